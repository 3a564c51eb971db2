"""docs/fedavg.md's fragment: client drift on iid and non-iid clients, the remedies of the FedAvg
sweep (`python bench/fed_sweep.py`), and the spread of the best of them over seeds.
"""
from .wording import algorithm_name, pct, plural, recipe, wrap


def fragments(R):
    """{name: text} of the fragment docs/fedavg.md marks."""
    return {"drift": wrap(drift_paragraph(R["fed"]) + fed_spread(R["fed"], R["fed_seeds"]))}


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
