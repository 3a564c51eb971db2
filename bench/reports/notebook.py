"""HW5.ipynb's fragments, in its markdown cells: the note on the run that made its outputs, and the
measured numbers of the answers.
"""
from .fragments import fill, missing
from .records import SCRIPTS
from .wording import (classes_held, first_rounds, minutes, mpi_name, pct, plural, seed_gap, size_name,
                      the_first_rounds_reach, wrap)


def render(current, R):
    """The notebook's text, `current`, with the fragments of its markdown cells rewritten from the records R."""
    import nbformat  # only here: rendering RESULTS.md (bench/run.py) needs no Jupyter

    nb = nbformat.reads(current, as_version=4)
    texts, found = fragments(R), []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source, names = fill(cell.source, texts, "HW5.ipynb")
            found += names
    missing(texts, found, "HW5.ipynb")
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"  # as nbformat.write ends a file


def fragments(R):
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


def machine(r):
    hw = r["hardware"]
    return f"{hw['cpu']}, {hw['cores']} CPU cores, GPU: {hw['gpu'] or 'none'}"


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
