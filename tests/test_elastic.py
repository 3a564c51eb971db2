"""--elastic (extensions/elastic.py): when a rank dies, the survivors shrink the communicator,
redo the interrupted step on the same global batch, and end where centralized SGD on that
batch ends, and where the uninterrupted run ends. The same for the parameter server's workers;
the asynchronous servers (async, ssp) redo nothing and give a lost worker's batch to another;
a lost server ends the job with one line.

    python -m pytest -q tests/test_elastic.py            # one serverless failure, in the default tier
    python -m pytest -q -m slow tests/test_elastic.py    # every case, the parameter server's too

tests/inject_failure.py ends a rank on its k-th training step, with os._exit(1) or a SIGKILL,
without a word to MPI. mpirun's own exit status is then the dead rank's: 1 after os._exit(1),
but 0 after a SIGKILL. So the survivors' output and results tell that the run went on.
"""
import functools
import json
import os
import re
import time

import pytest
import torch

from bench import elastic as bench_elastic
from mpi import ROOT, check, in_process, mpirun, python

ULFM = {"pml": "ob1", "btl": "tcp,self"}  # with `--with-ft ulfm`; shared memory hung in a probe
B, STEPS = 16, 8
# 400 samples: 6 steps per epoch at N = 4 (global batch 64), so a failure at a rank's 3rd or
# 5th step falls mid-epoch, and the last epoch is cut by --max-steps
QUICK = ["--dataset", "synthetic", "--train-size", 400, "--lr", 0.05, "--max-steps", STEPS, "--epochs", 2]
# Float32 noise: the shares' gradients are added in another order than one batch's backward
# pass. Plain SGD keeps it under 1e-5; Nesterov momentum 0.9 amplifies it, to 9e-5 at N = 4
# with no failure at all (measured), while the wrong momentum would be off by ~1e-3.
TOL = {0: 1e-5, 0.9: 2e-4}
# The parameter server adds its W gradients after W backward passes: with 4 workers and no
# failure at all it ends 1.9e-5 from centralized SGD in plain SGD here (measured).
TOL_PS = {0: 5e-5, 0.9: 2e-4}


def elastic_run(n, tmp_path, *faults, allreduce="mpi", how="exit", momentum=0):
    """mpirun n ranks of dist_sgd_serverless.py --elastic, ending each (rank, step) of
    `faults` at that training step (`how`: exit or kill). Returns (process, results, parameters)."""
    cmd = []
    for rank, step in faults:
        cmd += ["tests/inject_failure.py", rank, step, "train_step"]
    proc = mpirun(n, *cmd, "dist_sgd_serverless.py", *QUICK, "--batch-size", B, "--momentum", momentum,
                  "--elastic", "--allreduce", allreduce,
                  "--results", tmp_path / "r.json", "--save-model", tmp_path / "model.pt",
                  mca=ULFM, ft=True, timeout=120, env={"INJECT": how})
    assert proc.returncode == (1 if faults and how == "exit" else 0), proc.stderr
    assert re.search(r"^Final test accuracy: \d+\.\d\d%$", proc.stdout, re.M), proc.stdout + proc.stderr
    return proc, json.loads((tmp_path / "r.json").read_text()), torch.load(tmp_path / "model.pt")


@pytest.fixture(scope="module")
def centralized(tmp_path_factory):
    """centralized(n, momentum): cent_sgd.py's final weights with the global batch of n ranks."""
    folder = tmp_path_factory.mktemp("cent")

    @functools.cache
    def run(n, momentum):
        path = folder / f"{n}-{momentum}.pt"
        check(in_process("cent_sgd.py", *QUICK, "--batch-size", n * B, "--momentum", momentum,
                         "--save-model", path, "--results", folder / "r.json"))
        return torch.load(path)
    return run


