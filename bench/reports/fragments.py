"""The marked fragments of a page, <!-- begin: NAME --> ... <!-- end: NAME -->: only the text between
the two markers is generated, the hand-written text around them is left as it is.
"""
import re

FRAGMENT = re.compile(r"<!-- begin: (?P<name>[\w-]+) -->(?P<body>.*?)<!-- end: (?P=name) -->", re.S)


def fill(text, fragments, where):
    """text with the body of every marked fragment replaced; (new text, names found)."""
    found = []

    def body(m):
        name = m["name"]
        if name not in fragments:
            raise SystemExit(f"error: {where} marks a fragment {name!r} that bench/report.py does not generate")
        found.append(name)
        new = fragments[name]
        if m["body"].startswith("\n"):  # a block: markers on lines of their own
            new = f"\n{new}\n"
        elif m.start() == 0 or text[m.start() - 1] == "\n":  # markdown would show the line as raw HTML
            raise SystemExit(f"error: {where}: the inline fragment {name!r} starts a line; put a word before it")
        return f"<!-- begin: {name} -->{new}<!-- end: {name} -->"

    return FRAGMENT.sub(body, text), found


def missing(fragments, found, where):
    lost = sorted(set(fragments) - set(found))
    twice = sorted({n for n in found if found.count(n) > 1})
    if lost or twice:
        raise SystemExit(f"error: {where}: fragment markers missing for {lost}, repeated for {twice}")
