"""--trace: one Chrome trace-event file per run, every rank on one clock (extensions/timeline.py)."""
import json
import os
import re
import statistics

import pytest
import torch

from extensions import timeline
from mpi import ROOT, mpirun, python

QUICK = ["--dataset", "synthetic", "--train-size", 1280, "--epochs", 1]
ULFM = {"pml": "ob1", "btl": "tcp,self"}


def spans(trace, tid=None):
    return [e for e in trace["traceEvents"] if e["ph"] == "X" and tid in (None, e["tid"])]


def check_structure(trace, ranks):
    """Every event is complete; one named track per rank; within a track spans nest, never overlap."""
    for e in trace["traceEvents"]:
        assert {"ph", "ts", "pid", "tid", "cat"} <= set(e), e
        assert e["ph"] in ("X", "M"), e
        if e["ph"] == "X":
            assert e["cat"] in timeline.CATEGORIES and e["dur"] >= 0, e
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert sorted(names) == list(ranks), names
    for tid in ranks:
        open_ends = []
        for e in sorted(spans(trace, tid), key=lambda e: (e["ts"], -e["dur"])):
            while open_ends and e["ts"] >= open_ends[-1] - 1e-3:
                open_ends.pop()
            end = e["ts"] + e["dur"]
            assert not open_ends or end <= open_ends[-1] + 1e-3, f"rank {tid}: {e} overlaps its parent"
            open_ends.append(end)
    return names


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """4 ranks, ring all-reduce, traced; and the same run untraced."""
    d = tmp_path_factory.mktemp("ring")
    out = {}
    for name, more in (("traced", ["--trace", d / "t.json"]), ("plain", [])):
        proc = mpirun(4, "dist_sgd_serverless.py", *QUICK, "--allreduce", "ring", "--batch-size", 64,
                      "--results", d / f"{name}.json", "--save-model", d / f"{name}.pt", *more)
        assert proc.returncode == 0, proc.stderr
        out[name] = proc, json.loads((d / f"{name}.json").read_text()), torch.load(d / f"{name}.pt")
    return out, timeline.load(str(d / "t.json"))


def test_a_ring_trace_has_a_track_per_rank_and_the_ring_steps_in_each_all_reduce(ring):
    (out, trace), n = ring, 4
    names = check_structure(trace, range(n))
    assert names == {r: f"rank {r} (worker)" for r in range(n)}
    steps = out["traced"][1]["steps"]
    for r in range(n):
        allreduces = [e for e in spans(trace, r)
                      if e["cat"] == "comm" and e["name"] == "average_gradients (ring_allreduce)"]
        assert len(allreduces) == steps
        for e in allreduces:
            calls = e["args"]["calls"]
            assert [c["call"] for c in calls] == ["Sendrecv"] * 2 * (n - 1)
            assert {(c["dest"], c["source"]) for c in calls} == {((r + 1) % n, (r - 1) % n)}
            assert e["args"]["bytes_sent"] == sum(c["bytes"] for c in calls)
        assert {e["cat"] for e in spans(trace, r)} >= {"compute", "optimizer", "comm", "eval", "io"}


def test_comm_and_wait_spans_add_up_to_the_time_the_script_reports_in_the_all_reduce(ring):
    (out, trace) = ring
    h = out["traced"][1]["history"][0]
    in_call = h["comm_time"] + h["wait_time"]  # rank 0's time inside the average (its epoch line)
    traced = sum(e["dur"] for e in spans(trace, 0) if "ring_allreduce" in e["name"]) / 1e6
    assert abs(traced - in_call) <= 0.01 * in_call, (traced, in_call)


def test_tracing_changes_nothing_that_is_computed(ring):
    out, _ = ring
    assert torch.equal(out["traced"][2], out["plain"][2])
    assert "timeline" in out["traced"][1] and "timeline" not in out["plain"][1]


def test_rank_0_prints_one_line_of_the_summary_and_the_results_hold_it(ring):
    (out, trace) = ring
    proc, results = out["traced"][0], out["traced"][1]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("timeline: ")]
    assert len(lines) == 1 and "last to arrive: rank " in lines[0], proc.stdout
    summary = results["timeline"]
    assert summary == trace["otherData"]
    assert summary["exchanges"] == results["steps"]
    assert sum(r["late_count"] for r in summary["ranks"].values()) == summary["exchanges"]
    for r in summary["ranks"].values():
        assert abs(sum(r["share"].values()) - 1) < 0.01, r
        assert 0 <= r["clock_uncertainty_us"] < 1e5


