"""Gradient compression measured: accuracy against bytes per step, for each --compress method (issue 15).

    python bench/compression.py                        # full: 4 ranks, CIFAR-10, 8 epochs per method (long)
    python bench/compression.py --rates 10mbit,100mbit --max-steps 20   # step time on emulated slow links
    python bench/compression.py --render-only          # bench/COMPRESSION.md and the figure, from the records alone
    python bench/compression.py --tiny --out /tmp/c    # smoke test: synthetic, 2 ranks, 4 steps; only into /tmp/c

Runs `mpirun -n N python dist_sgd_serverless.py --compress X` for X in none, fp16, topk and
powersgd, one after another, with --allreduce ring by default: its bytes are counted
exactly, where MPI_Allreduce's are not (extensions/compression.py, "How bytes are counted").
Each run's own results JSON goes to OUT/runs/; OUT/compression.json holds the commands and
what the table needs. With --rates, the same runs go through bench/cluster.py's emulated
hosts (one rank each, every link shaped to the rate; needs root), for step times where links
are slow. bench/COMPRESSION.md and figures/compression.png are rendered from the records
alone, so that --render-only reproduces them. Records: results/reference/compression/.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MPIRUN = shutil.which("mpirun", path=sysconfig.get_path("scripts")) or shutil.which("mpirun") or "mpirun"
METHODS = {"none": [], "fp16": [], "topk": ["--topk-ratio", "0.01"], "powersgd": ["--powersgd-rank", "2"]}
# issue 15's goals: the best compressor >= 8x fewer bytes within 1 point of none, and >= 3x faster
# steps than none at 10 Mbit/s; fp16 within 0.3 points of none
GOALS = {"ratio": 8.0, "best_points": 1.0, "fp16_points": 0.3, "speedup": 3.0}


def script_args(method, args):
    data = (["--dataset", "synthetic", "--train-size", "512", "--max-steps", "4", "--batch-size", "16"]
            if args.tiny else ["--dataset", args.dataset, "--epochs", str(args.epochs)])
    if args.max_steps and not args.tiny:
        data += ["--max-steps", str(args.max_steps)]
    return ["dist_sgd_serverless.py", *data, "--seed", "0", "--allreduce", args.allreduce,
            "--compress", method, *METHODS[method]]


def run_one(method, rate, args, cluster=None):
    """One run of the script; returns its row of compression.json."""
    name = f"{method}_{rate}" if rate else method
    results = os.path.join(args.out, "runs", f"{name}.json")
    program = [*script_args(method, args), "--results", results]
    t0 = time.perf_counter()
    if cluster is None:
        cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(args.n), sys.executable, *program]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        shown = f"mpirun -n {args.n} python " + shlex.join(program)
    else:
        proc = cluster.mpirun(*program, timeout=3600)
        shown = f"python bench/cluster.py run --hosts {args.n} --rate {rate} -- " + shlex.join(program)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return {"method": method, "rate": rate, "command": shown.replace(args.out, "OUT"),
            "results": os.path.relpath(results, args.out)}


def measure(args):
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    rows = []
    if not args.rates:
        rows = [run_one(m, None, args) for m in METHODS]
    else:
        from bench import cluster as cl  # root only: network namespaces and tc
        with cl.Cluster(args.n) as cluster:
            for rate in args.rates.split(","):
                cluster.shape(rate)
                rows += [run_one(m, rate, args, cluster) for m in METHODS]
    # The local runs and the link runs are separate commands: each replaces only its own rows.
    path = os.path.join(args.out, "compression.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if (old["n"], old["allreduce"], old["tiny"]) == (args.n, args.allreduce, args.tiny):
            done = {(r["method"], r["rate"]) for r in rows}
            rows = [r for r in old["rows"] if (r["method"], r["rate"]) not in done] + rows
    record = {"n": args.n, "allreduce": args.allreduce, "tiny": args.tiny, "rows": rows,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return record


# ----------------------------------------------------------------------------- rendering

def table_rows(record, out):
    """The numbers of each run, read from its own results JSON."""
    rows = []
    order = lambda row: (row["rate"] is not None, (row["rate"] or "").rjust(9), list(METHODS).index(row["method"]))
    for row in sorted(record["rows"], key=order):  # this machine first, then the links, slowest first
        with open(os.path.join(out, row["results"])) as f:
            r = json.load(f)
        c, h = r["compression"], r["history"]
        sent = [b for b in c["bytes_sent_per_step"] if b is not None]
        rows.append(dict(row, acc=r["final_test_acc"], payload=c["payload_bytes_per_step"], ratio=c["ratio_vs_none"],
                         sent=max(sent) if sent else None, step_ms=1e3 * sum(x["train_time"] for x in h) / r["steps"],
                         comm=r["comm_fraction"], steps=r["steps"], params=r["params"], hardware=r["hardware"],
                         cut=r["config"].get("max_steps") is not None))
    return rows


def goals(rows):
    """Issue 15's goals: (goal, target, measured, met), from the runs that measured them."""
    local = {r["method"]: r for r in rows if r["rate"] is None}
    out = []
    best = None
    if "none" in local:
        none = local["none"]
        close = [r for m, r in local.items() if m != "none" and none["acc"] - r["acc"] <= GOALS["best_points"]]
        best = max(close, key=lambda r: r["ratio"], default=None)
        out.append(("best method within 1 point of none: bytes per step vs none", f">= {GOALS['ratio']:g}x",
                    f"{best['method']}: {best['ratio']:.1f}x" if best else "no method within 1 point",
                    bool(best) and best["ratio"] >= GOALS["ratio"]))
        if "fp16" in local:
            gap = none["acc"] - local["fp16"]["acc"]
            out.append(("fp16: accuracy below none", f"<= {GOALS['fp16_points']} points", f"{gap:.2f} points",
                        gap <= GOALS["fp16_points"]))
    slow = {r["method"]: r for r in rows if r["rate"] == "10mbit"}
    if "none" in slow and len(slow) > 1:  # the best method by accuracy, else the most compressed one
        name = best["method"] if best else max(slow.values(), key=lambda r: r["ratio"])["method"]
        speedup = slow["none"]["step_ms"] / slow[name]["step_ms"]
        out.append((f"{name} at 10 Mbit/s: step time vs none", f">= {GOALS['speedup']:g}x faster",
                    f"{speedup:.1f}x", speedup >= GOALS["speedup"]))
    return out


