"""The FedAvg-variant sweep (issue 16): every --algorithm on every split, as one command.

    python bench/fed_sweep.py                        # full: CIFAR-10, mpirun -n 5, 10 rounds x 1 local epoch
    python bench/fed_sweep.py --tiny --out /tmp/fs   # smoke test: synthetic, 3 ranks, non-iid shards only
    python bench/fed_sweep.py --render-only          # rebuild the table and plots from the records

1. Tuning, on the non-iid shards only: FedAvg, FedProx for each --mus, FedAvgM (server lr 1)
   for each --momenta. The best mu and momentum are those with the highest final test
   accuracy. There is no validation split, so this tunes on the test set of that one split;
   the other splits then use the same two values, untuned.
2. Every split (iid; non-iid shards; Dirichlet 0.1 and 0.5): FedAvg, FedProx (best mu),
   FedAvgM (best momentum), SCAFFOLD, and FedAvg at SCAFFOLD's byte budget: SCAFFOLD moves
   twice FedAvg's bytes per round, so this baseline runs twice the rounds with half the local
   steps (--max-steps: half the largest client's epoch; smaller Dirichlet clients keep their
   whole epoch). FedAvg on iid and on the shards also runs with --measure-drift, which
   changes no bit of the training, for figures/client_drift.png.
Each run writes its record to <out>/<split>_<label>.json and is skipped when that record
exists (delete it to rerun). Then <out>/sweep.md gets the table (final and best accuracy,
MB per client rank, training time) and <out>/fed_sweep_<split>.png the accuracy per round.
Records default to results/reference/fed/.
"""
import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MPIRUN = shutil.which("mpirun", path=sysconfig.get_path("scripts")) or shutil.which("mpirun") or "mpirun"
SPLITS = {"iid": [], "non-iid": ["--split-method", "non-iid"],
          "non-iid_alpha0.1": ["--split-method", "non-iid", "--alpha", "0.1"],
          "non-iid_alpha0.5": ["--split-method", "non-iid", "--alpha", "0.5"]}
TUNE_SPLIT = "non-iid"


