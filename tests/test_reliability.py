"""Reliability of all four scripts: a fault on any rank ends the job within seconds, an
interrupted run resumes to exactly the uninterrupted result, the same seed gives the same
bits, and bad input gets one line from rank 0.

    pytest -q tests/test_reliability.py

Faults are injected by tests/inject_failure.py, which patches one utils function on one
rank and then runs the unchanged script. cent_sgd.py, which uses no MPI, runs inside the
test's process (tests/mpi.py's in_process) except where its process ending is the point.
"""
import functools
import json
import pickle
import re
import sys
import time

import numpy as np
import pytest
import torch

from mpi import check, in_process, mpirun, python, run as run_command

QUICK = ["--dataset", "synthetic", "--lr", 0.05]
# Each script for 2 epochs (rounds) of 4 steps on 400 synthetic samples, at the smallest
# process count that shows its pattern; default momentum 0.9, so the optimizer state matters.
RUNS = {
    "cent_sgd.py": (None, ["--train-size", 400, "--epochs", 2, "--batch-size", 100]),
    "dist_sgd_serverless.py": (2, ["--train-size", 400, "--epochs", 2, "--batch-size", 50]),
    "dist_sgd_param_server.py": (3, ["--train-size", 400, "--epochs", 2, "--batch-size", 50]),
    # 2 of 4 clients per round, so that the checkpoint must also restore the client sampler
    "fed_avg.py": (2, ["--train-size", 400, "--rounds", 2, "--batch-size", 25, "--num-clients", 4,
                       "--client-fraction", 0.5]),
}
# The default tier runs the cheaper half of what follows; the slow tier (-m slow) the rest.
slow = functools.partial(pytest.param, marks=pytest.mark.slow)


def launch(ranks, *args, timeout=90, **kwargs):
    """mpirun with `ranks` processes, or when ranks is None, in this process."""
    return mpirun(ranks, *args, timeout=timeout, **kwargs) if ranks else in_process(*args, **kwargs)


def outputs(script, folder):
    """Where a run writes its results (and fed_avg.py its plot of the split)."""
    return ["--results", folder / "r.json"] + (["--figures-dir", folder] if script == "fed_avg.py" else [])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """run(script, name, *extra) -> (final parameters, stdout, folder) of one full run,
    with a checkpoint after every epoch. Cached, so that tests share the reference runs."""
    @functools.cache
    def go(script, name, *extra):
        folder = tmp_path_factory.mktemp(f"{script[:-3]}-{name}")
        ranks, flags = RUNS[script]
        proc = check(launch(ranks, script, *QUICK, *flags, *extra, *outputs(script, folder),
                            "--checkpoint", folder / "ckpt.pt", "--save-model", folder / "model.pt",
                            timeout=90))
        return torch.load(folder / "model.pt"), proc.stdout, folder
    return go


def final_accuracy(stdout):
    return re.search(r"^Final test accuracy: (\d+\.\d\d)%$", stdout, re.M).group(1)


# ----------------------------------------------------------------------------- determinism

# The same seed gives the same bits: test_resume_after_a_crash_is_exact compares, bit for
# bit, a run with one that another process (the crashed one) began, so it checks this too.

def test_another_seed_gives_other_bits(run):
    """The control: bit-identical results are not because nothing depends on the seed."""
    assert not torch.equal(run("cent_sgd.py", "reference")[0], run("cent_sgd.py", "seed1", "--seed", 1)[0])


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("script", ["cent_sgd.py", "dist_sgd_serverless.py", slow("dist_sgd_param_server.py"),
                                    slow("fed_avg.py")])
