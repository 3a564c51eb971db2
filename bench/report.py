"""Every measured number in README.md, docs/, HW5.ipynb and bench/RESULTS.md, from the committed records.

    python bench/report.py           # rewrite them from results/reference/
    python bench/report.py --check   # exit 1 with a diff when any of them differs from the records

The records are the JSON of the reference run (`python bench/reference.py`), committed in
results/reference/: the seed runs of the headline commands in runs/; a full run of HW5.ipynb, whose
scripts' records (cent_sgd.json, ..., allreduce_n4.json) and notebook.json are in notebook/; and
`python bench/run.py`'s in bench/ (run.json holds what its parts' JSON does not: date, machine,
versions, commands). bench/RESULTS.md is generated whole, by reports.results_md.render_results,
which bench/run.py also calls. In README.md, docs/*.md and the notebook's markdown cells each
generated fragment sits between two invisible markers,

    <!-- begin: NAME --> ... <!-- end: NAME -->

and only the text between them is rewritten. Each document's text is its own module in
bench/reports/; this one reads the pages, fills them and writes or diffs them. It needs neither
torch nor MPI.
"""
import argparse
import difflib
import os
import sys

from reports import docs_fedavg, docs_grading, docs_performance, notebook, readme  # bench/ is on sys.path
from reports.fragments import fill, missing
from reports.records import ROOT, records, smoke_test_records
from reports.results_md import RESULTS_MD, render_results
from reports.wording import shown_path

RECORDS = os.path.join(ROOT, "results", "reference")
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")  # the topic pages: a README fragment may sit in any of them
NOTEBOOK = os.path.join(ROOT, "HW5.ipynb")


def generated(folder):
    """{path: (current text, text generated from the records)} for README.md, docs/*.md, HW5.ipynb, RESULTS.md."""
    R = records(folder)
    smoke = smoke_test_records(folder)
    if smoke:
        raise SystemExit(f"error: {', '.join(smoke)} in {shown_path(folder)} are smoke-test (--tiny) records: "
                         "the numbers of a few steps are no measurement. Rerun: python bench/reference.py")
    out = markdown_texts(R)
    with open(NOTEBOOK) as f:
        current = f.read()
    out[NOTEBOOK] = (current, notebook.render(current, R))
    with open(RESULTS_MD) as f:
        out[RESULTS_MD] = (f.read(), render_results(os.path.join(folder, "bench"), os.path.dirname(RESULTS_MD)))
    return out


def markdown_texts(R):
    """{path: (current text, generated text)} of README.md and docs/*.md, which share one set of fragments:
    a fragment may move from one page to another without a change here."""
    fragments = {**readme.fragments(R), **docs_performance.fragments(R), **docs_fedavg.fragments(R),
                 **docs_grading.fragments(R)}
    out, found = {}, []
    for path in markdown_pages():
        with open(path) as f:
            current = f.read()
        text, names = fill(current, fragments, os.path.relpath(path, ROOT))
        found += names
        out[path] = (current, text)
    missing(fragments, found, "README.md and docs/")
    return out


def markdown_pages():
    """README.md and the topic pages of docs/, where the README's fragments live."""
    pages = sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md")) if os.path.isdir(DOCS) else []
    return [README, *pages]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 with a diff if any file differs")
    parser.add_argument("--records", default=RECORDS, help="the reference run's records (default: %(default)s)")
    args = parser.parse_args()
    stale = []
    for path, (current, text) in generated(args.records).items():
        if current == text:
            continue
        stale.append(os.path.relpath(path, ROOT))
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                       f"{stale[-1]} (committed)", f"{stale[-1]} (from the records)"))
        else:
            with open(path, "w") as f:
                f.write(text)
    if args.check and stale:
        print(f"\n{', '.join(stale)} differ from the records in {shown_path(args.records)}: "
              "run `python bench/report.py`", file=sys.stderr)
        sys.exit(1)
    print(f"{'stale' if args.check else 'rewrote'}: {', '.join(stale)}" if stale else "all generated numbers "
          "equal the records")


if __name__ == "__main__":
    main()
