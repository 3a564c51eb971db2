"""bench/gpu.sh, the one-GPU benchmark, where no GPU is: its no-GPU exit, its command list, its staging timer.

    pytest -q tests/test_gpu_script.py

The measurement itself needs a CUDA GPU and is not part of the suite. These tests pass on a
machine with one too: CUDA_VISIBLE_DEVICES="" hides it from torch.
"""
import json
import os
import re
import shlex

import pytest

import utils
from mpi import ROOT, check, mpirun, python, run

NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}
NO_GPU_EXIT = 77
SCRIPTS = {"cent_sgd.py": 1, "dist_sgd_serverless.py": 4, "dist_sgd_param_server.py": 5, "fed_avg.py": 5}
MPS_START, MPS_STOP = "$ nvidia-cuda-mps-control -d", "$ echo quit | nvidia-cuda-mps-control"


def gpu_sh(*args, timeout=60):
    return run(["bash", "bench/gpu.sh", *map(str, args)], timeout, NO_GPU)


def dry_run(tmp_path):
    proc = check(gpu_sh("--dry-run", "--out", tmp_path / "gpu"))
    assert not (tmp_path / "gpu").exists(), "--dry-run must write nothing"
    return proc.stdout.splitlines()


def test_script_parses():
    check(run(["bash", "-n", "bench/gpu.sh"], 30, None))


def test_no_gpu_prints_one_line_and_the_documented_status(tmp_path):
    proc = gpu_sh("--out", tmp_path / "gpu")
    assert proc.returncode == NO_GPU_EXIT, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA GPU visible: nothing to measure"), lines
    assert not (tmp_path / "gpu").exists(), "nothing measured, so nothing written"
    # the status the script returns is the one its header documents
    with open(os.path.join(ROOT, "bench", "gpu.sh")) as f:
        assert re.search(rf"^#\s+{NO_GPU_EXIT}\s+no CUDA GPU visible", f.read(), re.M)


def test_a_gpu_torch_cannot_see_is_no_gpu(tmp_path):
    # nvidia-smi lists a GPU (a fake one here), but torch sees none: the same one line and status
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = run(["bash", "bench/gpu.sh", "--out", tmp_path / "gpu"], 60,
               {**NO_GPU, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert proc.returncode == NO_GPU_EXIT, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.splitlines() == ["no CUDA GPU visible: nothing to measure "
                                        f"(torch.cuda.is_available() is False); exit {NO_GPU_EXIT}"], proc.stdout
    assert not (tmp_path / "gpu").exists()


def test_dry_run_lists_every_paradigm_with_mps_off_and_on_and_the_staging_timer(tmp_path):
    lines = dry_run(tmp_path)
    assert lines.count(MPS_START) == 1 and lines.count(MPS_STOP) == 1, lines
    start, stop = lines.index(MPS_START), lines.index(MPS_STOP)
    commands = [line for line in lines if line.startswith("$ ") and line not in (MPS_START, MPS_STOP)]
    for mps, part in (("off", lines[:start]), ("on", lines[start + 1:stop])):
        assert all(line.endswith(f"# MPS {mps}") for line in part), part
        for script, ranks in SCRIPTS.items():
            found = [line for line in part if f" {script} " in line]
            assert len(found) == 1, (script, mps, part)
            words = shlex.split(found[0][2:], comments=True)
            assert (words[0] == "python") if ranks == 1 else (words[:5] == [
                "mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks)]), found
            assert {"--dataset", "synthetic", "--device", "cuda"} <= set(words), found
            assert ("--rounds" if script == "fed_avg.py" else "--epochs") in words, found
        assert sum("bench/gpu_staging.py" in line for line in part) == 1, part
    assert len(commands) == 2 * (len(SCRIPTS) + 1), commands
    # every JSON lands in --out, one file per run
    outputs = [w for c in commands for w in shlex.split(c[2:], comments=True) if w.endswith(".json")]
    assert len(set(outputs)) == len(commands) and all(o.startswith(str(tmp_path / "gpu")) for o in outputs)


HELP = """import runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        print("=" * 20, flush=True)
"""


@pytest.fixture(scope="module")
def usage():
    """Each script's --help, from one Python process: torch is imported once, not five times."""
    scripts = [*SCRIPTS, "bench/gpu_staging.py"]
    texts = check(python("-c", HELP, *scripts, timeout=90)).stdout.split("=" * 20 + "\n")
    return dict(zip(scripts, texts))


@pytest.mark.parametrize("script", [*SCRIPTS, "bench/gpu_staging.py"])
def test_dry_run_uses_only_flags_the_scripts_accept(tmp_path, usage, script):
    line = next(line for line in dry_run(tmp_path) if f" {script} " in line)
    flags = {w for w in shlex.split(line[2:], comments=True) if w.startswith("--")}
    flags -= {"--allow-run-as-root", "--oversubscribe"}  # mpirun's
    assert usage[script].startswith(f"usage: {os.path.basename(script)}"), usage[script]  # the right one
    assert all(re.search(rf"{flag}\b", usage[script]) for flag in flags), (flags, usage[script])


@pytest.mark.slow
def test_staging_timer_on_the_cpu_times_the_allreduce_alone(tmp_path):
    out = tmp_path / "staging.json"
    check(mpirun(2, "-m", "mpi4py", "bench/gpu_staging.py", "--device", "cpu", "--repeats", 2, "--out", out,
                 timeout=60))
    with open(out) as f:
        r = json.load(f)
    assert r["ranks"] == 2 and r["device"] == "cpu" and r["cuda_aware_mpi"] is False
    assert [row["bytes"] for row in r["rows"]] == [4 * utils.num_params(utils.Net()), 16 << 20]  # P float32; 16 MB
    for row in r["rows"]:
        assert row["allreduce_ms"] > 0
        assert not any(key.startswith(("staged", "device")) for key in row), row  # nothing to stage on the CPU