# (ranks, [(rank, its step to die at)], all-reduce, how it dies, momentum)
@pytest.mark.parametrize("n, faults, allreduce, how, momentum", [
    (3, [(1, 3)], "ring", "exit", 0),
    *[pytest.param(*case, marks=pytest.mark.slow) for case in [
        (3, [(0, 3)], "mpi", "kill", 0), (4, [(0, 5)], "ring", "exit", 0), (4, [(2, 3)], "mpi", "exit", 0.9),
        # two failures, 4 ranks to 3 to 2: killed, as Open MPI's runtime ends the job when a
        # second rank exits with a non-zero status (measured), but survives killed ranks
        (4, [(3, 2), (1, 6)], "ring", "kill", 0.9)]]])
def test_survivors_finish_equal_to_centralized_sgd(n, faults, allreduce, how, momentum, centralized, tmp_path):
    proc, results, got = elastic_run(n, tmp_path, *faults, allreduce=allreduce, how=how, momentum=momentum)
    assert results["steps"] == STEPS
    lost = [f["ranks"] for f in results["failures"]]
    assert len(lost) == len(faults) and all(len(r) == 1 for r in lost), results["failures"]
    sizes = [f["world_size"] for f in results["failures"]]
    assert sizes == list(range(n - 1, n - 1 - len(faults), -1))
    # each death was followed by a completed step (timed by bench/elastic.py; here: no hang)
    deaths = sorted(float(t) for t in re.findall(r"injected fault in utils.train_step, .* at ([\d.]+)", proc.stderr))
    after = [f["next_step_at"] - t for f, t in zip(results["failures"], deaths)]
    assert all(0 < a < 10 for a in after), after
    # one line per failure, from the (new) rank 0
    lines = re.findall(r"^rank \d+ lost at step \d+: continuing on (\d) ranks \([\d.]+ s\)$", proc.stdout, re.M)
    assert list(map(int, lines)) == sizes, proc.stdout
    # the global batch stayed N x B: the result is centralized SGD's on that batch
    assert (got - centralized(n, momentum)).abs().max() < TOL[momentum], (got - centralized(n, momentum)).abs().max()
    # the control: centralized SGD on the other global batch size is measurably different
    assert (got - centralized(7 - n, momentum)).abs().max() > 10 * TOL[momentum]


def elastic_ps_run(n, tmp_path, *faults, how="exit", momentum=0, more=()):
    """mpirun n ranks of dist_sgd_param_server.py --elastic, ending each (rank, call, function)
    of `faults` on that call of utils.<function>: train_step on a worker, set_lr on the server."""
    cmd = []
    for rank, call, function in faults:
        cmd += ["tests/inject_failure.py", rank, call, function]
    return mpirun(n, *cmd, "dist_sgd_param_server.py", *QUICK, "--batch-size", B, "--momentum", momentum,
                  *more, "--elastic", "--results", tmp_path / "r.json", "--save-model", tmp_path / "model.pt",
                  mca=ULFM, ft=True, timeout=120, env={"INJECT": how})


# (ranks, worker rank, its step to die at, how, momentum): 3 workers to 2 share the global batch
# of 48 equally; 4 workers to 3 share 64 as 22, 21, 21, which the server weighs
@pytest.mark.slow
@pytest.mark.parametrize("n, rank, step, how, momentum", [(4, 2, 3, "exit", 0.9), (5, 1, 5, "kill", 0)])
def test_parameter_server_goes_on_without_a_lost_worker(n, rank, step, how, momentum, centralized, tmp_path):
    proc = elastic_ps_run(n, tmp_path, (rank, step, "train_step"), how=how, momentum=momentum)
    assert proc.returncode == (1 if how == "exit" else 0), proc.stderr
    assert re.search(r"^Final test accuracy: \d+\.\d\d%$", proc.stdout, re.M), proc.stdout + proc.stderr
    results, got = json.loads((tmp_path / "r.json").read_text()), torch.load(tmp_path / "model.pt")
    assert results["steps"] == STEPS
    [failure] = results["failures"]
    assert failure["ranks"] == [rank] and failure["world_size"] == n - 1
    # the survivors redid the step the server had not finished: the one the worker died in
    assert failure["step"] == step - 1
    lines = re.findall(r"^rank (\d) lost at step (\d+): continuing on (\d) ranks", proc.stdout, re.M)
    assert lines == [(str(rank), str(step - 1), str(n - 1))], proc.stdout
    # the global batch stayed (n - 1) x B: centralized SGD's result on that batch
    err = (got - centralized(n - 1, momentum)).abs().max()
    assert err < TOL_PS[momentum], err
    assert (got - centralized(n - 2, momentum)).abs().max() > 10 * TOL_PS[momentum]  # the control