def test_resume_after_a_crash_is_exact(script, run, tmp_path):
    """Rank 0 dies in its 2nd evaluation, after the checkpoint of epoch (round) 1 and before
    that of epoch 2. Resuming then runs epoch 2 only, and ends bit for bit where the
    uninterrupted run ended: parameters, momentum, data order and sampler all restored. The
    two runs are separate jobs, so this also shows that the same seed gives the same bits."""
    reference, reference_out, _ = run(script, "reference")
    ranks, flags = RUNS[script]
    unit = "round" if script == "fed_avg.py" else "epoch"
    args = [script, *QUICK, *flags, *outputs(script, tmp_path), "--checkpoint", tmp_path / "ckpt.pt"]
    crashed = launch(ranks, "tests/inject_failure.py", 0, 2, "evaluate", *args, timeout=90)
    assert_ended_quickly(crashed, "evaluate", 2, 0, "raise")  # rank 0 fails while the others wait for it
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["progress"][unit] == 1 and len(saved["progress"]["history"]) == 1

    resumed = check(launch(ranks, *args, "--resume", "--save-model", tmp_path / "model.pt", timeout=90))
    assert re.search(rf"^resumed from .*: {unit} 1\b", resumed.stdout, re.M), resumed.stdout
    assert [line.split("|")[0].strip() for line in resumed.stdout.splitlines()
            if line.startswith(unit)] == [f"{unit}   2/2"]  # only what was left
    assert torch.equal(torch.load(tmp_path / "model.pt"), reference)
    assert final_accuracy(resumed.stdout) == final_accuracy(reference_out)
    # the wall time counts the part before the crash too, not only the resumed part
    record = json.loads((tmp_path / "r.json").read_text())
    timed = sum(h.get("epoch_time", h.get("round_time", 0) + h.get("eval_time", 0)) for h in record["history"])
    assert len(record["history"]) == 2 and record["wall_time"] >= timed, (record["wall_time"], timed)


# ----------------------------------------------------------------------------- faults

# (script, ranks, failing rank, call, utils function, kind): a fault while loading data, in a
# training step, or on the way into a collective, on rank 0 and on other ranks; "kill" is a
# SIGKILL, like the out-of-memory killer, which leaves no Python traceback behind.
# test_resume_after_a_crash_is_exact's crashed runs add a fault on rank 0 in its evaluation.
FAULTS = [
    ("dist_sgd_serverless.py", 2, 1, 1, "load_data", "raise"),
    ("dist_sgd_serverless.py", 3, 2, 5, "staged", "kill"),
    ("dist_sgd_param_server.py", 2, 1, 3, "train_step", "kill"),
    ("fed_avg.py", 2, 1, 2, "train_step", "raise"),
    slow("cent_sgd.py", None, 0, 3, "train_step", "raise"),
    slow("dist_sgd_serverless.py", 2, 0, 3, "train_step", "raise"),
    slow("dist_sgd_param_server.py", 2, 0, 4, "staged", "raise"),
    slow("fed_avg.py", 2, 0, 1, "evaluate", "raise"),
]


def assert_ended_quickly(proc, function, call, rank, kind):
    """The injected fault was reported once, by the failing rank alone, and the job ended
    within 10 s of it with a non-zero status."""
    ended = time.time()
    assert proc.returncode != 0
    fault = f"injected fault in utils.{function}, call {call}, rank {rank} at "
    assert proc.stderr.count(fault) == 1, proc.stderr  # the first error, printed once
    assert proc.stderr.count("Traceback") == (kind == "raise"), proc.stderr  # by the failing rank only
    at = float(re.search(re.escape(fault) + r"([\d.]+)", proc.stderr).group(1))
    assert ended - at < 10, f"the job took {ended - at:.1f} s to end after the fault"


