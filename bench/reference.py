"""The reference run: every record that README.md, HW5.ipynb and bench/RESULTS.md quote, by one command.

    python bench/reference.py                    # all of it; resumable: what is done for this code is kept
    python bench/reference.py --list             # the jobs, and which are done
    python bench/reference.py --only non-iid     # only the jobs whose name contains this
    python bench/reference.py --allow-contended  # run beside other heavy processes; the records say so

The jobs, in this order:
  - the five headline runs (Q1 to Q5) at their defaults, seeds 0, 1 and 2, into
    results/reference/runs/<name>_seed<k>.json;
  - the full benchmark, `python bench/run.py`, into results/reference/bench/ (it times the all-reduces
    of Q7 at N = 2 and 4, from 1 KB to 16 MB, too);
  - the autograder on the solution, the handout and each seeded bug, `python bench/autograder.py`,
    into results/reference/grading/;
  - the notebook, top to bottom, its scripts' records into results/reference/notebook/.
A job whose record exists is skipped when that record is still valid: for a script run, when its
stored fingerprint (bench/fingerprint.py) equals the one computed at this code; for the bench, when
this command made it; for the autograder, when each grading has its record; for the notebook, when
this command made it and the script records it wrote pass the same check as a script run's. So
the run can span sittings: stop it, run the same line later.

Every record it makes gets a `provenance` entry: the commit, the host (CPU model and family, cores,
and a calibration: a fixed matmul's GFLOP/s), the load average before and after, and the other
processes that used a core meanwhile. Timings taken beside other heavy processes are not
measurements of this code, so it refuses to start a job while any runs (it names them), unless
--allow-contended, and then marks the record contended.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import fingerprint  # noqa: E402  (bench/ is on sys.path)
from grading import package  # noqa: E402
import utils  # noqa: E402
from run import MPIRUN  # noqa: E402

RECORDS = os.path.join(ROOT, "results", "reference")
SEEDS = (0, 1, 2)
# name: (question, ranks or None for one process, script, flags): the assignment's commands
HEADLINE = {
    "cent_sgd": ("Q1", None, "cent_sgd.py", []),
    "dist_sgd_serverless": ("Q2", 4, "dist_sgd_serverless.py", []),
    "dist_sgd_param_server": ("Q3", 5, "dist_sgd_param_server.py", []),
    "fed_avg_iid": ("Q4", 5, "fed_avg.py", []),
    "fed_avg_non-iid": ("Q5", 5, "fed_avg.py", ["--split-method", "non-iid"]),
}
MINUTES = {"cent_sgd": 5, "dist_sgd_serverless": 5, "dist_sgd_param_server": 6, "fed_avg_iid": 6,
           "fed_avg_non-iid": 6, "bench": 12, "autograder": 15, "notebook": 60}  # a guess, until a job of the kind has run
HEAVY = 0.25  # share of one core over a second that makes another process "heavy"


# ----- the host: what it is, how fast, and who else is on it -----

def host():
    """utils.hardware() (CPU model, cores), the CPU's family and model numbers, and a calibration:
    GFLOP/s of a fixed float32 matmul, on one thread and on all cores, best of a few seconds each.
    Hosts of the same CPU name differ."""
    info = {**utils.hardware(), "cpu_family": None, "cpu_model": None}
    try:
        with open("/proc/cpuinfo") as f:
            fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        info.update(cpu_family=fields.get("cpu family"), cpu_model=fields.get("model"))
    except OSError:
        pass
    saved = torch.get_num_threads()
    for threads in (1, os.cpu_count()):
        torch.set_num_threads(threads)
        info[f"matmul_gflops_{'1_thread' if threads == 1 else 'all_cores'}"] = round(matmul_gflops(), 1)
    torch.set_num_threads(saved)
    return info


def matmul_gflops(n=1024, seconds=1.5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def cpu_times():
    """{pid: (command, CPU seconds so far)} of every process."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[int(pid)] = (command[:120], (int(fields[11]) + int(fields[12])) / tick)
    return out


def heavy_processes(seconds=1.0):
    """Other processes that used more than HEAVY of a core over `seconds`: ["pid command (share)"]."""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    mine = os.getpid()
    return [f"{pid} {cmd} ({(t - before[pid][1]) / seconds:.0%})" for pid, (cmd, t) in sorted(after.items())
            if pid != mine and pid in before and (t - before[pid][1]) / seconds > HEAVY]


def commit():
    return package.commit(ROOT)


# ----- the jobs -----