@pytest.mark.slow
def test_a_lost_parameter_server_ends_the_job_with_one_line(tmp_path):
    proc = elastic_ps_run(3, tmp_path, (0, 3, "set_lr"))
    assert proc.returncode != 0 and "Final test accuracy" not in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "parameter server (rank 0) was lost" in errors[0] and "--resume" in errors[0], \
        proc.stderr
    died = float(re.search(r"injected fault in utils.set_lr, .* at ([\d.]+)", proc.stderr).group(1))
    assert time.time() - died < 10, f"the job took {time.time() - died:.1f} s to end after the fault"


# 400 samples, 25 batches of B per epoch, 2 epochs, each a worker's step
ASYNC = ["--max-steps", 50, "--lr", 0.02]


# (flags, ranks, the worker, its train_step to die at, how): mid-epoch, under async, ssp and DANA
@pytest.mark.slow
@pytest.mark.parametrize("flags, n, rank, step, how", [
    (("--mode", "async"), 4, 2, 3, "exit"),
    (("--mode", "ssp", "--staleness", 1), 4, 1, 5, "kill"),
    (("--mode", "async", "--dana", "--lr", 0.01), 5, 3, 4, "kill")])
def test_asynchronous_server_gives_a_lost_workers_batch_to_another(flags, n, rank, step, how, tmp_path):
    """Nothing is redone: the server gives the batch the lost worker was computing to the next
    worker that asks, every batch is applied once per epoch, and the survivors shrink at its end."""
    proc = elastic_ps_run(n, tmp_path, (rank, step, "train_step"), how=how, momentum=0.9, more=(*ASYNC, *flags))
    assert proc.returncode == (1 if how == "exit" else 0), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    first, second = results["history"]
    assert results["steps"] == 50 and [h["steps"] for h in results["history"]] == [25, 50]
    assert sum(first["gradients_per_worker"]) == sum(second["gradients_per_worker"]) == 25
    assert [lost["rank"] for lost in first["lost"]] == [rank] and first["gradients_per_worker"][rank - 1] < step
    died = float(re.search(r"injected fault in utils.train_step, .* at ([\d.]+)", proc.stderr).group(1))
    assert 0 < first["lost"][0]["time"] - died < 10  # the server noticed within seconds
    assert len(second["gradients_per_worker"]) == n - 2 and "lost" not in second
    assert results["failures"] == [dict(ranks=[rank], step=25, world_size=n - 1,
                                        recovery_time=results["failures"][0]["recovery_time"])]
    assert re.search(rf"^worker {rank} lost at step \d+: batch \d+ of the epoch goes to the next worker", proc.stdout,
                     re.M), proc.stdout
    assert re.search(rf"^rank {rank} lost: the epoch ended without it; continuing on {n - 1} ranks", proc.stdout,
                     re.M), proc.stdout
    if "ssp" in flags:
        assert max(int(tau) for h in results["history"] for tau in h["staleness"]) <= 1
    assert results["final_test_acc"] > 80  # it learned: chance is 10%, the uninterrupted runs reach 90-100%


