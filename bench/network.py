"""The paradigms where bandwidth is scarce: an emulated cluster at 1 Gbit/s, 100 Mbit/s and 10 Mbit/s.

    python bench/network.py                        # full (target: <= 15 min on 2 idle cores): results/reference/network/, bench/NETWORK.md, figures/network.png
    python bench/network.py --render-only          # NETWORK.md and the figure again, from the JSON records alone
    python bench/network.py --tiny --out /tmp/net  # smoke test, a few minutes: everything into /tmp/net
    (as root: it builds its hosts with bench/cluster.py, which needs ip netns and tc)

On N = 2, 3, 4 emulated hosts (one rank each; bench/cluster.py) with every link shaped to
each rate in both directions, it runs, one after another, on synthetic data:
  1. dist_sgd_serverless.py with --allreduce mpi, ring and tree, and dist_sgd_param_server.py,
     for a few steps (--max-steps), and fed_avg.py for three rounds of a few local steps; from
     each results JSON the step (round) time and its split, and from the tc counters of every
     host's link the bytes that really went through it, beside the bytes the script counts;
  2. bench/allreduce.py at 100 Mbit/s on 4 hosts, buffers of 64 B to 4 MB in steps of 2x,
     to find where ring starts to beat tree;
  3. FedAvg against the parameter server at 10 Mbit/s on 4 hosts, on the same data budget
     (one local epoch per round against one epoch of steps), to compare bytes per point
     of accuracy and time per pass.
It then fits the alpha-beta model of Thakur, Rabenseifner and Gropp (2005), "Optimization
of collective communication operations in MPICH", to the all-reduce sweep, with n the
buffer in bytes, alpha the cost per message and beta the seconds per byte of one link:
    ring            2(N-1) alpha + 2(N-1)/N n beta
    binomial tree   2 ceil(log2 N) (alpha + n beta)
    parameter server, FedAvg round: 2 alpha + 2(N-1) n beta   (all through the server's link)
and checks it against the step times of part 1 (beta scaled by the link rate), and
extrapolates to N = 1024 on 10 and 100 Gbit/s Ethernet. Records go to
results/reference/network/ (network.json and each script's own JSON); bench/NETWORK.md and
figures/network.png are rendered from them only, so `--render-only` reproduces them.
"""
import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from importlib.metadata import version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from bench/: import bench.cluster from the repo root

import numpy as np  # noqa: E402

from bench import cluster as cl  # noqa: E402

RATES = ("1gbit", "100mbit", "10mbit")
HOSTS = (2, 3, 4)
STEPS = {"1gbit": 10, "100mbit": 6, "10mbit": 3}  # enough to measure; comm grows as the rate drops
LOCAL_STEPS, ROUNDS = 2, 3  # FedAvg in part 1: rounds of a few local steps; the first is warm-up
SWEEP = dict(rate="100mbit", hosts=4, max_bytes=4 << 20, repeats=5)
FEDAVG_VS_PS = dict(rate="10mbit", hosts=4, train_size=1152, passes=2)
RUNS = ("mpi", "ring", "tree", "ps", "fedavg")  # part 1, in this order for each (rate, N)
LABEL = {"mpi": "serverless, MPI_Allreduce", "ring": "serverless, ring", "tree": "serverless, tree",
         "ps": "parameter server", "fedavg": "FedAvg round"}
GBE = {"10 GbE": 10e9, "100 GbE": 100e9}  # extrapolation links
BIG_MODEL = 25_557_032 * 4  # ResNet-50's parameters as float32, for the extrapolation
# An assumed per-message cost for real links, beside the fitted one (the emulation's, on 2
# shared cores): the order of MPI's small-message latency over Ethernet. Not measured here.
ALPHA_REAL = 10e-6
TARGETS = {"ratio": 0.25, "crossover": 2.0, "minutes": 15}


def rate_bits(rate):
    return cl.parse_rate(rate)


# ----------------------------------------------------------------------------- measuring

def script_args(kind, steps, extra=()):
    """The script and flags of one part-1 run."""
    common = ["--dataset", "synthetic", "--seed", "0", *extra]
    if kind in ("mpi", "ring", "tree"):
        return ["dist_sgd_serverless.py", *common, "--epochs", "1", "--max-steps", str(steps), "--allreduce", kind]
    if kind == "ps":
        return ["dist_sgd_param_server.py", *common, "--epochs", "1", "--max-steps", str(steps)]
    return ["fed_avg.py", *common, "--rounds", str(ROUNDS), "--max-steps", str(LOCAL_STEPS)]


