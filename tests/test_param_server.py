"""dist_sgd_param_server.py: trains exactly like serverless and centralized SGD, over shared
memory and over TCP. Faults, resume and bad input: tests/test_reliability.py.

That it equals centralized SGD (2 workers, and 4 with Nesterov momentum kept on the server
alone) and moves the bytes of Q6, on the wire and as it counts them, are the grader's checks
(grading/checks.py), which tests/test_grading.py runs on the solution; the tests here reuse their
runs and references (tests/conftest.py).

    pytest -q tests/test_param_server.py
"""
import pytest
import torch

from grading import checks

SCRIPT = "dist_sgd_param_server.py"
WORKERS = 2
FLAGS = (*checks.QUICK, "--batch-size", checks.B)  # the grader's first case: plain SGD, 2 workers


def test_another_seed_is_not_close(solution):
    """Negative control: the grader's comparison can fail. Another seed (other initial weights
    and data order) ends far outside its tolerance."""
    server, _ = solution.trained(WORKERS + 1, SCRIPT, *FLAGS)
    other_seed = solution.centralized(WORKERS * checks.B, "--seed", 1)
    assert (server - other_seed).abs().max() > 100 * checks.ATOL


@pytest.mark.slow  # the default tier has each of the two equal to centralized SGD (the grader's)
def test_param_server_equals_serverless(solution):
    server, _ = solution.trained(WORKERS + 1, SCRIPT, *FLAGS)
    serverless, _ = solution.trained(WORKERS, "dist_sgd_serverless.py", *FLAGS)
    assert (server - serverless).abs().max() < checks.ATOL


@pytest.mark.slow
def test_tcp_gives_the_same_bits_as_shared_memory(solution):
    """With Open MPI's shared-memory transport off (--mca btl tcp,self), the ranks talk over
    loopback TCP as they would across machines. The server adds the workers' gradients in
    rank order whatever order they arrive in, so the result is the same to the bit."""
    shared_memory, _ = solution.trained(WORKERS + 1, SCRIPT, *FLAGS)
    tcp, _ = solution.trained(WORKERS + 1, SCRIPT, *FLAGS, mca={"btl": "tcp,self"})
    assert torch.equal(tcp, shared_memory)
