"""Stragglers: the synchronous, bounded-staleness (ssp) and asynchronous parameter servers,
and the all-reduce, with no straggler and with one worker 3x slower (issue 17).

    python bench/async_ps.py                        # full: CIFAR-10, 1 server + 4 workers, --epochs 2 each
    python bench/async_ps.py --render-only          # bench/ASYNC.md and figures/async.png again, from the records
    python bench/async_ps.py --tiny --out /tmp/a    # smoke test: synthetic, 1 server + 2 workers, into /tmp/a only

For each straggler setting (none; worker 2 at 3x by sleeping; worker 2 at 3x by spinning), it
runs one after another, each as its own mpirun job with the same data, seed and epochs:
  dist_sgd_param_server.py --mode sync; --mode ssp --staleness 2 and --mode async, each with
  and without --staleness-lr; --mode async --momentum 0.6; and dist_sgd_serverless.py on
  the W worker ranks. The momentum run follows Mitliagkas et al. 2016 ("Asynchrony begets
  Momentum"): W asynchronous workers act like an implicit momentum of about 1 - 1/W, so
  explicit momentum should come down. 0.6 is a rough pick, not tuned: it is the mu for which
  (1 - mu) / W = 1 - 0.9 at W = 4, were the two momenta to compound.
  async-m0.6-lr0.025 also halves the lr, to sync's lr per sample (linear scaling from the
  batch of 256 to that of 64); it is the best of five probes, lr 0.025 with momentum 0.9,
  0.6, 0.3, 0 and lr 0.0125 with momentum 0.6, one epoch each without a straggler, picked on
  their test accuracy (records in probes/; --probes runs them). async-dana keeps sync's
  momentum, with one momentum buffer per worker (DANA-Zero, Hakimi et al. 2019; see
  extensions/async_ps.py), so that the stale gradients do not compound in one buffer; its
  default lr, sync's over W, gives it sync's lr per sample. Four DANA probes (lr 0.025,
  0.0177 and 0.0125 with momentum 0.9, lr 0.025 with 0.8) show no trend in lr beyond the
  spread of repeated runs, so async-dana keeps its default, untuned. --longer E runs sync,
  async-m0.6-lr0.025 and async-dana for E epochs without a straggler (records in longer/;
  with --seeds, also with seeds 1 and 2),
  for the accuracy gap after each epoch. Async runs are not reproducible (gradients arrive
  in another order each time), so one run per setting cannot tell a small gap: --seeds runs
  the same three without a straggler with seeds 1 and 2 as well (records in seeds/), and
  the gap is also given between their means over the three seeds. --lost runs async-dana
  with --elastic (under MPI's fault tolerance, ULFM), once whole and once with worker 2 killed
  mid-epoch (records in lost/): the server gives the lost worker's batch to another and the
  run goes on without it.
A run that diverges (the script's "training diverged" error) is recorded as such.
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
figure are rendered from them alone. A run whose record exists, made with the same --epochs,
is not run again (delete it to rerun), so --stragglers and --modes can fill in a subset;
async.json lists every run that has a record.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402
from bench.elastic import ULFM  # noqa: E402  (the launch flags --elastic needs)
from bench.reports.wording import recipe  # noqa: E402
from extensions import async_ps  # noqa: E402

MPIRUN = shutil.which("mpirun", path=sysconfig.get_path("scripts")) or shutil.which("mpirun") or "mpirun"
STRAGGLERS = {"none": [], "sleep3": ["--straggler", "2:3", "--straggler-wait", "sleep"],
              "busy3": ["--straggler", "2:3", "--straggler-wait", "busy"]}
MODES = {"sync": ["--mode", "sync"], "ssp2": ["--mode", "ssp", "--staleness", "2"],
         "ssp2-lr": ["--mode", "ssp", "--staleness", "2", "--staleness-lr"], "async": ["--mode", "async"],
         "async-lr": ["--mode", "async", "--staleness-lr"],
         "async-m0.6": ["--mode", "async", "--momentum", "0.6"],
         "async-m0.6-lr0.025": ["--mode", "async", "--momentum", "0.6", "--lr", "0.025"],
         "async-dana": ["--mode", "async", "--dana"], "serverless": None}
ASYNC = [mode for mode in MODES if mode.startswith("async")]
TARGETS = {"async_vs_sync_throughput": 1.8, "async_accuracy_points": 2.0}
PROBES = [("async", 0.025, 0.9), ("async", 0.025, 0.6), ("async", 0.025, 0.3), ("async", 0.025, 0.0),
          ("async", 0.0125, 0.6), ("async-dana", 0.025, 0.9), ("async-dana", 0.0177, 0.9),
          ("async-dana", 0.0125, 0.9), ("async-dana", 0.025, 0.8)]  # (mode, lr, momentum)
LONGER = ("sync", "async-m0.6-lr0.025", "async-dana")  # --longer: does async's gap shrink with more epochs?
SEEDS, SEEDED = (1, 2), ("sync", "async-m0.6-lr0.025", "async-dana")  # --seeds: the same runs with other seeds
# --lost: async-dana with --elastic, whole, then with worker 2 killed at its 50th gradient (of about 195)
LOST, LOST_WORKER, LOST_AT = "async-dana", 2, 50


def runs(tiny, stragglers=tuple(STRAGGLERS), modes=tuple(MODES)):
    """[(name, straggler, mode)] in the order they run."""
    if tiny:
        stragglers, modes = ("none", "sleep3"), ("sync", "ssp2", "async-lr", "serverless")
    return [(f"{mode}_{s}", s, mode) for s in STRAGGLERS if s in stragglers for mode in MODES if mode in modes]


def command(mode, straggler, workers, data, results, launch=(), wrapper=()):
    """The mpirun command line of one run (the serverless script runs on the W worker ranks).
    `launch`: more mpirun flags; `wrapper`: a script that runs the script (tests/inject_failure.py)."""
    if MODES[mode] is None:
        script, n, flags = "dist_sgd_serverless.py", workers, []
        slow = ["--straggler", "1:3", *STRAGGLERS[straggler][2:]] if STRAGGLERS[straggler] else []
    else:
        script, n, flags, slow = "dist_sgd_param_server.py", workers + 1, MODES[mode], STRAGGLERS[straggler]
    return [MPIRUN, "--allow-run-as-root", "--oversubscribe", *launch, "-n", str(n), sys.executable, *wrapper,
            script, *data, *flags, *slow, "--results", results]


def measure(out, tiny, epochs, stragglers, modes):
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    workers = 2 if tiny else 4
    data = (["--dataset", "synthetic", "--train-size", "320", "--batch-size", "16", "--epochs", "2"] if tiny
            else ["--dataset", "cifar10", "--epochs", str(epochs)])
    record = {"runs": [], "meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "tiny": tiny,
                                   "workers": workers, "cores": os.cpu_count(), "epochs": 2 if tiny else epochs}}
    chosen, ran = runs(tiny, stragglers, modes), False
    for name, straggler, mode in runs(tiny):
        results = os.path.join(out, "runs", f"{name}.json")
        cmd = command(mode, straggler, workers, data, results)
        shown = " ".join(["mpirun" if c == MPIRUN else "python" if c == sys.executable
                          else os.path.relpath(c, out) if c.startswith(out) else c for c in cmd])
        if not same_data(results, data) and (name, straggler, mode) in chosen:
            print(f"$ {shown}", flush=True)
            status, error, _ = run_logged(cmd)
            ran = True
            if status and error and "diverged" in error:  # a result, not a failure: record it
                marker = {"config": data_config(data), "diverged": error}
                utils.write_atomically(results, lambda f: json.dump(marker, f, indent=1))
            elif status:
                sys.exit(f"error: {name} ended with exit status {status}: {error}")
        if same_data(results, data):
            record["runs"].append({"name": name, "straggler": straggler, "mode": mode, "command": shown,
                                   "results": f"runs/{name}.json"})
    path = os.path.join(out, "async.json")
    if not ran and os.path.exists(path):  # the table's runs are those of before: so is their date
        with open(path) as f:
            record["meta"]["date"] = json.load(f)["meta"]["date"]
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def cifar_command(mode, epochs, results, **how):
    """The command of one run of `mode` on CIFAR-10 for `epochs` epochs, no straggler, 4 workers."""
    return command(mode, "none", 4, ["--dataset", "cifar10", "--epochs", str(epochs)], results, **how)


def probe(out, epochs):
    """The runs that picked async-m0.6-lr0.025's lr and momentum, and async-dana's around its
    default: no straggler, into probes/."""
    for mode, lr, momentum in PROBES:
        results = os.path.join(out, "probes", f"{mode}_lr{lr:g}_m{momentum:g}.json")
        run_missing(results, cifar_command(mode, epochs, results) + ["--lr", str(lr), "--momentum", str(momentum)],
                    f"the {mode} probe at lr {lr:g}, momentum {momentum:g}")


def longer(out, epochs, seeds_too):
    """sync and the best async modes without a straggler, for `epochs` epochs each, into longer/: the
    accuracy gap after each epoch. Each run's lr schedule spans its own epochs. `seeds_too`: with each
    of SEEDS as well (<mode>_<E>ep_seed<s>.json)."""
    for seed in (0, *SEEDS) if seeds_too else (0,):
        for mode in LONGER:
            results = os.path.join(out, "longer", f"{mode}_{epochs}ep{f'_seed{seed}' if seed else ''}.json")
            run_missing(results, cifar_command(mode, epochs, results) + (["--seed", str(seed)] if seed else []),
                        f"{mode} over {epochs} epochs with seed {seed}")


def seeds(out, epochs):
    """SEEDED without a straggler, with each of SEEDS, into seeds/ (seed 0 is the table's run)."""
    for seed in SEEDS:
        for mode in SEEDED:
            results = os.path.join(out, "seeds", f"{mode}_seed{seed}.json")
            run_missing(results, cifar_command(mode, epochs, results) + ["--seed", str(seed)],
                        f"{mode} with seed {seed}")


def lost(out, epochs):
    """LOST with --elastic under ULFM, without a straggler, into lost/: once whole, once with worker
    LOST_WORKER killed (SIGKILL, as by the OOM killer) at its LOST_AT-th gradient; the time of the
    kill goes to lost/kill.json. The two run on the same transport, one after the other."""
    for name in ("whole", "killed"):
        results = os.path.join(out, "lost", f"{LOST}_{name}.json")
        inject = ["tests/inject_failure.py", str(LOST_WORKER), str(LOST_AT), "train_step"] if name == "killed" else []
        killed = run_missing(results, cifar_command(LOST, epochs, results, launch=ULFM, wrapper=inject) + ["--elastic"],
                             f"{LOST} with --elastic ({name})", env={"INJECT": "kill"})
        if killed:
            utils.write_atomically(os.path.join(out, "lost", "kill.json"), lambda f: json.dump(
                dict(worker=LOST_WORKER, at_gradient=LOST_AT, time=float(killed.group(1)),
                     date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())), f, indent=1))


