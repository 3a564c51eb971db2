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
  2. bench/allreduce.py at 100 Mbit/s on 4 hosts, buffers of 64 B to 1 MB in steps of 2x,
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
STEPS = {"1gbit": 4, "100mbit": 3, "10mbit": 3}  # enough to measure; comm grows as the rate drops
LOCAL_STEPS, ROUNDS = 2, 3  # FedAvg in part 1: rounds of a few local steps; the first is warm-up
SWEEP = dict(rate="100mbit", hosts=4, max_bytes=1 << 20, repeats=4)
FEDAVG_VS_PS = dict(rate="10mbit", hosts=4, train_size=768, passes=2)
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

    # 1. every paradigm at every rate and size
    record["runs"] += measure_paradigms(hosts, rates, steps, out, scratch)

    # 2. the all-reduce sweep
    sweep = dict(SWEEP, hosts=2, max_bytes=256 << 10, repeats=2) if tiny else SWEEP  # beta needs 8 bursts
    record["sweep"].append(measure_sweep(sweep, out, scratch))

    # 3. FedAvg against the parameter server on the same data budget
    cmp = dict(FEDAVG_VS_PS, hosts=2, train_size=256, passes=1) if tiny else FEDAVG_VS_PS
    record["fedavg_vs_ps"] += measure_budget(cmp, out, scratch)

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


def measure_paradigms(hosts, rates, steps, out, scratch):
    """Part 1: each of RUNS at each rate on each number of hosts; one cluster per number of hosts,
    reshaped per rate. Returns their records, in that order."""
    runs = []
    for n in hosts:
        with cl.Cluster(n) as cluster:
            for rate in rates:
                cluster.shape(rate)
                print(f"part 1: {n} hosts, {rate}", flush=True)
                for kind in RUNS:
                    runs.append(measure(cluster, f"{rate}_n{n}_{kind}", script_args(kind, steps[rate]),
                                        out, scratch))
    return runs


