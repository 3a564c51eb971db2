"""Fixtures that several test files share."""
import pytest

from grading import checks, grade
from mpi import ROOT


@pytest.fixture(scope="session")
def solution_runs(tmp_path_factory):
    """The grader's Context on the solution, set up as grade.py sets up a submission (the
    handout's code and extensions/ stub, this repo's scripts over them): a run (or a centralized
    reference) that the grader's checks and the tests both need is made once per session."""
    scratch = str(tmp_path_factory.mktemp("solution"))
    work, _ = grade.workspace(ROOT, ROOT, scratch)
    return checks.Context(work, scratch)


@pytest.fixture
def solution(solution_runs):
    """solution_runs, with this test's deadline for the runs it starts: a hang fails the test."""
    solution_runs.start(240)
    return solution_runs
