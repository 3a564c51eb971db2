"""bench/RESULTS.md, generated whole from the records of `python bench/run.py`.

bench/run.py calls render_results after its run; bench/report.py checks the committed file against it.
"""
import os

from .records import ROOT, at_size, bench_records, thread_step_ms
from .wording import shown_path, size_name

RESULTS_MD = os.path.join(ROOT, "bench", "RESULTS.md")
OVERLAP_WINS = 1.03  # a gain below this is within the run-to-run noise of the bench machine


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
