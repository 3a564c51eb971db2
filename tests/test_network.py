"""bench/network.py: its committed tables and figure are what its committed records render to,
and its alpha-beta model does what the formulas of Thakur, Rabenseifner and Gropp say.

    python -m pytest -q tests/test_network.py

No cluster here (that is tests/test_cluster.py, in the slow tier): only the records and the model.
"""
import json
import math
import os
import shutil

import pytest

from mpi import ROOT, check, python

from bench import network

RECORDS = os.path.join(ROOT, "results", "reference", "network")


def test_model_formulas():
    n, a, b = 1 << 20, 1e-4, 1e-8
    assert network.model_time("ring", 4, n, a, b) == pytest.approx(6 * a + 1.5 * n * b)
    assert network.model_time("tree", 4, n, a, b) == pytest.approx(4 * (a + n * b))
    assert network.model_time("tree", 3, n, a, b) == pytest.approx(4 * (a + n * b))  # ceil(log2 3) = 2
    assert network.model_time("ps", 4, n, a, b) == pytest.approx(2 * a + 6 * n * b)
    assert network.model_time("mpi", 4, n, a, b) is None
    # at the predicted crossover ring and tree take the same time, for any N with a crossover
    for ranks in (4, 8, 1024):
        x = network.predicted_crossover(ranks, a, b)
        assert network.model_time("ring", ranks, x, a, b) == pytest.approx(network.model_time("tree", ranks, x, a, b))
    assert network.predicted_crossover(2, a, b) == 0  # two ranks: the ring is never slower


def test_measured_crossover_of_model_times_is_the_predicted_one():
    a, b = 3e-4, 9e-8
    rows = [(s, {k: network.model_time(k, 4, s, a, b) for k in ("ring", "tree")}) for s in (64 << i for i in range(17))]
    sizes = [s for s, _ in rows]
    measured = network.crossover(sizes, [t["ring"] for _, t in rows], [t["tree"] for _, t in rows])
    assert measured == pytest.approx(network.predicted_crossover(4, a, b), rel=0.1)
    assert math.isclose(network.predicted_crossover(4, a, b), 0.8 * a / b)


def test_fit_leaves_out_the_sizes_the_burst_lets_through():
    """The token bucket passes a message's first burst of bytes at the veth's speed: small
    buffers cost only their messages, middling ones less than their bytes. The fit must take
    alpha from the first and beta from the large buffers, and never go below the rate."""
    a, b, burst = 1e-4, 9e-8, 25_000
    rows = []
    for s in (64 << i for i in range(15)):
        if s <= burst / 4:
            t = {k: network.model_time(k, 4, s, a, 0) for k in ("ring", "tree")}
        elif s < 8 * burst:
            t = {k: network.model_time(k, 4, s, a, b / 5) for k in ("ring", "tree")}
        else:
            t = {k: network.model_time(k, 4, s, a, b) for k in ("ring", "tree")}
        rows.append((s, t))
    fa, fb = network.fit_alpha_beta(rows, 4, burst)
    assert fa == pytest.approx(a, rel=1e-9) and fb == pytest.approx(b, rel=1e-9)
    with pytest.raises(ValueError, match="at least 200000 bytes"):
        network.fit_alpha_beta(rows[:10], 4, burst)


def test_pipelined_server_hides_all_but_one_gradient():
    a = {"alpha": 1e-3, "beta": 1e-7}  # at 100mbit; 10mbit is 10x slower per byte
    ps = {"compute": 0.3, "hosts": 4, "nbytes": 400_000, "predicted": None}
    assert network.pipelined_ps(ps, a, "10mbit") == pytest.approx(0.3 + 2e-3 + 4 * 400_000 * 1e-6)
    assert network.pipelined_ps(ps, a, "10mbit") < 0.3 + network.model_time("ps", 4, 400_000, 1e-3, 1e-6)


@pytest.mark.skipif(not os.path.exists(os.path.join(RECORDS, "network.json")),
                    reason="no committed records: run python bench/network.py (as root)")
def test_committed_tables_are_rendered_from_the_records(tmp_path):
    out = tmp_path / "network"
    shutil.copytree(RECORDS, out)
    check(python("bench/network.py", "--render-only", "--out", out, timeout=120))
    committed = open(os.path.join(ROOT, "bench", "NETWORK.md")).read()
    rendered = (out / "NETWORK.md").read_text().replace(os.path.relpath(out, ROOT), "results/reference/network")
    assert rendered == committed, "bench/NETWORK.md is stale: python bench/network.py --render-only"
    with open(out / "network.json") as f:
        record = json.load(f)
    assert not record["meta"]["tiny"]
