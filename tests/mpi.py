"""Launch a script under mpirun from a test, the way mpi4py's own test suite does."""
import importlib.util
import os
import re
import sys

from grading import launch as launcher

TEST_ENV = launcher.ENV  # what every run gets in its environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpirun(n, *args, timeout=120, env=None, mca=None, ft=False):
    """Run `mpirun -n n python *args` from the repo root and return the CompletedProcess.

    Root and oversubscribe flags are always passed, since tests run as root on 2 cores.
    `mca` adds `--mca KEY VALUE` pairs, e.g. {"btl": "tcp,self"} for the network path.
    `ft` adds `--with-ft ulfm`, MPI's fault tolerance, which --elastic needs.
    A hang becomes a test failure after `timeout` seconds instead of a stuck CI run.
    """
    return run(launcher.mpirun_cmd(n, *args, mca=mca, ft=ft), timeout, env)


def python(*args, timeout=120, env=None):
    """Run `python *args` from the repo root, without mpirun."""
    return run([sys.executable, *map(str, args)], timeout, env)


def run(cmd, timeout, env, retry=True):
    """Run cmd from the repo root (grading/launch.py: its own process group, a launcher flake
    retried once); a timeout fails the test, showing what the run printed."""
    try:
        return launcher.launch(cmd, ROOT, timeout, env, retry)
    except launcher.Timeout as e:
        raise AssertionError(f"{e}:\n{e.stdout}\n{e.stderr}") from None


def check(proc):
    """Assert a finished run exited 0, showing its output if not."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def in_process(script, *args, env=None):
    """Run `python script *args` from the repo root inside the test's own process and return
    what `python()` would (grading/launch.py's in_process): the tests pay for importing torch
    once. Only for code that runs on one rank (cent_sgd.py, or an MPI script refusing its
    flags) and cannot hang or kill the process."""
    return launcher.in_process(script, *args, cwd=ROOT, env=env)


def bench_module(name):
    """bench/<name>.py as a module, loaded the way `python bench/<name>.py` sees its siblings."""
    if os.path.join(ROOT, "bench") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_committed(name, rendered, command):
    """The committed bench/<name> equals `rendered`, the file its records render to."""
    with open(os.path.join(ROOT, "bench", name)) as committed, open(rendered) as fresh:
        assert committed.read() == fresh.read(), f"stale: {command}"


def assert_resume_is_exact(launch, script, unit, tmp_path):
    """`launch(name, *flags, script=(...))` runs `script` with its outputs and its checkpoint
    in tmp_path/name. Run it uninterrupted; then with rank 0 dying in its 2nd evaluation, after
    the checkpoint of `unit` 1; then resumed from that checkpoint. The resumed run must end on
    the uninterrupted run's bits."""
    import torch  # here, not at the top: the module is imported by tests that never load torch

    check(launch("reference", "--save-model", tmp_path / "reference.pt"))
    crashed = launch("crash", script=("tests/inject_failure.py", 0, 2, "evaluate", script))
    assert crashed.returncode != 0 and "injected fault" in crashed.stderr
    (tmp_path / "resume").mkdir()
    (tmp_path / "crash" / "ckpt.pt").rename(tmp_path / "resume" / "ckpt.pt")
    resumed = check(launch("resume", "--resume", "--save-model", tmp_path / "resumed.pt"))
    assert re.search(rf"^resumed from .*: {unit} 1\b", resumed.stdout, re.M), resumed.stdout
    assert torch.equal(torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "reference.pt"))
