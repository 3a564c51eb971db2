"""dist_sgd_param_server.py: trains exactly like serverless and centralized SGD, over shared
memory and over TCP, and moves the bytes its cost model says. Faults, resume and bad input:
tests/test_reliability.py.

    pytest -q tests/test_param_server.py
"""
import functools
import json

import pytest
import torch

import utils
from mpi import check, in_process, mpirun

STEPS = 6
COMMON = ["--dataset", "synthetic", "--lr", 0.05, "--max-steps", STEPS]
BATCH = 16  # per worker (per rank for the serverless script)
# Float32 noise: one backward pass over the global batch adds up the per-sample gradients
# in another order than averaging the workers' shares does. After 6 steps the largest
# difference measured was 3e-8 to cent_sgd.py (and 0 to the serverless script), for both
# cases below; 1e-6 leaves 30x.
ATOL = 1e-6
# (workers, momentum) of the two parameter-server runs the tests share: plain SGD with
# 2 workers, then Nesterov momentum (the default 0.9) with 3.
CASES = [(2, 0.0), (3, 0.9)]


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    """Run a script on the synthetic set for STEPS steps; return its final flat parameters
    and its results. Cached, so that several tests share one run."""
    folder = tmp_path_factory.mktemp("runs")

    @functools.cache
    def run(script, ranks, *flags):  # ranks=None: in this process, no mpirun
        name = f"{script}-{ranks}-{'-'.join(map(str, flags))}"
        model, results = folder / f"{name}.pt", folder / f"{name}.json"
        args = [script, *COMMON, *flags, "--save-model", model, "--results", results]
        check(mpirun(ranks, *args, timeout=60) if ranks else in_process(*args))
        with open(results) as f:
            return torch.load(model), json.load(f)
    return run


def param_server(train, workers, momentum, *flags):
    return train("dist_sgd_param_server.py", workers + 1, "--batch-size", BATCH,
                 "--momentum", momentum, *flags)


def centralized(train, workers, momentum, *flags):
    return train("cent_sgd.py", None, "--batch-size", workers * BATCH, "--momentum", momentum, *flags)


def test_param_server_equals_centralized(train):
    workers, momentum = CASES[0]
    server, results = param_server(train, workers, momentum)
    central, _ = centralized(train, workers, momentum)
    assert results["steps"] == STEPS and results["global_batch"] == workers * BATCH
    assert torch.allclose(server, central, rtol=0, atol=ATOL), (server - central).abs().max()


@pytest.mark.slow  # the default tier has each of the two equal to centralized SGD (test_serverless.py)
def test_param_server_equals_serverless(train):
    workers, momentum = CASES[0]
    server, _ = param_server(train, workers, momentum)
    serverless, _ = train("dist_sgd_serverless.py", workers, "--batch-size", BATCH, "--momentum", momentum)
    assert torch.allclose(server, serverless, rtol=0, atol=ATOL), (server - serverless).abs().max()


@pytest.mark.slow
def test_tcp_gives_the_same_bits_as_shared_memory(train, tmp_path):
    """With Open MPI's shared-memory transport off (--mca btl tcp,self), the ranks talk over
    loopback TCP as they would across machines. The server adds the workers' gradients in
    rank order whatever order they arrive in, so the result is the same to the bit."""
    workers, momentum = CASES[0]
    shared_memory, _ = param_server(train, workers, momentum)
    check(mpirun(workers + 1, "dist_sgd_param_server.py", *COMMON, "--batch-size", BATCH,
                 "--momentum", momentum, "--save-model", tmp_path / "model.pt",
                 "--results", tmp_path / "r.json", mca={"btl": "tcp,self"}, timeout=60))
    assert torch.equal(torch.load(tmp_path / "model.pt"), shared_memory)


def test_momentum_lives_on_the_server_alone(train):
    """With Nesterov momentum only the server keeps the velocity; 3 workers still give
    exactly centralized SGD (the serverless script keeps it on every rank instead)."""
    workers, momentum = CASES[1]
    server, _ = param_server(train, workers, momentum)
    central, _ = centralized(train, workers, momentum)
    assert torch.allclose(server, central, rtol=0, atol=ATOL), (server - central).abs().max()


def test_another_seed_is_not_close(train):
    """Negative control: the comparisons above can fail. Another seed (other initial weights
    and data order) ends far outside the tolerance."""
    server, _ = param_server(train, *CASES[0])
    other_seed, _ = centralized(train, *CASES[0], "--seed", 1)
    assert not torch.allclose(server, other_seed, rtol=0, atol=ATOL)
    assert (server - other_seed).abs().max() > 1000 * ATOL


@pytest.mark.parametrize("workers, momentum", CASES)
def test_bytes_match_the_cost_model(train, workers, momentum):
    """After S steps each worker sent and received 4PS bytes, the server W x 4PS each way.

    Only the per-step gradients and parameters count: not the one Bcast of the initial
    weights at setup, nor the small pickled metrics at the end of each epoch.
    """
    _, results = param_server(train, workers, momentum)
    p, s = results["params"], results["steps"]
    assert p == utils.num_params(utils.make_model(torch.device("cpu"), seed=0)) and s == STEPS
    server, *worker_bytes = results["bytes_per_rank"]
    assert len(worker_bytes) == workers
    assert server == {"bytes_sent": workers * p * 4 * s, "bytes_recv": workers * p * 4 * s}
    assert all(w == {"bytes_sent": p * 4 * s, "bytes_recv": p * 4 * s} for w in worker_bytes)
