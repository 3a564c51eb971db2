"""The Q7 bench. That the hand-written ring and tree all-reduces equal MPI_Allreduce, with the
steps and bytes of their formulas, for N = 1..5 and awkward sizes, is the grader's check
(grading/allreduce_check.py), which tests/test_grading.py runs on the solution.

    pytest -q -m slow tests/test_allreduce.py
"""
import json

import pytest

from mpi import check, mpirun


@pytest.mark.slow
def test_bench_writes_json_and_png(tmp_path):
    proc = check(mpirun(2, "-m", "mpi4py", "bench/allreduce.py",
                        "--min-bytes", 1024, "--max-bytes", 4096, "--repeats", 2,
                        "--results-dir", tmp_path, "--figures-dir", tmp_path, timeout=60))
    assert "ring/mpi" in proc.stdout, proc.stdout
    with open(tmp_path / "allreduce_n2.json") as f:
        result = json.load(f)
    assert result["n"] == 2
    assert [row["bytes"] for row in result["rows"]] == [1024, 4096]
    assert all(row[f"{name}_ms"] > 0 for row in result["rows"] for name in ("mpi", "ring", "tree"))
    assert (tmp_path / "allreduce_n2.png").stat().st_size > 0