def jobs():
    """[(name, kind, record path, command, env)] in the order they run."""
    out = []
    for seed in SEEDS:
        for name, (_, n, script, flags) in HEADLINE.items():
            path = os.path.join(RECORDS, "runs", f"{name}_seed{seed}.json")
            cmd = [sys.executable, script, *flags, "--seed", str(seed), "--results", path]
            if script == "fed_avg.py":
                cmd += ["--figures-dir", os.path.join(ROOT, "results", "figures") + os.sep]
            if n:
                cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(n), *cmd]
            out.append((f"{name} seed {seed}", name, path, cmd, {}))
    out.append(("bench", "bench", os.path.join(RECORDS, "bench", "run.json"),
                [sys.executable, os.path.join("bench", "run.py")], {}))
    out.append(("autograder", "autograder", os.path.join(RECORDS, "grading", "run.json"),
                [sys.executable, os.path.join("bench", "autograder.py")], {}))
    notebook = os.path.join("results", "reference", "notebook")  # HW5_RESULTS: where its scripts write
    out.append(("notebook", "notebook", os.path.join(ROOT, notebook, "notebook.json"),
                [sys.executable, "-m", "jupyter", "execute", "HW5.ipynb", "--inplace"], {"HW5_RESULTS": notebook}))
    return out


def script_records(kind, path):
    """The script records that the job's record at `path` stands for, each with a fingerprint: the
    run's own, or for the notebook those its scripts wrote beside notebook.json."""
    if kind in HEADLINE:
        return [path]
    if kind == "notebook":
        folder = os.path.dirname(path)
        return [p for p in (os.path.join(folder, f"{name}.json") for name in HEADLINE) if os.path.exists(p)]
    return []


def done(kind, path):
    """Whether the record at `path` is still valid for this code (see the docstring)."""
    if kind == "autograder":  # it keeps a record of its own per grading
        import autograder
        return autograder.complete()
    if not os.path.exists(path):
        return False
    with open(path) as f:
        record = json.load(f)
    if record.get("tiny") or "provenance" not in record:
        return False
    return all(fingerprint.check(p)[0] for p in script_records(kind, path))


def stamp(path, provenance, kind):
    """Add the provenance to the record at `path`, and a fingerprint to each script record it stands for."""
    for p in script_records(kind, path):
        with open(p) as f:
            record = json.load(f)
        record["fingerprint"] = fingerprint.replay(record)
        with open(p, "w") as f:
            json.dump(record, f, indent=1)
    with open(path) as f:
        record = json.load(f)
    record["provenance"] = provenance
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def run_job(name, kind, path, cmd, env, allow_contended):
    others = heavy_processes()
    if others and not allow_contended:
        raise SystemExit(f"error: other heavy processes are running, and timings beside them are not "
                         f"measurements: {'; '.join(others)}. Wait for them, or pass --allow-contended")
    provenance = dict(commit(), host=host(), load_before=os.getloadavg(), heavy_before=others,
                      command=" ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd))
    if kind == "autograder" and allow_contended:  # it checks the load before each grading
        cmd = [*cmd, "--allow-contended"]
    t0 = time.time()
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(clean, PYTHONUNBUFFERED="1", OMPI_MCA_btl=os.environ.get(
        "OMPI_MCA_btl", "^ofi"), **env))
    if proc.returncode != 0:
        raise SystemExit(f"error: {name} failed (exit {proc.returncode}): {provenance['command']}")
    provenance.update(seconds=round(time.time() - t0, 1), load_after=os.getloadavg(), heavy_after=heavy_processes())
    provenance["contended"] = bool(provenance["heavy_before"] or provenance["heavy_after"])
    stamp(path, provenance, kind)
    return provenance["seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="run only the jobs whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the jobs and whether each is done; run nothing")
    parser.add_argument("--allow-contended", action="store_true",
                        help="run even while other heavy processes do; the records say contended: true")
    args = parser.parse_args()
    todo = [j for j in jobs() if not args.only or args.only in j[0]]
    if not todo:
        raise SystemExit(f"error: no job's name contains {args.only!r}; see --list")
    print(f"checking which of the {len(todo)} jobs are done (a fingerprint replay each)...", flush=True)
    pending = [j for j in todo if not done(j[1], j[2])]
    if args.list:
        for j in todo:
            print(f"  {'todo' if j in pending else 'done'}  {j[0]}  ({os.path.relpath(j[2], ROOT)})")
        return
    seconds = {}  # measured job times per kind, for the estimate
    t_start = time.time()
    for k, job in enumerate(pending, 1):
        left = sum(sum(seconds.get(j[1], [])) / len(seconds[j[1]]) if j[1] in seconds else 60 * MINUTES[j[1]]
                   for j in pending[k - 1:])
        print(f"[{k}/{len(pending)}] {job[0]} | {(time.time() - t_start) / 60:.0f} min so far, about "
              f"{left / 60:.0f} min left", flush=True)
        seconds.setdefault(job[1], []).append(run_job(*job, args.allow_contended))
    print(f"done: {len(pending)} jobs in {(time.time() - t_start) / 60:.1f} min; {len(todo) - len(pending)} "
          f"were already done", flush=True)


if __name__ == "__main__":
    main()
