"""The benchmark runs end to end in its tiny mode, so that it cannot rot.

    pytest -q tests/test_bench.py

The full bench (`python bench/run.py`, minutes) is not part of the suite. Slow tier:
`pytest -q -m slow tests/test_bench.py`.
"""
import json
import os

import pytest

from mpi import ROOT, check, python

SECTIONS = ("## Targets", "## 1. Serverless step against PyTorch DDP", "## 2. Hand-written collectives",
            "## 3. Paradigm cost", "## 4. Pickle against buffer", "## Optimizations", "## Commands")


@pytest.mark.slow
def test_tiny_bench_writes_results_and_plots(tmp_path):
    # --tiny must write only into --out, never over the committed results and records
    committed = [os.path.join(ROOT, "bench", "RESULTS.md"), os.path.join(ROOT, "figures", "bench_allreduce.png"),
                 os.path.join(ROOT, "figures", "bench_paradigms.png"),
                 os.path.join(ROOT, "results", "reference", "bench", "run.json")]
    before = {p: os.path.getmtime(p) for p in committed if os.path.exists(p)}
    check(python("bench/run.py", "--tiny", "--out", tmp_path, timeout=400))  # < 1 min on an idle machine
    assert {p: os.path.getmtime(p) for p in committed if os.path.exists(p)} == before

    text = (tmp_path / "RESULTS.md").read_text()
    for section in SECTIONS:
        assert section in text, f"RESULTS.md lacks {section!r}:\n{text}"
    targets = text.split("## Targets")[1].split("\n## ")[0]
    rows = [line for line in targets.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6, targets  # DDP x2, ring at 4 MB x2, serverless vs centralized, wall time
    assert all(r.rstrip(" |").endswith(("**met**", "**missed**", "not measured")) for r in rows), targets
    for plot in ("bench_allreduce.png", "bench_paradigms.png"):
        assert (tmp_path / plot).stat().st_size > 0

    # RESULTS.md comes from the records alone: rendering them again gives the same file
    check(python("bench/run.py", "--render-only", "--out", tmp_path, timeout=60))
    assert (tmp_path / "RESULTS.md").read_text() == text

    # the DDP equality check: same parameters after a few steps, to float32 reduction noise
    with open(tmp_path / "ddp_n2.json") as f:
        ddp = json.load(f)
    assert ddp["check_steps"] >= 3
    assert set(ddp["max_abs_diff"]) >= {"ddp", "copy", "overlap"}
    assert all(d <= 1e-5 for d in ddp["max_abs_diff"].values()), ddp["max_abs_diff"]