def run_missing(results, cmd, what, env=None):
    """Run `cmd` unless its record `results` exists; end the bench if it fails. Returns the match of
    tests/inject_failure.py's line in its output (None if it injected nothing or did not run)."""
    if not os.path.exists(results):
        status, error, injected = run_logged(cmd, env)
        if status or not os.path.exists(results):
            sys.exit(f"error: {what} ended with exit status {status}: {error}")
        return injected
    return None


def run_logged(cmd, env=None):
    """Run `cmd`, echoing its output; returns (its exit status, its last line that starts with error:,
    the match of a fault injected by tests/inject_failure.py, whose group 1 is its time)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    error = injected = None
    for line in proc.stdout:
        print(line, end="", flush=True)
        error = line.strip() if line.startswith("error:") else error
        injected = injected or re.search(r"injected fault in utils\.\w+, .* at ([\d.]+)", line)
    return proc.wait(), error, injected


def same_data(results, data):
    """Whether a finished record exists at `results`, made with the data flags `data`."""
    if not os.path.exists(results):
        return False
    with open(results) as f:
        config = json.load(f)["config"]
    return all(str(config[key]) == value for key, value in data_config(data).items())


def data_config(data):
    """The data flags ["--train-size", "320", ...] as a results JSON's config keys: {"train_size": "320", ...}."""
    return {flag[2:].replace("-", "_"): value for flag, value in zip(data[::2], data[1::2])}