@pytest.mark.slow
def test_a_lost_asynchronous_server_ends_the_job_with_one_line(tmp_path):
    proc = elastic_ps_run(3, tmp_path, (0, 3, "set_lr"), more=(*ASYNC, "--mode", "async"))
    assert proc.returncode != 0 and "Final test accuracy" not in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "parameter server (rank 0) was lost" in errors[0] and "--resume" in errors[0], \
        proc.stderr
    died = float(re.search(r"injected fault in utils.set_lr, .* at ([\d.]+)", proc.stderr).group(1))
    assert time.time() - died < 10, f"the job took {time.time() - died:.1f} s to end after the fault"


# ----------------------------------------------------------------------------- FedAvg

# 6 clients on 3 client ranks, 2 each, 4 steps per client per round: rank 2's 6th step is in
# round 2, its second client's second step
FED = ["fed_avg.py", "--dataset", "synthetic", "--train-size", 600, "--rounds", 3, "--max-steps", 4,
       "--batch-size", B, "--num-clients", 6]


@pytest.fixture(scope="module")
def fed_uninterrupted(tmp_path_factory):
    """fed_uninterrupted(momentum): the final global model of the same FedAvg run on 4 ranks,
    with no failure and no --elastic."""
    folder = tmp_path_factory.mktemp("fed")

    @functools.cache
    def run(momentum):
        path = folder / f"fed-{momentum}.pt"
        check(mpirun(4, *FED, "--momentum", momentum, "--save-model", path, "--results", folder / "fed.json",
                     "--figures-dir", folder))
        return torch.load(path)
    return run


def elastic_fed_run(tmp_path, *faults, how="exit", momentum=0, more=()):
    """mpirun 4 ranks of fed_avg.py --elastic, ending each (rank, call, function) of `faults`."""
    cmd = []
    for rank, call, function in faults:
        cmd += ["tests/inject_failure.py", rank, call, function]
    return mpirun(4, *cmd, *FED, "--momentum", momentum, "--elastic", "--results", tmp_path / "r.json",
                  "--save-model", tmp_path / "model.pt", "--figures-dir", tmp_path, *more,
                  mca=ULFM, ft=True, timeout=150, env={"INJECT": how})


# (client rank, its train_step to die at, how, momentum): rank 2 in round 2 (its clients 1 and 4
# move to ranks 1 and 2 of the survivors), rank 3 in round 1
@pytest.mark.slow
@pytest.mark.parametrize("rank, step, how, momentum", [(2, 6, "exit", 0), (3, 2, "kill", 0.9)])
def test_fedavg_moves_a_lost_ranks_clients_and_ends_where_the_uninterrupted_run_ends(
        rank, step, how, momentum, fed_uninterrupted, tmp_path):
    proc = elastic_fed_run(tmp_path, (rank, step, "train_step"), how=how, momentum=momentum)
    assert proc.returncode == (1 if how == "exit" else 0), proc.stderr
    assert re.search(r"^Final test accuracy: \d+\.\d\d%$", proc.stdout, re.M), proc.stdout + proc.stderr
    results, got = json.loads((tmp_path / "r.json").read_text()), torch.load(tmp_path / "model.pt")
    [failure] = results["failures"]
    lost_round = 1 + (step - 1) // 8  # 2 clients x 4 steps per round on the rank
    assert failure["ranks"] == [rank] and failure["world_size"] == 3 and failure["round"] == lost_round
    clients = [k for k in range(6) if 1 + k % 3 == rank]  # as fed_avg.py deals them
    assert failure["moved"] == clients and all(1 <= r <= 2 for r in results["client_ranks"])
    assert sorted(results["client_ranks"][k] for k in clients) == [1, 2]  # dealt out in turn
    line = f"rank {rank} lost in round {lost_round}: clients {', '.join(map(str, clients))} moved; " \
           "redoing the round on 3 ranks"
    assert line in proc.stdout, proc.stdout
    assert [h["round"] for h in results["history"]] == [1, 2, 3]
    # the same clients, from the same global model, with their own seeds: the same run, up to the
    # order in which the server adds their weights
    want = fed_uninterrupted(momentum)
    assert (got - want).abs().max() < TOL[momentum], (got - want).abs().max()


