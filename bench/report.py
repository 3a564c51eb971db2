"""Every measured number in README.md, docs/, HW5.ipynb and bench/RESULTS.md, from the committed records.

    python bench/report.py           # rewrite them from results/reference/
    python bench/report.py --check   # exit 1 with a diff when any of them differs from the records

The records are the JSON of the reference run (`python bench/reference.py`), committed in
results/reference/: the seed runs of the headline commands in runs/; a full run of HW5.ipynb, whose
scripts' records (cent_sgd.json, ..., allreduce_n4.json) and notebook.json are in notebook/; and
`python bench/run.py`'s in bench/ (run.json holds what its parts' JSON does not: date, machine,
versions, commands). bench/RESULTS.md is generated whole, by render_results, which bench/run.py
also calls. In README.md, docs/*.md and the notebook's markdown cells each generated fragment sits
between two invisible markers,

    <!-- begin: NAME --> ... <!-- end: NAME -->

and only the text between them is rewritten. This module needs neither torch nor MPI.
"""
import argparse
import difflib
import json
import os
import re
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join(ROOT, "results", "reference")
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")  # the topic pages: a README fragment may sit in any of them
NOTEBOOK = os.path.join(ROOT, "HW5.ipynb")
RESULTS_MD = os.path.join(ROOT, "bench", "RESULTS.md")
OVERLAP_WINS = 1.03  # a gain below this is within the run-to-run noise of the bench machine
FRAGMENT = re.compile(r"<!-- begin: (?P<name>[\w-]+) -->(?P<body>.*?)<!-- end: (?P=name) -->", re.S)


def load(path):
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- bench/RESULTS.md

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


def bench_records(raw, run=None):
    """The bench's records in raw (a folder that `bench/run.py` filled), keyed as its parts name them.

    run: the run's own record, when run.json is not written yet."""
    run = run or load(os.path.join(raw, "run.json"))
    ns = run["ns"]
    return {"run": run,
            "ddp": {n: load(os.path.join(raw, f"ddp_n{n}.json")) for n in ns},
            "ar": {n: load(os.path.join(raw, f"allreduce_n{n}.json")) for n in ns},
            "epochs": {label: epoch_row(load(os.path.join(raw, name))) for label, name in run["epochs"].items()},
            "threads": {label: load(os.path.join(raw, name)) for label, name in run["threads"].items()},
            "pickled": {n: load(os.path.join(raw, f"pickle_n{n}.json")) for n in ns}}


def at_size(ar, nbytes):
    """The row of an all-reduce record for one buffer size, or None."""
    return next((row for row in ar["rows"] if row["bytes"] == nbytes), None)


def bench_targets(b):
    """(target, measured, limit, rule) for each target of the bench."""
    sv = {n: d["variants"] for n, d in b["ddp"].items()}
    at_4mb = {n: at_size(b["ar"][n], 4 << 20) if n in b["ar"] else None for n in (2, 4)}
    targets = [(f"serverless steps/s / DDP-gloo steps/s, N={n}",
                sv[n]["serverless"]["steps_per_s"] / sv[n]["ddp"]["steps_per_s"] if n in sv else None, 1.0, ">= 1.0x")
               for n in (2, 4)]
    targets += [(f"ring / MPI_Allreduce time at 4 MB, N={n}", row and row["ring_ms"] / row["mpi_ms"], 2.0, "<= 2x")
                for n, row in at_4mb.items()]
    e = b["epochs"]
    targets += [("serverless N=2 epoch / centralized batch 128 epoch",
                 e["serverless N=2"]["epoch_s"] / e["centralized, batch 128"]["epoch_s"], 1.15, "<= 1.15x"),
                ("bench wall time, minutes (up to this table)", b["run"]["wall_s"] / 60, 15.0, "<= 15")]
    return targets


def verdict(value, limit, rule):
    if value is None:
        return "not measured"
    return "**met**" if (value >= limit if rule.startswith(">=") else value <= limit) else "**missed**"


def fmt(x, spec=".2f"):
    return "–" if x is None else format(x, spec)


def shown_path(path):
    """path relative to the repo root when it lies inside it."""
    return os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT + os.sep) else path


def size_name(nbytes):
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


def provenance_lines(p):
    """RESULTS.md's lines on what bench/reference.py stamped on run.json: commit, host calibration, load."""
    if not p:
        return []
    h = p["host"]
    return [f"- Made by `python bench/reference.py` at commit {p['commit'][:10]}"
            f"{' with uncommitted changes' if p['dirty'] else ''}; host: {h['cpu']} (family {h['cpu_family']}, "
            f"model {h['cpu_model']}), calibrated before the run at {h['matmul_gflops_1_thread']:.0f} GFLOP/s on one "
            f"thread and {h['matmul_gflops_all_cores']:.0f} on all cores (a 1024 x 1024 float32 matmul); load average "
            f"{p['load_before'][0]:.2f} before, "
            + ("and no other heavy process during it." if not p["contended"] else
               f"**contended**: other heavy processes ran ({'; '.join(p['heavy_before'] + p['heavy_after'])}).")]


def render_results(raw, md_dir):
    """The text of RESULTS.md, from the bench's records in raw, for a file in md_dir (for the plots' links)."""
    b = bench_records(raw)
    plots = {name: os.path.relpath(os.path.normpath(os.path.join(raw, p)), md_dir)
             for name, p in b["run"]["plots"].items()}
    L = results_header(b, raw)
    L += ddp_section(b["ddp"])
    L += allreduce_section(b["ar"], plots)
    L += paradigms_section(b, plots)
    L += pickle_section(b["pickled"])
    L += optimizations_section(b)
    L += ["", "## Commands", "", "From the repo root, in this order:", "", "```"]
    L += [f"{c['command']}  # {c['seconds']:.1f} s" for c in b["run"]["commands"]] + ["```", ""]
    return "\n".join(L)


def results_header(b, raw):
    """RESULTS.md's title, what made it and where, and the targets."""
    run, ar = b["run"], b["ar"]
    L = ["# Benchmark: the scripts against PyTorch DDP and MPI itself", ""]
    if run["tiny"]:
        L += ["**Tiny mode** (`--tiny`): a smoke test on synthetic data with a few steps, with 2 ranks. "
              "Its numbers show that the bench runs, not how fast anything is.", ""]
    hw = run["machine"]
    L += [f"- Date: {run['date']}; the whole run took {run['wall_s'] / 60:.1f} min.",
          f"- Machine: {hw['cpu']}, {hw['cores']} CPU cores, GPU: {hw['gpu'] or 'none'}.",
          f"- Software: Python {run['python']}, torch {run['torch']}, mpi4py {run['mpi4py']}, "
          f"{ar[min(ar)]['mpi'].split(',')[0]}, mpirun `{run['mpirun']}`.",
          f"- Data: {run['dataset']}.",
          *provenance_lines(run.get("provenance")),
          "- Every part ran alone, one after another, in this one run; times are wall clock, "
          "and a step or call counts at the pace of the slowest rank.",
          f"- Records: the JSON of every part and `run.json`, in `{shown_path(raw)}/`; "
          "`python bench/run.py --render-only` rebuilds this file from them.",
          "- Beside this one, each from its own records and command: the paradigms on an emulated "
          "cluster with slow links, [`NETWORK.md`](NETWORK.md) (`bench/network.py`); `--elastic`, "
          "[`ELASTIC.md`](ELASTIC.md) (`bench/elastic.py`); gradient compression, "
          "[`COMPRESSION.md`](COMPRESSION.md) (`bench/compression.py`); stragglers and asynchronous updates, "
          "[`ASYNC.md`](ASYNC.md) (`bench/async_ps.py`); and FedAvg's variants on non-iid clients, "
          "[`FED.md`](FED.md) (`bench/fed_sweep.py`).", "",
          "## Targets", "",
          "| target | measured | limit | result |", "|---|---|---|---|"]
    return L + [f"| {what} | {fmt(v)} | {rule} | {verdict(v, limit, rule)} |"
                for what, v, limit, rule in bench_targets(b)]


