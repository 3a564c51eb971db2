"""The benchmark: the scripts against PyTorch DDP and MPI itself, in one run on one machine.

    python bench/run.py                      # full, minutes (target: <= 15): bench/RESULTS.md, figures/bench_*.png
    python bench/run.py --tiny --out /tmp/b  # smoke test, < 1 min: synthetic, few steps, 2 ranks; only into /tmp/b

It runs each part as its own mpirun job (--allow-run-as-root --oversubscribe, the mpirun
next to this Python if there is one), one after another, reads the JSON each one writes,
and writes RESULTS.md: the machine, the versions, the data, every command, the tables, and
the targets, each with its measured value and whether it was met.
  1. dist_sgd_serverless.py's step against DistributedDataParallel (gloo), N = 2 and 4,
     and variants of the step (bench/ddp.py)
  2. ring and tree against MPI_Allreduce, with a memcpy reference (bench/allreduce.py)
  3. one epoch of each script; the serverless step split into compute and communication
  4. the gradient all-reduce pickled (lowercase) and as a buffer (bench/pickle_vs_buffer.py)
Raw JSON goes to results/bench/ (with --tiny, to --out). Run it on an otherwise idle machine:
the parts take turns on all cores, and anything else running shows up in the numbers.
"""
import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from importlib.metadata import version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the script lives in bench/, but imports utils from the repo root

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils  # noqa: E402

MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun") or "mpirun"
COMMANDS = []  # every command run, for RESULTS.md
OVERLAP_WINS = 1.03  # a gain below this is within the run-to-run noise of this machine


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
    COMMANDS.append(f"{shown}  # {time.perf_counter() - t0:.1f} s")