@pytest.mark.slow
def test_fedavg_after_a_lost_server_resumes_from_the_checkpoint_the_survivors_wrote(fed_uninterrupted, tmp_path):
    """A client rank dies in round 1, the survivors go on; then the server dies in round 2 (at its
    2nd evaluation, before round 2's checkpoint): one line that says --resume. The resumed run,
    on 4 ranks again from the survivors' checkpoint of round 1, ends where the uninterrupted run ends."""
    ckpt = ["--checkpoint", tmp_path / "ckpt.pt"]
    proc = elastic_fed_run(tmp_path, (3, 2, "train_step"), (0, 2, "evaluate"), how="kill", more=ckpt)
    assert proc.returncode != 0 and "Final test accuracy" not in proc.stdout, proc.stdout + proc.stderr
    assert "rank 3 lost in round 1" in proc.stdout and "round   1/3" in proc.stdout, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "server (rank 0) was lost" in errors[0] and "--resume" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    died = float(re.search(r"injected fault in utils.evaluate, .* at ([\d.]+)", proc.stderr).group(1))
    assert time.time() - died < 10, f"the job took {time.time() - died:.1f} s to end after the fault"
    resumed = mpirun(4, *FED, "--momentum", 0, "--results", tmp_path / "r.json", "--save-model",
                     tmp_path / "model.pt", "--figures-dir", tmp_path, *ckpt, "--resume")
    check(resumed)
    assert "resumed from" in resumed.stdout and "round 1" in resumed.stdout, resumed.stdout
    want = fed_uninterrupted(0)
    got = torch.load(tmp_path / "model.pt")
    assert (got - want).abs().max() < TOL[0], (got - want).abs().max()


def test_elastic_refuses_scaffold(tmp_path):
    proc = in_process("fed_avg.py", "--dataset", "synthetic", "--elastic", "--algorithm", "scaffold",
                      "--results", tmp_path / "r.json",
                      env={"OMPI_MCA_mpi_ft_enable": "1"})  # as `mpirun --with-ft ulfm` sets it
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "SCAFFOLD" in errors[0], proc.stderr


@pytest.mark.slow
def test_elastic_without_a_failure_is_the_uninterrupted_run(centralized, tmp_path):
    proc, results, got = elastic_run(4, tmp_path)
    assert results["failures"] == [] and "lost" not in proc.stdout
    assert (got - centralized(4, 0)).abs().max() < TOL[0]


def test_elastic_without_mpis_fault_tolerance_is_refused(tmp_path):
    assert "OMPI_MCA_mpi_ft_enable" not in os.environ  # what `mpirun --with-ft ulfm` sets
    proc = in_process("dist_sgd_serverless.py", "--dataset", "synthetic", "--elastic",
                      "--results", tmp_path / "r.json")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--with-ft ulfm" in errors[0], proc.stderr


# ----------------------------------------------------------------------------- the benchmark

def test_committed_table_is_rendered_from_the_record():
    """bench/ELASTIC.md holds no number that its record does not."""
    path = os.path.join(ROOT, "results", "reference", "elastic", "elastic.json")
    with open(path) as f:
        record = json.load(f)
    record["source"] = os.path.relpath(path, ROOT)
    with open(os.path.join(ROOT, "bench", "ELASTIC.md")) as f:
        assert f.read() == bench_elastic.render(record), "stale: python bench/elastic.py --render-only"


@pytest.mark.slow
def test_bench_tiny(tmp_path):
    check(python("bench/elastic.py", "--tiny", "--steps", 12, "--kill-at", 4, "--out", tmp_path, timeout=600))
    record = json.loads((tmp_path / "elastic.json").read_text())
    assert set(record["runs"]) == {"default", "elastic", "killed"}
    killed = record["runs"]["killed"]
    assert killed["lost"] == [2] and killed["world_size"] == 4 and 0 < record["recovery_s"] < 10
    assert (tmp_path / "ELASTIC.md").read_text().startswith("# `--elastic`, measured")