def ddp_section(ddp):
    """Part 1: the serverless step against DDP's, and their parameters' difference."""
    d0 = ddp[min(ddp)]
    L = ["", "## 1. Serverless step against PyTorch DDP (gloo)", "",
         f"`bench/ddp.py`: the same model, per-rank batch {d0['batch_size']}, same data shares, "
         f"{d0['steps']} timed steps per variant in {d0['blocks']} interleaved blocks after warmup. "
         f"Equality: max |parameter difference| from the serverless step after {d0['check_steps']} "
         "steps of plain SGD from the same weights (limit 1e-5).", "",
         "| N | threads/rank | serverless steps/s | DDP steps/s | serverless / DDP | max abs diff: DDP | copy "
         "| overlap |", "|---|---|---|---|---|---|---|---|"]
    for n, d in ddp.items():
        v, diff = d["variants"], d["max_abs_diff"]
        L.append(f"| {n} | {d['threads']} | {v['serverless']['steps_per_s']:.2f} | {v['ddp']['steps_per_s']:.2f} | "
                 f"**{v['serverless']['steps_per_s'] / v['ddp']['steps_per_s']:.2f}x** | "
                 f"{diff['ddp']:.1e} | {diff['copy']:.1e} | {diff['overlap']:.1e} |")
    return L


def allreduce_section(ar, plots):
    """Part 2: ring and tree against MPI_Allreduce and a memcpy, per size, at each N."""
    L = ["", "## 2. Hand-written collectives against MPI_Allreduce", "",
         "`bench/allreduce.py`: median of the slowest rank's time per call, in ms. `copy` is the "
         "physical reference: np.copyto of the buffer, timed on every rank in the same run, "
         "x 2(N-1)/N (a ring's traffic per rank at memcpy speed).", ""]
    for n, r in ar.items():
        L += [f"N = {n}:", "", "| size | mpi | ring | tree | copy | ring / mpi | mpi / copy |",
              "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            L.append(f"| {size_name(row['bytes'])} | {row['mpi_ms']:.3f} | {row['ring_ms']:.3f} | "
                     f"{row['tree_ms']:.3f} | {row['copy_ms']:.3f} | {row['ring_ms'] / row['mpi_ms']:.2f} | "
                     f"{row['mpi_ms'] / row['copy_ms']:.1f} |")
        L.append("")
    return L + [f"![all-reduce time against size]({plots['allreduce']})"]


def paradigms_section(b, plots):
    """Part 3: an epoch of each script, split into compute, communication and waiting; and the
    serverless step with and without its all-reduce."""
    L = ["", "## 3. Paradigm cost", "",
         f"One epoch of each script (FedAvg: one round, in which each of its {b['run']['fed_n'] - 1} client(s) "
         "makes one pass over its share), from the `history` of its results JSON. Epoch time includes evaluation. "
         "Compute is training time less communication and waiting. Serverless splits its time in the "
         "all-reduce into the call itself (the shortest time in it over ranks: the last rank to arrive "
         "waits for no one) and waiting for the last rank; for the parameter server and FedAvg, "
         "communication includes waiting for the server.", "",
         "| run | ranks | threads/rank | steps | epoch s | compute s | communication s | waiting s | ms per step |",
         "|---|---|---|---|---|---|---|---|---|"]
    for label, e in b["epochs"].items():
        L.append(f"| {label} | {e['ranks']} | {e['threads']} | {e['steps']} | {e['epoch_s']:.2f} | "
                 f"{e['compute_s']:.2f} | {e['comm_s']:.2f} | {e['wait_s']:.2f} | {e['step_ms']:.1f} |")
    L += ["", f"![epoch time per paradigm]({plots['paradigms']})", "",
          "The serverless step, split (`bench/ddp.py`, same run as part 1). The time inside the all-reduce "
          "call (mean over ranks) includes waiting for the rank that finishes its backward last, which "
          "the time of the call alone (part 2) does not. What the all-reduce adds to the step is the "
          "exposed overhead: the step with it, less the step with it skipped (ranks uncoupled), interleaved.", "",
          "| N | step ms | in all-reduce ms | step without all-reduce ms | exposed overhead ms | of the step |",
          "|---|---|---|---|---|---|"]
    for n, d in b["ddp"].items():
        v = d["variants"]
        exposed = v["serverless"]["step_ms"] - v["skip"]["step_ms"]
        L.append(f"| {n} | {v['serverless']['step_ms']:.1f} | {v['serverless']['comm_ms']:.2f} | "
                 f"{v['skip']['step_ms']:.1f} | {exposed:.2f} | {100 * exposed / v['serverless']['step_ms']:.1f}% |")
    return L


def pickle_section(pickled):
    """Part 4: the lowercase (pickling) calls against the buffer call."""
    p0 = pickled[min(pickled)]
    L = ["", "## 4. Pickle against buffer", "",
         "`bench/pickle_vs_buffer.py`: summing a gradient of the model's size "
         f"({p0['floats']:,} float32 in {p0['tensors']} tensors); median ms of the slowest rank.", "",
         "| N | " + " | ".join(f"`{w}`" for w in p0["median_ms"]) + " | slowdown of the pickled ways |",
         "|---|---|---|---|---|"]
    for n, p in pickled.items():
        ms = p["median_ms"]
        slow = ", ".join(f"{ms[w] / ms['Allreduce(buffer)']:.1f}x" for w in ms if w != "Allreduce(buffer)")
        L.append(f"| {n} | " + " | ".join(f"{t:.3f}" for t in ms.values()) + f" | {slow} |")
    return L


def optimizations_section(b):
    """Each optimization's gain, measured in the run, and why the one the scripts skip does not pay."""
    sv = {n: d["variants"] for n, d in b["ddp"].items()}
    L = ["", "## Optimizations and their measured gains", "",
         "Gain = time before / time after, both measured in this run (> 1: the optimization helps).", "",
         "| optimization | N | before | after | gain | in the scripts |", "|---|---|---|---|---|---|"]
    for n, v in sv.items():
        L.append(f"| grads as views of the flat buffer (before: torch.cat + copy back), ms/step | {n} | "
                 f"{v['copy']['step_ms']:.1f} | {v['serverless']['step_ms']:.1f} | "
                 f"**{v['copy']['step_ms'] / v['serverless']['step_ms']:.2f}x** | yes: utils.flatten_parameters |")
    threads = b["threads"]
    before, after = thread_step_ms(threads)
    L.append(f"| {threads['default']['threads']} thread(s) per rank, cores/ranks (before: OMP_NUM_THREADS=2, "
             f"oversubscribed), ms/step over {threads['default']['steps']} steps | 2 | {before:.1f} | {after:.1f} | "
             f"**{before / after:.2f}x** | yes: utils.set_threads |")
    gains = {n: v["serverless"]["step_ms"] / v["overlap"]["step_ms"] for n, v in sv.items()}
    for n, v in sv.items():
        L.append(f"| overlap all-reduce with backward (buckets, hooks, Iallreduce), ms/step | {n} | "
                 f"{v['serverless']['step_ms']:.1f} | {v['overlap']['step_ms']:.1f} | **{gains[n]:.2f}x** | "
                 "no: bench/ddp.py only |")
    views = {n: v["copy"]["step_ms"] / v["serverless"]["step_ms"] for n, v in sv.items()}
    kb = round(4 * b["pickled"][min(b["pickled"])]["floats"] / 1000)  # decimal KB, as the README counts
    L += ["", "Grads as views of the flat buffer " + ("gained " if all(g >= OVERLAP_WINS for g in views.values())
          else "gained nothing measurable ") + f"({', '.join(f'N={n}: {g:.2f}x' for n, g in views.items())}): "
          f"the pack and unpack it saves copy the {kb} KB gradient twice per step, a fraction of a millisecond "
          "at the memcpy speed of part 2. The scripts keep the views because they are also the simpler "
          "code: one buffer that backward fills in place, no packing loop."]
    won = all(g >= OVERLAP_WINS for g in gains.values())
    L += ["", f"Overlap {'beat' if won else 'did not beat'} the plain step by the {OVERLAP_WINS:.2f}x that this "
          f"machine's noise calls for, at every N ({', '.join(f'N={n}: {g:.2f}x' for n, g in gains.items())})."]
    if not won:  # say why, from this run's numbers
        L[-1] += why_no_overlap(b, kb)
    return L