# ----------------------------------------------------------------------------- from the records

def summarize(record, out):
    """One row per run: samples/s, staleness, accuracy after the same samples and the same time."""
    rows = []
    for run in record["runs"]:
        with open(os.path.join(out, run["results"])) as f:
            r = json.load(f)
        if "diverged" in r:  # the script stopped at an epoch with a nan loss, and wrote no results
            rows.append(dict(run, diverged=r["diverged"], samples_per_s=None, acc=None, curve=[], staleness={},
                             mean_tau=None, max_tau=None))
            continue
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
    same_time = min(row["curve"][-1][0] for row in rows if row["curve"])
    for row in rows:
        done = [acc for t, acc in row["curve"] if t <= same_time * 1.0001]
        row["acc_same_time"] = done[-1] if done else None
    return rows, same_time


def run_configs(out, skip=("longer",)):
    """The configs of every run record under `out`, but those in its folders `skip` (--longer's
    runs have a recipe of their own, which their table states)."""
    configs = []
    for path in sorted(glob.glob(os.path.join(out, "**", "*.json"), recursive=True)):
        if os.path.relpath(path, out).split(os.sep)[0] in skip:
            continue
        with open(path) as f:
            r = json.load(f)
        if "config" in r:
            configs.append(r["config"])
    return configs


