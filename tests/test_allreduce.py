"""The hand-written ring and tree all-reduces match MPI_Allreduce and their cost formulas.

    pytest -q tests/test_allreduce.py
"""
import json

import pytest

from mpi import check, mpirun


def test_allreduce_matches_mpi():
    # One launch of 5 ranks checks groups of N = 1..5 ranks, each on sizes 1, N-1, N, N+1, 3001.
    proc = check(mpirun(5, "-m", "mpi4py", "tests/allreduce_check.py", timeout=90))
    assert all(f"allreduce OK: N={n} " in proc.stdout for n in range(1, 6)), proc.stdout


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