def measure_sweep(sweep, out, scratch):
    """Part 2: bench/allreduce.py on its own cluster; its JSON is copied into <out>/runs/. Returns
    the record's entry for it."""
    with cl.Cluster(sweep["hosts"], sweep["rate"]) as cluster:
        print(f"part 2: all-reduce sweep, {sweep['hosts']} hosts, {sweep['rate']}", flush=True)
        folder = os.path.join(scratch, "sweep")
        args = ["bench/allreduce.py", "--min-bytes", "64", "--max-bytes", str(sweep["max_bytes"]), "--factor", "2",
                "--repeats", str(sweep["repeats"]), "--results-dir", folder, "--figures-dir", folder]
        t0 = time.perf_counter()
        proc = cluster.mpirun(*args, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(os.path.join(folder, f"allreduce_n{sweep['hosts']}.json")) as f:
            raw = json.load(f)
        name = f"allreduce_{sweep['rate']}_n{sweep['hosts']}.json"
        with open(os.path.join(out, "runs", name), "w") as f:
            json.dump(raw, f, indent=1)
        return {"rate": sweep["rate"], "hosts": sweep["hosts"], "results": f"runs/{name}",
                "wall_s": time.perf_counter() - t0,
                "command": f"python bench/cluster.py run --hosts {sweep['hosts']} "
                           f"--rate {sweep['rate']} -- " + shlex.join(args[:-4])}


def measure_budget(cmp, out, scratch):
    """Part 3: the parameter server for `passes` epochs, then FedAvg for as many rounds of one local
    epoch. Returns their two records."""
    runs = []
    with cl.Cluster(cmp["hosts"], cmp["rate"]) as cluster:
        print(f"part 3: FedAvg against the parameter server, {cmp['hosts']} hosts, {cmp['rate']}", flush=True)
        common = ["--dataset", "synthetic", "--seed", "0", "--train-size", str(cmp["train_size"])]
        for kind, args in (("ps", ["dist_sgd_param_server.py", *common, "--epochs", str(cmp["passes"])]),
                           ("fedavg", ["fed_avg.py", *common, "--rounds", str(cmp["passes"]), "--local-epochs", "1"])):
            runs.append(measure(cluster, f"budget_{cmp['rate']}_n{cmp['hosts']}_{kind}", args, out, scratch))
    return runs


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


def fit_alpha_beta(rows, n_ranks, burst):
    """alpha and beta from the two ends of the sweep, ring and tree together, each by least
    squares in relative error: alpha from the buffers of at most burst/4, beta from those of
    at least 8 bursts.

    The token bucket lets a message's first `burst` bytes through at the veth's own speed, so a
    small buffer costs only its messages, m alpha, and a buffer of a few bursts less than its
    bytes; neither is in the model, and fitted as it stands they would pull beta below the rate.
    Past 8 bursts, the time is m alpha + c beta, with alpha now known.
    """
    small, large = [], []
    for nbytes, t in rows:
        for kind in ("ring", "tree"):
            # model_time is linear in (alpha, beta): m and c are its values at (1, 0) and (0, 1)
            m, c = model_time(kind, n_ranks, nbytes, 1, 0), model_time(kind, n_ranks, nbytes, 0, 1)
            if nbytes <= burst / 4:
                small.append(m / t[kind])
            elif nbytes >= 8 * burst:
                large.append((m / t[kind], c / t[kind]))
    if not small or not large:
        raise ValueError(f"the sweep needs buffers of at most {burst // 4} and at least {8 * burst} bytes")
    small = np.array(small)
    alpha = small.sum() / (small ** 2).sum()  # argmin of sum (alpha m / t - 1)^2
    m, c = np.array(large).T
    beta = (c * (1 - alpha * m)).sum() / (c ** 2).sum()
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
    n, steps_or_rounds, in_comm, waiting = run["hosts"], None, None, None
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
            in_comm, waiting = h["comm_time"] / steps_or_rounds, h["wait_time"] / steps_or_rounds
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
            "nbytes": nbytes, "in_comm": in_comm, "waiting": waiting,
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
    alpha, beta = fit_alpha_beta(rows, sweep["hosts"], cl.burst_bytes(sweep["rate"]))
    sizes = [b for b, _ in rows]
    cross = crossover(sizes, [t["ring"] for _, t in rows], [t["tree"] for _, t in rows])
    runs = [run_row(run, out, alpha, beta) for run in record["runs"]]
    # A parameter server's compute is its step less its workers' time in communication, and the
    # server's clock stops when its last send is queued, while up to the token bucket's 200 ms
    # of it is still on the way: at a slow link and a few steps, that skew can exceed the
    # compute. The workers' compute does not depend on the link, so every rate takes it from
    # the fastest rate's run with the same hosts, where the queue holds the least.
    fastest = {r["hosts"]: r for r in runs if r["kind"] == "ps" and r["rate"] == RATES[0]}
    for r in runs:
        if r["kind"] == "ps" and r["hosts"] in fastest and r is not fastest[r["hosts"]]:
            r["compute"] = fastest[r["hosts"]]["compute"]
            r["predicted"] = r["compute"] + r["comm_model"]
    budget = [budget_row(run, out, alpha, beta) for run in record["fedavg_vs_ps"]]
    # each algorithm's own seconds per byte over the large buffers, past alpha: the ring's links
    # carry data both ways at once, the tree's one way at a time
    burst = cl.burst_bytes(sweep["rate"])
    own_beta = {k: float(np.mean([(t[k] - model_time(k, sweep["hosts"], b, alpha, 0)) / model_time(k, sweep["hosts"], b, 0, 1)
                                  for b, t in rows if b >= 8 * burst])) for k in ("ring", "tree")}
    return {"alpha": alpha, "beta": beta, "rows": rows, "cross": cross, "burst": burst, "own_beta": own_beta,
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
    """NETWORK.md (md_path) and its figure (fig_path), from the records in `out` alone; returns the analysis."""
    v = view(record, out)
    L = header_lines(v) + targets_lines(v) + model_lines(v) + step_time_lines(v) + sweep_lines(v)
    L += fedavg_lines(v) + extrapolation_lines(v)
    L += answer_section(v["a"], v["by"], v["big_n"], v["slow"], v["ratio"], v["fed"], v["psb"])
    L += ["## Commands", "", "```"]
    L += [run["command"] for run in record["runs"] + record["sweep"] + record["fedavg_vs_ps"]] + ["```", ""]
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    with open(md_path, "w") as f:
        f.write("\n".join(L))
    plot(v["a"], v["sweep"], fig_path)
    return v["a"]


def view(record, out):
    """What the sections of NETWORK.md share: the analysis, and the runs and ratios they cite."""
    a = analyse(record, out)
    meta = record["meta"]
    sweep = meta["sweep"]
    ideal_beta = 8 / rate_bits(sweep["rate"])
    by = {(r["kind"], r["rate"], r["hosts"]): r for r in a["runs"]}
    big_n = max(r["hosts"] for r in a["runs"])
    slow = RATES[-1] if (("ring", RATES[-1], big_n) in by) else a["runs"][-1]["rate"]
    ps, ring = by.get(("ps", slow, big_n)), by.get(("ring", slow, big_n))
    ratio = ratio_model = ratio_refined = None
    if ps and ring:
        ratio, ratio_model = ps["measured"] / ring["measured"], ps["predicted"] / ring["predicted"]
        ratio_refined = pipelined_ps(ps, a, slow) / (ring["predicted"] + ring["waiting"])
    fed, psb = ({r["kind"]: r for r in a["budget"]}.get(k) for k in ("fedavg", "ps"))
    return dict(a=a, meta=meta, sweep=sweep, cmp=meta["fedavg_vs_ps"], out=out, ideal_beta=ideal_beta,
                efficiency=ideal_beta / a["beta"], by=by, big_n=big_n, slow=slow, ratio=ratio,
                ratio_model=ratio_model, ratio_refined=ratio_refined, fed=fed, psb=psb)


def header_lines(v):
    """The title, what made the records, and the cluster."""
    a, meta = v["a"], v["meta"]
    rel = os.path.relpath
    L = ["# The paradigms on an emulated cluster: where bandwidth is scarce", "",
         f"Written by `python bench/network.py` from the records in `{rel(v['out'], ROOT)}/` "
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

    return L


def targets_lines(v):
    """The targets' table, the model's misses, and a note on the crossover."""
    a, big_n, slow, ratio, ratio_model, ratio_refined = (v[k] for k in ("a", "big_n", "slow", "ratio", "ratio_model",
                                                                      "ratio_refined"))
    meta, fed, psb, cmp = v["meta"], v["fed"], v["psb"], v["cmp"]
    L = ["## Targets", "", "| measure | measured | predicted by the model | goal | result |", "|---|---|---|---|---|"]
    if ratio:
        for what, predicted in (("the plain model", ratio_model),
                                ("with the server's pipeline and the ring's wait (below)", ratio_refined)):
            err = abs(predicted - ratio) / ratio
            L.append(f"| parameter server / ring step time, {big_n} hosts, {slow}: {what} | {ratio:.2f} | "
                     f"{predicted:.2f} ({100 * err:.0f}% off) | model within {100 * TARGETS['ratio']:.0f}% | "
                     f"{'**met**' if err <= TARGETS['ratio'] else '**missed**'} |")
    L.append(crossover_target(a, v["sweep"]))
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
    L += model_misses(a, v["by"], big_n, slow, ratio, ratio_refined)
    return L + crossover_note(v)


def crossover_target(a, sweep):
    """The targets' row of the ring-against-tree crossover, measured and modelled."""
    if a["cross"] and a["cross_model"]:
        f = max(a["cross"], a["cross_model"]) / min(a["cross"], a["cross_model"])
        verdict = "**met**" if f <= TARGETS["crossover"] else "**missed**"
        if a["cross_model"] < a["burst"]:
            verdict += " (not a test of the model here: see below)"
        return (f"| ring-vs-tree crossover buffer, {sweep['rate']}, N = {sweep['hosts']} | {size_text(a['cross'])} "
                f"| {size_text(a['cross_model'])} ({f:.1f}x off) | within {TARGETS['crossover']:.0f}x | {verdict} |")
    return (f"| ring-vs-tree crossover buffer, {sweep['rate']}, N = {sweep['hosts']} | "
            f"{size_text(a['cross']) if a['cross'] else 'no crossover in the sweep'} | "
            f"{size_text(a['cross_model'])} | within {TARGETS['crossover']:.0f}x | **not measured** |")


def crossover_note(v):
    """Why the measured crossover is the token bucket's, when the model puts it inside the burst."""
    a, sweep, efficiency = v["a"], v["sweep"], v["efficiency"]
    L = []
    if a["cross_model"] and a["cross_model"] < a["burst"]:
        L += [f"**The crossover.** The model puts it at 0.8 alpha / beta = {size_text(a['cross_model'])} for N = "
              f"{sweep['hosts']}: with no wire delay, alpha is only the software's cost of a message. That is inside "
              f"the token bucket's burst ({a['burst']:,} bytes at {sweep['rate']}), which lets a message through at "
              "the veth's own speed: below it a buffer costs only its messages, and the tree (2 log2 N of them) "
              "beats the ring (2(N-1)) until its whole buffers drain the bucket faster than it refills, while the "
              f"ring's 1/N chunks still pass. So the measured crossover ({size_text(a['cross'])}) is the bucket's, "
              "not alpha's and beta's, and agreement or disagreement with the model says nothing about it. A "
              "smaller burst would not help much: the bucket must hold at least a whole frame (1.5 KB). Testing "
              "it needs wire delay (netem, absent from this kernel) or a real cluster: with the assumed "
              f"{1e6 * ALPHA_REAL:.0f} us of the extrapolation below and 10 GbE, the model's crossover for "
              f"N = {sweep['hosts']} is "
              f"{size_text(predicted_crossover(sweep['hosts'], ALPHA_REAL, 8 / (GBE['10 GbE'] * efficiency)))}.", ""]

    return L


def model_lines(v):
    """The alpha-beta model, as fitted."""
    a, sweep, ideal_beta, efficiency = v["a"], v["sweep"], v["ideal_beta"], v["efficiency"]
    alpha, beta = v["a"]["alpha"], v["a"]["beta"]
    L = ["## The alpha-beta model", "",
          f"Fitted to the ring and tree times of part 2 ({sweep['rate']}, N = {sweep['hosts']}) at the two ends of "
          f"the sweep, each by least squares in relative error: alpha from the buffers of at most burst/4 "
          f"({sum(1 for b, _ in a['rows'] if b <= a['burst'] / 4)} sizes), beta from those of at least 8 bursts "
          f"({sum(1 for b, _ in a['rows'] if b >= 8 * a['burst'])} sizes); the token bucket's burst is "
          f"{a['burst']:,} bytes at {sweep['rate']}. The bucket lets each message's first burst of bytes through "
          "at the veth's own speed, which the model does not have: below it a buffer costs only its messages, "
          "and between the two ends less than its bytes.", "",
          f"- alpha = {1e6 * alpha:.0f} us per message: no wire delay here, so this is the software's cost of a "
          "step (Python, MPI, TCP over veth), and waiting to be scheduled again on cores shared by all the hosts "
          "and whatever else runs on the machine;",
          f"- beta = {1e9 * beta:.1f} ns per byte at {sweep['rate']}, against {1e9 * ideal_beta:.0f} ns for the bare rate: "
          f"the payload moves at {100 * efficiency:.0f}% of the rate (TCP/IP and Ethernet headers take about 4.5%; "
          "TCP's reaction to the token bucket the rest). Over the large buffers alone, the ring's bytes moved at "
          f"{1e9 * a['own_beta']['ring']:.1f} ns and the tree's at {1e9 * a['own_beta']['tree']:.1f} ns per byte: "
          "a ring keeps every link busy both ways at once, and (likely, not isolated here) each direction's TCP "
          "acknowledgements then queue behind the other direction's data in the token bucket's queue.", ""]
    if beta < ideal_beta:
        L += ["**Beta is below the bare rate's: the payload cannot move faster than the link, so the shaping did not "
              "hold during the sweep (or the fit failed). Do not trust the model's numbers from these records.**", ""]
        print(f"warning: fitted beta {1e9 * beta:.1f} ns/B is below the bare rate's {1e9 * ideal_beta:.0f} ns/B",
              file=sys.stderr)
    L += ["Other rates use beta x (100 Mbit/s / rate), the same alpha. Predicted step = the run's own compute "
          "time (its step time less its time in communication) + the model's communication time. The model's "
          "error so contains everything not in it: waiting for the slowest rank, the two-way traffic above, "
          "the server's update, the first step's connection set-up.", ""]

    return L


def step_time_lines(v):
    """Part 1: step time and bytes against link rate and hosts."""
    a, meta = v["a"], v["meta"]
    L = ["## 1. Step time against link rate and hosts", "",
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

    return L


def sweep_lines(v):
    """Part 2: the all-reduces against buffer size, and the crossover."""
    a, sweep = v["a"], v["sweep"]
    alpha, beta = v["a"]["alpha"], v["a"]["beta"]
    L = [f"## 2. All-reduce time against buffer size, {sweep['rate']}, N = {sweep['hosts']}", "",
          f"`bench/allreduce.py` on the cluster, twice (from 64 B and from 128 B, each stepping by 4x): median "
          f"of {sweep['repeats']} calls, the slowest rank's time, in ms. Model: the fitted alpha and beta.", "",
          "| size | mpi | ring | tree | ring model | tree model | faster |", "|---|---|---|---|---|---|---|"]
    for b, t in a["rows"]:
        rm, tm = (model_time(k, sweep["hosts"], b, alpha, beta) for k in ("ring", "tree"))
        L.append(f"| {size_text(b)} | {1e3 * t['mpi']:.2f} | {1e3 * t['ring']:.2f} | {1e3 * t['tree']:.2f} | "
                 f"{1e3 * rm:.2f} | {1e3 * tm:.2f} | {'ring' if t['ring'] < t['tree'] else 'tree'} |")
    L += ["", f"Crossover (ring faster above it): measured {size_text(a['cross']) if a['cross'] else 'none'}, "
          f"model {size_text(a['cross_model'])} = 2(N-1) - 2 log2 N over 2 log2 N - 2(N-1)/N, times alpha / beta.", ""]

    return L


def fedavg_lines(v):
    """Part 3: FedAvg against the parameter server, on the same samples."""
    cmp, fed, psb = v["cmp"], v["fed"], v["psb"]
    L = []
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

    return L


def extrapolation_lines(v):
    """The model at N = 1024 on fast links."""
    a, efficiency = v["a"], v["efficiency"]
    alpha = v["a"]["alpha"]
    L = ["## Extrapolation to N = 1024", "",
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
    return L


def pipelined_ps(ps, a, rate):
    """A synchronous parameter server's step at best, on a full-duplex link: the server sends the
    weights to one worker after another (W n beta), each worker computes and returns its gradient
    while the server sends to the next, so only the last gradient's n bytes are not hidden:
    compute + 2 alpha + (W + 1) n beta, against the plain model's compute + 2 alpha + 2 W n beta."""
    beta = a["beta"] * rate_bits("100mbit") / rate_bits(rate)
    return ps["compute"] + 2 * a["alpha"] + ps["hosts"] * ps["nbytes"] * beta


def model_misses(a, by, big_n, slow, ratio, ratio_refined):
    """Where the prediction and the measurement part, in numbers, with the likely cause."""
    predicted = [r for r in a["runs"] if r["predicted"] is not None]
    within = sum(abs(r["predicted"] - r["measured"]) <= TARGETS["ratio"] * r["measured"] for r in predicted)
    lines = [f"Of the {len(predicted)} step (round) times of part 1 that the model covers, {within} are predicted "
             f"within {100 * TARGETS['ratio']:.0f}%.", ""]
    ps, ring = by.get(("ps", slow, big_n)), by.get(("ring", slow, big_n))
    if not (ps and ring and ratio):
        return lines
    best = pipelined_ps(ps, a, slow)
    lines += [
        f"Where it misses, at {slow} on {big_n} hosts, the records say why. The ring's step ({ms(ring['measured'])} "
        f"ms) is its compute ({ms(ring['compute'])} ms), {ms(ring['in_comm'])} ms in its exchanges (the model: "
        f"{ms(ring['comm_model'])} ms; the excess is the two-way traffic of the sweep above) and "
        f"{ms(ring['waiting'])} ms waiting for the slowest rank, which the model does not have: {big_n} ranks share "
        f"the machine's cores, so they reach each step's exchange at different times. The parameter server's step "
        f"({ms(ps['measured'])} ms) is faster than the model's {ms(ps['predicted'])} ms, which sends all the weights "
        "and then receives all the gradients through the server's link. That link is full duplex, and the "
        "workers are not in step: a worker that has its weights computes and returns its gradient while the "
        "server still sends to others. If the server sent to one worker after another, only the last "
        f"gradient's bytes would not be hidden: compute + 2 alpha + N n beta = {ms(best)} ms (`pipelined_ps`). "
        f"With that for the server and the measured wait added to the ring's prediction "
        f"({ms(ring['predicted'] + ring['waiting'])} ms), the ratio is {ratio_refined:.2f} against the measured "
        f"{ratio:.2f}. Both corrections come after the measurement; the plain model is the one the target names.", ""]
    return lines


def answer_section(a, by, big_n, slow, ratio, fed, psb):
    """Q6/Q7 at cluster scale, with the numbers of this run."""
    alpha = a["alpha"]
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
