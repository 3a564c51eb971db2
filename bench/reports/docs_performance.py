"""docs/performance.md's fragments: the notebook's run in detail, and the full bench's wall time and
findings (its tables are bench/RESULTS.md's own).
"""
from .records import SCRIPTS, thread_step_ms
from .results_md import OVERLAP_WINS
from .wording import command, machine_of_run, wrap


def fragments(R):
    """{name: text} of every fragment docs/performance.md marks."""
    return {"results-bullets": wrap(results_bullets(R)), **bench_fragments(R["bench"])}


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


def step_ms(r):
    """Mean training time per step over the run, in ms (the time inside train_time: no evaluation)."""
    return 1e3 * sum(h["train_time"] for h in r["history"]) / r["steps"]


def bench_fragments(b):
    """The full bench's wall time and its findings (its targets' table is RESULTS.md's own)."""
    run = b["run"]
    data = "CIFAR-10" if run["dataset"].startswith("CIFAR-10") else "synthetic data"
    wall = f"{run['wall_s'] / 60:.1f} min on {machine_of_run(run)}, on {data}" + (
        ", in its `--tiny` mode: a smoke test of a few steps, so the numbers below show the tables' "
        "shape, not this machine's performance (the full bench has yet to be rerun at this code)"
        if run["tiny"] else "")
    return {"bench-wall": wall,  # inline, inside a sentence: wrapping would break its line
            "bench-bullets": wrap("\n".join(bench_bullets(b)))}


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
