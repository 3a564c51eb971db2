"""README.md's fragments: the notebook's run and its table, the all-reduce table (Q7), the non-iid
paragraph and the seed runs of the headline commands.
"""
from .records import SCRIPTS, at_size
from .wording import (classes_held, command, first_rounds, machine_of_run, minutes, mpi_name, pct, plural, seed_gap,
                      size_name, spread, the_first_rounds_reach, wrap)

COMMANDS = {"cent_sgd": "python cent_sgd.py", "dist_sgd_serverless": "mpirun -n 4 python dist_sgd_serverless.py",
            "dist_sgd_param_server": "mpirun -n 5 python dist_sgd_param_server.py",
            "fed_avg_iid": "mpirun -n 5 python fed_avg.py",
            "fed_avg_non-iid": "mpirun -n 5 python fed_avg.py --split-method non-iid"}


def fragments(R):
    """{name: text} of every fragment README.md marks."""
    b, iid, non = R["bench"], R["fed_avg_iid"], R["fed_avg_non-iid"]
    F = {"results-setup": results_setup(R), "results-table": results_table(R),
         "q7-table": "\n".join(q7_table(b["ar"]) + ["", q7_note(b)]),
         "noniid": noniid_paragraph(iid, non) + seed_gap(R["runs"], "[the reference runs](#the-reference-runs)"),
         "reference-runs": seeds_table(R["runs"]) if R["runs"] else "No run of `python bench/reference.py` yet."}
    return {name: wrap(text) for name, text in F.items()}


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


def epoch_times(r):
    """Seconds per epoch (FedAvg: round, evaluation included), from the record's history."""
    return [h["round_time"] + h["eval_time"] if "round" in h else h["epoch_time"] for h in r["history"]]


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
            f"[the bench](docs/performance.md) on {machine_of_run(run)}: "
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
