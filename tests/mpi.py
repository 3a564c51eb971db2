"""Launch a script under mpirun from a test, the way mpi4py's own test suite does."""
import contextlib
import importlib.util
import io
import os
import re
import runpy
import signal
import subprocess
import sys
import traceback

from bench.cluster import LAUNCHER_FLAKE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpirun(n, *args, timeout=120, env=None, mca=None, ft=False):
    """Run `mpirun -n n python *args` from the repo root and return the CompletedProcess.

    Root and oversubscribe flags are always passed, since tests run as root on 2 cores.
    `mca` adds `--mca KEY VALUE` pairs, e.g. {"btl": "tcp,self"} for the network path.
    `ft` adds `--with-ft ulfm`, MPI's fault tolerance, which --elastic needs.
    A hang becomes a test failure after `timeout` seconds instead of a stuck CI run.
    """
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", *["--with-ft", "ulfm"] * ft, "-n", str(n)]
    for key, value in (mca or {}).items():
        cmd += ["--mca", key, str(value)]
    cmd += [sys.executable, *map(str, args)]
    return run(cmd, timeout, env)


def python(*args, timeout=120, env=None):
    """Run `python *args` from the repo root, without mpirun."""
    return run([sys.executable, *map(str, args)], timeout, env)


# Open MPI's PyPI build probes for a libfabric network (its `ofi` transport) in MPI_Init, which
# costs every rank about 1 s on a machine without one. Tests run on one machine, over shared
# memory (or TCP where a test asks for it with --mca btl, which overrides this), so skip it.
# A user's own OMPI_MCA_btl wins.
TEST_ENV = {"PYTHONUNBUFFERED": "1", "OMPI_MCA_btl": os.environ.get("OMPI_MCA_btl", "^ofi")}


def run(cmd, timeout, env, retry=True):
    """Run cmd in its own process group, so that a timeout kills the ranks too, not just
    mpirun: otherwise the ranks keep the output pipes open and the test waits for them."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **TEST_ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"`{' '.join(cmd)}` did not finish in {timeout} s:\n{stdout}\n{stderr}") from None
    # Open MPI's launcher now and then fails before any rank runs (a known PMIx flake, seen in
    # other projects' CI too): that launch ran nothing, so it is run once more
    if retry and proc.returncode != 0 and LAUNCHER_FLAKE in stderr and not stdout:
        return run(cmd, timeout, env, retry=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def check(proc):
    """Assert a finished run exited 0, showing its output if not."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def in_process(script, *args, env=None):
    """Run `python script *args` inside the test's own process and return what `python()`
    would: exit status, stdout and stderr.

    Every new process pays for importing torch and then torch._dynamo, which the first
    torch.optim call pulls in; on a 2-core test machine that is most of a short run. The
    tests pay it once this way. Only for code that runs on one rank (cent_sgd.py, or an
    MPI script refusing its flags) and cannot hang or kill the process: there is no timeout
    here. An uncaught exception becomes a traceback on stderr and exit status 1, as in python.
    """
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env, saved_cwd = sys.argv, dict(os.environ), os.getcwd()
    sys.argv = [script, *map(str, args)]
    os.environ.update(env or {})
    os.chdir(ROOT)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:  # what python does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


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
