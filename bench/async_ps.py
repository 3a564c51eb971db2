"""Stragglers: the synchronous, bounded-staleness (ssp) and asynchronous parameter servers,
and the all-reduce, with no straggler and with one worker 3x slower (issue 17).

    python bench/async_ps.py                        # full: CIFAR-10, 1 server + 4 workers, --epochs 2 each
    python bench/async_ps.py --render-only          # bench/ASYNC.md and figures/async.png again, from the records
    python bench/async_ps.py --tiny --out /tmp/a    # smoke test: synthetic, 1 server + 2 workers, into /tmp/a only

For each straggler setting (none; worker 2 at 3x by sleeping; worker 2 at 3x by spinning), it
runs one after another, each as its own mpirun job with the same data, seed and epochs:
  dist_sgd_param_server.py --mode sync; --mode ssp --staleness 2 and --mode async, each with
  and without --staleness-lr; and dist_sgd_serverless.py on the W worker ranks.
Every run applies every batch of every epoch once, so all see the same training samples.
From each results JSON it takes the throughput in training samples whose gradients were
applied per second of training (a sync step applies W batches, an async update one: samples,
not updates), the staleness histogram, the test accuracy after the same samples (the last
epoch) and after the same wall time (the last epoch each run finished within the time of
the fastest run), and accuracy against wall time for the figure.

The machine matters: with fewer cores than ranks a sleeping straggler frees its core for the
others, so it slows the job less than a slower processor would; the busy variant keeps the
core, and the difference between the two rows is that effect. Run it on an idle machine.
Records (async.json and each run's JSON) go to results/reference/async/; ASYNC.md and the
figure are rendered from them alone.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from extensions import async_ps  # noqa: E402

MPIRUN = shutil.which("mpirun", path=sysconfig.get_path("scripts")) or shutil.which("mpirun") or "mpirun"
STRAGGLERS = {"none": [], "sleep3": ["--straggler", "2:3", "--straggler-wait", "sleep"],
              "busy3": ["--straggler", "2:3", "--straggler-wait", "busy"]}
MODES = {"sync": ["--mode", "sync"], "ssp2": ["--mode", "ssp", "--staleness", "2"],
         "ssp2-lr": ["--mode", "ssp", "--staleness", "2", "--staleness-lr"], "async": ["--mode", "async"],
         "async-lr": ["--mode", "async", "--staleness-lr"], "serverless": None}
TARGETS = {"async_vs_sync_throughput": 1.8, "async_accuracy_points": 2.0}


def runs(tiny):
    """[(name, straggler, mode)] in the order they run."""
    stragglers = ("none", "sleep3") if tiny else tuple(STRAGGLERS)
    modes = ("sync", "ssp2", "async-lr", "serverless") if tiny else tuple(MODES)
    return [(f"{mode}_{s}", s, mode) for s in stragglers for mode in modes]


def command(mode, straggler, workers, data, results):
    """The mpirun command line of one run (the serverless script runs on the W worker ranks)."""
    if MODES[mode] is None:
        script, n, flags = "dist_sgd_serverless.py", workers, []
        slow = ["--straggler", "1:3", *STRAGGLERS[straggler][2:]] if STRAGGLERS[straggler] else []
    else:
        script, n, flags, slow = "dist_sgd_param_server.py", workers + 1, MODES[mode], STRAGGLERS[straggler]
    return [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(n), sys.executable, script,
            *data, *flags, *slow, "--results", results]


def measure(out, tiny, epochs):
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    workers = 2 if tiny else 4
    data = (["--dataset", "synthetic", "--train-size", "320", "--batch-size", "16", "--epochs", "2"] if tiny
            else ["--dataset", "cifar10", "--epochs", str(epochs)])
    record = {"runs": [], "meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "tiny": tiny,
                                   "workers": workers, "cores": os.cpu_count()}}
    for name, straggler, mode in runs(tiny):
        results = os.path.join(out, "runs", f"{name}.json")
        cmd = command(mode, straggler, workers, data, results)
        shown = " ".join(["mpirun" if c == MPIRUN else "python" if c == sys.executable
                          else os.path.relpath(c, out) if c.startswith(out) else c for c in cmd])
        print(f"$ {shown}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), check=True)
        record["runs"].append({"name": name, "straggler": straggler, "mode": mode, "command": shown,
                               "seconds": round(time.perf_counter() - t0, 1), "results": f"runs/{name}.json"})
    with open(os.path.join(out, "async.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


# ----------------------------------------------------------------------------- from the records

def summarize(record, out):
    """One row per run: samples/s, staleness, accuracy after the same samples and the same time."""
    rows = []
    for run in record["runs"]:
        with open(os.path.join(out, run["results"])) as f:
            r = json.load(f)
        per_step = r["config"]["batch_size"] if r["config"].get("mode", "sync") != "sync" else r["global_batch"]
        train_time = sum(h["train_time"] for h in r["history"])
        clock, curve = 0.0, []
        for h in r["history"]:
            clock += h["epoch_time"]
            curve.append((clock, h["test_acc"]))
        hist = async_ps.staleness_summary(r["history"])
        mean_tau, max_tau = async_ps.histogram_stats(hist) if hist else (0.0, 0)
        rows.append(dict(run, samples_per_s=r["steps"] * per_step / train_time, acc=r["final_test_acc"],
                         curve=curve, staleness=hist, mean_tau=mean_tau, max_tau=max_tau))
    same_time = min(row["curve"][-1][0] for row in rows)
    for row in rows:
        done = [acc for t, acc in row["curve"] if t <= same_time * 1.0001]
        row["acc_same_time"] = done[-1] if done else None
    return rows, same_time


def render(record, out, md_path, fig_path):
    rows, same_time = summarize(record, out)
    sync = {row["straggler"]: row["samples_per_s"] for row in rows if row["mode"] == "sync"}
    lines = [f"# Stragglers: sync, ssp and async parameter servers ({'tiny smoke test' if record['meta']['tiny'] else 'full'})",
             "", f"{record['meta']['date']}, {record['meta']['workers']} workers, {record['meta']['cores']} cores. "
             f"Rendered by `python bench/async_ps.py --render-only` from the records beside it.", "",
             f"| run | straggler | samples/s | x sync | mean tau | max tau | test acc, same samples | "
             f"test acc at {same_time:.0f} s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        at = "-" if row["acc_same_time"] is None else f"{row['acc_same_time']:.2f}%"
        lines.append(f"| {row['mode']} | {row['straggler']} | {row['samples_per_s']:.1f} | "
                     f"{row['samples_per_s'] / sync[row['straggler']]:.2f} | {row['mean_tau']:.2f} | {row['max_tau']} | "
                     f"{row['acc']:.2f}% | {at} |")
    lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
    by = {(row["mode"], row["straggler"]): row for row in rows}
    for s in ("sleep3", "busy3"):
        if ("async", s) in by or ("async-lr", s) in by:
            best = max(by[m, s]["samples_per_s"] for m in ("async", "async-lr") if (m, s) in by)
            ratio = best / sync[s]
            lines.append(f"| async samples/s vs sync, 3x straggler ({s}) | >= {TARGETS['async_vs_sync_throughput']}x | "
                         f"{ratio:.2f}x | {'yes' if ratio >= TARGETS['async_vs_sync_throughput'] else 'no'} |")
    for s in sync:
        accs = [by[m, s]["acc"] for m in ("async", "async-lr") if (m, s) in by]
        if accs:
            gap = by["sync", s]["acc"] - max(accs)
            lines.append(f"| async accuracy vs sync, same samples ({s}): sync minus the better async, points | "
                         f"<= {TARGETS['async_accuracy_points']} | {gap:+.2f} | "
                         f"{'yes' if gap <= TARGETS['async_accuracy_points'] else 'no'} |")
    lines += ["", "Commands:", ""] + [f"    {run['command']}" for run in record["runs"]]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, fig_path)


def plot(rows, path):
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    stragglers = list(dict.fromkeys(row["straggler"] for row in rows))
    fig = Figure(figsize=(5 * len(stragglers), 7.5))
    axes = fig.subplots(2, len(stragglers), squeeze=False)
    for col, s in enumerate(stragglers):
        top, bottom = axes[0][col], axes[1][col]
        for row in (r for r in rows if r["straggler"] == s):
            top.plot(*zip(*row["curve"]), marker="o", label=row["mode"])
            if row["staleness"] and row["mode"] != "sync":
                taus = [int(t) for t in row["staleness"]]
                bottom.plot(taus, list(row["staleness"].values()), marker=".", label=row["mode"])
        top.set(xlabel="wall time (s)", ylabel="test accuracy (%)", title=f"straggler: {s}")
        bottom.set(xlabel="staleness tau (server updates)", ylabel="gradients", yscale="log")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="synthetic, 2 workers, 2 straggler settings, 4 modes")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every full run")
    parser.add_argument("--out", default=None, help="records folder; default: results/reference/async "
                        "(with --tiny it must be given, and the table and figure go there too)")
    parser.add_argument("--render-only", action="store_true", help="run nothing: render from the records in --out")
    args = parser.parse_args()
    if args.tiny and not args.out:
        parser.error("--tiny needs --out, so that a smoke test never overwrites the committed records")
    out = os.path.abspath(args.out or os.path.join(ROOT, "results", "reference", "async"))
    md, fig = ((os.path.join(out, "ASYNC.md"), os.path.join(out, "async.png")) if args.out
               else (os.path.join(ROOT, "bench", "ASYNC.md"), os.path.join(ROOT, "figures", "async.png")))
    if args.render_only:
        with open(os.path.join(out, "async.json")) as f:
            record = json.load(f)
    else:
        record = measure(out, args.tiny, args.epochs)
    render(record, out, md, fig)
    print(f"wrote {os.path.relpath(md, ROOT)} and {os.path.relpath(fig, ROOT)}", flush=True)


if __name__ == "__main__":
    main()
