"""The autograder's own numbers: what it scores, and how long one grading takes.

    python bench/autograder.py                    # into results/reference/grading/; resumable
    python bench/autograder.py --allow-contended  # beside other heavy processes; records say so

It grades the solution (this repo), the handout (grading/handout.py) and each seeded bug of
grading/mutants.py, each with one `python grading/grade.py FOLDER --results RECORD`, timed whole:
the wall time one submission costs on this host (a check's 2 to 5 ranks share the host's cores,
so a host with more cores grades faster), and the peak memory of its processes together. The record is grade.py's results.json with the host's
calibration, the load and the commit (bench/reference.py's provenance) and, for a mutant, which
bug it is. A record that exists is kept, so the run can span sittings. docs/grading.md quotes the
records (bench/report.py), and tests/test_grading.py checks that the mutants still lose what they
say. bench/reference.py runs this as one of its jobs.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grading import handout, mutants  # noqa: E402
from reference import RECORDS, commit, heavy_processes, host  # noqa: E402  (bench/ is on sys.path)

FOLDER = os.path.join(RECORDS, "grading")
SUMMARY = os.path.join(FOLDER, "run.json")  # written when every grading is done


def gradings():
    """[(record name, make(scratch) -> the folder to grade, what the record adds)], in order."""
    out = [("solution", lambda scratch: ROOT, {"graded": "this repo's scripts"}),
           ("handout", write_handout, {"graded": "python grading/handout.py's scripts"})]
    for m in mutants.MUTANTS:
        about = {"label": m.label, "question": m.question, "file": m.file, "bug": m.bug}
        out.append((f"mutant_{slug(m.label)}",
                    lambda scratch, m=m: mutants.write(m, os.path.join(scratch, "mutant")),
                    {"graded": "a copy of this repo's scripts with the mutant", "mutant": about}))
    return out


def slug(label):
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def write_handout(scratch):
    folder = os.path.join(scratch, "handout")
    handout.write_handout(folder)
    return folder


def done(name):
    path = os.path.join(FOLDER, f"{name}.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return "provenance" in json.load(f)


def complete():
    """Whether every grading has its record, and the summary names them all."""
    if not os.path.exists(SUMMARY):
        return False
    with open(SUMMARY) as f:
        names = json.load(f)["gradings"]
    return names == [name for name, _, _ in gradings()] and all(map(done, names))


def grade(name, folder, about, allow_contended):
    """Grade `folder` into its record, timed whole; add the provenance and `about`."""
    others = heavy_processes()
    if others and not allow_contended:
        raise SystemExit(f"error: other heavy processes are running, and timings beside them are "
                         f"not measurements: {'; '.join(others)}. Wait, or pass --allow-contended")
    path = os.path.join(FOLDER, f"{name}.json")
    provenance = dict(commit(), host=host(), load_before=os.getloadavg(), heavy_before=others,
                      command=f"python grading/grade.py FOLDER --results "
                              f"{os.path.relpath(path, ROOT)}")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, os.path.join("grading", "grade.py"), folder,
                             "--results", path], cwd=ROOT)
    peak = peak_memory_mb(proc)
    if proc.returncode:
        raise SystemExit(f"error: grading {name} failed (exit {proc.returncode})")
    provenance.update(seconds=round(time.time() - t0, 1), peak_pss_mb=round(peak),
                      load_after=os.getloadavg(), heavy_after=heavy_processes())
    provenance["contended"] = bool(provenance["heavy_before"] or provenance["heavy_after"])
    with open(path) as f:
        record = json.load(f)
    record.update(about, provenance=provenance)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def peak_memory_mb(proc, every=0.5):
    """Wait for `proc`, sampling the proportional set size (PSS) of it and all its descendants
    together; return the peak in MB. PSS shares a page among the processes that map it, so the
    sum is what they hold together, torch's libraries counted once."""
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, sum(map(pss_mb, descendants(proc.pid))))
        time.sleep(every)
    return peak


def descendants(pid):
    """`pid` and every process below it, from /proc."""
    children = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def pss_mb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-contended", action="store_true",
                        help="run even while other heavy processes do; the records say so")
    args = parser.parse_args()
    os.makedirs(FOLDER, exist_ok=True)
    todo = [g for g in gradings() if not done(g[0])]
    for k, (name, make, about) in enumerate(todo, 1):
        print(f"[{k}/{len(todo)}] grading {name}", flush=True)
        with tempfile.TemporaryDirectory(prefix="hw5-autograder-") as scratch:
            record = grade(name, make(scratch), about, args.allow_contended)
        print(f"  {record['score']:g} points in {record['provenance']['seconds']:.0f} s", flush=True)
    with open(SUMMARY, "w") as f:
        json.dump({"gradings": [name for name, _, _ in gradings()]}, f, indent=1)
    print(f"done: {len(todo)} gradings; {len(gradings()) - len(todo)} were already recorded")


if __name__ == "__main__":
    main()