def fed_avg(out, split, label, flags, args):
    """Run fed_avg.py once (unless its record exists); return the record."""
    path = os.path.join(out, f"{split}_{label}.json")
    if not os.path.exists(path):
        cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(args.ranks), sys.executable,
               "fed_avg.py", *args.common, *SPLITS[split], *flags, "--results", path,
               "--figures-dir", os.path.join(out, "figures")]
        print("$ " + " ".join(c if c not in (MPIRUN, sys.executable) else os.path.basename(c) for c in cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    with open(path) as f:
        return json.load(f)


def sweep(out, args):
    """Tune on the shards, then every algorithm on every split; returns {split: {label: record}}."""
    runs = {split: {} for split in args.splits}
    tune = runs.setdefault(TUNE_SPLIT, {})
    tune["fedavg"] = fed_avg(out, TUNE_SPLIT, "fedavg", ["--measure-drift"], args)
    for mu in args.mus:
        tune[f"fedprox_mu{mu:g}"] = fed_avg(out, TUNE_SPLIT, f"fedprox_mu{mu:g}",
                                            ["--algorithm", "fedprox", "--prox-mu", str(mu)], args)
    for beta in args.momenta:
        tune[f"fedavgm_b{beta:g}"] = fed_avg(out, TUNE_SPLIT, f"fedavgm_b{beta:g}",
                                             ["--algorithm", "fedavgm", "--server-momentum", str(beta)], args)
    best = lambda prefix: max((r["final_test_acc"], label) for label, r in tune.items() if label.startswith(prefix))[1]
    mu, beta = best("fedprox"), best("fedavgm")
    print(f"tuned on {TUNE_SPLIT}: {mu}, {beta}", flush=True)
    for split in args.splits:
        base = runs[split].get("fedavg") or fed_avg(out, split, "fedavg", ["--measure-drift"] * (split == "iid"), args)
        runs[split]["fedavg"] = base
        for label, flags in ((mu, ["--algorithm", "fedprox", "--prox-mu", mu[len("fedprox_mu"):]]),
                             (beta, ["--algorithm", "fedavgm", "--server-momentum", beta[len("fedavgm_b"):]]),
                             ("scaffold", ["--algorithm", "scaffold"])):
            runs[split][label] = runs[split].get(label) or fed_avg(out, split, label, flags, args)
        half = math.ceil(max(base["local_steps"]) / 2)
        rounds = 2 * base["config"]["rounds"]
        runs[split]["fedavg_2x"] = fed_avg(out, split, "fedavg_2x", ["--rounds", str(rounds), "--max-steps", str(half)], args)
    return runs


def describe(label, record):
    c = record["config"]
    if c["algorithm"] == "fedprox":
        return f"FedProx, mu {c['prox_mu']:g}"
    if c["algorithm"] == "fedavgm":
        return f"FedAvgM, momentum {c['server_momentum']:g}, server lr {c['server_lr']:g}"
    if c["algorithm"] == "scaffold":
        return "SCAFFOLD"
    return "FedAvg" + (f", {c['rounds']} rounds of <= {c['max_steps']} steps (SCAFFOLD's bytes)" if label == "fedavg_2x" else "")


def render(out, tiny):
    """sweep.md and the plots, from the records in `out` alone."""
    from matplotlib.figure import Figure

    records = {}
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        name = os.path.basename(path)[:-len(".json")]
        split = max((s for s in SPLITS if name.startswith(s + "_")), key=len, default=None)
        if split is None:
            continue
        label = name[len(split) + 1:]
        with open(path) as f:
            records.setdefault(split, {})[label] = json.load(f)
    lines = ["# FedAvg variants (issue 16)", "",
             f"{'Smoke test (--tiny): synthetic data, numbers mean nothing. ' if tiny else ''}"
             "Made by `python bench/fed_sweep.py`; one row per record in this folder. MB: bytes sent "
             "+ received per client rank, over the run. Train s: the rounds' time, without evaluation.", "",
             "| split | algorithm | rounds | final acc % | best acc % | MB per client rank | train s |",
             "|---|---|---|---|---|---|---|"]
    for split, runs in records.items():
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        for label, r in sorted(runs.items(), key=lambda kv: -kv[1]["final_test_acc"]):
            h = r["history"]
            clients = r["bytes_per_rank"][1:]
            mb = sum(b["bytes_sent"] + b["bytes_recv"] for b in clients) / len(clients) / 1e6
            lines.append(f"| {split} | {describe(label, r)} | {len(h)} | {r['final_test_acc']:.2f} | "
                         f"{max(x['test_acc'] for x in h):.2f} | {mb:.1f} | {sum(x['round_time'] for x in h):.0f} |")
            scale = 0.5 if label == "fedavg_2x" else 1  # its 2 rounds cost SCAFFOLD's 1 in bytes
            ax.plot([x["round"] * scale for x in h], [x["test_acc"] for x in h], marker=".", label=describe(label, r))
        ax.set_xlabel("round (FedAvg at SCAFFOLD's bytes: rounds / 2)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{split}{' (tiny smoke test)' if tiny else ''}", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"fed_sweep_{split}.png"), dpi=120)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(out, "sweep.md")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: synthetic data, 3 ranks, 2 rounds of 2 steps, the non-iid shards only")
    parser.add_argument("--out", default=None, help="records folder; default results/reference/fed (--tiny: required)")
    parser.add_argument("--mus", type=float, nargs="+", default=[0.001, 0.01, 0.1], help="FedProx mu to try")
    parser.add_argument("--momenta", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="FedAvgM momentum to try")
    parser.add_argument("--render-only", action="store_true", help="only rebuild sweep.md and the plots")
    args = parser.parse_args()
    if args.tiny and not args.out:
        parser.error("--tiny needs --out, so that smoke records never land among the reference ones")
    out = args.out or os.path.join(ROOT, "results", "reference", "fed")
    os.makedirs(out, exist_ok=True)
    if args.tiny:  # synthetic, tiny shards, and one value of each knob
        args.ranks, args.splits = 3, [TUNE_SPLIT]
        args.common = ["--dataset", "synthetic", "--rounds", "2", "--max-steps", "2", "--batch-size", "16"]
        args.mus, args.momenta = args.mus[:1], args.momenta[:1]
    else:
        args.ranks, args.splits, args.common = 5, list(SPLITS), []
    if not args.render_only:
        t0 = time.perf_counter()
        sweep(out, args)
        print(f"sweep: {time.perf_counter() - t0:.0f} s", flush=True)
        drift = [os.path.join(out, f"{s}_fedavg.json") for s in ("iid", "non-iid") if s in args.splits]
        figure = os.path.join(out if args.tiny else os.path.join(ROOT, "figures"), "client_drift.png")
        subprocess.run([sys.executable, "-m", "extensions.drift", *drift, "--out", figure], cwd=ROOT, check=True)
    print(f"wrote {render(out, args.tiny)}")


if __name__ == "__main__":
    main()