def measure(cluster, name, args, out, scratch):
    """Run one script on the cluster; return its record: command, wall time, tc bytes per host."""
    results = os.path.join(out, "runs", f"{name}.json")
    args = [*args, "--results", results]
    if args[0] == "fed_avg.py":
        args += ["--figures-dir", scratch]
    before = cluster.link_bytes()
    t0 = time.perf_counter()
    proc = cluster.mpirun(*args, timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    after = cluster.link_bytes()
    link = [{k: a[k] if k == "host" else a[k] - b[k] for k in a} for a, b in zip(after, before)]
    s = cluster.state
    shown = (f"python bench/cluster.py run --hosts {s['hosts']} --rate {s['rate']} -- "
             + shlex.join(os.path.relpath(a, ROOT) if a.startswith(out) else "SCRATCH" if a == scratch else a
                          for a in args))
    print(f"  {name}: {wall:.1f} s", flush=True)
    return {"name": name, "rate": s["rate"], "hosts": s["hosts"], "command": shown, "wall_s": wall,
            "results": os.path.relpath(results, out), "link": link}


def measure_all(out, tiny):
    out = os.path.abspath(out)
    scratch = tempfile.mkdtemp(prefix="hw5-network-")
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    rates, hosts = (("100mbit",), (2,)) if tiny else (RATES, HOSTS)
    steps = {r: 2 for r in rates} if tiny else STEPS
    record = {"runs": [], "sweep": [], "fedavg_vs_ps": []}
    t_start = time.perf_counter()

    # 1. every paradigm at every rate and size; one cluster per size, reshaped per rate
    for n in hosts:
        with cl.Cluster(n) as cluster:
            for rate in rates:
                cluster.shape(rate)
                print(f"part 1: {n} hosts, {rate}", flush=True)
                for kind in RUNS:
                    record["runs"].append(measure(cluster, f"{rate}_n{n}_{kind}", script_args(kind, steps[rate]),
                                                  out, scratch))

    # 2. the all-reduce sweep: two interleaved runs of bench/allreduce.py (it steps by 4x)
    sweep = dict(SWEEP, hosts=2, max_bytes=64 << 10, repeats=2) if tiny else SWEEP
    with cl.Cluster(sweep["hosts"], sweep["rate"]) as cluster:
        print(f"part 2: all-reduce sweep, {sweep['hosts']} hosts, {sweep['rate']}", flush=True)
        for first in (64, 128):
            folder = os.path.join(scratch, f"sweep{first}")
            args = ["bench/allreduce.py", "--min-bytes", str(first), "--max-bytes", str(sweep["max_bytes"]),
                    "--repeats", str(sweep["repeats"]), "--results-dir", folder, "--figures-dir", folder]
            t0 = time.perf_counter()
            proc = cluster.mpirun(*args, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            with open(os.path.join(folder, f"allreduce_n{sweep['hosts']}.json")) as f:
                raw = json.load(f)
            name = f"allreduce_{sweep['rate']}_n{sweep['hosts']}_from{first}.json"
            with open(os.path.join(out, "runs", name), "w") as f:
                json.dump(raw, f, indent=1)
            record["sweep"].append({"rate": sweep["rate"], "hosts": sweep["hosts"], "results": f"runs/{name}",
                                    "wall_s": time.perf_counter() - t0,
                                    "command": f"python bench/cluster.py run --hosts {sweep['hosts']} "
                                               f"--rate {sweep['rate']} -- " + shlex.join(args[:-4])})

    # 3. FedAvg against the parameter server on the same data budget
    cmp = dict(FEDAVG_VS_PS, hosts=2, train_size=256, passes=1) if tiny else FEDAVG_VS_PS
    with cl.Cluster(cmp["hosts"], cmp["rate"]) as cluster:
        print(f"part 3: FedAvg against the parameter server, {cmp['hosts']} hosts, {cmp['rate']}", flush=True)
        common = ["--dataset", "synthetic", "--seed", "0", "--train-size", str(cmp["train_size"])]
        for kind, args in (("ps", ["dist_sgd_param_server.py", *common, "--epochs", str(cmp["passes"])]),
                           ("fedavg", ["fed_avg.py", *common, "--rounds", str(cmp["passes"]), "--local-epochs", "1"])):
            record["fedavg_vs_ps"].append(measure(cluster, f"budget_{cmp['rate']}_n{cmp['hosts']}_{kind}",
                                                  args, out, scratch))

    record["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                      "wall_s": time.perf_counter() - t_start, "tiny": tiny,
                      "load_avg": os.getloadavg()[2],  # 15 min: whatever else ran on the cores meanwhile
                      "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores, shared by all emulated hosts",
                      "kernel": platform.release(), "python": platform.python_version(),
                      "torch": version("torch"), "mpi4py": version("mpi4py"), "steps": steps,
                      "local_steps": LOCAL_STEPS, "rounds": ROUNDS, "sweep": sweep, "fedavg_vs_ps": cmp,
                      "tbf": "rate RATE burst max(16 KiB, 2 ms at RATE) latency 200ms"}
    with open(os.path.join(out, "network.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def cores(meta):
    """The recorded machine's core count, from "<cpu>, <k> CPU cores, ..."."""
    return int(meta["machine"].split(" CPU cores")[0].rsplit(", ", 1)[1])


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- the model

def model_time(kind, n_ranks, nbytes, alpha, beta):
    """Seconds for one exchange of `nbytes` among n_ranks by the alpha-beta model."""
    if kind == "ring":
        return 2 * (n_ranks - 1) * alpha + 2 * (n_ranks - 1) / n_ranks * nbytes * beta
    if kind == "tree":
        return 2 * math.ceil(math.log2(n_ranks)) * (alpha + nbytes * beta)
    if kind in ("ps", "fedavg"):  # W = N - 1 messages in, then out, all through the server's link
        return 2 * alpha + 2 * (n_ranks - 1) * nbytes * beta
    return None  # MPI_Allreduce: the library picks its algorithm


def sweep_rows(record, out):
    """[(bytes, {"mpi": s, "ring": s, "tree": s})] of the all-reduce sweep, sorted by size."""
    rows = {}
    for part in record["sweep"]:
        for row in load(out, part["results"])["rows"]:
            rows[row["bytes"]] = {k: row[f"{k}_ms"] / 1e3 for k in ("mpi", "ring", "tree")}
    return sorted(rows.items())


def fit_alpha_beta(rows, n_ranks):
    """Least squares in relative error of ring and tree times over the sweep: (alpha, beta)."""
    a, b = [], []
    for nbytes, t in rows:
        for kind in ("ring", "tree"):
            # model_time is linear in (alpha, beta): its coefficients are the times at (1, 0), (0, 1)
            a.append([model_time(kind, n_ranks, nbytes, 1, 0) / t[kind], model_time(kind, n_ranks, nbytes, 0, 1) / t[kind]])
            b.append(1.0)
    (alpha, beta), *_ = np.linalg.lstsq(np.array(a), np.array(b), rcond=None)
    return float(alpha), float(beta)


def crossover(sizes, ring, tree):
    """The buffer size above which ring beats tree: log-linear interpolation of log(ring/tree)
    between the last size where tree wins and the next; None if one wins everywhere."""
    r = np.log(np.array(ring) / np.array(tree))
    for i in range(len(r) - 1, 0, -1):
        if r[i - 1] > 0 >= r[i] and all(r[i:] <= 0):
            x0, x1 = math.log(sizes[i - 1]), math.log(sizes[i])
            return math.exp(x0 + (x1 - x0) * r[i - 1] / (r[i - 1] - r[i]))
    return None


def predicted_crossover(n_ranks, alpha, beta):
    """Where 2(N-1) a + 2(N-1)/N n b = 2L (a + n b), L = ceil(log2 N)."""
    steps = math.ceil(math.log2(n_ranks))
    gain = 2 * steps - 2 * (n_ranks - 1) / n_ranks  # tree's extra bandwidth term, in n beta
    if gain <= 0:
        return None
    return (2 * (n_ranks - 1) - 2 * steps) * alpha / (gain * beta)


# ----------------------------------------------------------------------------- rendering

def load(out, rel):
    with open(os.path.join(out, rel)) as f:
        return json.load(f)


def run_row(run, out, alpha, beta100):
    """One part-1 run: measured and predicted seconds per step (round), with the split."""
    r = load(out, run["results"])
    n, steps_or_rounds = run["hosts"], None
    beta = beta100 * rate_bits("100mbit") / rate_bits(run["rate"])
    nbytes = 4 * r["params"]
    kind = run["name"].rsplit("_", 1)[1]
    if r["script"] == "fed_avg":
        h = r["history"][1:] or r["history"]  # the first round is warm-up (its clients start slowly)
        measured = float(np.mean([x["round_time"] for x in h]))
        compute = float(np.mean([x["train_time"] for x in h]))
        steps_or_rounds = len(r["history"])
        nbytes += 4  # the count n_k rides along on the way up
    else:
        h = r["history"][0]
        steps_or_rounds = h["steps"]
        measured = h["step_time"]
        if r["script"] == "dist_sgd_serverless":
            compute = (h["train_time"] - h["comm_time"] - h["wait_time"]) / steps_or_rounds
        else:  # a worker's time in its sends and receives includes waiting for the server
            compute = h["step_time"] - h["comm_time"] / steps_or_rounds
    comm = model_time(kind, n, nbytes, alpha, beta)
    predicted = None if comm is None else compute + comm
    # bytes: the busiest host by tc, and the same rank's count from the script (host k = rank k - 1)
    per_rank = r["bytes_per_rank"]
    busiest = max(range(n), key=lambda k: run["link"][k]["up"] + run["link"][k]["down"])
    counted = per_rank[busiest]
    script_bytes = None if counted["bytes_sent"] is None else counted["bytes_sent"] + counted["bytes_recv"]
    link = run["link"][busiest]
    return {"kind": kind, "rate": run["rate"], "hosts": n, "count": steps_or_rounds, "measured": measured,
            "compute": compute, "comm_model": comm, "predicted": predicted, "busiest": busiest,
            "tc_bytes": link["up"] + link["down"], "dropped": link.get("dropped"), "script_bytes": script_bytes,
            "nbytes": nbytes,
            "acc": r["final_test_acc"]}


def budget_row(run, out, alpha, beta100):
    """One part-3 run: the server host's bytes, accuracy, and the time of its last pass."""
    r = load(out, run["results"])
    n, h = run["hosts"], r["history"][-1]  # the last pass: past the warm-up of the first
    beta = beta100 * rate_bits("100mbit") / rate_bits(run["rate"])
    kind = run["name"].rsplit("_", 1)[1]
    comm = model_time(kind, n, 4 * r["params"] + (4 if kind == "fedavg" else 0), alpha, beta)
    if kind == "fedavg":
        exchanges, last, predicted = len(r["history"]), h["round_time"], h["train_time"] + comm
        total = sum(x["round_time"] for x in r["history"])
        sgd_steps = max(r["local_steps"]) * len(r["history"])  # per client
    else:
        exchanges, last, sgd_steps = r["steps"], h["train_time"], r["steps"]
        per_pass = r["steps"] // len(r["history"])
        predicted = per_pass * (h["step_time"] - h["comm_time"] / per_pass + comm)
        total = sum(x["train_time"] for x in r["history"])
    link, counted = run["link"][0], r["bytes_per_rank"][0]  # the server is rank 0, on node-1
    return {"kind": kind, "rate": run["rate"], "hosts": n, "exchanges": exchanges, "sgd_steps": sgd_steps,
            "batch": r["config"]["batch_size"] * (1 if kind == "fedavg" else n - 1), "last_pass": last,
            "predicted_pass": predicted, "total": total, "tc_bytes": link["up"] + link["down"],
            "script_bytes": counted["bytes_sent"] + counted["bytes_recv"], "acc": r["final_test_acc"]}


def analyse(record, out):
    meta = record["meta"]
    sweep = meta["sweep"]
    rows = sweep_rows(record, out)
    alpha, beta = fit_alpha_beta(rows, sweep["hosts"])
    sizes = [b for b, _ in rows]
    cross = crossover(sizes, [t["ring"] for _, t in rows], [t["tree"] for _, t in rows])
    runs = [run_row(run, out, alpha, beta) for run in record["runs"]]
    budget = [budget_row(run, out, alpha, beta) for run in record["fedavg_vs_ps"]]
    return {"alpha": alpha, "beta": beta, "rows": rows, "cross": cross,
            "cross_model": predicted_crossover(sweep["hosts"], alpha, beta), "runs": runs, "budget": budget}


def ms(x):
    return "–" if x is None else f"{1e3 * x:.0f}" if x >= 0.1 else f"{1e3 * x:.1f}"


def size_text(b):
    if b is None:
        return "–"
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def render(record, out, md_path, fig_path):
    a = analyse(record, out)
    meta, alpha, beta = record["meta"], a["alpha"], a["beta"]
    sweep, cmp = meta["sweep"], meta["fedavg_vs_ps"]
    ideal_beta = 8 / rate_bits(sweep["rate"])
    efficiency = ideal_beta / beta
    by = {(r["kind"], r["rate"], r["hosts"]): r for r in a["runs"]}
    big_n = max(r["hosts"] for r in a["runs"])
    slow = RATES[-1] if (("ring", RATES[-1], big_n) in by) else a["runs"][-1]["rate"]
    ps, ring = by.get(("ps", slow, big_n)), by.get(("ring", slow, big_n))
    ratio = ratio_model = None
    if ps and ring:
        ratio, ratio_model = ps["measured"] / ring["measured"], ps["predicted"] / ring["predicted"]
    fed, psb = ({r["kind"]: r for r in a["budget"]}.get(k) for k in ("fedavg", "ps"))
    rel = os.path.relpath
    md_dir = os.path.dirname(os.path.abspath(md_path))

    L = ["# The paradigms on an emulated cluster: where bandwidth is scarce", "",
         f"Written by `python bench/network.py` from the records in `{rel(out, ROOT)}/` "
         f"(`--render-only` rewrites this file and the figure from them alone).", "",
         f"- Date: {meta['date']}; the measurements took {meta['wall_s'] / 60:.1f} min" + (
             f"; the machine's 15-minute load average at the end was {meta['load_avg']:.1f} on {cores(meta)} cores "
             "(the bench itself keeps at most 4 ranks busy; more means other jobs shared the cores)."
             if "load_avg" in meta else "."),
         f"- Machine: {meta['machine']}; Linux {meta['kernel']}; Python {meta['python']}, torch {meta['torch']}, "
         f"mpi4py {meta['mpi4py']}.",
         "- Cluster: `bench/cluster.py`. Each host is a network namespace with its own hostname, one rank, "
         "and a veth link into a bridge; ranks start through mpirun's rsh launcher and talk TCP "
         "(`--mca btl tcp,self`), one thread each. Every link is shaped by `tc tbf` in both "
         "directions (burst max(16 KiB, 2 ms at the rate), queue 200 ms); there is no delay emulation "
         "(no netem in this kernel), so the latency alpha is software's: Python, MPI, TCP over veth.",
         "- All hosts share this machine's cores: compute is slower than on real hosts, and the 1 Gbit/s runs are compute-bound.",
         f"- Data: synthetic (CIFAR-shaped), model of {a['runs'][0]['nbytes'] // 4:,} parameters: "
         f"n = {a['runs'][0]['nbytes']:,} bytes of float32 per exchange.", ""]

    # targets
    L += ["## Targets", "", "| measure | measured | predicted by the model | goal | result |", "|---|---|---|---|---|"]
    if ratio:
        err = abs(ratio_model - ratio) / ratio
        L.append(f"| parameter server / ring step time, {big_n} hosts, {slow} | {ratio:.2f} | {ratio_model:.2f} "
                 f"({100 * err:.0f}% off) | model within {100 * TARGETS['ratio']:.0f}% | "
                 f"{'**met**' if err <= TARGETS['ratio'] else '**missed**'} |")
    if a["cross"] and a["cross_model"]:
        f = max(a["cross"], a["cross_model"]) / min(a["cross"], a["cross_model"])
        L.append(f"| ring-vs-tree crossover buffer, {sweep['rate']}, N = {sweep['hosts']} | {size_text(a['cross'])} "
                 f"| {size_text(a['cross_model'])} ({f:.1f}x off) | within {TARGETS['crossover']:.0f}x | "
                 f"{'**met**' if f <= TARGETS['crossover'] else '**missed**'} |")
    else:
        L.append(f"| ring-vs-tree crossover buffer, {sweep['rate']}, N = {sweep['hosts']} | "
                 f"{size_text(a['cross']) if a['cross'] else 'no crossover in the sweep'} | "
                 f"{size_text(a['cross_model'])} | within {TARGETS['crossover']:.0f}x | **not measured** |")
    if fed and psb:
        fewer = (psb["tc_bytes"] / psb["acc"]) / (fed["tc_bytes"] / fed["acc"])
        L.append(f"| FedAvg against parameter server, {cmp['rate']}, {cmp['hosts']} hosts, same samples: server-link "
                 f"bytes per point of test accuracy | {fewer:.1f}x fewer ({fed['acc']:.1f}% against {psb['acc']:.1f}%) "
                 f"| {psb['exchanges'] / fed['exchanges']:.1f}x fewer bytes (exchanges) | measured | see part 3 |")
        L.append(f"| the same: FedAvg round against parameter-server epoch (one pass each) | "
                 f"{psb['last_pass'] / fed['last_pass']:.1f}x faster | {psb['predicted_pass'] / fed['predicted_pass']:.1f}x "
                 f"| measured | see part 3 |")
    L.append(f"| `bench/network.py` wall time | {meta['wall_s'] / 60:.1f} min | – | <= {TARGETS['minutes']} min | "
             f"{'**met**' if meta['wall_s'] <= 60 * TARGETS['minutes'] else '**missed**'} |")
    L.append("")
    L += model_misses(a, by, big_n, slow, ratio, meta)

    # the model
    L += ["## The alpha-beta model", "",
          f"Fitted to the ring and tree times of part 2 ({sweep['rate']}, N = {sweep['hosts']}, "
          f"{len(a['rows'])} buffer sizes), by least squares in relative error:", "",
          f"- alpha = {1e6 * alpha:.0f} us per message: no wire delay here, so this is the software's cost of a "
          "step (Python, MPI, TCP over veth), and waiting to be scheduled again on cores shared by all the hosts "
          "and whatever else runs on the machine;",
          f"- beta = {1e9 * beta:.1f} ns per byte at {sweep['rate']}, against {1e9 * ideal_beta:.0f} ns for the bare rate: "
          f"the payload moves at {100 * efficiency:.0f}% of the rate (TCP/IP and Ethernet headers take about 4.5%; "
          "TCP's reaction to the token bucket the rest).", "",
          "Other rates use beta x (100 Mbit/s / rate), the same alpha. Predicted step = the run's own compute "
          "time (its step time less its time in communication) + the model's communication time. The model's "
          "error so contains everything not in it: waiting for the slowest rank, TCP slow start, the server's "
          "update, the first step's connection set-up.", ""]

    # part 1
    L += ["## 1. Step time against link rate and hosts", "",
          f"Serverless and the parameter server: mean over {', '.join(f'{v} steps at {k}' for k, v in meta['steps'].items())}, "
          f"from `step_time` in each JSON (the first step's set-up included). FedAvg: mean round time of rounds 2 "
          f"to {meta['rounds']}, each of {meta['local_steps']} local steps per client (the first round is warm-up: "
          "its clients' first steps take seconds; the server's evaluation is excluded). All times in ms. "
          "The parameter server and FedAvg use one of the N hosts as the server: N - 1 workers.", ""]
    L += ["| link | N | run | measured | compute | model comm | predicted | error |", "|---|---|---|---|---|---|---|---|"]
    for r in a["runs"]:
        err = "–" if r["predicted"] is None else f"{100 * (r['predicted'] - r['measured']) / r['measured']:+.0f}%"
        L.append(f"| {r['rate']} | {r['hosts']} | {LABEL[r['kind']]} | {ms(r['measured'])} | {ms(r['compute'])} | "
                 f"{ms(r['comm_model'])} | {ms(r['predicted'])} | {err} |")
    L += ["", "Bytes through the busiest host's link for the whole run (up + down, from the `tc -s` counters of "
          "its two token buckets), beside the bytes that the script counted for the rank on that host "
          "(`bytes_per_rank`; null for MPI_Allreduce, which does not say). tc counts Ethernet frames: "
          "payload plus headers, TCP's acknowledgements, the launcher's traffic, and what the script does not "
          "count (the initial broadcast of the weights, the evaluation's small reductions).", "",
          "Dropped: packets that the token buckets of that host's link dropped (their queue was full), "
          "which TCP sent again, so tc counts them twice.", "",
          "| link | N | run | busiest host | tc bytes | script bytes | tc / script | dropped |",
          "|---|---|---|---|---|---|---|---|"]
    for r in a["runs"]:
        sb = r["script_bytes"]
        L.append(f"| {r['rate']} | {r['hosts']} | {LABEL[r['kind']]} | node-{r['busiest'] + 1} | {r['tc_bytes']:,} | "
                 f"{'–' if sb is None else format(sb, ',')} | {'–' if not sb else format(r['tc_bytes'] / sb, '.2f')} | "
                 f"{'–' if r['dropped'] is None else r['dropped']} |")
    L.append("")

    # part 2
    L += [f"## 2. All-reduce time against buffer size, {sweep['rate']}, N = {sweep['hosts']}", "",
          f"`bench/allreduce.py` on the cluster, twice (from 64 B and from 128 B, each stepping by 4x): median "
          f"of {sweep['repeats']} calls, the slowest rank's time, in ms. Model: the fitted alpha and beta.", "",
          "| size | mpi | ring | tree | ring model | tree model | faster |", "|---|---|---|---|---|---|---|"]
    for b, t in a["rows"]:
        rm, tm = (model_time(k, sweep["hosts"], b, alpha, beta) for k in ("ring", "tree"))
        L.append(f"| {size_text(b)} | {1e3 * t['mpi']:.2f} | {1e3 * t['ring']:.2f} | {1e3 * t['tree']:.2f} | "
                 f"{1e3 * rm:.2f} | {1e3 * tm:.2f} | {'ring' if t['ring'] < t['tree'] else 'tree'} |")
    L += ["", f"Crossover (ring faster above it): measured {size_text(a['cross']) if a['cross'] else 'none'}, "
          f"model {size_text(a['cross_model'])} = 2(N-1) - 2 log2 N over 2 log2 N - 2(N-1)/N, times alpha / beta.", ""]

    # part 3
    if fed and psb:
        L += [f"## 3. FedAvg against the parameter server, {cmp['rate']}, {cmp['hosts']} hosts", "",
              f"The same samples: {cmp['train_size']} synthetic training samples, {cmp['passes']} passes. The parameter "
              f"server runs {cmp['passes']} epochs of global batch {cmp['hosts'] - 1} x 64 (one exchange per step); "
              f"FedAvg runs {cmp['passes']} rounds in which each of its {cmp['hosts'] - 1} clients makes one pass over "
              "its shard in batches of 64 (one exchange per round). Bytes: the server host's link, from tc, and what "
              "the server's rank counted. Pass time: the last epoch (round), past the first one's warm-up; "
              "predicted: its compute plus the model's communication.", "",
              "| run | exchanges | server link bytes (tc) | counted by the script | test acc % | tc bytes per point "
              "| last pass s | predicted s | all passes s |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in (("parameter server", psb), ("FedAvg", fed)):
            L.append(f"| {name} | {r['exchanges']} | {r['tc_bytes']:,} | {r['script_bytes']:,} | {r['acc']:.2f} | "
                     f"{r['tc_bytes'] / max(r['acc'], 1e-9):,.0f} | {r['last_pass']:.2f} | {r['predicted_pass']:.2f} | "
                     f"{r['total']:.2f} |")
        L += ["", "Synthetic data and a few passes: the accuracies say how far each got on these samples, not what "
              "the CIFAR-10 runs reach. The ratio of bytes is that of the exchanges, whatever the data (the "
              "default runs, README, make 8 epochs of steps against 10 rounds). All passes include the first, "
              "whose warm-up (FedAvg's clients start slowly) the last pass leaves out.", ""]

    # extrapolation
    L += ["## Extrapolation to N = 1024", "",
          f"The model at N = 1024 on 10 and 100 Gbit/s links, with beta from the payload share of the rate measured "
          f"here ({100 * efficiency:.0f}%), and two per-message costs: the fitted alpha ({1e6 * alpha:.0f} us, this "
          f"emulation's: Python, MPI and TCP over veth on 2 shared cores) and an assumed {1e6 * ALPHA_REAL:.0f} us, "
          "the order of MPI's small-message latency on a real Ethernet cluster (not measured here). The figure "
          "(panels c and d) uses the assumed one.", "",
          "| link | alpha | n | ring ms | tree ms | parameter server ms | fastest | ring / tree crossover |",
          "|---|---|---|---|---|---|---|---|"]
    for link, bits in GBE.items():
        b = 8 / (bits * efficiency)
        for alpha_, name in ((alpha, "fitted"), (ALPHA_REAL, "assumed")):
            for n_bytes in (a["runs"][0]["nbytes"], BIG_MODEL):
                t = {k: model_time(k, 1024, n_bytes, alpha_, b) for k in ("ring", "tree", "ps")}
                L.append(f"| {link} | {1e6 * alpha_:.0f} us ({name}) | {size_text(n_bytes)} | {1e3 * t['ring']:.1f} | "
                         f"{1e3 * t['tree']:.1f} | {1e3 * t['ps']:.0f} | "
                         f"{LABEL[min(t, key=t.get)].replace('serverless, ', '')} | "
                         f"{size_text(predicted_crossover(1024, alpha_, b))} |")
    L.append("")
    L += answer_section(a, by, big_n, slow, ratio, fed, psb)
    L += ["## Commands", "", "```"] + [run["command"] for run in record["runs"] + record["sweep"] + record["fedavg_vs_ps"]] + ["```", ""]

    os.makedirs(md_dir, exist_ok=True)
    with open(md_path, "w") as f:
        f.write("\n".join(L))
    plot(a, sweep, fig_path)
    return a


def model_misses(a, by, big_n, slow, ratio, meta):
    """Where the prediction and the measurement part, in numbers, with the likely cause."""
    predicted = [r for r in a["runs"] if r["predicted"] is not None]
    within = sum(abs(r["predicted"] - r["measured"]) <= TARGETS["ratio"] * r["measured"] for r in predicted)
    lines = [f"Of the {len(predicted)} step (round) times of part 1 that the model covers, {within} are predicted "
             f"within {100 * TARGETS['ratio']:.0f}%.", ""]
    ps, ring = by.get(("ps", slow, big_n)), by.get(("ring", slow, big_n))
    if not (ps and ring and ratio):
        return lines
    rings = [r for r in predicted if r["kind"] == "ring" and r["rate"] == slow]
    slow_ring = np.mean([(r["measured"] - r["compute"]) / r["comm_model"] for r in rings])
    beta = a["beta"] * rate_bits("100mbit") / rate_bits(slow)
    overlap = ps["compute"] + 2 * a["alpha"] + (big_n - 1) * ps["nbytes"] * beta
    lines += [
        f"Where it misses, at {slow}: the ring spends {slow_ring:.1f}x the model's time outside compute (mean over "
        f"N), the parameter server {(ps['measured'] - ps['compute']) / ps['comm_model']:.2f}x on {big_n} hosts. "
        "Likely causes, not isolated here: the ring's 2(N-1) exchanges each wait for the slowest pair, and "
        "each step starts on TCP connections that sat idle through the compute, longer than the minimum "
        "retransmission timeout, which Linux answers by shrinking the congestion window again "
        "(tcp_slow_start_after_idle); the fit came from back-to-back calls, which do not pay this. The "
        "parameter server beats its model because the model serialises the gather and the broadcast, while "
        "the server's link is full duplex: a worker that receives its weights first computes and sends its "
        "next gradient while the server is still sending to the others. With that overlap complete, the "
        f"model gives {ms(overlap)} ms for its step (measured {ms(ps['measured'])} ms) and a ratio of "
        f"{overlap / ring['predicted']:.2f} to the ring's predicted step (measured ratio {ratio:.2f}).", ""]
    return lines


def answer_section(a, by, big_n, slow, ratio, fed, psb):
    """Q6/Q7 at cluster scale, with the numbers of this run."""
    alpha, beta = a["alpha"], a["beta"]
    fast = RATES[0]
    lines = ["## Q6 and Q7 at cluster scale", ""]
    ring_fast, ps_fast = by.get(("ring", fast, big_n)), by.get(("ps", fast, big_n))
    tree_slow, ring_slow = by.get(("tree", slow, big_n)), by.get(("ring", slow, big_n))
    if ring_fast and ps_fast and ratio:
        lines.append(
            f"**Where communication is cheap, nothing wins by much.** At {fast} on {big_n} hosts a ring step takes "
            f"{ms(ring_fast['measured'])} ms and a parameter-server step {ms(ps_fast['measured'])} ms, mostly compute "
            f"({ms(ring_fast['compute'])} ms): the {size_text(ring_fast['nbytes'])} gradient takes "
            f"{ms(ring_fast['nbytes'] * 8 / rate_bits(fast))} ms to cross a {fast} link. At {slow} the same "
            f"step is {ms(ring_slow['measured'])} ms with the ring and {ms(by[('ps', slow, big_n)]['measured'])} ms "
            f"with the server ({ratio:.1f}x): the server's link carries 2(N-1) n bytes per step, each ring link "
            f"2(N-1)/N n, so the server's step grows as N while the ring's stays, and no compute hides it "
            "(less than N times here, since the server's sends and receives overlap; see Targets).")
    if tree_slow and ring_slow:
        lines.append("")
        lines.append(
            f"**Ring against tree (Q7).** A tree moves the whole buffer on each of its 2 log2 N rounds, a ring moves "
            f"1/N of it on each of 2(N-1) steps. At {slow} on {big_n} hosts the tree step takes "
            f"{ms(tree_slow['measured'])} ms against the ring's {ms(ring_slow['measured'])} ms. The tree wins only "
            f"below the crossover, where the per-message cost alpha dominates: here "
            f"{size_text(a['cross']) if a['cross'] else 'nowhere in the sweep'} measured, about "
            f"{size_text(a['cross_model'])} by the model, far below a gradient. At N = 1024 the ring's 2046 "
            f"latencies cost {1e3 * 2046 * alpha:.0f} ms at the fitted alpha, {1e3 * 2046 * ALPHA_REAL:.0f} ms at "
            f"{1e6 * ALPHA_REAL:.0f} us, so small buffers (or very many ranks) go to "
            "trees, and large ones to rings; libraries switch by size (Open MPI's tuned decision, NCCL's "
            "ring and tree), and hierarchical schemes combine both.")
    if fed and psb:
        fewer = (psb["tc_bytes"] / psb["acc"]) / (fed["tc_bytes"] / fed["acc"])
        lines.append("")
        lines.append(
            f"**FedAvg (Q6).** On the same data budget at {fed['rate']} FedAvg moved {fewer:.1f}x fewer bytes per "
            f"point of accuracy through the server's link, reaching {fed['acc']:.1f}% against the parameter server's "
            f"{psb['acc']:.1f}%: it exchanges the weights once per round instead of once per step, so its "
            "traffic falls by the number of local steps, which is what matters where the link is the bottleneck "
            "(phones, sites joined by a WAN). "
            + (f"On these iid shards it also ended more accurate for the same samples ({fed['sgd_steps']} SGD "
               f"steps of batch {fed['batch']} on each client, against the server's {psb['sgd_steps']} of batch "
               f"{psb['batch']}). "
               if fed["acc"] >= psb["acc"] else "It ended less accurate for the same samples here. ")
            + "The price is statistical and grows with skew: on non-iid clients the local models drift apart "
            "(README, Q5), and more rounds are needed for the same accuracy.")
    lines.append("")
    lines.append(
        "**At scale.** The parameter server's time grows as N at a fixed link; the ring's bandwidth term stays at "
        "2n beta for any N, and its latency term grows as N; the tree's grows as log N in both. So: a parameter "
        "server only with few workers or sharded over many servers; rings for large gradients; trees "
        "(or hierarchical all-reduce) for small messages and very large N; and where even the ring's 2n bytes "
        "per step are too many for the link, fewer exchanges (FedAvg, local SGD) or smaller ones (compression).")
    lines.append("")
    return lines


def plot(a, sweep, path):
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    fig = Figure(figsize=(11, 8.5))
    axes = fig.subplots(2, 2)
    alpha, beta = a["alpha"], a["beta"]
    colors = {"mpi": "C0", "ring": "C1", "tree": "C2", "ps": "C3", "fedavg": "C4"}

    ax = axes[0][0]
    sizes = np.array([b for b, _ in a["rows"]])
    grid = np.geomspace(sizes[0], sizes[-1], 100)
    for kind in ("mpi", "ring", "tree"):
        ax.loglog(sizes, [1e3 * t[kind] for _, t in a["rows"]], "o", color=colors[kind], label=f"{kind} measured")
        if kind != "mpi":
            ax.loglog(grid, [1e3 * model_time(kind, sweep["hosts"], b, alpha, beta) for b in grid], "-",
                      color=colors[kind], label=f"{kind} model")
    for x, style in ((a["cross"], ":"), (a["cross_model"], "--")):
        if x:
            ax.axvline(x, color="gray", ls=style)
    ax.set(xlabel="buffer (bytes)", ylabel="ms per all-reduce",
           title=f"(a) all-reduce, {sweep['rate']}, N = {sweep['hosts']} (dotted: measured crossover, dashed: model)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[0][1]
    markers = {"1gbit": "o", "100mbit": "s", "10mbit": "^"}
    for r in a["runs"]:
        if r["predicted"] is not None:
            ax.loglog(1e3 * r["measured"], 1e3 * r["predicted"], markers.get(r["rate"], "x"), color=colors[r["kind"]])
    lo = min(1e3 * r["measured"] for r in a["runs"]) / 2
    hi = max(1e3 * r["measured"] for r in a["runs"]) * 2
    ax.loglog([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.loglog([lo, hi], [0.75 * lo, 0.75 * hi], "k:", lw=0.6)
    ax.loglog([lo, hi], [1.25 * lo, 1.25 * hi], "k:", lw=0.6)
    for kind in ("ring", "tree", "ps", "fedavg"):
        ax.plot([], [], "s", color=colors[kind], label=LABEL[kind])
    for rate, m in markers.items():
        ax.plot([], [], m, color="gray", label=rate)
    ax.set(xlabel="measured ms per step (round)", ylabel="predicted ms", title="(b) model against the cluster (dotted: +-25%)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    efficiency = (8 / rate_bits(sweep["rate"])) / beta
    ns = np.unique(np.geomspace(2, 1024, 40).astype(int))
    for ax, (link, bits) in zip(axes[1], GBE.items()):
        b = 8 / (bits * efficiency)
        for n_bytes, style in ((a["runs"][0]["nbytes"], "-"), (BIG_MODEL, "--")):
            for kind in ("ring", "tree", "ps"):
                ax.loglog(ns, [1e3 * model_time(kind, n, n_bytes, ALPHA_REAL, b) for n in ns], style,
                          color=colors[kind], label=f"{LABEL[kind].replace('serverless, ', '')}, {size_text(n_bytes)}")
        ax.set(xlabel="ranks N", ylabel="ms per exchange (model)",
               title=f"({'c' if link == '10 GbE' else 'd'}) extrapolated to {link}: alpha = {1e6 * ALPHA_REAL:.0f} us "
                     f"(assumed), beta at {100 * efficiency:.0f}% of the rate")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "reference", "network"),
                        help="where the JSON records go; with another folder than the default, the markdown "
                             "and the figure go there too, not to bench/ and figures/")
    parser.add_argument("--tiny", action="store_true", help="smoke test: 2 hosts, one rate, few steps; needs --out")
    parser.add_argument("--render-only", action="store_true", help="no measuring: render from the records in --out")
    args = parser.parse_args()
    default_out = os.path.join(ROOT, "results", "reference", "network")
    if args.tiny and os.path.abspath(args.out) == default_out:
        parser.error("--tiny writes only into --out: give one, e.g. --out /tmp/net")
    if os.path.abspath(args.out) != default_out:  # only the reference records render into bench/ and figures/
        md_path, fig_path = os.path.join(args.out, "NETWORK.md"), os.path.join(args.out, "network.png")
    else:
        md_path, fig_path = os.path.join(ROOT, "bench", "NETWORK.md"), os.path.join(ROOT, "figures", "network.png")

    if args.render_only:
        record = load(args.out, "network.json")
    else:
        reason = cl.can_create()
        if reason:
            sys.exit(f"cannot emulate a cluster here: {reason}")
        with cl.signals_raise():  # SIGTERM tears the current cluster down, as Ctrl-C does
            record = measure_all(args.out, args.tiny)
    a = render(record, args.out, md_path, fig_path)
    print(f"alpha {1e6 * a['alpha']:.0f} us, beta {1e9 * a['beta']:.1f} ns/B at {record['meta']['sweep']['rate']}; "
          f"wrote {os.path.relpath(md_path)} and {os.path.relpath(fig_path)}")


if __name__ == "__main__":
    main()
