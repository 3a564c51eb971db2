"""docs/grading.md's fragments: what each seeded bug loses, and how long a grading takes, from
`python bench/autograder.py`'s records in results/reference/grading/.
"""
import re
import sys

from .readme import host_of
from .records import ROOT
from .wording import wrap

if ROOT not in sys.path:  # the grader names its checks: grading/grade.py
    sys.path.insert(0, ROOT)
from grading.grade import heading  # noqa: E402

QUESTIONS = ("Q2", "Q3", "Q4", "Q5", "Q7")  # the graded ones


def fragments(R):
    """{name: text} of the fragments docs/grading.md marks."""
    g = R["grading"]
    if not g:
        missing = "No run of `python bench/autograder.py` yet."
        return {"grading-mutants": missing, "grading-time": missing,
                "grading-ubuntu": wrap(ubuntu_try(R["grading_ubuntu"]))}
    return {"grading-mutants": mutant_table(g), "grading-time": wrap(wall_time(g)),
            "grading-ubuntu": wrap(ubuntu_try(R["grading_ubuntu"]))}


def checks(record):
    """{check: (question, score, max_score, seconds)} of one grading."""
    out = {}
    for t in record["tests"]:
        question, name = heading(t)
        seconds = re.search(r"\((\d+) s\)$", t["output"])
        out[name] = (question, t["score"], t["max_score"], int(seconds.group(1)) if seconds else None)
    return out


def mutant_table(g):
    """One row per seeded bug: the file, the bug, the points lost by question, the checks failed."""
    rows = ["| mutant (file) | the bug | " + " | ".join(QUESTIONS) + " | checks it fails (points kept) |",
            "|---|---|" + "---|" * len(QUESTIONS) + "---|"]
    for r in (r for r in g.values() if "mutant" in r):
        m, by_check = r["mutant"], checks(r)
        lost = {q: sum(top - got for qq, got, top, _ in by_check.values() if qq == q) for q in QUESTIONS}
        failed = [f"`{name}` ({got:g} of {top:g})" for name, (_, got, top, _) in by_check.items()
                  if got < top]
        rows.append(f"| {m['label']} (`{m['file']}`) | {m['bug']} | "
                    + " | ".join(f"{lost[q]:.1f}" if lost[q] else "0" for q in QUESTIONS)
                    + f" | {', '.join(failed)} |")
    return "\n".join(rows)


def wall_time(g):
    """How long grading the solution, the handout and the mutants took, on which host, with how
    much memory, and which of the solution's checks take longest."""
    solution, handout = g["solution"], g["handout"]
    records, mutants = list(g.values()), [r["provenance"]["seconds"] for r in g.values() if "mutant" in r]
    commits = sorted({r["provenance"]["commit"][:10] + (" with uncommitted changes" if r["provenance"]["dirty"]
                                                        else "") for r in records})
    slowest = sorted(checks(solution).items(), key=lambda item: -(item[1][3] or 0))[:3]
    handout_note = ": every graded check fails at its TODO" if not handout["score"] else ""
    return " ".join([
        f"Grading the solution took **{solution['provenance']['seconds']:.0f} s** of wall time "
        f"({solution['score']:g} points), the handout {handout['provenance']['seconds']:.0f} s "
        f"({handout['score']:g} points{handout_note}), and each seeded bug "
        f"{min(mutants):.0f}–{max(mutants):.0f} s: one `python grading/grade.py` each, measured whole by "
        f"`python bench/autograder.py` at commit {', '.join(commits)} on {host_of(records)}"
        + ("; other heavy processes shared the machine, so these times are not this host's (contended)."
           if any(r["provenance"]["contended"] for r in records) else ", with the machine to itself."),
        f"Grading the solution, its processes held at most {solution['provenance']['peak_pss_mb']:,} MB "
        f"together, and at most {max(r['provenance']['peak_pss_mb'] for r in records):,} MB in any of these "
        "gradings (their proportional set size, sampled every 0.5 s).",
        "A check's 2 to 5 ranks share the host's cores, so a host with more cores grades faster.",
        "The solution's longest checks: " + ", ".join(f"`{name}` {s} s" for name, (_, _, _, s) in slowest) + ".",
        "The records are in [`results/reference/grading/`](../results/reference/grading/)."])


def ubuntu_try(tried):
    """What grading/try_zip.sh's runs in a fresh Ubuntu 22.04 gave: the environment setup.sh
    built (grade.py's second line of output), and each submission's score."""
    if not tried:
        return "It has not been tried here yet."
    line = next(iter(tried.values()))["output"].splitlines()[-1].strip("()").removeprefix("on ")
    built, _, zip_of = line.partition("; the autograder of ")
    scores = " and ".join(f"the {name} {r['score']:g} points"
                          for name, r in sorted(tried.items(), key=lambda item: -item[1]["score"]))
    return (f"Tried here, on Linux x86-64" + (f", with the zip of {zip_of}" if zip_of else "")
            + f": setup.sh built {built}, and run_autograder gave {scores}. Their results.json are in "
            "[`results/reference/grading/ubuntu-22.04/`](../results/reference/grading/ubuntu-22.04/). "
            "Not tried on Gradescope's own servers.")
