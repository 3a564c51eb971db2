"""dist_sgd_param_server.py --mode async and ssp (extensions/async_ps.py), and --straggler in
both distributed scripts (extensions/stragglers.py): the references they must equal, the
staleness bound, the bytes, faults, and that the default flags compute the same bits as before.

    python -m pytest -q tests/test_async_ps.py            # the default tier: in one process
    python -m pytest -q -m slow tests/test_async_ps.py    # under mpirun: the references, bytes, whole epochs,
                                                          # the bits of before, stragglers, faults, the bench
"""
import functools
import json
import math
import os
import re
import subprocess
import time

import pytest
import torch

from extensions import async_ps
from mpi import ROOT, assert_committed, assert_resume_is_exact, check, in_process, mpirun, python

BATCH, LR = 16, 0.05
COMMON = ["--dataset", "synthetic", "--batch-size", BATCH]
ATOL = 1e-5  # float32 noise of summing the same samples' gradients in another order (measured: 3e-8)
# the last commit before --mode and --straggler: the default flags must still compute its bits
BEFORE = "2809cad"


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    """run(script, ranks, *flags) -> (final parameters, results) of one run; cached."""
    folder = tmp_path_factory.mktemp("async")

    @functools.cache
    def run(script, ranks, *flags, env=None):
        name = re.sub(r"[^\w.-]", "_", f"{os.path.basename(script)}-{ranks}-{'-'.join(map(str, flags))}")
        model, results = folder / f"{name}.pt", folder / f"{name}.json"
        args = [script, *COMMON, *flags, "--save-model", model, "--results", results]
        env = dict(env) if env else None
        check(mpirun(ranks, *args, timeout=120, env=env) if ranks else python(*args, timeout=120, env=env))
        with open(results) as f:
            return torch.load(model), json.load(f)
    return run


def server(train, workers, *flags):
    return train("dist_sgd_param_server.py", workers + 1, *flags)


def staleness(results):
    """{tau: gradients} over the whole run."""
    total = {}
    for h in results["history"]:
        for tau, n in h["staleness"].items():
            total[int(tau)] = total.get(int(tau), 0) + n
    return total


def gradients_per_worker(results):
    return [sum(g) for g in zip(*(h["gradients_per_worker"] for h in results["history"]))]


# ----------------------------------------------------------------------------- the schedule, simulated

def simulate(speeds, staleness, batches, deaths=None):
    """Drive async_ps.Server as serve_epoch does, with worker w taking speeds[w - 1] seconds per
    gradient, no MPI, and worker w lost at time deaths[w] (--elastic); return (the size of every
    update, the batches in the order their gradients were applied, the server's final state)."""
    state, clock, done_at, sizes, applied, idle = async_ps.Server(len(speeds), batches, staleness), 0.0, {}, [], [], []
    deaths = dict(deaths or {})
    done_at.update({w: speeds[w - 1] for w in state.computing})
    idle += [w for w in state.read if w not in state.computing]

    def hand_out(w):
        if state.assign(w) is None:
            idle.append(w)
        else:
            done_at[w] = clock + speeds[w - 1]

    while state.computing or state.held:
        group = state.next_update()
        if not group:  # the next event: a gradient arrives, or a worker dies
            w = min(state.computing, key=done_at.get)
            dying = min(deaths, key=deaths.get, default=None)
            if dying is not None and deaths[dying] <= done_at[w]:
                clock = deaths.pop(dying)
                state.lose(dying)
                if dying in idle:
                    idle.remove(dying)
                while state.todo and idle:
                    hand_out(idle.pop())
                continue
            clock = done_at[w]
            state.arrived(w)
            continue
        applied += [state.batch[w] for w in group]
        state.applied(group)
        sizes.append(len(group))
        for w in group:
            if w not in state.lost:
                hand_out(w)
    return sizes, applied, state