def why_no_overlap(b, kb):
    """The sentence on why overlapping the all-reduce with backward did not pay, from the run's numbers."""
    ar = b["ar"][min(b["ar"])]
    why = f" There is little to hide: the all-reduce of the whole gradient ({kb} KB) is short once the ranks"
    why += " are in step"
    near = {nbytes: at_size(ar, nbytes) for nbytes in (256 << 10, 1 << 20)}
    if all(near.values()):
        why += (f" (part 2, N={min(b['ar'])}: {near[256 << 10]['mpi_ms']:.2f} ms at 256 KB, "
                f"{near[1 << 20]['mpi_ms']:.2f} ms at 1 MB)")
    why += ", and backward already keeps every core busy"
    if b["run"]["no_progress_thread"]:
        why += (", while this Open MPI has no progress thread (`ompi_info`: OMPI progress: no), so a "
                "started Iallreduce moves on only inside MPI calls, here the final Waitall")
    return why + ". The scripts keep the plain step, which is simpler to read."


def thread_step_ms(threads):
    """ms per step with OMP_NUM_THREADS=2 (before) and with utils.set_threads' choice (after)."""
    return tuple(1e3 * threads[k]["history"][0]["step_time"] for k in ("OMP_NUM_THREADS=2", "default"))


# ----------------------------------------------------------------------------- shared wording

SCRIPTS = ("cent_sgd", "dist_sgd_serverless", "dist_sgd_param_server", "fed_avg_iid", "fed_avg_non-iid")


def records(folder):
    """The reference run's records: the notebook's run (its scripts', its all-reduce bench's and its own,
    in notebook/), the bench's, the seed runs and the FedAvg sweep's."""
    r = {name: load(os.path.join(folder, "notebook", f"{name}.json"))
         for name in (*SCRIPTS, "allreduce_n4", "notebook")}
    r["bench"] = bench_records(os.path.join(folder, "bench"))
    r["runs"] = seed_runs(os.path.join(folder, "runs"))
    fed = os.path.join(folder, "fed")  # bench/fed_sweep.py's records: <split>_<label>.json
    r["fed"] = {name[:-len(".json")]: load(os.path.join(fed, name))
                for name in sorted(os.listdir(fed)) if name.endswith(".json")} if os.path.isdir(fed) else {}
    seeds = os.path.join(fed, "seeds")  # bench/fed_sweep.py --seeds: <split>_<label>_seed<k>.json
    r["fed_seeds"] = {name[:-len(".json")]: load(os.path.join(seeds, name))
                      for name in sorted(os.listdir(seeds)) if name.endswith(".json")} if os.path.isdir(seeds) else {}
    return r


COMMANDS = {"cent_sgd": "python cent_sgd.py", "dist_sgd_serverless": "mpirun -n 4 python dist_sgd_serverless.py",
            "dist_sgd_param_server": "mpirun -n 5 python dist_sgd_param_server.py",
            "fed_avg_iid": "mpirun -n 5 python fed_avg.py",
            "fed_avg_non-iid": "mpirun -n 5 python fed_avg.py --split-method non-iid"}


