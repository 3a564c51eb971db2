"""Fixtures that several test files share."""
import pytest

from grading import checks
from mpi import ROOT


@pytest.fixture(scope="session")
def solution_runs(tmp_path_factory):
    """The grader's Context on this repo's own scripts, the solution: a run (or a centralized
    reference) that the grader's checks and the tests both need is made once per session."""
    return checks.Context(ROOT, str(tmp_path_factory.mktemp("solution")))


@pytest.fixture
def solution(solution_runs):
    """solution_runs, with this test's deadline for the runs it starts: a hang fails the test."""
    solution_runs.start(240)
    return solution_runs
