"""A fingerprint of what a record's code computes: a few steps of its script, with its flags, on synthetic data.

    python bench/fingerprint.py results/reference/runs/*.json   # each: ok, or stale (rerun it)

A record of a script run (results/reference/runs/) stores the fingerprint that bench/reference.py
computed when it made the record. Recomputing it at another commit tells whether that commit's
code still computes what made the record: a refactor keeps the fingerprint, a change of recipe
moves it, and then the record must be rerun.

The replay runs the record's script with the record's flags and world size, except that the data
are the small synthetic set and the run stops after a few steps; the fingerprint is the change of
the parameters from their initial values, projected on a few fixed random directions, with its
norm. Floats differ between hosts (other CPUs round otherwise), so two fingerprints agree when they
are within REL_TOL of each other, far above that noise and far below what a changed computation
moves.
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import utils  # noqa: E402
from run import MPIRUN  # noqa: E402  (bench/ is on sys.path)

# Other CPUs round otherwise, and FedAvg on the non-iid shards (2 rounds of momentum SGD on
# 2-class clients) carries it furthest: at the code of b1fcfae its fingerprint moved by 5.4e-4
# of the update's norm between an AMD EPYC and an Intel Xeon host. A changed computation (an lr
# 2% off, tests/test_fingerprints.py) moves it by far more than REL_TOL.
REL_TOL = 2e-3
DIRECTIONS = 6
# Flags added after records were made, with the value that computes what the code did before them.
# A record's config without the key replays with that value, so older records stay checkable.
BEFORE = {"clip_norm": 0.0}
# What the replay sets, whatever the record says: small data, few steps, its outputs in a scratch folder
REPLAY = {"dataset": "synthetic", "train_size": 512, "max_steps": 4}
REPLAY_FED = {"dataset": "synthetic", "train_size": 2000, "max_steps": 2, "rounds": 2}
NOT_FLAGS = set(utils.NOT_CONFIG) | {"split"}  # file names and derived values, not flags


def replay_flags(record):
    """The command-line flags that replay `record`'s configuration, as a list of strings."""
    return config_flags({**record["config"], **(REPLAY_FED if record["script"] == "fed_avg" else REPLAY)})


def config_flags(config):
    """The command-line flags that give a script the configuration `config` (a record's), as strings;
    a flag added after the record was made takes the value that computes what the code did before it."""
    config = {**BEFORE, **config}
    flags = []
    for key, value in sorted(config.items()):
        if key in NOT_FLAGS or value is None or value is False:
            continue
        flags.append("--" + key.replace("_", "-"))
        if value is not True:
            flags.append(str(value))
    return flags


def replay(record):
    """Run the record's script for a few steps with its flags; return its fingerprint (a list of floats)."""
    script, n = record["script"], record["world_size"]
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model.pt")
        cmd = [sys.executable, f"{script}.py", *replay_flags(record), "--results", os.path.join(tmp, "r.json"),
               "--save-model", model]
        if script == "fed_avg":
            cmd += ["--figures-dir", tmp + os.sep]
        if script != "cent_sgd":
            cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(n), *cmd]
        env = dict(os.environ, OMPI_MCA_btl=os.environ.get("OMPI_MCA_btl", "^ofi"), PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"the replay of {script} failed: {tail}")
        weights = torch.load(model)
    start = utils.parameters_vector(utils.make_model(torch.device("cpu"), record["config"]["seed"]))
    return summarize(weights - start)


def summarize(delta):
    """The norm of `delta` and its projections on DIRECTIONS fixed random directions.

    A projection on a unit direction is about norm / sqrt(P) in size; times sqrt(P), each number
    is of the norm's size, so that one tolerance, relative to the norm, fits them all. A change of
    the computation that moves the update by a fraction f in any direction moves them by about f."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(DIRECTIONS, len(delta), generator=g, dtype=torch.float64)
    directions *= len(delta) ** 0.5 / directions.norm(dim=1, keepdim=True)
    delta = delta.double()
    return [float(delta.norm())] + [float(x) for x in directions @ delta]


def agree(a, b):
    """True if fingerprints a and b are the same computation: they differ by at most REL_TOL of its size."""
    if a is None or b is None or len(a) != len(b):
        return False
    scale = max(abs(a[0]), abs(b[0]), 1e-12)  # the update's norm: the projections are at most that
    return all(abs(x - y) <= REL_TOL * scale for x, y in zip(a, b))


def check(path):
    """(ok, message) for the record at `path`: its stored fingerprint against one computed now."""
    with open(path) as f:
        record = json.load(f)
    stored = record.get("fingerprint")
    if stored is None:
        return False, f"{os.path.relpath(path, ROOT)}: no fingerprint stored; rerun it with bench/reference.py"
    try:
        now = replay(record)
    except RuntimeError as e:
        return False, f"{os.path.relpath(path, ROOT)}: {e}; rerun it"
    if not agree(stored, now):
        worst = max(abs(x - y) for x, y in zip(stored, now)) / max(abs(stored[0]), 1e-12)
        return False, (f"{os.path.relpath(path, ROOT)}: this code computes otherwise (fingerprints differ by "
                       f"{worst:.1e} of the update's norm); rerun it with bench/reference.py")
    return True, f"{os.path.relpath(path, ROOT)}: ok"


def main():
    paths = sys.argv[1:]
    if not paths or paths[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[2].strip())
        sys.exit(0 if paths else 2)
    results = [check(p) for p in paths]
    for _, message in results:
        print(message, flush=True)
    sys.exit(0 if all(ok for ok, _ in results) else 1)


if __name__ == "__main__":
    main()
