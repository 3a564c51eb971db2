"""The reference run's records (results/reference/), loaded once for every document.

records() is the whole run: the notebook's scripts, the bench, the seed runs and the FedAvg sweep;
bench_records() is the bench's part alone, which bench/run.py renders before run.json exists.
"""
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ("cent_sgd", "dist_sgd_serverless", "dist_sgd_param_server", "fed_avg_iid", "fed_avg_non-iid")


def load(path):
    with open(path) as f:
        return json.load(f)


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
    r["grading"] = gradings(os.path.join(folder, "grading"))
    ubuntu = os.path.join(folder, "grading", "ubuntu-22.04")  # grading/try_zip.sh's results.json
    r["grading_ubuntu"] = {name[:-len(".json")]: load(os.path.join(ubuntu, name)) for name in
                           sorted(os.listdir(ubuntu)) if name.endswith(".json")} if os.path.isdir(ubuntu) else {}
    return r


def gradings(folder):
    """bench/autograder.py's records, {name: grade.py's results.json with its provenance}, in the
    order of its summary (run.json, written when every grading is done); {} before that."""
    summary = os.path.join(folder, "run.json")
    if not os.path.exists(summary):
        return {}
    return {name: load(os.path.join(folder, f"{name}.json")) for name in load(summary)["gradings"]}


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


def seed_runs(folder):
    """bench/reference.py's headline runs, {name: [record, ...] in seed order}, for the names it has run."""
    out = {}
    for name in SCRIPTS:
        seeds = [load(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if re.fullmatch(
            rf"{re.escape(name)}_seed\d+\.json", f)] if os.path.isdir(folder) else []
        if seeds:
            out[name] = sorted(seeds, key=lambda r: r["config"]["seed"])
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


def at_size(ar, nbytes):
    """The row of an all-reduce record for one buffer size, or None."""
    return next((row for row in ar["rows"] if row["bytes"] == nbytes), None)


def thread_step_ms(threads):
    """ms per step with OMP_NUM_THREADS=2 (before) and with utils.set_threads' choice (after)."""
    return tuple(1e3 * threads[k]["history"][0]["step_time"] for k in ("OMP_NUM_THREADS=2", "default"))