def render(record, out, md_path, fig_path):
    rows = table_rows(record, out)
    lines = ["# Gradient compression: accuracy against bytes (issue 15)", "",
             f"{record['n']} ranks, --allreduce {record['allreduce']}, on {rows[0]['hardware']['cpu']} "
             f"({rows[0]['hardware']['cores']} cores); finished {record['finished']}."
             + (" **Tiny smoke run: the numbers mean nothing.**" if record["tiny"] else ""), "",
             "Payload: the bytes a rank hands to the collectives per step; sent: the bytes a rank put on the "
             "wire per step, as extensions/compression.py counts them (- where MPI_Allreduce chose the "
             "algorithm); step time: the training time per step, computation included. The local rows share "
             "this machine's cores among all ranks, so their times are a comm share, not a link's speed; "
             "the rows with a link rate ran on bench/cluster.py's emulated hosts, cut to a few steps "
             "(their accuracy means nothing). Those hosts share this machine's cores too, so a step's "
             "computation is that of all ranks on them: with a core per host it would be shorter, the "
             "link's share of a step larger, and compression's gain in step time larger with it. "
             "One run per method, one seed: the spread of accuracy between seeds was not measured.", "",
             "| method | link | final test acc | payload per step | vs none | sent per step | step time | comm share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sent = "-" if r["sent"] is None else f"{r['sent'] / 1e3:,.1f} kB"
        acc = f"({r['steps']} steps)" if r["cut"] else f"{r['acc']:.2f}%"
        lines.append(f"| {r['method']} | {r['rate'] or 'local'} | {acc} | {r['payload'] / 1e3:,.1f} kB | "
                     f"{r['ratio']:.1f}x | {sent} | {r['step_ms']:.1f} ms | {100 * r['comm']:.0f}% |")
    lines += ["", "## Goals", "", "| goal | target | measured | |", "|---|---|---|---|"]
    lines += [f"| {g} | {t} | {m} | {'**met**' if ok else '**missed**'} |" for g, t, m, ok in goals(rows)]
    lines += ["", "## Commands", ""] + [f"    {r['command']}" for r in record["rows"]] + [""]
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    plot(rows, fig_path)


def plot(rows, path):
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for r in rows:
        if r["rate"] is None:
            ax.scatter(r["payload"], r["acc"])
            ax.annotate(r["method"], (r["payload"], r["acc"]), textcoords="offset points", xytext=(4, 4))
    ax.set(xscale="log", xlabel="payload per step and rank (bytes)", ylabel="final test accuracy (%)",
           title="accuracy against bytes per step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=4, help="ranks (hosts, with --rates)")
    p.add_argument("--dataset", choices=("cifar10", "synthetic"), default="cifar10")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps")
    p.add_argument("--allreduce", choices=("mpi", "ring", "tree"), default="ring")
    p.add_argument("--rates", default=None, help="comma-separated link rates (bench/cluster.py); default: this machine")
    p.add_argument("--tiny", action="store_true", help="synthetic, 2 ranks, 4 steps, into --out only")
    p.add_argument("--render-only", action="store_true", help="render from the records in --out; run nothing")
    p.add_argument("--out", default=None, help="records folder; default: results/reference/compression")
    args = p.parse_args()
    if args.tiny and not args.out:
        p.error("--tiny writes only into --out: give one")
    args.n = 2 if args.tiny else args.n
    reference = os.path.join(ROOT, "results", "reference", "compression")
    args.out = os.path.abspath(args.out or reference)
    md, fig = ((os.path.join(ROOT, "bench", "COMPRESSION.md"), os.path.join(ROOT, "figures", "compression.png"))
               if args.out == reference else
               (os.path.join(args.out, "COMPRESSION.md"), os.path.join(args.out, "compression.png")))
    if args.render_only:
        with open(os.path.join(args.out, "compression.json")) as f:
            record = json.load(f)
    else:
        record = measure(args)
    render(record, args.out, md, fig)
    print(f"wrote {os.path.relpath(md)} and {os.path.relpath(fig)}")


if __name__ == "__main__":
    main()
