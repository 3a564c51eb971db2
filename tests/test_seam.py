"""The seams of issue 26 changed no computation: with every extension flag, each script ends with the
parameters, bit for bit, that the code before the refactor (commit BEFORE) ends with.

    python -m pytest -q -m slow tests/test_seam.py
"""
import os
import io
import subprocess
import tarfile

import pytest
import torch

from mpi import ROOT, mpirun

BEFORE = "5816f3c"  # the last commit before the seams: each feature still entered its own way
QUICK = ["--dataset", "synthetic", "--train-size", 640]
STEPS = ["--epochs", 1, "--max-steps", 4]
FED = ["--rounds", 2, "--num-clients", 8]
ULFM = {"pml": "ob1", "btl": "tcp,self"}
# (script, ranks, flags); the defaults are test_fingerprints.py's, which replays every reference run
CASES = [
    ("dist_sgd_serverless.py", 4, ["--allreduce", "ring"]),
    ("dist_sgd_serverless.py", 3, ["--allreduce", "tree"]),
    ("dist_sgd_serverless.py", 4, ["--compress", "fp16"]),
    ("dist_sgd_serverless.py", 4, ["--compress", "topk", "--topk-ratio", 0.05]),
    ("dist_sgd_serverless.py", 4, ["--compress", "powersgd", "--powersgd-rank", 2]),
    ("dist_sgd_serverless.py", 4, ["--straggler", "1:2"]),
    # asynchronous updates follow the order the gradients arrive in, which the OS decides: one
    # worker, or ssp at staleness 0 (lockstep), has one order, so its bits can be compared
    ("dist_sgd_param_server.py", 2, ["--mode", "async"]),
    ("dist_sgd_param_server.py", 5, ["--mode", "ssp", "--staleness", 0]),
    ("dist_sgd_param_server.py", 2, ["--mode", "async", "--dana"]),
    ("dist_sgd_param_server.py", 5, ["--straggler", "2:2"]),
    ("fed_avg.py", 5, ["--split-method", "non-iid"]),
    ("fed_avg.py", 5, ["--algorithm", "fedprox"]),
    ("fed_avg.py", 5, ["--algorithm", "fedavgm"]),
    ("fed_avg.py", 5, ["--algorithm", "scaffold"]),
    ("fed_avg.py", 5, ["--algorithm", "fedrs", "--split-method", "non-iid"]),
    ("fed_avg.py", 5, ["--algorithm", "fedlc", "--split-method", "non-iid"]),
    ("fed_avg.py", 5, ["--measure-drift"]),
]


@pytest.fixture(scope="module")
def before(tmp_path_factory):
    """The repository as it was at BEFORE, unpacked (git archive), or a skip without the history."""
    archive = subprocess.run(["git", "archive", BEFORE], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"no git history with commit {BEFORE}")
    folder = tmp_path_factory.mktemp("before")
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(folder, filter="data")
    return folder


def final_parameters(where, script, n, flags, out, elastic=False):
    steps = FED if script == "fed_avg.py" else STEPS
    more = ["--figures-dir", out] if script == "fed_avg.py" else []
    path = os.path.join(out, f"{os.path.basename(str(where))}.pt")
    proc = mpirun(n, os.path.join(where, script), *QUICK, *steps, *flags, *more,
                  *(["--elastic"] if elastic else []), "--results", os.path.join(out, "r.json"),
                  "--save-model", path, timeout=300, mca=ULFM if elastic else None, ft=elastic)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


@pytest.mark.slow
@pytest.mark.parametrize("script, n, flags", CASES, ids=[f"{s[:-3]}{''.join(map(str, f))}" for s, _, f in CASES])
def test_every_extension_flag_computes_the_bits_of_before_the_seams(before, script, n, flags, tmp_path):
    old = final_parameters(before, script, n, flags, str(tmp_path))
    new = final_parameters(ROOT, script, n, flags, str(tmp_path))
    assert torch.equal(old, new), f"{script} {flags}: max |difference| {(old - new).abs().max()}"


@pytest.mark.slow
@pytest.mark.parametrize("script, n", [("dist_sgd_serverless.py", 4), ("dist_sgd_param_server.py", 5),
                                       ("fed_avg.py", 5)])
def test_elastic_without_a_failure_computes_the_bits_of_before_the_seams(before, script, n, tmp_path):
    old = final_parameters(before, script, n, [], str(tmp_path), elastic=True)
    new = final_parameters(ROOT, script, n, [], str(tmp_path), elastic=True)
    assert torch.equal(old, new), f"{script} --elastic: max |difference| {(old - new).abs().max()}"
