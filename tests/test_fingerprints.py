"""The reference's script records were made by code that computes what HEAD computes (bench/fingerprint.py).

    python -m pytest -q -m slow tests/test_fingerprints.py

Each script record of results/reference/runs/ and results/reference/notebook/ stores the fingerprint
that bench/reference.py computed when it made the record: a few steps of its script, with its flags,
on synthetic data. Recomputed here, it must agree; if it does not, HEAD computes something else, and
the test names the records to rerun.
"""
import glob
import os

import pytest

from mpi import ROOT, bench_module

REFERENCE = os.path.join(ROOT, "results", "reference")
SCRIPTS = ("cent_sgd", "dist_sgd_serverless", "dist_sgd_param_server", "fed_avg_iid", "fed_avg_non-iid")
# the seed runs, and the records the notebook's scripts wrote (the bench's and notebook.json are no script's)
RUNS = sorted(glob.glob(os.path.join(REFERENCE, "runs", "*.json"))) + [
    p for p in (os.path.join(REFERENCE, "notebook", f"{name}.json") for name in SCRIPTS) if os.path.exists(p)]


def test_flags_added_later_replay_as_before_them():
    fingerprint = bench_module("fingerprint")
    record = {"script": "cent_sgd", "world_size": 1,
              "config": {"seed": 1, "lr": 0.05, "momentum": 0.9, "resume": False, "results": "x.json"}}
    flags = fingerprint.replay_flags(record)
    assert flags[flags.index("--clip-norm") + 1] == "0.0"  # a record from before clipping: replayed unclipped
    assert "--resume" not in flags and "--results" not in flags and flags[flags.index("--dataset") + 1] == "synthetic"
    record["config"]["clip_norm"] = 5.0
    assert fingerprint.replay_flags(record)[flags.index("--clip-norm") + 1] == "5.0"


def test_agree_tolerates_rounding_and_not_a_change():
    fingerprint = bench_module("fingerprint")
    a = [2.0, 1.5, -0.7, 0.3]
    assert fingerprint.agree(a, [x * (1 + 1e-6) for x in a])
    assert not fingerprint.agree(a, [a[0], a[1] + 1e-2, *a[2:]])
    assert not fingerprint.agree(a, None)


@pytest.mark.slow
def test_a_changed_flag_moves_the_fingerprint():
    fingerprint = bench_module("fingerprint")
    record = {"script": "cent_sgd", "world_size": 1, "config": {"seed": 0}}
    base = fingerprint.replay(record)
    assert fingerprint.agree(base, fingerprint.replay(record))
    assert not fingerprint.agree(base, fingerprint.replay({**record, "config": {"seed": 0, "lr": 0.051}}))


@pytest.mark.slow
def test_every_reference_run_was_made_by_this_code():
    assert RUNS, "results/reference/runs/ holds no records: python bench/reference.py"
    fingerprint = bench_module("fingerprint")
    stale = [message for ok, message in map(fingerprint.check, RUNS) if not ok]
    assert not stale, "rerun these (python bench/reference.py):\n" + "\n".join(stale)