def seed_runs(folder):
    """bench/reference.py's headline runs, {name: [record, ...] in seed order}, for the names it has run."""
    out = {}
    for name in SCRIPTS:
        seeds = [load(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if re.fullmatch(
            rf"{re.escape(name)}_seed\d+\.json", f)] if os.path.isdir(folder) else []
        if seeds:
            out[name] = sorted(seeds, key=lambda r: r["config"]["seed"])
    return out


def spread(runs):
    """'78.0% (77.5–78.4, 3 seeds)': the mean final accuracy and its range over the seeds."""
    accs = [r["final_test_acc"] for r in runs]
    if len(accs) == 1:
        return f"{accs[0]:.2f}% (1 seed)"
    return f"{sum(accs) / len(accs):.2f}% ({min(accs):.2f}–{max(accs):.2f}, {plural(len(accs), 'seed')})"


def host_of(records):
    """The hosts of `records`, with the range of their calibrations (bench/reference.py's matmul)."""
    hosts = sorted({(h["cpu"], h["cpu_family"], h["cpu_model"], h["cores"])
                    for h in (r["provenance"]["host"] for r in records)})
    gflops = [r["provenance"]["host"]["matmul_gflops_all_cores"] for r in records]
    return (" and ".join(f"{cpu} (family {family}, model {model}), {cores} cores" for cpu, family, model, cores
                         in hosts)
            + (f", whose float32 matmul ran at {gflops[0]:.0f} GFLOP/s before the run (the host's calibration)"
               if len(gflops) == 1 else
               f", whose float32 matmul ran at {min(gflops):.0f}–{max(gflops):.0f} GFLOP/s before the runs "
               "(the host's calibration, taken before each)"))


def seeds_table(runs):
    """The headline runs at this code, each over its seeds: mean and range, each seed, seed 0's curve."""
    L = ["| command | final test accuracy | seeds | seed 0, after each epoch (round) | training | clip |",
         "|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        curve = ", ".join(f"{h['test_acc']:.1f}" for h in rs[0]["history"])
        contended = any(r["provenance"]["contended"] for r in rs)
        L.append(f"| `{COMMANDS[name]}` | **{spread(rs)}** | "
                 + ", ".join(f"{r['config']['seed']}: {r['final_test_acc']:.2f}%" for r in rs)
                 + f" | {curve} | {minutes(sum(r['wall_time'] for r in rs) / len(rs))} a run"
                 + (" (contended)" if contended else "") + f" | {rs[0]['config']['clip_norm']:g} |")
    first = next(iter(runs.values()))[0]
    commits = sorted({r["provenance"]["commit"][:10] + (" with uncommitted changes" if r["provenance"]["dirty"] else "")
                      for rs in runs.values() for r in rs})
    L.append(f"Made by `python bench/reference.py` at commit {', '.join(commits)} (the fingerprints, which "
             f"`tests/test_fingerprints.py` checks, tie them to this code), on "
             f"{host_of([r for rs in runs.values() for r in rs])}; "
             f"PyTorch {first['torch']}; data: {first['data']}. Each run had the machine to itself "
             "(the command refuses to start beside other heavy processes), so its time is this host's; the "
             "4 or 5 ranks of the MPI runs time-share its 2 cores, so their times show this host, not how the "
             "paradigms scale." if first["hardware"]["cores"] < 4 else
             "(the command refuses to start beside other heavy processes), so its time is this host's.")
    return "\n".join(L[:-1]) + "\n\n" + wrap(L[-1])


def wrap(text, width=96):
    """Paragraphs and bullets, each line wrapped as the hand-written text around them; tables untouched."""
    out = []
    for line in text.split("\n"):
        if line.startswith("|"):
            out.append(line)
            continue
        indent = "  " if line.startswith("- ") else ""
        lines = textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=False,
                              break_on_hyphens=False) or [""]
        # a continuation line that markdown would read as a list item, heading, table or HTML: keep one line
        if any(re.match(r"\s*([-+*] |#|\||<|\d+[.)] )", x) for x in lines[1:]):
            lines = [line]
        out += lines
    return "\n".join(out)


def plural(n, word, many=None):
    """'1 epoch', '8 epochs'."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def pct(x):
    return f"{x:.2f}%"


def algorithm_name(c):
    """fed_avg.py's --algorithm and the settings it read, from a record's config: 'FedProx (mu 0.01)'."""
    a = c["algorithm"]
    if a == "fedprox":
        return f"FedProx (mu {c['prox_mu']:g})"
    if a == "fedavgm":
        return f"FedAvgM (momentum {c['server_momentum']:g}, server lr {c['server_lr']:g})"
    momentum = f" + server momentum {c['server_momentum']:g}" if c.get("server_momentum") else ""
    if a == "fedrs":
        return f"FedRS (alpha {c['rs_alpha']:g}{momentum})"
    if a == "fedlc":
        return f"FedLC (tau {c['lc_tau']:g}{momentum})"
    return {"fedavg": "FedAvg", "scaffold": "SCAFFOLD"}[a]


def recipe(configs):
    """One sentence on whether the runs of `configs` clipped the gradient's norm (--clip-norm)."""
    clips = sorted({c.get("clip_norm", 0.0) for c in configs})  # a record made before the flag: no clip
    if clips == [0.0]:
        return ("Recipe: no gradient clipping, the scripts' recipe before `--clip-norm` (their default now "
                "clips; `--clip-norm 0` computes what these runs did).")
    return f"Recipe: `--clip-norm {' and '.join(f'{c:g}' for c in clips)}`."


def minutes(seconds):
    return f"{seconds / 60:.1f} min"


def command(r):
    """The command that made a script's record, with its defaults left out."""
    script = r["script"]
    line = f"python {script}.py" if r["world_size"] == 1 else f"mpirun -n {r['world_size']} python {script}.py"
    return line + (" --split-method non-iid" if r.get("split", "").startswith("non-iid") else "")


def epoch_times(r):
    """Seconds per epoch (FedAvg: round, evaluation included), from the record's history."""
    return [h["round_time"] + h["eval_time"] if "round" in h else h["epoch_time"] for h in r["history"]]


def step_ms(r):
    """Mean training time per step over the run, in ms (the time inside train_time: no evaluation)."""
    return 1e3 * sum(h["train_time"] for h in r["history"]) / r["steps"]


def machine(r):
    hw = r["hardware"]
    return f"{hw['cpu']}, {hw['cores']} CPU cores, GPU: {hw['gpu'] or 'none'}"


def mpi_name(ar):
    return ar["mpi"].split(",")[0]  # "Open MPI v5.0.11"


def classes_held(r):
    """The number of classes each client holds, as words."""
    held = sorted({sum(1 for n in counts if n) for counts in r["client_class_counts"]})
    total = len(r["client_class_counts"][0])
    return (f"{held[0]} of the {total} classes" if len(held) == 1 else
            f"{held[0]} to {held[-1]} of the {total} classes")


def first_rounds(r, k=3):
    """The test accuracies of the first k rounds, as words."""
    return ", ".join(f"{h['test_acc']:.1f}%" for h in r["history"][:k])


def the_first_rounds_reach(r, k=3):
    return "the first round reaches" if min(k, len(r["history"])) == 1 else "the first rounds reach"


# ----------------------------------------------------------------------------- README.md

def readme_fragments(R):
    """{name: text} of every fragment README.md and docs/ mark."""
    F = {"results-setup": results_setup(R), "results-table": results_table(R),
         "results-bullets": results_bullets(R), **bench_fragments(R["bench"])}
    b, iid, non = R["bench"], R["fed_avg_iid"], R["fed_avg_non-iid"]
    F["q7-table"] = "\n".join(q7_table(b["ar"]) + ["", q7_note(b)])
    F["noniid"] = noniid_paragraph(iid, non) + seed_gap(R["runs"], "[the reference runs](#the-reference-runs)")
    F["drift"] = drift_paragraph(R["fed"]) + fed_spread(R["fed"], R["fed_seeds"])
    F["reference-runs"] = seeds_table(R["runs"]) if R["runs"] else "No run of `python bench/reference.py` yet."
    return {name: text if "\n" not in text and name.endswith("-wall") else wrap(text) for name, text in F.items()}


def results_setup(R):
    """What made the notebook's run, on which host, and what its table's columns mean."""
    cent, nb = R["cent_sgd"], R["notebook"]
    prov = nb["provenance"]
    return (
        f"Measured by one run of `HW5.ipynb`, top to bottom, on seed 0 ({nb['minutes']:.1f} min, finished "
        f"{nb['finished']}), made by `python bench/reference.py` at commit {prov['commit'][:10]}"
        + (" with uncommitted changes" if prov["dirty"] else "") + f" on {host_of([nb])}"
        + ("; other heavy processes shared the machine, so its times are not this host's (contended)"
           if prov["contended"] else ", with the machine to itself")
        + f"; PyTorch {cent['torch']}, {mpi_name(R['allreduce_n4'])}; data: {cent['data']}. Every script ran "
        + ("in the notebook's quick mode (one epoch or round on synthetic data)" if nb["quick"] else "with its defaults")
        + ", one after another. *training* is the training loop (the record's `wall_time`: no start-up or data "
        "loading), and an epoch (FedAvg: a round) includes its evaluation. The records are in "
        "[`results/reference/notebook/`](results/reference/notebook/).")



def results_table(R):
    """One row per script of the notebook's run: its command, setup, accuracy and times."""
    rows = ["| command | what | test accuracy | training | per epoch / round |", "|---|---|---|---|---|"]
    for r in (R[k] for k in SCRIPTS):
        c = r["config"]
        if r["script"] == "cent_sgd":
            what = f"{plural(c['epochs'], 'epoch')}, batch {c['batch_size']}, lr {c['lr']:g}, " \
                   f"{plural(r['threads'], 'thread')}"
        elif r["script"] == "fed_avg":
            what = (f"{r['split']}, {plural(len(r['history']), 'round')} × "
                    f"{plural(c['local_epochs'], 'local epoch')}, "
                    f"{len(r['client_sizes'])} clients")
        else:
            ranks = r.get("num_workers", r["world_size"])
            what = (f"{plural(c['epochs'], 'epoch')}, {ranks} {'workers' if 'num_workers' in r else 'ranks'} × "
                    f"{c['batch_size']}, lr {c['lr']:g}, {r['threads']} thread per rank")
        t = epoch_times(r)
        rows.append(f"| `{command(r)}` | {what} | **{pct(r['final_test_acc'])}** | {r['wall_time']:.0f} s | "
                    f"{min(t):.1f}–{max(t):.1f} s |")
    return "\n".join(rows)


def results_bullets(R):
    """The notebook's run in detail: memory, where a serverless step goes, the server's bytes."""
    cent, sv, ps, iid, non = (R[k] for k in SCRIPTS)
    bullets = []
    if all("max_rss_mb" in r for r in (cent, sv, ps, iid, non)):
        bullets.append("- Peak resident memory of rank 0: " + ", ".join(
            f"{r['max_rss_mb']:,.0f} MB for `{command(r)}`"
            for r in (cent, sv, ps, iid, non)) + ".")
    comm, wait = 100 * sv["comm_fraction"], 100 * sv["wait_fraction"]
    bullets.append(
        f"- Serverless, {sv['world_size']} ranks: {step_ms(sv):.0f} ms per step, {comm + wait:.1f}% of it inside "
        f"`MPI_Allreduce`, which splits into **{comm:.1f}% for the all-reduce itself** and {wait:.1f}% waiting "
        "for the last rank to arrive. The epoch line (`wait ... | comm ...`) and the JSON (`comm_fraction`, "
        "`wait_fraction`) report the two apart: per step, the shortest time in the call over ranks is the "
        "all-reduce itself, since the last rank to arrive waits for no one; the rest is load imbalance"
        + (f", here {sv['world_size']} ranks time-sharing {sv['hardware']['cores']} cores, so that the OS runs "
           "some of them later." if sv["hardware"]["cores"] < sv["world_size"] else "."))
    P, S, W = ps["params"], ps["steps"], ps["num_workers"]
    worker, server = ps["bytes_per_rank"][1], ps["bytes_per_rank"][0]
    formula = " (= 4 B · P · S with P = {:,})".format(P) if worker["bytes_sent"] == 4 * P * S else ""
    bullets.append(
        f"- Parameter server, {W} workers: {step_ms(ps):.0f} ms per step ({step_ms(ps) / step_ms(sv):.2f}× "
        f"serverless), {100 * ps['comm_fraction']:.1f}% of it in communication, waiting for the server "
        f"included. Over the {S:,} steps each worker sent {worker['bytes_sent']:,} bytes and received "
        f"{worker['bytes_recv']:,}{formula}, and the server "
        + (f"{W} times that." if server["bytes_recv"] == W * worker["bytes_sent"] else
           f"received {server['bytes_recv']:,} and sent {server['bytes_sent']:,}."))
    return "\n".join(bullets)


def bench_fragments(b):
    """The full bench's wall time and its findings (its targets' table is RESULTS.md's own)."""
    run = b["run"]
    data = "CIFAR-10" if run["dataset"].startswith("CIFAR-10") else "synthetic data"
    wall = f"{run['wall_s'] / 60:.1f} min on {machine_of_run(run)}, on {data}" + (
        ", in its `--tiny` mode: a smoke test of a few steps, so the numbers below show the tables' "
        "shape, not this machine's performance (the full bench has yet to be rerun at this code)"
        if run["tiny"] else "")
    return {"bench-wall": wall, "bench-bullets": "\n".join(bench_bullets(b))}


def machine_of_run(run):
    hw = run["machine"]
    return f"{hw['cpu']}, {hw['cores']} CPU cores, GPU: {hw['gpu'] or 'none'}"


def bench_bullets(b):
    ddp, ar, pickled, epochs, threads = (b[k] for k in ("ddp", "ar", "pickled", "epochs", "threads"))
    sv = {n: d["variants"] for n, d in ddp.items()}
    ns, first, last = sorted(ddp), min(ddp), max(ddp)
    diffs = ", ".join(f"{ddp[n]['max_abs_diff']['ddp']:.1g} at N = {n}" for n in ns)
    out = [f"- DDP and the serverless step end with the same parameters after {ddp[first]['check_steps']} steps "
           f"from the same weights (largest difference {diffs}), so the race is fair."]
    ms = pickled[first]["median_ms"]
    buf = ms["Allreduce(buffer)"]
    out.append(f"- **Pickle against buffer:** the lowercase `comm.allreduce(tensor)` takes "
               f"{ms['allreduce(tensor)'] / buf:.1f}× as long as `Allreduce` on the flat float32 buffer "
               f"({ms['allreduce(tensor)']:.2f} against {buf:.2f} ms at N = {first}), and one lowercase call per "
               f"parameter tensor {ms['allreduce per tensor'] / buf:.0f}×.")
    e = epochs.get(f"serverless N={last}")
    if e:
        skip = sv[last]
        exposed = 100 * (skip["serverless"]["step_ms"] - skip["skip"]["step_ms"]) / skip["serverless"]["step_ms"]
        cores = b["run"]["machine"]["cores"]
        out.append(f"- **Where a serverless step goes**, N = {last}, one epoch: compute {e['compute_s']:.1f} s, "
                   f"the all-reduce {e['comm_s']:.2f} s, waiting for the last rank {e['wait_s']:.2f} s. "
                   + (f"Uncoupling the ranks (skipping the all-reduce) shortens the step by {exposed:.1f}%"
                      if exposed > 0 else f"Uncoupling the ranks (skipping the all-reduce) does not shorten "
                      f"the step here (it was {-exposed:.1f}% longer)")
                   + (f": the wait is mostly the time-sharing of {cores} cores, which the ranks pay with or "
                      "without it." if cores < last and exposed < 100 * e["wait_s"] / e["epoch_s"] else "."))
    before, after = thread_step_ms(threads)
    views = ", ".join(f"{sv[n]['copy']['step_ms'] / sv[n]['serverless']['step_ms']:.2f}× at N = {n}" for n in ns)
    gains = {n: sv[n]["serverless"]["step_ms"] / sv[n]["overlap"]["step_ms"] for n in ns}
    won = all(g >= OVERLAP_WINS for g in gains.values())
    kb = round(4 * pickled[first]["floats"] / 1000)
    out.append(
        f"- **Optimizations, each with its gain measured in the same run:** one thread per rank "
        f"(`utils.set_threads`) against `OMP_NUM_THREADS=2` on 2 ranks, **{before / after:.1f}×**; grads as views "
        f"of the flat buffer against packing and unpacking them, {views}, kept because it is also the simpler "
        f"code; overlapping the all-reduce with backward (DDP's buckets and hooks, by hand in `bench/ddp.py`), "
        + ", ".join(f"{g:.2f}× at N = {n}" for n, g in gains.items())
        + (", a gain, but not in the scripts, which keep the plain step to stay readable."
           if won else
           f", so not in the scripts: the {kb} KB all-reduce is short, backward already fills the cores"
           + (", and this Open MPI has no progress thread to move an `Iallreduce` during backward."
              if b["run"]["no_progress_thread"] else ".")))
    return out


def q7_table(ar):
    ns = sorted(ar)
    head = "| buffer | " + " | ".join(f"N={n}: mpi | ring | tree | copy | ring/mpi" for n in ns) + " |"
    L = [head, "|---|" + "---|" * 5 * len(ns)]
    sizes = sorted({row["bytes"] for n in ns for row in ar[n]["rows"]})  # every size measured
    for i, nbytes in enumerate(sizes):
        cells = []
        for n in ns:
            row = at_size(ar[n], nbytes)
            if row is None:
                cells.append(" | ".join(["–"] * 5))
                continue
            ratio = f"{row['ring_ms'] / row['mpi_ms']:.2f}"
            unit = " ms" if i == 0 else ""
            cells.append(f"{row['mpi_ms']:.3f}{unit} | {row['ring_ms']:.3f} | {row['tree_ms']:.3f} | "
                         f"{row['copy_ms']:.3f} | " + (f"**{ratio}**" if nbytes == 4 << 20 else ratio))
        L.append(f"| {size_name(nbytes)} | " + " | ".join(cells) + " |")
    return L


def q7_note(b):
    ar, run = b["ar"], b["run"]
    ns = sorted(ar)
    small, large = (min(r["bytes"] for r in ar[max(ns)]["rows"]), max(r["bytes"] for r in ar[max(ns)]["rows"]))
    lo, hi = at_size(ar[max(ns)], small), at_size(ar[max(ns)], large)
    return (f"(`mpirun -n N python bench/allreduce.py`, N = {' and '.join(map(str, ns))}, from the bench run of "
            f"[Performance](#performance) on {machine_of_run(run)}: "
            + " and ".join(f"`results/reference/bench/allreduce_n{n}.json`" for n in ns)
            + f"; median of {ar[ns[0]]['repeats']} calls, each the slowest rank's time; `copy` is the physical "
            "floor, a memcpy of the buffer timed in the same run, times 2(N−1)/N, a ring's traffic per rank. "
            "The notebook's Q7 cell runs N = 4 again, and its answer quotes that run. Run by hand, the script "
            "writes `results/allreduce_nN.json` and `figures/allreduce_nN.png`.) "
            f"At N = {max(ns)}, the smallest buffer ({size_name(small)}) is latency-bound: the tree's "
            f"{'few messages beat' if lo['tree_ms'] < lo['ring_ms'] else 'few messages do not beat'} the ring's "
            f"many ({lo['tree_ms']:.3f} against {lo['ring_ms']:.3f} ms). At {size_name(large)} the ring's "
            "bandwidth-optimal schedule "
            + (f"beats the tree, which pushes the whole buffer through rank 0 ⌈log2 N⌉ times "
               f"({hi['ring_ms']:.2f} against {hi['tree_ms']:.2f} ms)" if hi["ring_ms"] < hi["tree_ms"] else
               f"does not beat the tree here ({hi['ring_ms']:.2f} against {hi['tree_ms']:.2f} ms)")
            + f", and is {hi['ring_ms'] / hi['mpi_ms']:.2f}× MPI's own all-reduce.")


def noniid_paragraph(iid, non):
    K = len(non["client_sizes"])
    shards = 2 * K
    shard = sum(non["client_sizes"]) // shards
    drop = non["final_test_acc"] < iid["final_test_acc"]
    return (f"With `--split-method non-iid` the training set is sorted by label and cut into {shards} shards "
            f"of {shard:,}, two per client, after the pathological split of McMahan et al. (2017), whose 200 "
            "shards of 300 held one class each, so that a client had at most 2. Here a shard spans classes, "
            f"and each client holds {classes_held(non)} "
            "(`figures/data_distribution_non-iid.png`, against `figures/data_distribution_iid.png`). "
            f"Accuracy {'drops' if drop else 'goes'} from {pct(iid['final_test_acc'])} to "
            f"{pct(non['final_test_acc'])} with the same {plural(len(non['history']), 'round')}, and "
            f"{the_first_rounds_reach(non)} {first_rounds(non)} (iid: {first_rounds(iid)}).")


def seed_gap(runs, where):
    """Q5's answer over the seeds: the gap between the means of the iid and non-iid runs, citing `where`."""
    iid, non = runs.get("fed_avg_iid"), runs.get("fed_avg_non-iid")
    if not (iid and non):
        return ""
    accs = {k: [r["final_test_acc"] for r in rs] for k, rs in (("iid", iid), ("non", non))}
    gap = sum(accs["iid"]) / len(iid) - sum(accs["non"]) / len(non)
    ranges = [max(a) - min(a) for a in accs.values()]
    return (f" Over the seeds ({where}), iid clients reach {spread(iid)} and non-iid clients {spread(non)}: "
            f"the non-iid split costs **{gap:.1f} points**, "
            + (f"far more than either's spread over the seeds ({ranges[0]:.2f} and {ranges[1]:.2f} points)."
               if gap > 2 * max(ranges) else f"against spreads over the seeds of {ranges[0]:.2f} and "
               f"{ranges[1]:.2f} points."))


def drift_paragraph(fed):
    """What --measure-drift found on iid and on the shards, and the remedies on the shards after 10 rounds."""
    iid, non = fed.get("iid_fedavg"), fed.get("non-iid_fedavg")
    if not (iid and non):
        return "The drift measurements have not run yet: `python bench/fed_sweep.py`."
    d = lambda r, i: r["history"][i]["drift"]
    mean = lambda xs: sum(x for x in xs if x is not None) / len([x for x in xs if x is not None])
    last = len(non["history"]) - 1
    text = (f"Measured with `--measure-drift` (`python bench/fed_sweep.py`, table in "
            f"[`bench/FED.md`](../bench/FED.md), figure `figures/client_drift.png`): after round 1 a client's "
            f"model lies {mean(d(non, 0)['distance']):.3f} of the global model's norm from the new global model "
            f"on the shards, against {mean(d(iid, 0)['distance']):.3f} with iid clients "
            f"(round {last + 1}: {mean(d(non, last)['distance']):.3f} against {mean(d(iid, last)['distance']):.3f}). "
            f"In round 1 the shard clients' models score {pct(mean(d(non, 0)['acc_own']))} on their own classes "
            f"and {pct(mean(d(non, 0)['acc_other']))} on the others (iid clients: "
            f"{pct(mean(d(iid, 0)['acc_own']))} on all ten); in round {last + 1}, "
            f"{pct(mean(d(non, last)['acc_own']))} and {pct(mean(d(non, last)['acc_other']))}. The global "
            f"model's weakest class ends at {pct(min(d(non, last)['global_class_acc']))} "
            f"(iid: {pct(min(d(iid, last)['global_class_acc']))}).")
    fixes = [r for _, r in sorted(fed.items()) if r["split"] == non["split"]
             and r["config"]["algorithm"] in ("fedrs", "fedlc") and all("drift" in h for h in r["history"])]
    if fixes:  # the label-skew fixes act on exactly this: the classes a client lacks
        text += (f" With the label-skew fixes the clients' models still score on the other classes in round {last + 1}: "
                 + ", ".join(f"{pct(mean(d(r, last)['acc_other']))} with {algorithm_name(r['config'])}" for r in fixes)
                 + ".")
    return text + remedies(fed, iid, non) + " " + recipe([r["config"] for r in fed.values()])


def remedies(fed, iid, non):
    """The sweep's algorithms on each split, best first, each with the mu or momentum tuned on the shards;
    and FedAvg at SCAFFOLD's bytes."""
    last = len(non["history"]) - 1
    text = ""

    def kind(r):  # the algorithm, and whether a client-side fix also takes server momentum
        c = r["config"]
        return c["algorithm"], bool(c.get("server_momentum")) and c["algorithm"] != "fedavgm"

    def setting(r):
        return r["config"].get("prox_mu"), r["config"].get("server_momentum")

    # the mu and momentum were tuned on the shards: each algorithm at its best value there
    tuned = {}
    for r in fed.values():
        if r["split"] == non["split"] and len(r["history"]) == len(non["history"]):
            tuned[kind(r)] = max(tuned.get(kind(r), r), r, key=lambda r: r["final_test_acc"])

    def ranked(split):  # each algorithm's final accuracy on `split`, best first, after as many rounds
        rivals = [r for r in fed.values() if r["split"] == split and len(r["history"]) == len(non["history"])]
        if split == non["split"]:
            rivals = list(tuned.values())
        else:  # where a run with the tuned value exists, the runs with other values (older tunings) drop out
            rivals = [r for r in rivals if kind(r) not in tuned or setting(r) == setting(tuned[kind(r)])
                      or not any(setting(o) == setting(tuned[kind(r)]) for o in rivals if kind(o) == kind(r))]
        return [f"{algorithm_name(r['config'])} {pct(r['final_test_acc'])}"
                for r in sorted(rivals, key=lambda r: -r["final_test_acc"])] if len(rivals) > 1 else []
    splits = [non["split"], *sorted({r["split"] for r in fed.values()} - {iid["split"], non["split"]}), iid["split"]]
    for split in splits:
        parts = ranked(split)
        if parts and split == non["split"]:
            text += (f" The remedies on the shards, after the same {plural(last + 1, 'round')}, each with the best "
                     f"μ or momentum of the sweep: {', '.join(parts)}.")
        elif parts and split == iid["split"]:
            text += f" With iid clients, which have little drift to correct: {', '.join(parts)}."
        elif parts:
            text += f" With a {split.split(', ')[-1]} split: {', '.join(parts)}."
    # the baseline at SCAFFOLD's bytes (bench/fed_sweep.py's fedavg_2x): more rounds of fewer local steps
    twice = {r["split"]: r for name, r in fed.items() if name.endswith("_fedavg_2x")}
    where = {iid["split"]: "iid", non["split"]: "on the shards"}
    if twice:
        text += (" FedAvg with SCAFFOLD's bytes spent on twice the rounds, of half the local steps, reaches "
                 + ", ".join(f"{pct(twice[split]['final_test_acc'])} {where.get(split, 'on ' + split.split(', ')[-1])}"
                             for split in splits if split in twice) + ".")
    return text


def fed_spread(fed, seeds):
    """FedAvg and each split's best variant over the seeds (bench/fed_sweep.py --seeds), as a sentence:
    the mean and range of each, and whether the two ranges of a split overlap."""
    groups = {}  # <split>_<label>: {seed: record}, seed 0 being the sweep's own run
    for name, r in seeds.items():
        base, seed = name.rsplit("_seed", 1)
        groups.setdefault(base, {0: fed[base]})[int(seed)] = r
    if not groups:
        return ""
    by_split, iid = {}, fed.get("iid_fedavg", {}).get("split")
    for base, by_seed in groups.items():
        accs = [r["final_test_acc"] for r in by_seed.values() if r.get("final_test_acc") is not None]
        diverged = len(by_seed) - len(accs)
        text = (f"{algorithm_name(fed[base]['config'])} {sum(accs) / len(accs):.2f}% ({min(accs):.2f}–"
                f"{max(accs):.2f}" + (f"; {plural(diverged, 'seed')} diverged" if diverged else "") + ")")
        by_split.setdefault(fed[base]["split"], []).append((fed[base]["config"]["algorithm"] == "fedavg", text,
                                                            min(accs), max(accs)))
    out = []
    for split, rows in by_split.items():
        where = "iid" if split == iid else "on " + split.split(", ")[-1]
        rows.sort(key=lambda row: not row[0])  # FedAvg first
        overlap = len(rows) == 2 and rows[0][2] <= rows[1][3] and rows[1][2] <= rows[0][3]
        out.append(f"{where}, " + " against ".join(row[1] for row in rows)
                   + (" (the ranges overlap)" if overlap else " (the ranges do not overlap)" if len(rows) == 2 else ""))
    n = max(len(by_seed) for by_seed in groups.values())
    return (f" Over {n} seeds (`python bench/fed_sweep.py --seeds`, the table in [`bench/FED.md`](../bench/FED.md)): "
            + "; ".join(out) + ".")


# ----------------------------------------------------------------------------- HW5.ipynb

def notebook_fragments(R):
    """{name: text} of every fragment HW5.ipynb's markdown cells mark: the run's note and the answers."""
    seeds = spread_of(R["runs"])
    F = {"notebook-run": notebook_run_note(R), "answer-q1": answer_q1(R, seeds), "answer-q2": answer_q2(R, seeds),
         "answer-q3": answer_q3(R, seeds), "answer-q4": answer_q4(R, seeds), "answer-q5": answer_q5(R),
         "q5-local-steps": f"{max(R['fed_avg_non-iid']['local_steps']):,}",
         "q6-local-steps": f"{max(R['fed_avg_iid']['local_steps']):,}",
         "answer-q7-measured": q7_measured(R["allreduce_n4"])}
    return {name: text if name.endswith("-steps") else wrap(text) for name, text in F.items()}


def spread_of(runs):
    """name -> ' (seed 0; the mean over 3 seeds is 77.77%, range 77.61–77.98)', or '' before the seed runs exist."""
    def seeds(name):
        if name not in runs:
            return ""
        accs = [r["final_test_acc"] for r in runs[name]]
        return (f" (seed 0; the mean over {len(accs)} seeds is {sum(accs) / len(accs):.2f}%, range "
                f"{min(accs):.2f}–{max(accs):.2f})")
    return seeds


def notebook_run_note(R):
    """What made the outputs below: the run, its host and commit, and the seeds the answers cite."""
    cent, sv, ps, nb, ar = R["cent_sgd"], R["dist_sgd_serverless"], R["dist_sgd_param_server"], R["notebook"], \
        R["allreduce_n4"]
    hw = cent["hardware"]
    shared = (f", so the {sv['world_size']} or {ps['world_size']} ranks of Q2 to Q5 share {hw['cores']} cores, and "
              "the wall times show this machine rather than how the paradigms scale"
              if not hw["gpu"] and hw["cores"] < ps["world_size"] else "")
    prov = nb["provenance"]
    return (
        f"**About the outputs below.** They come from one run of this notebook, top to bottom, on seed 0, "
        f"finished {nb['finished']}, in {nb['minutes']:.1f} minutes{' (quick mode)' if nb['quick'] else ''}, "
        f"made by `python bench/reference.py` at commit {prov['commit'][:10]}: "
        f"{machine(cent)} (PyTorch {cent['torch']} on the {cent['device']}, {mpi_name(ar)}){shared}. "
        f"Data: {cent['data']}. Their JSON records are committed in `results/reference/notebook/`, and "
        "`python bench/report.py` writes the numbers of the answers below from them. Each answer also gives "
        "the mean and range of its command over seeds 0, 1 and 2 (`results/reference/runs/`): another seed, "
        "or another machine's float rounding, moves a run by about a point.")


def answer_q1(R, seeds):
    cent = R["cent_sgd"]
    c = cent["config"]
    return (
        f"**Answer (Q1).** Centralized SGD reaches **{pct(cent['final_test_acc'])}** test accuracy"
        f"{seeds('cent_sgd')} after "
        f"{plural(c['epochs'], 'epoch')} ({plural(cent['steps'], 'step')} of batch {c['batch_size']}, "
        f"lr {c['lr']:g}) in "
        f"{minutes(cent['wall_time'])} of training. The cell below reads the number from "
        "`results/reference/notebook/cent_sgd.json`, which the script wrote.")


def answer_q2(R, seeds):
    cent, sv = R["cent_sgd"], R["dist_sgd_serverless"]
    N, b = sv["world_size"], sv["config"]["batch_size"]
    return (
        f"**Answer (Q2).** Serverless data-parallel SGD on {N} ranks reaches **{pct(sv['final_test_acc'])}**"
        f"{seeds('dist_sgd_serverless')}, against Q1's {pct(cent['final_test_acc'])}. The per-rank batch is {b}, so "
        f"each step uses a global batch of {N * b} and an epoch takes {N}× fewer steps ({sv['steps']:,} in all); "
        f"the lr is scaled by √{N} to {sv['config']['lr']:g}. The model has no BatchNorm, so the averaged gradient is exactly the gradient "
        f"of the whole global batch: this *is* centralized SGD with batch {N * b} (the tests check it to float32 "
        "rounding), and the difference from Q1 comes from the larger batch and lr, not from distributing the "
        "work.")


def answer_q3(R, seeds):
    sv, ps = R["dist_sgd_serverless"], R["dist_sgd_param_server"]
    gap = abs(ps["final_test_acc"] - sv["final_test_acc"])
    return (
        f"**Answer (Q3).** The parameter server with {ps['num_workers']} workers reaches "
        f"**{pct(ps['final_test_acc'])}**{seeds('dist_sgd_param_server')}, against Q2's {pct(sv['final_test_acc'])}. "
        "It computes the same steps as Q2: "
        f"the same global batch of {ps['global_batch']}, the same lr, with the momentum held by the server. "
        f"The two runs end {gap:.2f} points apart only through float32 rounding (the server adds the "
        f"gradients in another order than `MPI_Allreduce`), which grows over {ps['steps']:,} steps. What "
        "differs by design is the traffic: all of it goes through rank 0 (Q6), and the time: "
        f"{minutes(ps['wall_time'])} of training against {minutes(sv['wall_time'])}.")


def answer_q4(R, seeds):
    cent, sv, ps, iid = (R[k] for k in SCRIPTS[:4])
    K, steps = len(iid["client_sizes"]), max(iid["local_steps"])
    others = [cent["final_test_acc"], sv["final_test_acc"], ps["final_test_acc"]]
    where = ("below all of" if iid["final_test_acc"] < min(others) else
             "above all of" if iid["final_test_acc"] > max(others) else "between")
    return (
        f"**Answer (Q4).** FedAvg with {K} iid clients reaches **{pct(iid['final_test_acc'])}**"
        f"{seeds('fed_avg_iid')} after "
        f"{plural(len(iid['history']), 'round')}. Each round every client starts from the global model, "
        f"takes {steps:,} local SGD steps (one pass over its {max(iid['client_sizes']):,} samples) and sends its "
        "weights back; the server averages them weighted by sample count. That is "
        f"{plural(len(iid['history']), 'pass', 'passes')} over the data in all, and it ends {where} Q1 to Q3 "
        f"({', '.join(pct(a) for a in others)}): an average of {K} models trained apart for {steps:,} steps is "
        f"not the same as {steps:,} steps of SGD. In exchange it talks to "
        "the server once per round instead of once per step.")


def answer_q5(R):
    iid, non = R["fed_avg_iid"], R["fed_avg_non-iid"]
    diff = iid["final_test_acc"] - non["final_test_acc"]
    shards = 2 * len(non["client_sizes"])
    return (
        f"**Answer (Q5).** With non-iid clients FedAvg reaches **{pct(non['final_test_acc'])}**, "
        f"{abs(diff):.1f} points {'below' if diff > 0 else 'above'} the iid split ({pct(iid['final_test_acc'])}), "
        "with the same data, model, rounds and communication. In the plots, each iid client holds all "
        f"classes in equal parts; each non-iid client holds {classes_held(non)} (the training set, sorted by "
        f"label, is cut into {shards} shards of {sum(non['client_sizes']) // shards:,} images and each client "
        f"gets 2). {the_first_rounds_reach(non).capitalize()} {first_rounds(non)}, against {first_rounds(iid)} "
        "with iid clients." + seed_gap(R["runs"], "`results/reference/runs/`, made by `python bench/reference.py`"))


def q7_measured(ar):
    N, rows = ar["n"], ar["rows"]
    lo, hi = rows[0], rows[-1]
    log_n = (N - 1).bit_length()  # ⌈log2 N⌉
    def us(ms):
        return f"{ms:.1f} ms" if ms >= 1 else f"{1e3 * ms:.0f} µs"

    worst = max(r["mpi_ms"] / min(r["ring_ms"], r["tree_ms"]) for r in rows)
    return (
        f"**What the benchmark shows** (N = {N}, `results/reference/notebook/allreduce_n{N}.json`, all ranks on one "
        f"machine, {ar['machine']}, so a \"link\" is shared memory). For small buffers the latency term "
        f"dominates, and the tree (2⌈log2 {N}⌉ = {2 * log_n} rounds) "
        f"{'beats' if lo['tree_ms'] < lo['ring_ms'] else 'does not beat'} the ring ({2 * (N - 1)} steps): at "
        f"{size_name(lo['bytes'])}, tree {us(lo['tree_ms'])} against ring {us(lo['ring_ms'])}. For large buffers "
        f"the bandwidth term dominates and the ring, which moves {2 * (N - 1) / N:g}·P per rank against the "
        f"tree's {log_n}·P through rank 0, {'wins' if hi['ring_ms'] < hi['tree_ms'] else 'does not win here'}: "
        f"at {size_name(hi['bytes'])}, ring {us(hi['ring_ms'])} against tree {us(hi['tree_ms'])}. "
        "`MPI_Allreduce` switches algorithms by size and "
        + (f"is close to the better of the two everywhere (at most {worst:.2f}× its time; "
           if worst <= 1.5 else f"takes up to {worst:.1f}× the better of the two (")
        + f"{us(hi['mpi_ms'])} at {size_name(hi['bytes'])}). Over a real network α and β are much larger "
        "than through shared memory; the α-β model above predicts the same shape there, with the crossover "
        "at another size.")


# ----------------------------------------------------------------------------- fragments

def fill(text, fragments, where):
    """text with the body of every marked fragment replaced; (new text, names found)."""
    found = []

    def body(m):
        name = m["name"]
        if name not in fragments:
            raise SystemExit(f"error: {where} marks a fragment {name!r} that bench/report.py does not generate")
        found.append(name)
        new = fragments[name]
        if m["body"].startswith("\n"):  # a block: markers on lines of their own
            new = f"\n{new}\n"
        elif m.start() == 0 or text[m.start() - 1] == "\n":  # markdown would show the line as raw HTML
            raise SystemExit(f"error: {where}: the inline fragment {name!r} starts a line; put a word before it")
        return f"<!-- begin: {name} -->{new}<!-- end: {name} -->"

    return FRAGMENT.sub(body, text), found


def generated(folder):
    """{path: (current text, text generated from the records)} for README.md, docs/*.md, HW5.ipynb, RESULTS.md."""
    import nbformat  # only here: rendering RESULTS.md (bench/run.py) needs no Jupyter

    R = records(folder)
    smoke = smoke_test_records(folder)
    if smoke:
        raise SystemExit(f"error: {', '.join(smoke)} in {shown_path(folder)} are smoke-test (--tiny) records: "
                         "the numbers of a few steps are no measurement. Rerun: python bench/reference.py")
    out, fragments, found = {}, readme_fragments(R), []
    for path in markdown_pages():
        with open(path) as f:
            current = f.read()
        text, names = fill(current, fragments, os.path.relpath(path, ROOT))
        found += names
        out[path] = (current, text)
    missing(fragments, found, "README.md and docs/")

    with open(NOTEBOOK) as f:
        current = f.read()
    nb = nbformat.reads(current, as_version=4)
    fragments, found = notebook_fragments(R), []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source, names = fill(cell.source, fragments, "HW5.ipynb")
            found += names
    missing(fragments, found, "HW5.ipynb")
    text = nbformat.writes(nb)
    out[NOTEBOOK] = (current, text if text.endswith("\n") else text + "\n")  # as nbformat.write ends a file

    with open(RESULTS_MD) as f:
        out[RESULTS_MD] = (f.read(), render_results(os.path.join(folder, "bench"), os.path.dirname(RESULTS_MD)))
    return out


def smoke_test_records(folder):
    """The records under `folder` that a smoke test (--tiny) wrote, as paths relative to it."""
    found = []
    for d, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".json"):
                with open(os.path.join(d, name)) as f:
                    if json.load(f).get("tiny"):
                        found.append(os.path.relpath(os.path.join(d, name), folder))
    return found


