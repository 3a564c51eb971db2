"""Phrases that more than one document says, so that the README, the notebook and the benches'
pages name a run, a host or an algorithm alike (bench/fed_sweep.py and bench/async_ps.py use them too).
"""
import os
import re
import textwrap

from .records import ROOT


def shown_path(path):
    """path relative to the repo root when it lies inside it."""
    return os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT + os.sep) else path


def size_name(nbytes):
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


def plural(n, word, many=None):
    """'1 epoch', '8 epochs'."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def pct(x):
    return f"{x:.2f}%"


def minutes(seconds):
    return f"{seconds / 60:.1f} min"


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


def spread(runs):
    """'78.0% (77.5–78.4, 3 seeds)': the mean final accuracy and its range over the seeds."""
    accs = [r["final_test_acc"] for r in runs]
    if len(accs) == 1:
        return f"{accs[0]:.2f}% (1 seed)"
    return f"{sum(accs) / len(accs):.2f}% ({min(accs):.2f}–{max(accs):.2f}, {plural(len(accs), 'seed')})"


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


def command(r):
    """The command that made a script's record, with its defaults left out."""
    script = r["script"]
    line = f"python {script}.py" if r["world_size"] == 1 else f"mpirun -n {r['world_size']} python {script}.py"
    return line + (" --split-method non-iid" if r.get("split", "").startswith("non-iid") else "")


def machine_of_run(run):
    hw = run["machine"]
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