@pytest.mark.parametrize("script, ranks, rank, call, function, kind", FAULTS)
def test_a_fault_on_any_rank_ends_the_job_within_10_s(script, ranks, rank, call, function, kind, tmp_path):
    args = ["tests/inject_failure.py", rank, call, function, script, *QUICK, *outputs(script, tmp_path)]
    # cent_sgd.py runs as its own process here: that process ending is the point
    proc = (mpirun(ranks, *args, timeout=60, env={"INJECT": kind}) if ranks else
            python(*args, timeout=60, env={"INJECT": kind}))
    assert_ended_quickly(proc, function, call, rank, kind)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """Data folders that exist but cannot be used: a truncated batch, and missing batches."""
    root = tmp_path_factory.mktemp("bad-data")
    batch = pickle.dumps({"data": bytes(30 * 3072), "labels": [0] * 30})
    truncated = root / "truncated" / "cifar-10-batches-py"
    truncated.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (truncated / name).write_bytes(batch[:len(batch) // 2])
    incomplete = root / "incomplete" / "cifar-10-batches-py"
    incomplete.mkdir(parents=True)
    (incomplete / "data_batch_1").write_bytes(batch)
    return root


@pytest.fixture(scope="module")
def checkpoints(run, tmp_path_factory):
    """A good checkpoint of cent_sgd.py, and a truncated copy of it."""
    _, _, folder = run("cent_sgd.py", "reference")
    corrupt = tmp_path_factory.mktemp("corrupt") / "ckpt.pt"
    data = (folder / "ckpt.pt").read_bytes()
    corrupt.write_bytes(data[:len(data) // 3])
    return {"good": folder / "ckpt.pt", "corrupt": corrupt}


CENT = [*QUICK, *RUNS["cent_sgd.py"][1]]
# (script, ranks, arguments, what the one error line says); {truncated}, {incomplete},
# {good}, {corrupt} are filled in from the fixtures above. ranks None: one rank, run in this
# process; 2: under mpirun, where only rank 0 may print the line and no rank may hang.
BAD_INPUT = [
    ("dist_sgd_param_server.py", None, [], "at least one worker"),
    ("fed_avg.py", None, [], "needs a server and at least one client"),
    slow("fed_avg.py", 2, ["--dataset", "synthetic", "--num-clients", 6000], "cannot split 5000 samples"),
    ("dist_sgd_serverless.py", 2, ["--allreduce", "butterfly"], "invalid choice"),
    ("fed_avg.py", None, ["--split-method", "dirichlet"], "invalid choice"),
    ("dist_sgd_param_server.py", None, ["--dataset", "imagenet"], "invalid choice"),
    ("fed_avg.py", None, ["--split-method", "non-iid", "--alpha", -1], "must be > 0"),
    ("dist_sgd_serverless.py", None, ["--epochs", 0], "must be > 0"),
    ("fed_avg.py", None, ["--rounds", 0], "must be > 0"),
    ("dist_sgd_param_server.py", None, ["--batch-size", -64], "must be > 0"),
    ("fed_avg.py", None, ["--lr", 0], "must be > 0"),
    slow("fed_avg.py", 2, ["--dataset", "synthetic", "--num-clients", 100], "fewer than one batch of 64"),
    ("dist_sgd_param_server.py", 2, ["--dataset", "synthetic", "--batch-size", 6000], "larger than the 5000"),
    ("dist_sgd_serverless.py", None, ["--data-dir", "{truncated}"], "cannot read"),
    slow("dist_sgd_serverless.py", 2, ["--data-dir", "{truncated}"], "cannot read"),
    slow("fed_avg.py", 2, ["--data-dir", "{incomplete}"], "cannot read"),
    ("cent_sgd.py", None, ["--resume"], "--resume needs --checkpoint"),
    ("cent_sgd.py", None, ["--seed", -1], "--seed must be >= 0"),
    # outputs that cannot be written are refused before any training, not after the first epoch
    ("cent_sgd.py", None, ["--checkpoint", "/proc/x/ck.pt"], "cannot write /proc/x/ck.pt"),
    ("dist_sgd_serverless.py", None, ["--save-model", "/proc/x/m.pt"], "cannot write /proc/x/m.pt"),
    slow("dist_sgd_serverless.py", 2, ["--save-model", "/proc/x/m.pt"], "cannot write /proc/x/m.pt"),
    slow("fed_avg.py", 2, ["--figures-dir", "/proc/x"], "cannot write /proc/x"),
    ("cent_sgd.py", None, [*CENT, "--checkpoint", "{corrupt}", "--resume"], "cannot read checkpoint"),
    ("dist_sgd_serverless.py", None, ["--dataset", "synthetic", "--checkpoint", "{corrupt}", "--resume"],
     "cannot read checkpoint"),
    slow("dist_sgd_serverless.py", 2, ["--dataset", "synthetic", "--checkpoint", "{corrupt}", "--resume"],
         "cannot read checkpoint"),
    ("dist_sgd_serverless.py", None, ["--dataset", "synthetic", "--checkpoint", "{good}", "--resume"],
     "written by cent_sgd.py"),
    ("cent_sgd.py", None, [*CENT, "--lr", 0.1, "--checkpoint", "{good}", "--resume"],
     "--lr was 0.05, now 0.1"),
]


@pytest.mark.parametrize("script, ranks, args, message", BAD_INPUT)
def test_bad_input_gets_one_line_and_a_nonzero_exit(script, ranks, args, message, bad_data, checkpoints, tmp_path):
    paths = {"truncated": bad_data / "truncated", "incomplete": bad_data / "incomplete", **checkpoints}
    args = [str(a).format(**paths) for a in args]
    proc = launch(ranks, script, *outputs(script, tmp_path), *args, timeout=60)  # args may override outputs
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path):
    """So that one notebook cell both starts a run and, after a disconnect, resumes it."""
    path = tmp_path / "none-yet.pt"
    proc = check(in_process("cent_sgd.py", *QUICK, "--max-steps", 2, "--checkpoint", path, "--resume",
                            "--results", tmp_path / "r.json"))
    assert f"no checkpoint at {path} yet" in proc.stdout and path.exists()


# (script, ranks, the rank that evaluates and is perturbed): the parameter server evaluates on rank 0 only
@pytest.mark.slow  # python -O compiles torch anew in every process; test_layout.py checks for asserts
@pytest.mark.parametrize("script, ranks, rank", [("dist_sgd_serverless.py", 2, 1), ("dist_sgd_param_server.py", 3, 0)])
def test_diverged_replicas_are_caught_even_under_python_O(script, ranks, rank, tmp_path):
    """The end-of-run check that every rank holds the same weights is an explicit check, not an
    assert, which `python -O` strips. Here one rank changes its weights on its way into the
    last evaluation; the check must notice."""
    flags = RUNS[script][1]
    proc = mpirun(ranks, "-O", "tests/inject_failure.py", rank, 2, "evaluate", script, *QUICK, *flags,
                  *outputs(script, tmp_path), timeout=90, env={"INJECT": "perturb"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("diverged" in errors[0] or "differ" in errors[0]), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("missing_on", [0, 1])
def test_a_rank_whose_machine_lacks_the_data_ends_the_job_with_one_line(missing_on, tmp_path):
    """As when one node of a cluster has no copy of the dataset: here the two ranks get
    different --data-dir (two mpirun app contexts), one of which holds no data and cannot
    receive a download. Before the ranks agreed on it, rank 1 missing the data segfaulted
    and rank 0 missing it hung."""
    good = tmp_path / "good" / "cifar-10-batches-py"
    good.mkdir(parents=True)
    batch = pickle.dumps({"data": np.zeros((8, 3072), np.uint8), "labels": list(range(8))})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (good / name).write_bytes(batch)
    dirs = [str(tmp_path / "good"), "/proc/no-data-here"]
    if missing_on == 0:
        dirs.reverse()
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
    for rank, data_dir in enumerate(dirs):
        cmd += [":"] * (rank > 0) + ["-n", "1", sys.executable, "dist_sgd_serverless.py", "--data-dir", data_dir,
                                    "--batch-size", 4, "--max-steps", 1, "--results", tmp_path / "r.json"]
    proc = run_command([str(c) for c in cmd], 60, None)  # a hang fails here
    assert proc.returncode != 0
    assert "Segmentation" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "CIFAR-10 is not in /proc/no-data-here" in errors[0], proc.stderr
    assert (f"on rank {missing_on} (" in errors[0]) == (missing_on != 0), errors[0]