def test_a_3x_straggler_is_the_last_to_arrive_and_its_compute_is_the_longest(tmp_path):
    proc = mpirun(5, "dist_sgd_param_server.py", *QUICK, "--batch-size", 16, "--max-steps", 10,
                  "--straggler", "2:3", "--trace", tmp_path / "t.json.gz",
                  "--results", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    trace = timeline.load(str(tmp_path / "t.json.gz"))
    names = check_structure(trace, range(5))
    assert names[0] == "server" and names[2] == "rank 2 (worker)"
    late = trace["otherData"]["late_rank_per_exchange"]
    assert len(late) == 10 and late.count(2) >= 9, late
    compute = {r: sum(e["dur"] for e in spans(trace, r) if e["cat"] == "compute") for r in range(1, 5)}
    assert compute[2] >= 2 * statistics.median([compute[r] for r in (1, 3, 4)]), compute
    # the server idles for the workers: most of its steps' exchanges are waiting
    server = trace["otherData"]["ranks"]["0"]["seconds"]
    assert server["wait"] > server["comm"], server


@pytest.mark.slow
def test_fedavg_tracks_name_the_server_and_each_ranks_clients(tmp_path):
    proc = mpirun(5, "fed_avg.py", "--dataset", "synthetic", "--train-size", 800, "--rounds", 2,
                  "--num-clients", 8, "--trace", tmp_path / "t.json", "--results", tmp_path / "r.json",
                  "--figures-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    trace = timeline.load(str(tmp_path / "t.json"))
    names = check_structure(trace, range(5))
    assert names[0] == "server"
    assert names[3] == "client rank 3 (clients 2, 6)"  # client k runs on rank 1 + k % 4
    late = trace["otherData"]["late_rank_per_exchange"]
    assert len(late) == 2 and set(late) <= {1, 2, 3, 4}


def test_a_trace_path_that_is_not_json_is_refused_with_one_line():
    proc = python("cent_sgd.py", "--dataset", "synthetic", "--trace", "t.txt")
    assert proc.returncode == 2 and "give a .json or .json.gz path" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_waits_are_split_at_the_arrival_of_the_rank_waited_for():
    """The merge alone, on made-up tracks: rank 1's clock runs 1000 ns behind rank 0's."""
    def track(rank, offset, spans):
        return dict(track=rank, role=f"r{rank}", offset_ns=offset, uncertainty_ns=5, t_start=0,
                    t_end=10_000, spans=[[c, n, a, b, 0, {}, m, late] for c, n, a, b, m, late in spans])
    tracks = [track(0, 0, [("comm", "gather", 100, 900, "star", True),
                           ("comm", "allreduce", 2000, 3000, "all", False)]),
              track(1, 1000, [("comm", "gather", -500, 0, "star", True),     # at 500..1000
                              ("comm", "allreduce", 1500, 2100, "all", False)]),  # at 2500..3100
              track(2, 0, [("comm", "gather", 700, 850, "star", True),
                           ("comm", "allreduce", 2200, 3050, "all", False)])]
    events, summary = timeline.merge(tracks, "test")
    waits = {(e["tid"], e["name"]): (round(e["ts"] * 1e3), round(e["dur"] * 1e3)) for e in events
             if e["ph"] == "X" and e["cat"] == "wait"}
    assert waits == {(0, "wait (gather)"): (100, 600),          # until rank 2, the last, at 700
                     (0, "wait (allreduce)"): (2000, 500),      # until rank 1 at 2500
                     (2, "wait (allreduce)"): (2200, 300)}
    assert summary["late_rank_per_exchange"] == [2]
    assert summary["ranks"]["1"]["clock_offset_us"] == 1.0


TRACED_MODES = [
    ("dist_sgd_serverless.py", 4, ["--allreduce", "tree"], "average_gradients (tree_allreduce)"),
    ("dist_sgd_serverless.py", 4, ["--allreduce", "mpi", "--compress", "powersgd"], "mpi_allreduce"),
    ("dist_sgd_serverless.py", 4, ["--compress", "topk"], "Allgather"),
    ("dist_sgd_param_server.py", 5, ["--mode", "async"], "wait for a worker"),
    ("dist_sgd_param_server.py", 5, ["--mode", "ssp"], "wait for a worker"),
    ("fed_avg.py", 5, ["--algorithm", "scaffold", "--rounds", 2, "--num-clients", 8], "reduce_weighted_sums"),
    ("cent_sgd.py", 1, [], "forward+backward"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script, n, flags, name", TRACED_MODES)
def test_every_mode_writes_a_well_formed_trace(script, n, flags, name, tmp_path):
    common = ["--dataset", "synthetic", "--train-size", 640]
    if script != "fed_avg.py":
        common += ["--epochs", 1, "--max-steps", 6]
    else:
        common += ["--figures-dir", tmp_path]
    proc = mpirun(n, script, *common, *flags, "--trace", tmp_path / "t.json", "--results", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    trace = timeline.load(str(tmp_path / "t.json"))
    check_structure(trace, range(n))
    assert any(e["name"] == name for e in spans(trace)), name
    assert json.loads((tmp_path / "r.json").read_text())["timeline"] == trace["otherData"]


@pytest.mark.slow
def test_an_elastic_run_traces_the_survivors_and_records_the_loss(tmp_path):
    proc = mpirun(4, "tests/inject_failure.py", 2, 3, "train_step", "dist_sgd_serverless.py", *QUICK,
                  "--batch-size", 16, "--max-steps", 8, "--elastic", "--allreduce", "ring",
                  "--trace", tmp_path / "t.json", "--results", tmp_path / "r.json",
                  mca=ULFM, ft=True, env={"INJECT": "kill"})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^timeline: ", proc.stdout, re.M), proc.stdout
    trace = timeline.load(str(tmp_path / "t.json"))
    check_structure(trace, [0, 1, 3])
    assert trace["otherData"]["failures"][0]["ranks"] == [2]


# ----- the pictures (bench/timeline.py), from the committed traces -----

def bench_timeline():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_timeline", os.path.join(ROOT, "bench", "timeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    bt, folder = bench_timeline(), tmp_path_factory.mktemp("pictures")
    return bt, folder, bt.render(bt.OUT, str(folder))


def test_each_picture_shows_what_its_sentence_says(pictures):
    bt, folder, facts = pictures
    for name in bt.SENTENCES:
        assert os.path.getsize(folder / f"timeline_{name}.png") > 10_000, name
    ring, tree = facts["ring_vs_tree"]["ring"], facts["ring_vs_tree"]["tree"]
    # the ring: 2(N-1) = 6 calls on every rank, each a quarter of the gradient
    assert set(ring["calls_per_rank"].values()) == {6}
    # the tree: at most 2 ceil(log2 N) = 4 calls, each the whole gradient; the leaves make 2
    assert tree["calls_per_rank"] == {0: 4, 1: 2, 2: 4, 3: 2}
    assert 3.9 < tree["largest_call_bytes"] / ring["largest_call_bytes"] < 4.1
    # the parameter server: the server waits for most of each step, each worker waits too
    ps = facts["param_server"]
    assert ps["ranks"][0]["wait"] > 0.5 * ps["window_s"], ps
    assert all(ps["ranks"][w]["wait"] > 0 for w in range(1, 5)), ps
    # FedAvg: long local training, a short exchange; the server idles for nearly all of it
    fed = facts["fedavg"]
    for k in range(1, 5):
        assert fed["ranks"][k]["compute"] > 10 * fed["ranks"][k]["comm"], fed
    assert fed["ranks"][0]["wait"] > 0.8 * fed["window_s"], fed
    # the straggler: sync, the others wait for rank 2 at each step; async, they take more steps
    s = facts["straggler"]
    assert s["sync_late"].count(2) >= 0.9 * len(s["sync_late"]), s
    assert all(s["sync_wait"][w] > 2 * s["sync_wait"][2] for w in (1, 3, 4)), s
    assert all(s["async_steps"][w] >= 2 * max(1, s["async_steps"][2]) for w in (1, 3, 4)), s
    # 10 Mbit/s: the all-reduce takes longer than the compute on every rank
    c = facts["cluster_ring"]
    assert all(r["comm"] + r["wait"] > r["compute"] for r in c["ranks"].values()), c


def test_the_notebook_says_each_pictures_sentence_under_it():
    bt = bench_timeline()
    text = open(os.path.join(ROOT, "HW5.ipynb")).read()
    for name, sentence in bt.SENTENCES.items():
        assert f"figures/timeline_{name}.png" in text, name
        assert json.dumps(sentence)[1:-1] in text, name


def test_timeline_md_is_what_the_records_render(pictures, tmp_path):
    bt, _, facts = pictures
    bt.render_md(bt.OUT, facts, str(tmp_path / "TIMELINE.md"))
    committed = open(os.path.join(ROOT, "bench", "TIMELINE.md")).read()
    assert (tmp_path / "TIMELINE.md").read_text() == committed, "run: python bench/timeline.py --render-only"


@pytest.mark.slow
def test_the_bench_traces_and_draws_end_to_end(tmp_path):
    """bench/timeline.py --tiny: every run traced (the emulated cluster's too), the cost runs, the
    pictures and TIMELINE.md, into a scratch folder; a second call skips what exists."""
    proc = python("bench/timeline.py", "--tiny", "--out", tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bt = bench_timeline()
    for name in bt.RUNS:
        assert (tmp_path / f"{name}.json.gz").exists(), name
    for name in bt.SENTENCES:
        assert (tmp_path / f"timeline_{name}.png").exists(), name
    assert "## What tracing costs" in (tmp_path / "TIMELINE.md").read_text()
    again = python("bench/timeline.py", "--tiny", "--out", tmp_path, timeout=300)
    assert again.returncode == 0 and "tracing" not in again.stdout, again.stdout