def render(record, out, md_path, fig_path):
    rows, same_time = summarize(record, out)
    sync = {row["straggler"]: row["samples_per_s"] for row in rows if row["mode"] == "sync"}
    lines = straggler_table(record, out, rows, same_time, sync)
    lines += probe_lines(out)
    table, longer_gap = longer_lines(out)
    lines += table
    lines += unclipped_lines(out)
    by = {(row["mode"], row["straggler"]): row for row in rows}
    means = seed_means(out, by)
    if means:
        lines += ["", "Seeds (`--seeds`), no straggler: the same runs with other seeds (seed 0 is the table's).",
                  "", "| run | " + " | ".join(f"seed {s}" for s in (0, *SEEDS)) + " | mean |",
                  "|---|" + "---|" * (len(SEEDS) + 2)]
        lines += [f"| {mode} | " + " | ".join(f"{a:.2f}%" for a in accs) + f" | {mean:.2f}% |"
                  for mode, (accs, mean) in means.items()]
    lines += lost_table(out)
    lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += throughput_goals(by, sync) + accuracy_goals(by, sync, means, longer_gap)
    lines += ["", "Commands:", ""] + [f"    {run['command']}" for run in record["runs"]]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, fig_path)


def straggler_table(record, out, rows, same_time, sync):
    """The page's title and its first table: one row per run of async.json."""
    meta = record["meta"]
    epochs = meta.get("epochs")
    ran = {(run["straggler"], run["mode"]) for run in record["runs"]}
    skipped = [f"{mode}_{s}" for s in STRAGGLERS for mode in MODES if (s, mode) not in ran]
    lines = [f"# Stragglers: sync, ssp and async parameter servers ("
             f"{'tiny smoke test' if meta['tiny'] else 'CIFAR-10'}{f', {epochs} epoch(s) per run' if epochs else ''})",
             "", f"{meta['date']}, 1 server + {meta['workers']} workers, {meta['cores']} cores. Rendered by "
             f"`python bench/async_ps.py --render-only` from the records in `results/reference/async/` (or --out). "
             f"Samples/s: training samples whose gradients were applied, per second of training. "
             f"tau: server updates between a worker's read and its gradient's application. The workers and the "
             f"server time-share the cores, so a sleeping straggler frees CPU for the others (sleep3) while a "
             f"spinning one keeps it (busy3)."
             + (f" Not run: {', '.join(skipped)}." if skipped and not meta["tiny"] else "")
             + " " + recipe(run_configs(out)), "",
             f"| run | straggler | samples/s | x sync | mean tau | max tau | test acc, same samples | "
             f"test acc at {same_time:.0f} s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["acc"] is None:
            lines.append(f"| {row['mode']} | {row['straggler']} | diverged: train loss nan after the first epoch "
                         f"| | | | | |")
            continue
        at = "-" if row["acc_same_time"] is None else f"{row['acc_same_time']:.2f}%"
        lines.append(f"| {row['mode']} | {row['straggler']} | {row['samples_per_s']:.1f} | "
                     f"{row['samples_per_s'] / sync[row['straggler']]:.2f} | {row['mean_tau']:.2f} | {row['max_tau']} | "
                     f"{row['acc']:.2f}% | {at} |")
    if record["meta"].get("epochs") == 1:
        lines += ["", "Each run is one epoch with one test at its end, so the last column has a value only for "
                  "the runs that ended within the fastest run's time."]
    return lines


def probe_lines(out):
    """The --probes table, if its records exist."""
    probes = sorted(glob.glob(os.path.join(out, "probes", "*.json")))
    if not probes:
        return []
    lines = ["", "Probes (`--probes`), without a straggler: the async runs that picked async-m0.6-lr0.025's "
             "lr and momentum on test accuracy, and four of async-dana around its default (lr 0.025, "
             "momentum 0.9), which it keeps:", "", "| mode | lr | momentum | test acc |", "|---|---|---|---|"]
    for path in probes:
        with open(path) as f:
            r = json.load(f)
        lines.append(f"| async{'-dana' if r['config'].get('dana') else ''} | {r['config']['lr']:g} | "
                     f"{r['config']['momentum']:g} | {r['final_test_acc']:.2f}% |")
    return lines


def longer_lines(out):
    """The --longer tables, one per number of epochs run, and (epochs, sync's lead over the better
    async in the mean of the seeds) of the last one run with every seed, or None."""
    lines, longer_gap = [], None
    for path in sorted(glob.glob(os.path.join(out, "longer", f"{LONGER[0]}_*ep.json"))):
        table, gap = longer_table(out, path)
        lines += table
        longer_gap = gap or longer_gap
    return lines, longer_gap


def longer_histories(path):
    """{mode: [its history with seed 0, 1, ...]} of the --longer runs of sync's record `path`, while
    every seed's record exists."""
    by_mode = {}
    for mode in LONGER:
        mode_path = path.replace(f"{os.sep}{LONGER[0]}_", f"{os.sep}{mode}_")
        for seed_path in [mode_path] + [mode_path.replace(".json", f"_seed{s}.json") for s in SEEDS]:
            if not os.path.exists(seed_path):
                break
            with open(seed_path) as f:
                by_mode.setdefault(mode, []).append(json.load(f)["history"])
    return by_mode


def longer_table(out, path):
    """The accuracy after each epoch of the --longer runs of sync's record `path`, and (epochs, sync's
    lead) if every seed ran, else None."""
    by_mode, longer_gap = longer_histories(path), None
    epochs_, others = len(by_mode[LONGER[0]][0]), [m for m in LONGER[1:] if m in by_mode]
    seeded = all(len(by_mode[m]) == len(SEEDS) + 1 for m in [LONGER[0], *others])
    configs = [r["config"] for r in map(load, glob.glob(os.path.join(out, "longer", f"*_{epochs_}ep*.json")))]
    lines = ["", f"Longer runs (`--longer {epochs_}`), no straggler: test accuracy after each epoch of "
             f"{epochs_}-epoch runs (the lr schedule spans the {epochs_} epochs); the gap is sync's lead"
             + (f". Seed 0, then the mean of seeds 0, {', '.join(map(str, SEEDS))} (`--seeds`). " if seeded
                else ". ") + recipe(configs), "",
             "| epoch | " + " | ".join([LONGER[0]] + [f"{m} | gap, points" for m in others]) + " |",
             "|---|" + "---|---|" * len(others) + "---|"]
    # seed 0's runs; then, with every seed's, their mean
    for label, n in [("", 1)] + [(f", mean of {len(SEEDS) + 1} seeds", len(SEEDS) + 1)] * seeded:
        for i in range(epochs_):
            acc = {m: sum(h[i]["test_acc"] for h in by_mode[m][:n]) / n for m in [LONGER[0], *others]}
            cells = [f"{acc[LONGER[0]]:.2f}%"] + [f"{acc[m]:.2f}% | {acc[LONGER[0]] - acc[m]:+.2f}" for m in others]
            lines.append(f"| {i + 1}{label} | " + " | ".join(cells) + " |")
        if n > 1:
            longer_gap = epochs_, acc[LONGER[0]] - max(acc[m] for m in others)
    if seeded:
        lines += longer_spread_lines(by_mode, others, epochs_)
    return lines + longer_rerun_lines(out, by_mode, epochs_), longer_gap


def longer_spread_lines(by_mode, others, epochs_):
    """Each seed's end, and which leads exceed the seeds' spread (the ranges do not overlap)."""
    ends = {m: [h[-1]["test_acc"] for h in by_mode[m]] for m in [LONGER[0], *others]}
    lo, hi = {m: min(a) for m, a in ends.items()}, {m: max(a) for m, a in ends.items()}
    return ["", f"After epoch {epochs_}, each seed (0, {', '.join(map(str, SEEDS))}): "
            + "; ".join(f"{m} " + ", ".join(f"{a:.2f}%" for a in ends[m]) + f" (range {lo[m]:.2f}–{hi[m]:.2f})"
                        for m in ends) + ". "
            + " ".join(f"Sync's lead over {m}, {sum(ends[LONGER[0]]) / len(ends[m]) - sum(ends[m]) / len(ends[m]):+.2f} "
                       "points on the means, " + ("exceeds the seeds' spread (the ranges do not overlap)."
                       if lo[LONGER[0]] > hi[m] or hi[LONGER[0]] < lo[m] else "is within the seeds' spread "
                       "(the ranges overlap).") for m in others)]


def longer_rerun_lines(out, by_mode, epochs_):
    """The seed-0 runs run again on a later session's host (longer/rerun/), beside the table's."""
    lines = []
    for rerun in sorted(glob.glob(os.path.join(out, "longer", "rerun", f"*_{epochs_}ep.json"))):
        with open(rerun) as f:
            again = json.load(f)
        mode = os.path.basename(rerun)[:-len(f"_{epochs_}ep.json")]
        lines += ["", f"Seeds 1 and 2 of these runs ran in a later session than seed 0, on another host. The "
                  f"seed-0 {mode} run again there, "
                  f"with the same command (record in `longer/rerun/`): "
                  + ", ".join(f"{h['test_acc']:.2f}%" for h in again["history"])
                  + " after each epoch, against the table's "
                  + ", ".join(f"{h['test_acc']:.2f}%" for h in by_mode[mode][0]) + "."]
    return lines


def throughput_goals(by, sync):
    """The goals' rows of samples/s under a 3x straggler: async against sync, ssp between them."""
    lines = []
    for s in ("sleep3", "busy3"):
        if any((m, s) in by for m in ASYNC):
            best = max(by[m, s]["samples_per_s"] or 0 for m in ASYNC if (m, s) in by)
            ratio = best / sync[s]
            lines.append(f"| async samples/s vs sync, 3x straggler ({s}) | >= {TARGETS['async_vs_sync_throughput']}x | "
                         f"{ratio:.2f}x | {'yes' if ratio >= TARGETS['async_vs_sync_throughput'] else 'no'} |")
            for m in ("ssp2", "ssp2-lr"):
                if (m, s) in by and by[m, s]["samples_per_s"]:
                    r = by[m, s]["samples_per_s"] / sync[s]
                    lines.append(f"| {m} samples/s vs sync, 3x straggler ({s}) | between 1x and async's {ratio:.2f}x | "
                                 f"{r:.2f}x | {'yes' if 1 < r < ratio else 'no'} |")
    return lines


def accuracy_goals(by, sync, means, longer_gap):
    """The goals' rows of sync's accuracy lead over the better async: per straggler setting, on the
    seeds' means, and after the --longer runs."""
    lines = []
    for s in sync:
        accs = [by[m, s]["acc"] for m in ASYNC if (m, s) in by and by[m, s]["acc"] is not None]
        if accs:
            gap = by["sync", s]["acc"] - max(accs)
            lines.append(f"| async accuracy vs sync, same samples ({s}): sync minus the better async, points | "
                         f"<= {TARGETS['async_accuracy_points']} | {gap:+.2f} | "
                         f"{'yes' if gap <= TARGETS['async_accuracy_points'] else 'no'} |")
    if "sync" in means and len(means) > 1:
        gap = means["sync"][1] - max(mean for mode, (_, mean) in means.items() if mode != "sync")
        lines.append(f"| async accuracy vs sync, same samples (none), mean of {len(SEEDS) + 1} seeds: sync minus the "
                     f"better async, points | <= {TARGETS['async_accuracy_points']} | {gap:+.2f} | "
                     f"{'yes' if gap <= TARGETS['async_accuracy_points'] else 'no'} |")
    if longer_gap:
        epochs_, gap = longer_gap
        lines.append(f"| async accuracy vs sync after {epochs_} epochs (none), mean of {len(SEEDS) + 1} seeds: sync "
                     f"minus the better async, points | <= {TARGETS['async_accuracy_points']} | {gap:+.2f} | "
                     f"{'yes' if gap <= TARGETS['async_accuracy_points'] else 'no'} |")
    return lines


def load(path):
    with open(path) as f:
        return json.load(f)


def unclipped_lines(out):
    """The --longer runs of the recipe before --clip-norm (longer/unclipped/), which the clip replaced:
    what each seed's first epoch and last reached."""
    paths = sorted(glob.glob(os.path.join(out, "longer", "unclipped", "*.json")))
    if not paths:
        return []
    runs = {}  # mode: {seed: history}
    for path in paths:
        name = os.path.basename(path)[:-len(".json")]
        mode, _, seed = re.fullmatch(r"(.+)_\d+ep(_seed(\d+))?", name).groups()
        runs.setdefault(mode, {})[int(seed or 0)] = load(path)["history"]
    cells = {mode: ", ".join(f"seed {s}: {h[0]['test_acc']:.2f}% after epoch 1, {h[-1]['test_acc']:.2f}% at the end"
                             for s, h in sorted(by_seed.items())) for mode, by_seed in runs.items()}
    return ["", "The same longer runs before `--clip-norm`, the recipe of the straggler table's runs (records in "
            "`longer/unclipped/`). Synchronous SGD then lost its first epoch on some seeds, a training "
            "instability rather than an effect of synchrony, so those runs are no baseline for async: "
            + "; ".join(f"{mode}: {text}" for mode, text in cells.items()) + "."]


def lost_table(out):
    """The lines of the --lost section, if its records exist."""
    paths = {name: os.path.join(out, "lost", f"{LOST}_{name}.json") for name in ("whole", "killed")}
    kill_path = os.path.join(out, "lost", "kill.json")
    if not all(map(os.path.exists, [*paths.values(), kill_path])):
        return []
    with open(kill_path) as f:
        kill = json.load(f)
    runs = {}
    for name, path in paths.items():
        with open(path) as f:
            runs[name] = json.load(f)
    lines = ["", f"A lost worker (`--lost`), no straggler: {LOST} with `--elastic` under `mpirun "
             f"{' '.join(ULFM)}` (TCP between the ranks), once whole and once with worker {kill['worker']} killed "
             f"(SIGKILL) at its gradient {kill['at_gradient']}, on {kill['date']}. The host can change between "
             f"sessions, so compare these two rows' samples/s with each other only. Two single runs: the killed one "
             f"ends {runs['killed']['final_test_acc'] - runs['whole']['final_test_acc']:+.2f} points from the whole "
             f"one, and single async runs vary by a few points (the seeds above).", "",
             "| run | samples/s | test acc | gradients per worker | server noticed the loss | ranks at the end |",
             "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        h = r["history"]
        noticed = [f"at update {x['step']}, {x['time'] - kill['time']:.2f} s after the kill"
                   for e in h for x in e.get("lost", [])]
        per_worker = " / ".join(",".join(map(str, e["gradients_per_worker"])) for e in h)
        lines.append(f"| {LOST}, {name} | {r['steps'] * r['config']['batch_size'] / sum(e['train_time'] for e in h):.1f} "
                     f"| {r['final_test_acc']:.2f}% | {per_worker} | {'; '.join(noticed) or '-'} | "
                     f"{r['failures'][-1]['world_size'] if r.get('failures') else r['world_size']} |")
    return lines


def seed_means(out, by):
    """{mode: ([test acc with seed 0, 1, ...], their mean)} for the SEEDED modes whose every seed has a record."""
    means = {}
    for mode in SEEDED:
        paths = [os.path.join(out, "seeds", f"{mode}_seed{seed}.json") for seed in SEEDS]
        if (mode, "none") in by and by[mode, "none"]["acc"] is not None and all(map(os.path.exists, paths)):
            accs = [by[mode, "none"]["acc"]]
            for path in paths:
                with open(path) as f:
                    accs.append(json.load(f)["final_test_acc"])
            means[mode] = accs, sum(accs) / len(accs)
    return means


def plot(rows, path):
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    stragglers = list(dict.fromkeys(row["straggler"] for row in rows))
    fig = Figure(figsize=(5 * len(stragglers), 7.5))
    axes = fig.subplots(2, len(stragglers), squeeze=False)
    for col, s in enumerate(stragglers):
        top, bottom = axes[0][col], axes[1][col]
        for row in (r for r in rows if r["straggler"] == s and r["curve"]):
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
    parser.add_argument("--stragglers", nargs="+", choices=STRAGGLERS, default=list(STRAGGLERS),
                        help="run only these straggler settings")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="run only these modes")
    parser.add_argument("--probes", action="store_true", help="first run the lr and momentum probes (see above)")
    parser.add_argument("--seeds", action="store_true",
                        help=f"first run {', '.join(SEEDED)}, no straggler, with seeds {SEEDS} (into seeds/)")
    parser.add_argument("--lost", action="store_true",
                        help=f"first run {LOST} with --elastic, whole and with worker {LOST_WORKER} killed "
                             "(into lost/)")
    parser.add_argument("--longer", type=int, metavar="EPOCHS",
                        help=f"first run {' and '.join(LONGER)}, no straggler, for EPOCHS epochs each (into longer/)")
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
        if args.probes:
            probe(out, args.epochs)
        if args.longer:
            longer(out, args.longer, args.seeds)
        if args.seeds:
            seeds(out, args.epochs)
        if args.lost:
            lost(out, args.epochs)
        record = measure(out, args.tiny, args.epochs, args.stragglers, args.modes)
    render(record, out, md, fig)
    print(f"wrote {os.path.relpath(md, ROOT)} and {os.path.relpath(fig, ROOT)}", flush=True)


if __name__ == "__main__":
    main()