def mpirun(n, script, *args, env=None):
    run([MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", n, sys.executable, script, *args], env)


def load(path):
    with open(path) as f:
        return json.load(f)


def free_port():
    """A TCP port free right now, for the gloo rendezvous of one job."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def epoch_row(r):
    """One script's first epoch (FedAvg: round) from its results JSON, in the same terms for all."""
    h = r["history"][0]
    if r["script"] == "fed_avg":  # clients train, then send: the round's times do not overlap
        steps, compute, comm, wait = max(r["local_steps"]), h["train_time"], h["comm_time"], 0.0
        epoch = h["round_time"] + h["eval_time"]
    else:  # comm_time (and serverless' wait_time for the last rank) lie inside train_time
        steps, comm, wait, epoch = h["steps"], h.get("comm_time", 0.0), h.get("wait_time", 0.0), h["epoch_time"]
        compute = h["train_time"] - comm - wait
    return {"ranks": r["world_size"], "threads": r["threads"], "steps": steps, "epoch_s": epoch,
            "compute_s": compute, "comm_s": comm, "wait_s": wait, "step_ms": 1e3 * (compute + comm + wait) / steps}


def no_progress_thread():
    """True if ompi_info says this Open MPI runs no asynchronous progress thread."""
    info = shutil.which("ompi_info", path=os.path.dirname(MPIRUN))
    out = subprocess.run([info], capture_output=True, text=True).stdout if info else ""
    return "OMPI progress: no" in out


def verdict(value, limit, rule):
    if value is None:
        return "not measured"
    return "**met**" if (value >= limit if rule.startswith(">=") else value <= limit) else "**missed**"


def fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="smoke test: synthetic data, a few steps")
    parser.add_argument("--out", default=None, help="where RESULTS.md, plots and JSON go (required with --tiny)")
    args = parser.parse_args()
    if args.tiny and not args.out:
        parser.error("--tiny writes only into --out DIR; give one")
    t_start = time.perf_counter()
    md_dir = os.path.abspath(args.out or os.path.join(ROOT, "bench"))
    fig_dir = os.path.abspath(args.out or os.path.join(ROOT, "figures"))
    raw = os.path.abspath(args.out or os.path.join(ROOT, "results", "bench"))
    for d in (md_dir, fig_dir, raw):
        os.makedirs(d, exist_ok=True)
    cifar = not args.tiny and os.path.isdir(os.path.join(ROOT, "data", "cifar-10-batches-py"))
    data = ["--dataset", "cifar10" if cifar else "synthetic"]
    few = ["--max-steps", 2] if args.tiny else []
    # --tiny runs every part, with as few ranks as it can: each rank takes seconds to start
    ns, ps_ns, fed_n = ((2,), (2,), 2) if args.tiny else ((2, 4), (3, 5), 5)

    # 1. serverless step against DDP, and the step's variants
    ddp = {}
    for n in ns:
        out = os.path.join(raw, f"ddp_n{n}.json")
        timing = (["--batch-size", 16, "--warmup", 1, "--steps", 1, "--blocks", 1] if args.tiny
                  else ["--warmup", 5, "--steps", 20, "--blocks", 8])
        mpirun(n, "bench/ddp.py", *data, *timing, "--port", free_port(), "--out", out)
        ddp[n] = load(out)

    # 2. collectives against MPI_Allreduce
    ar = {}
    for n in ns:
        sizes = ["--max-bytes", 16 << 10, "--repeats", 2] if args.tiny else []
        mpirun(n, "bench/allreduce.py", *sizes, "--results-dir", raw, "--figures-dir", raw)
        ar[n] = load(os.path.join(raw, f"allreduce_n{n}.json"))

    # 3. one epoch of each script (FedAvg: one round, in which every client makes one pass)
    # (centralized at batch 128 has the global batch of serverless N=2 at 64 per rank)
    runs = {} if args.tiny else {"centralized, batch 64": ("cent_sgd.py", 1, ["--batch-size", 64])}
    runs["centralized, batch 128"] = ("cent_sgd.py", 1, ["--batch-size", 128])
    runs.update({f"serverless N={n}": ("dist_sgd_serverless.py", n, []) for n in ns})
    runs.update({f"parameter server N={n}": ("dist_sgd_param_server.py", n, []) for n in ps_ns})
    runs[f"FedAvg N={fed_n}"] = ("fed_avg.py", fed_n, ["--rounds", 1, "--figures-dir", raw])
    epochs = {}
    for i, (label, (script, n, extra)) in enumerate(runs.items()):
        out = os.path.join(raw, f"epoch_{i}.json")
        once = [] if script == "fed_avg.py" else ["--epochs", 1]
        cmd = [script, *data, *once, *extra, *few, "--results", out]
        if script == "cent_sgd.py":  # one process on all cores: no mpirun
            run([sys.executable, *cmd])
        else:
            mpirun(n, *cmd)
        epochs[label] = epoch_row(load(out))

    # threads per rank: the same steps with utils.set_threads' cores/ranks, and with 2 per rank
    # (oversubscribed), what torch picks by itself; a fixed number of steps, as the latter is slow
    threads = {}
    for label, env in (("default", None), ("OMP_NUM_THREADS=2", {"OMP_NUM_THREADS": "2"})):
        out = os.path.join(raw, f"threads_{len(threads)}.json")
        mpirun(2, "dist_sgd_serverless.py", *data, "--epochs", 1, "--max-steps", 2 if args.tiny else 100,
               "--results", out, env=env)
        threads[label] = load(out)

    # 4. pickle against buffer
    pickled = {}
    for n in ns:
        out = os.path.join(raw, f"pickle_n{n}.json")
        mpirun(n, "bench/pickle_vs_buffer.py", "--repeats", 3 if args.tiny else 30, "--out", out)
        pickled[n] = load(out)

    # plots
    plots = {"allreduce": os.path.join(fig_dir, "bench_allreduce.png"),
             "paradigms": os.path.join(fig_dir, "bench_paradigms.png")}
    plot_allreduce(ar, plots["allreduce"])
    plot_paradigms(epochs, plots["paradigms"])

    # targets
    sv = {n: d["variants"] for n, d in ddp.items()}
    at_4mb = {n: next((row for row in ar[n]["rows"] if row["bytes"] == 4 << 20), None) if n in ar else None
              for n in (2, 4)}
    wall = time.perf_counter() - t_start
    # (target, measured, limit, the rule): the serverless/DDP ratio must reach its limit, the others stay under
    targets = [(f"serverless steps/s / DDP-gloo steps/s, N={n}",
                sv[n]["serverless"]["steps_per_s"] / sv[n]["ddp"]["steps_per_s"] if n in sv else None, 1.0, ">= 1.0x")
               for n in (2, 4)]
    targets += [(f"ring / MPI_Allreduce time at 4 MB, N={n}", row and row["ring_ms"] / row["mpi_ms"], 2.0, "<= 2x")
                for n, row in at_4mb.items()]
    targets += [("serverless N=2 epoch / centralized batch 128 epoch",
                 epochs["serverless N=2"]["epoch_s"] / epochs["centralized, batch 128"]["epoch_s"], 1.15, "<= 1.15x"),
                ("bench wall time, minutes (up to this table)", wall / 60, 15.0, "<= 15")]

    # RESULTS.md
    hw = utils.hardware()
    L = ["# Benchmark: the scripts against PyTorch DDP and MPI itself", ""]
    if args.tiny:
        L += ["**Tiny mode** (`--tiny`): a smoke test on synthetic data with a few steps, with 2 ranks. "
              "Its numbers show that the bench runs, not how fast anything is.", ""]
    dataset = ("CIFAR-10 from data/cifar-10-batches-py (50,000 train images)" if cifar
               else "synthetic (--dataset synthetic, 5,000 train images)")
    L += [f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S')}; the whole run took {wall / 60:.1f} min.",
          f"- Machine: {hw['cpu']}, {hw['cores']} CPU cores, GPU: {hw['gpu'] or 'none'}.",
          f"- Software: Python {sys.version.split()[0]}, torch {torch.__version__}, mpi4py {version('mpi4py')}, "
          f"{ar[2]['mpi'].split(',')[0]}, mpirun `{MPIRUN}`.",
          f"- Data: {dataset}.",
          "- Every part ran alone, one after another, in this one run; times are wall clock, "
          "and a step or call counts at the pace of the slowest rank.", "",
          "## Targets", "",
          "| target | measured | limit | result |", "|---|---|---|---|"]
    L += [f"| {what} | {fmt(v)} | {rule} | {verdict(v, limit, rule)} |" for what, v, limit, rule in targets]

    L += ["", "## 1. Serverless step against PyTorch DDP (gloo)", "",
          f"`bench/ddp.py`: the same model, per-rank batch {ddp[2]['batch_size']}, same data shares, "
          f"{ddp[2]['steps']} timed steps per variant in {ddp[2]['blocks']} interleaved blocks after warmup. "
          f"Equality: max |parameter difference| from the serverless step after {ddp[2]['check_steps']} "
          "steps of plain SGD from the same weights (limit 1e-5).", "",
          "| N | threads/rank | serverless steps/s | DDP steps/s | serverless / DDP | max abs diff: DDP | copy "
          "| overlap |", "|---|---|---|---|---|---|---|---|"]
    for n, d in ddp.items():
        v, diff = d["variants"], d["max_abs_diff"]
        L.append(f"| {n} | {d['threads']} | {v['serverless']['steps_per_s']:.2f} | {v['ddp']['steps_per_s']:.2f} | "
                 f"**{v['serverless']['steps_per_s'] / v['ddp']['steps_per_s']:.2f}x** | "
                 f"{diff['ddp']:.1e} | {diff['copy']:.1e} | {diff['overlap']:.1e} |")

    L += ["", "## 2. Hand-written collectives against MPI_Allreduce", "",
          "`bench/allreduce.py`: median of the slowest rank's time per call, in ms. `copy` is the "
          "physical reference: np.copyto of the buffer, timed on every rank in the same run, "
          "x 2(N-1)/N (a ring's traffic per rank at memcpy speed).", ""]
    for n, r in ar.items():
        L += [f"N = {n}:", "", "| size | mpi | ring | tree | copy | ring / mpi | mpi / copy |",
              "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            b = row["bytes"]
            size = f"{b >> 20} MB" if b >= 1 << 20 else f"{b >> 10} KB"
            L.append(f"| {size} | {row['mpi_ms']:.3f} | {row['ring_ms']:.3f} | {row['tree_ms']:.3f} | "
                     f"{row['copy_ms']:.3f} | {row['ring_ms'] / row['mpi_ms']:.2f} | "
                     f"{row['mpi_ms'] / row['copy_ms']:.1f} |")
        L.append("")
    L.append(f"![all-reduce time against size]({os.path.relpath(plots['allreduce'], md_dir)})")

    L += ["", "## 3. Paradigm cost", "",
          f"One epoch of each script (FedAvg: one round, in which each of its {fed_n - 1} client(s) makes one "
          "pass over its share), from the `history` of its results JSON. Epoch time includes evaluation. "
          "Compute is training time less communication and waiting. Serverless splits its time in the "
          "all-reduce into the call itself (the shortest time in it over ranks: the last rank to arrive "
          "waits for no one) and waiting for the last rank; for the parameter server and FedAvg, "
          "communication includes waiting for the server.", "",
          "| run | ranks | threads/rank | steps | epoch s | compute s | communication s | waiting s | ms per step |",
          "|---|---|---|---|---|---|---|---|---|"]
    for label, e in epochs.items():
        L.append(f"| {label} | {e['ranks']} | {e['threads']} | {e['steps']} | {e['epoch_s']:.2f} | "
                 f"{e['compute_s']:.2f} | {e['comm_s']:.2f} | {e['wait_s']:.2f} | {e['step_ms']:.1f} |")
    L += ["", f"![epoch time per paradigm]({os.path.relpath(plots['paradigms'], md_dir)})", "",
          "The serverless step, split (`bench/ddp.py`, same run as part 1). The time inside the all-reduce "
          "call (mean over ranks) includes waiting for the rank that finishes its backward last, which "
          "the time of the call alone (part 2) does not. What the all-reduce adds to the step is the "
          "exposed overhead: the step with it, less the step with it skipped (ranks uncoupled), interleaved.", "",
          "| N | step ms | in all-reduce ms | step without all-reduce ms | exposed overhead ms | of the step |",
          "|---|---|---|---|---|---|"]
    for n, v in sv.items():
        exposed = v["serverless"]["step_ms"] - v["skip"]["step_ms"]
        L.append(f"| {n} | {v['serverless']['step_ms']:.1f} | {v['serverless']['comm_ms']:.2f} | "
                 f"{v['skip']['step_ms']:.1f} | {exposed:.2f} | {100 * exposed / v['serverless']['step_ms']:.1f}% |")

    L += ["", "## 4. Pickle against buffer", "",
          "`bench/pickle_vs_buffer.py`: summing a gradient of the model's size "
          f"({pickled[2]['floats']:,} float32 in {pickled[2]['tensors']} tensors); median ms of the slowest "
          "rank.", "",
          "| N | " + " | ".join(f"`{w}`" for w in pickled[2]["median_ms"]) + " | slowdown of the pickled ways |",
          "|---|---|---|---|---|"]
    for n, p in pickled.items():
        ms = p["median_ms"]
        slow = ", ".join(f"{ms[w] / ms['Allreduce(buffer)']:.1f}x" for w in ms if w != "Allreduce(buffer)")
        L.append(f"| {n} | " + " | ".join(f"{t:.3f}" for t in ms.values()) + f" | {slow} |")

    L += ["", "## Optimizations and their measured gains", "",
          "Gain = time before / time after, both measured in this run (> 1: the optimization helps).", "",
          "| optimization | N | before | after | gain | in the scripts |", "|---|---|---|---|---|---|"]
    for n, v in sv.items():
        L.append(f"| grads as views of the flat buffer (before: torch.cat + copy back), ms/step | {n} | "
                 f"{v['copy']['step_ms']:.1f} | {v['serverless']['step_ms']:.1f} | "
                 f"**{v['copy']['step_ms'] / v['serverless']['step_ms']:.2f}x** | yes: utils.flatten_parameters |")
    before, after = (1e3 * threads[k]["history"][0]["step_time"] for k in ("OMP_NUM_THREADS=2", "default"))
    L.append(f"| {threads['default']['threads']} thread(s) per rank, cores/ranks (before: OMP_NUM_THREADS=2, "
             f"oversubscribed), ms/step over {threads['default']['steps']} steps | 2 | {before:.1f} | {after:.1f} | "
             f"**{before / after:.2f}x** | yes: utils.set_threads |")
    gains = {n: v["serverless"]["step_ms"] / v["overlap"]["step_ms"] for n, v in sv.items()}
    for n, v in sv.items():
        L.append(f"| overlap all-reduce with backward (buckets, hooks, Iallreduce), ms/step | {n} | "
                 f"{v['serverless']['step_ms']:.1f} | {v['overlap']['step_ms']:.1f} | **{gains[n]:.2f}x** | "
                 "no: bench/ddp.py only |")
    views = {n: v["copy"]["step_ms"] / v["serverless"]["step_ms"] for n, v in sv.items()}
    L += ["", "Grads as views of the flat buffer " + ("gained " if all(g >= OVERLAP_WINS for g in views.values())
          else "gained nothing measurable ") + f"({', '.join(f'N={n}: {g:.2f}x' for n, g in views.items())}): "
          f"the pack and unpack it saves copy the {round(4 * pickled[2]['floats'] / 1000)} KB gradient twice "
          "per step, a fraction of a millisecond "
          "at the memcpy speed of part 2. The scripts keep the views because they are also the simpler "
          "code: one buffer that backward fills in place, no packing loop."]
    won = all(g >= OVERLAP_WINS for g in gains.values())
    L += ["", f"Overlap {'beat' if won else 'did not beat'} the plain step by the {OVERLAP_WINS:.2f}x that this "
          f"machine's noise calls for, at every N ({', '.join(f'N={n}: {g:.2f}x' for n, g in gains.items())})."]
    if not won:  # say why, from this run's numbers
        kb = round(4 * pickled[2]["floats"] / 1000)  # decimal KB, as the README counts
        why = f" There is little to hide: the all-reduce of the whole gradient ({kb} KB) is short once the ranks"
        why += " are in step"
        near = {row["bytes"]: row["mpi_ms"] for row in ar[2]["rows"] if row["bytes"] in (256 << 10, 1 << 20)}
        if len(near) == 2:
            why += f" (part 2, N=2: {near[256 << 10]:.2f} ms at 256 KB, {near[1 << 20]:.2f} ms at 1 MB)"
        why += ", and backward already keeps every core busy"
        if no_progress_thread():
            why += (", while this Open MPI has no progress thread (`ompi_info`: OMPI progress: no), so a "
                    "started Iallreduce moves on only inside MPI calls, here the final Waitall")
        L[-1] += why + ". The scripts keep the plain step, which is simpler to read."

    L += ["", "## Commands", "", "From the repo root, in this order:", "", "```"] + COMMANDS + ["```", ""]
    path = os.path.join(md_dir, "RESULTS.md")
    with open(path, "w") as f:
        f.write("\n".join(L))
    print(f"wrote {path}, {plots['allreduce']} and {plots['paradigms']} in {wall / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
