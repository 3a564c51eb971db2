"""Grade a submission of HW5: run the graded checks (grading/checks.py), write a Gradescope
results.json, print a table.

    python grading/grade.py SUBMISSION_DIR                        # results.json in SUBMISSION_DIR
    python grading/grade.py SUBMISSION_DIR --results PATH
    python grading/grade.py SUBMISSION_DIR --only ring_allreduce,tree_allreduce --timeout 30

SUBMISSION_DIR holds the students' files, the four scripts and utils.py (anywhere below it: the
first folder that holds one of them is taken). They are graded in a scratch copy of the support
folder (--support; default: the folder above grading/, which in the autograder holds the
handout; in the repo, the handout is written from the solution first), so that a file the
submission lacks comes from there, as does extensions/ (the handout's stub). Each check has a deadline (its timeout in checks.py, at
most --timeout): a hang or a crash scores 0 on that check and grading goes on.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from grading import checks, handout  # noqa: E402
from grading.handout import CODE  # noqa: E402


def read_table(path):
    """{question: {check: points}} from the TOML table; without tomllib (Python < 3.11, as in
    Gradescope's Ubuntu 22.04 image), its simple form of [sections] and `name = number` lines."""
    try:
        import tomllib
    except ModuleNotFoundError:
        table, section = {}, None
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line.startswith("["):
                    section = table.setdefault(line.strip("[]").strip(), {})
                elif line:
                    name, value = (part.strip() for part in line.split("=", 1))
                    section[name] = float(value) if "." in value else int(value)
        return table
    with open(path, "rb") as f:
        return tomllib.load(f)


def load_points(path):
    """{check name: points} from the table, which must name every check once."""
    table = read_table(path)
    points = {name: value for question in table.values() for name, value in question.items()}
    known = {c.name: c.question for c in checks.CHECKS}
    unknown = sorted(set(points) - set(known))
    missing = sorted(set(known) - set(points))
    wrong = [n for q, names in table.items() for n in names if n in known and known[n] != q]
    if unknown or missing or wrong:
        sys.exit(f"error: {path}: unknown checks {unknown}, checks without points {missing}, "
                 f"checks under another question {wrong}")
    return points


def find_submission(folder):
    """The first folder at or below `folder` that holds one of the students' files, or None."""
    for here, dirs, files in sorted(os.walk(folder)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        if set(CODE) & set(files):
            return here
    return None


def workspace(submission, support, scratch):
    """scratch/submission: the support's code and its extensions/ stub, then the submission's
    files over them. When `support` holds the real extensions/ (this repo), the handout's code is
    written into scratch/support first, so that a submission is graded with the stub it was
    given. Returns (that folder, the names taken from the submission)."""
    if not handout.is_stub(support):
        support = os.path.join(scratch, "support")
        handout.write_code(support)
    work = os.path.join(scratch, "submission")
    os.makedirs(work)
    for name in CODE:
        shutil.copy(os.path.join(support, name), work)
    shutil.copytree(os.path.join(support, "extensions"), os.path.join(work, "extensions"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    found = find_submission(submission)
    taken = [name for name in CODE if found and os.path.isfile(os.path.join(found, name))]
    for name in taken:
        shutil.copy(os.path.join(found, name), work)
    return work, taken


def run_check(check, ctx, timeout):
    """[(passed, line)] of one check, under its deadline; a hang or an error fails it."""
    ctx.start(min(check.timeout, timeout))
    try:
        cases = check.run(ctx)
    except checks.Timeout as e:
        cases = [(False, str(e))]
    except Exception as e:  # a broken submission may break a check anywhere: it fails, alone
        cases = [(False, f"{type(e).__name__}: {e}")]
    return cases or [(False, "no cases ran")]


def heading(test):
    """(question, check name) of one of score()'s entries, from its name "Qk check: what"."""
    question, name = test["name"].split(":")[0].split()
    return question, name


def score(check, ctx, points, timeout=600):
    """Gradescope's entry for one check: its points times the fraction of its cases that pass,
    and a line per case."""
    started = time.monotonic()
    cases = run_check(check, ctx, timeout)
    passed = sum(ok for ok, _ in cases)
    lines = [("ok   " if ok else "FAIL ") + line for ok, line in cases]
    return dict(name=f"{check.question} {check.name}: {check.what}",
                score=round(points * passed / len(cases), 2), max_score=points,
                visibility="visible",
                output="\n".join(lines) + f"\n({time.monotonic() - started:.0f} s)")


def grade(submission, results_path, points, only=None, timeout=600, support=None):
    """Grade `submission`; write results.json to `results_path`; return the results dict."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hw5-grade-") as scratch:
        work, taken = workspace(submission, support or checks.ROOT, scratch)
        ctx = checks.Context(work, scratch)
        tests = [score(check, ctx, points[check.name], timeout) for check in checks.CHECKS
                 if taken and (not only or check.name in only)]
    output = (f"graded {', '.join(taken)} from the submission" if taken else
              f"found none of {', '.join(CODE)} in the submission: upload those files")
    output += f"\n(on {environment()})"
    result = dict(score=round(sum(t["score"] for t in tests), 2),
                  execution_time=round(time.monotonic() - t0), output=output, tests=tests)
    os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
    with open(results_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def environment():
    """'Python X, torch Y, Open MPI Z': what the checks ran on, for the results' first lines."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "none"
    try:
        mpirun = subprocess.run(["mpirun", "--version"], capture_output=True, text=True,
                                timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        mpirun = "no mpirun"
    made = os.path.join(HERE, "VERSION")  # in the autograder zip: the commit it was made from
    if os.path.exists(made):
        with open(made) as f:
            mpirun += f"; the autograder of commit {f.read().strip()}"
    return f"Python {platform.python_version()}, torch {torch}, {mpirun}"


def print_table(result):
    print(result["output"])
    width = max([len(" ".join(heading(t))) for t in result["tests"]] + [5])
    for t in result["tests"]:
        print(f"{' '.join(heading(t)):<{width}}  {t['score']:6.2f} / {t['max_score']:<3}")
        for line in t["output"].splitlines():
            if line.startswith("FAIL"):
                print(f"{'':<{width}}    {line}")
    total = sum(t["max_score"] for t in result["tests"])
    print(f"{'total':<{width}}  {result['score']:6.2f} / {total}   "
          f"({result['execution_time']} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("submission", help="the folder of the submission")
    parser.add_argument("--results", default=None,
                        help="where results.json goes (default: SUBMISSION/results.json)")
    parser.add_argument("--points", default=os.path.join(HERE, "points.toml"),
                        help="the points table (default: grading/points.toml)")
    parser.add_argument("--support", default=None,
                        help="where extensions/ and missing files come from (default: the "
                             "folder above grading/)")
    parser.add_argument("--only", default=None, help="comma-separated check names to run")
    parser.add_argument("--timeout", type=float, default=600,
                        help="at most this many seconds per check (default: each check's own)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    points = load_points(args.points)
    results_path = args.results or os.path.join(args.submission, "results.json")
    print_table(grade(args.submission, results_path, points, only, args.timeout, args.support))


if __name__ == "__main__":
    main()