def markdown_pages():
    """README.md and the topic pages of docs/, where the README's fragments live."""
    pages = sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md")) if os.path.isdir(DOCS) else []
    return [README, *pages]


def missing(fragments, found, where):
    lost = sorted(set(fragments) - set(found))
    twice = sorted({n for n in found if found.count(n) > 1})
    if lost or twice:
        raise SystemExit(f"error: {where}: fragment markers missing for {lost}, repeated for {twice}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 with a diff if any file differs")
    parser.add_argument("--records", default=RECORDS, help="the reference run's records (default: %(default)s)")
    args = parser.parse_args()
    stale = []
    for path, (current, text) in generated(args.records).items():
        if current == text:
            continue
        stale.append(os.path.relpath(path, ROOT))
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                       f"{stale[-1]} (committed)", f"{stale[-1]} (from the records)"))
        else:
            with open(path, "w") as f:
                f.write(text)
    if args.check and stale:
        print(f"\n{', '.join(stale)} differ from the records in {shown_path(args.records)}: "
              "run `python bench/report.py`", file=sys.stderr)
        sys.exit(1)
    print(f"{'stale' if args.check else 'rewrote'}: {', '.join(stale)}" if stale else "all generated numbers "
          "equal the records")


if __name__ == "__main__":
    main()