@pytest.mark.parametrize("speeds", [(1.0, 1.0), (1.0, 5.0), (1.0, 1.3, 3.0, 1.1), (2.0, 1.0, 1.0, 7.0, 1.5)])
def test_the_schedule_bounds_staleness_and_never_deadlocks(speeds):
    for s in (0, 1, 2, 3, 10):
        sizes, applied, state = simulate(speeds, s, batches=60)
        assert sorted(applied) == list(range(60)) and sum(state.gradients.values()) == 60
        assert max(map(int, state.tau)) <= s, (s, state.tau)
        if s == 0:  # the synchronous server: W gradients of the same weights per update
            assert sizes == [len(speeds)] * (60 // len(speeds)), sizes
    sizes, applied, state = simulate(speeds, math.inf, batches=60)  # async: each gradient on its own, at once
    assert sizes == [1] * 60
    if max(speeds) >= 5 * min(speeds):
        assert max(map(int, state.tau)) > 2, state.tau


# (speeds, {worker: the time it dies}): mid-step; two at once; the slow one, its first batch not
# done, while the other has finished the epoch's other batches; one idle already, then the slow one
@pytest.mark.parametrize("speeds, deaths", [((1.0, 1.0, 1.0), {2: 2.5}), ((1.0, 1.3, 3.0, 1.1), {1: 4.2, 4: 4.2}),
                                            ((1.0, 30.0), {2: 25.0}), ((1.0, 30.0, 1.0), {1: 25.0, 2: 26.0})])
def test_a_lost_workers_batch_goes_to_another_and_every_batch_is_applied_once(speeds, deaths):
    """--elastic: Server.lose puts back the batch the lost worker was computing; the
    survivors apply every batch of the epoch once, under async and ssp alike."""
    for s in (math.inf, 2, 0):
        _, applied, state = simulate(speeds, s, batches=20, deaths=deaths)
        assert sorted(applied) == list(range(20)), (s, applied)
        assert sorted(state.lost) == sorted(deaths) and not state.todo
        assert max(map(int, state.tau)) <= s
        for w in deaths:  # nothing assigned after its death
            assert state.gradients[w] <= deaths[w] // speeds[w - 1]


# ----------------------------------------------------------------------------- DANA

def test_dana_is_nesterov_per_worker_in_lookahead_form():
    """DANA-Zero as published keeps the weights theta and a momentum v_i per worker, and sends a
    worker theta - lr m (v_1 + ... + v_W); on worker i's gradient g: v_i = m v_i + g, theta -=
    lr v_i. --dana sends its weights as they are and steps torch's Nesterov SGD with worker i's
    own buffer. On a quadratic, with gradients stale by any amount, the two send the same
    points, and --dana without the per-worker buffers does not."""
    torch.manual_seed(0)
    W, P, lr, m = 3, 5, 0.1, 0.9
    a = torch.randn(P, P)
    a, start = a @ a.T / P + torch.eye(P), torch.randn(P)
    grad = lambda w: a @ w  # noqa: E731  (the loss w A w / 2)
    order = [1, 2, 3, 1, 1, 3, 2, 2, 1, 3, 3, 2, 1]  # who sends next; each worker's read is its last reply

    theta, v = start.clone(), torch.zeros(W, P)
    sent, published = {w: start.clone() for w in range(1, W + 1)}, []
    for w in order:
        v[w - 1] = m * v[w - 1] + grad(sent[w])
        theta = theta - lr * v[w - 1]
        sent[w] = theta - lr * m * v.sum(0)
        published.append(sent[w])

    def ours(per_worker):
        phi = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.SGD([phi], lr=lr, momentum=m, nesterov=True)
        sent, reads = {w: start.clone() for w in range(1, W + 1)}, []
        for w in order:
            phi.grad = grad(sent[w])
            if per_worker:
                async_ps.use_momentum_of(optimizer, w, W)
            optimizer.step()
            sent[w] = phi.detach().clone()
            reads.append(sent[w])
        return reads

    for a_read, b_read in zip(published, ours(per_worker=True)):
        assert torch.allclose(a_read, b_read, rtol=0, atol=1e-5), (a_read - b_read).abs().max()
    assert not all(torch.allclose(a_read, b_read, atol=1e-3) for a_read, b_read in zip(published, ours(False)))


# ----------------------------------------------------------------------------- references

@pytest.mark.slow
@pytest.mark.parametrize("dana", [(), ("--dana",)])
def test_async_with_one_worker_is_centralized_sgd(train, dana):
    """One worker: each gradient is applied before the next is computed, on the batches and
    at the lr of cent_sgd.py with that batch (Nesterov momentum on, on the server). With
    --dana its one buffer is the server's one buffer."""
    async_, results = server(train, 1, "--mode", "async", *dana, "--lr", LR, "--max-steps", 6)
    central, _ = train("cent_sgd.py", None, "--lr", LR, "--max-steps", 6)
    assert results["steps"] == 6 and staleness(results) == {0: 6}
    assert torch.allclose(async_, central, rtol=0, atol=ATOL), (async_ - central).abs().max()


@pytest.mark.slow
def test_ssp_with_staleness_0_is_the_synchronous_server(train):
    """s = 0: the server waits for all W gradients of the same weights and applies their mean
    as one update, at lr x sqrt(W): the synchronous server, with every tau = 0 and, step for
    step, the same bytes. (Each worker's batch is a contiguous slice of the order instead of a
    strided share, so the sums differ in float32 rounding only.)"""
    workers = 2
    ssp, results = server(train, workers, "--mode", "ssp", "--staleness", 0, "--lr", LR / math.sqrt(workers),
                          "--max-steps", 6 * workers)
    sync, sync_results = server(train, workers, "--lr", LR, "--max-steps", 6)
    assert staleness(results) == {0: 6 * workers} and gradients_per_worker(results) == [6] * workers
    assert torch.allclose(ssp, sync, rtol=0, atol=ATOL), (ssp - sync).abs().max()
    assert results["bytes_per_rank"] == sync_results["bytes_per_rank"]


def check_bytes(results):
    """Every gradient (4P bytes) gets exactly one reply of 4P bytes, the epoch's last one
    carrying the final weights: worker w moves 4P g_w each way, the server 4P G, G = sum g_w."""
    p, g, steps = results["params"], gradients_per_worker(results), results["steps"]
    assert sum(g) == steps and sum(staleness(results).values()) == steps
    server_bytes, *worker_bytes = results["bytes_per_rank"]
    assert server_bytes == {"bytes_sent": 4 * p * steps, "bytes_recv": 4 * p * steps}
    assert worker_bytes == [{"bytes_sent": 4 * p * n, "bytes_recv": 4 * p * n} for n in g]


@pytest.mark.slow
def test_async_bytes_match_the_cost_model(train):
    """(ssp: with s = 0 above, with a straggler below)"""
    _, results = server(train, 2, "--mode", "async", "--lr", LR, "--max-steps", 12)
    assert results["steps"] == 12
    check_bytes(results)


@pytest.mark.slow
def test_whole_epochs_take_every_batch_once(train):
    """Without --max-steps an epoch applies every full batch of --batch-size once, in any
    split between the workers; 2 epochs of 160 samples: 20 gradients."""
    _, results = server(train, 2, "--mode", "async", "--lr", LR, "--train-size", 160, "--epochs", 2)
    assert results["steps"] == 20 and [h["steps"] for h in results["history"]] == [10, 20]
    assert all(sum(h["gradients_per_worker"]) == 10 for h in results["history"])


@pytest.mark.slow
def test_dana_resumes_exactly_with_every_workers_momentum(tmp_path):
    """rank 0 dies in its 2nd evaluation, after epoch 1's checkpoint. With one worker async is
    deterministic, so the resumed run must end on the uninterrupted run's bits: it does only
    if the checkpoint kept the workers' buffers (new zero buffers would change the steps)."""
    flags = [*COMMON, "--mode", "async", "--dana", "--lr", LR, "--train-size", 160, "--epochs", 2]

    def launch(name, *extra, script=("dist_sgd_param_server.py",)):
        folder = tmp_path / name
        return mpirun(2, *script, *flags, "--results", folder / "r.json", "--checkpoint", folder / "ckpt.pt",
                      *extra, timeout=120)
    assert_resume_is_exact(launch, "dist_sgd_param_server.py", "epoch", tmp_path)


# ----------------------------------------------------------------------------- default flags

@pytest.mark.slow
@pytest.mark.parametrize("script, ranks", [("dist_sgd_param_server.py", 3), ("dist_sgd_serverless.py", 2)])
def test_default_flags_compute_the_bits_of_before(train, script, ranks, tmp_path):
    """The scripts as they were before --mode and --straggler (commit BEFORE), run on the same
    flags, end with the same bits as today's with default flags."""
    old = tmp_path / script
    try:
        old.write_text(subprocess.run(["git", "show", f"{BEFORE}:{script}"], cwd=ROOT, capture_output=True,
                                      text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with commit {BEFORE}")
    flags = ("--lr", LR, "--max-steps", 3)
    now, _ = train(script, ranks, *flags)
    before, _ = train(str(old), ranks, *flags, env=(("PYTHONPATH", ROOT),))
    assert torch.equal(now, before)


# ----------------------------------------------------------------------------- stragglers

@pytest.mark.slow
@pytest.mark.parametrize("script, ranks", [("dist_sgd_param_server.py", 3), ("dist_sgd_serverless.py", 2)])
def test_a_straggler_changes_the_time_not_the_bits(train, script, ranks):
    flags = ("--lr", LR, "--max-steps", 3)
    slowed, results = train(script, ranks, *flags, "--straggler", "1:3", "--straggler-wait", "busy")
    plain, _ = train(script, ranks, *flags)
    assert torch.equal(slowed, plain) and results["config"]["straggler"] == [1, 3.0]


@pytest.mark.slow
def test_ssp_bounds_the_staleness_of_a_5x_straggler_and_async_does_not(train):
    """Worker 1 computes 5 times slower. Under ssp s = 2 no gradient is applied more than 2
    updates after its read; under async the fast worker's updates pile up past 2."""
    flags = ("--lr", LR, "--max-steps", 24, "--straggler", "1:5")
    _, ssp = server(train, 2, "--mode", "ssp", "--staleness", 2, *flags)
    _, async_ = server(train, 2, "--mode", "async", *flags)
    assert max(staleness(ssp)) <= 2, staleness(ssp)
    assert max(staleness(async_)) > 2, staleness(async_)
    for results in (ssp, async_):
        slow, fast = gradients_per_worker(results)
        assert slow < fast, (slow, fast)
        check_bytes(results)


# ----------------------------------------------------------------------------- faults, bad input

# (mode, failing rank, call, utils function, kind), as in tests/test_reliability.py's FAULTS
FAULTS = [("async", 1, 3, "train_step", "kill"), ("ssp", 0, 4, "staged", "raise")]


@pytest.mark.slow
@pytest.mark.parametrize("mode, rank, call, function, kind", FAULTS)
def test_a_fault_on_any_rank_ends_the_job_within_10_s(mode, rank, call, function, kind, tmp_path):
    proc = mpirun(3, "tests/inject_failure.py", rank, call, function, "dist_sgd_param_server.py", *COMMON,
                  "--mode", mode, "--results", tmp_path / "r.json", timeout=60, env={"INJECT": kind})
    ended = time.time()
    assert proc.returncode != 0
    fault = f"injected fault in utils.{function}, call {call}, rank {rank} at "
    assert proc.stderr.count(fault) == 1, proc.stderr
    at = float(re.search(re.escape(fault) + r"([\d.]+)", proc.stderr).group(1))
    assert ended - at < 10, f"the job took {ended - at:.1f} s to end after the fault"


@pytest.mark.parametrize("script, ranks, args, message", [
    pytest.param("dist_sgd_param_server.py", 2, ["--mode", "ssp", "--staleness", -1], "--staleness must be >= 0",
                 marks=pytest.mark.slow),
    pytest.param("dist_sgd_param_server.py", 2, ["--straggler", "0:3"], "rank 0 is the server", marks=pytest.mark.slow),
    pytest.param("dist_sgd_param_server.py", 2, ["--dana"], "--dana needs --mode async", marks=pytest.mark.slow),
    pytest.param("dist_sgd_param_server.py", 2, ["--mode", "async", "--dana", "--momentum", 0], "needs --momentum > 0",
                 marks=pytest.mark.slow),
    ("dist_sgd_serverless.py", None, ["--straggler", "1:0.5"], "FACTOR >= 1"),
])
def test_bad_input_gets_one_line(script, ranks, args, message, tmp_path):
    args = [script, *args, "--results", tmp_path / "r.json"]
    proc = mpirun(ranks, *args, timeout=60) if ranks else in_process(*args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr


# ----------------------------------------------------------------------------- the benchmark

@pytest.mark.slow
def test_bench_tiny(tmp_path):
    check(python("bench/async_ps.py", "--tiny", "--out", tmp_path, timeout=600))
    record = json.loads((tmp_path / "async.json").read_text())
    assert {r["mode"] for r in record["runs"]} == {"sync", "ssp2", "async-lr", "serverless"}
    assert {r["straggler"] for r in record["runs"]} == {"none", "sleep3"}
    assert (tmp_path / "ASYNC.md").exists() and (tmp_path / "async.png").exists()


def test_committed_table_is_rendered_from_the_records(tmp_path):
    """bench/ASYNC.md holds no number that results/reference/async does not."""
    from bench import async_ps as bench
    out = os.path.join(ROOT, "results", "reference", "async")
    with open(os.path.join(out, "async.json")) as f:
        record = json.load(f)
    bench.render(record, out, tmp_path / "ASYNC.md", tmp_path / "async.png")
    assert_committed("ASYNC.md", tmp_path / "ASYNC.md", "python bench/async_ps.py --render-only")


def test_bench_records_a_diverged_run_and_reuses_records_of_the_same_data(tmp_path):
    """A run the script stopped for a nan loss is a row that says so, and does not count towards
    the goals; a record is reused only when it was made with the bench's data flags."""
    from bench import async_ps as bench
    data = ["--dataset", "cifar10", "--epochs", "1"]
    (tmp_path / "runs").mkdir()
    def result(mode, samples_per_s, acc):  # one epoch of 10 steps of 4 x 8 or 8 samples
        batch = 8
        return dict(config=dict(dataset="cifar10", epochs=1, mode=mode, batch_size=batch), global_batch=4 * batch,
                    steps=10 * (4 if mode != "sync" else 1), final_test_acc=acc,
                    history=[dict(train_time=10 * 4 * batch / samples_per_s, epoch_time=5.0, test_acc=acc,
                                  staleness={"0": 10} if mode != "sync" else {})])
    runs = {"sync_none": result("sync", 100.0, 50.0), "async-m0.6_none": result("async", 150.0, 49.0),
            "async_none": {"config": {"dataset": "cifar10", "epochs": "1"}, "diverged": "error: training diverged"}}
    for name, r in runs.items():
        (tmp_path / "runs" / f"{name}.json").write_text(json.dumps(r))
    assert bench.same_data(str(tmp_path / "runs" / "sync_none.json"), data)
    assert bench.same_data(str(tmp_path / "runs" / "async_none.json"), data)
    assert not bench.same_data(str(tmp_path / "runs" / "sync_none.json"), ["--dataset", "cifar10", "--epochs", "2"])
    assert not bench.same_data(str(tmp_path / "runs" / "ssp2_none.json"), data)
    record = {"runs": [{"name": name, "straggler": "none", "mode": name.split("_")[0], "command": "",
                        "results": f"runs/{name}.json"} for name in runs], "meta": {"date": "d", "tiny": False,
                                                                                    "workers": 4, "cores": 2}}
    bench.render(record, str(tmp_path), tmp_path / "ASYNC.md", tmp_path / "async.png")
    text = (tmp_path / "ASYNC.md").read_text()
    assert "| async | none | diverged" in text
    assert "| async-m0.6 | none | 150.0 | 1.50 |" in text
    # the diverged run does not count: the accuracy goal compares sync with async-m0.6 only
    assert "| async accuracy vs sync, same samples (none): sync minus the better async, points | <= 2.0 | +1.00 | yes |" in text
