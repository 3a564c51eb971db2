"""Launch a script under mpirun from a test, the way mpi4py's own test suite does."""
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpirun(n, *args, timeout=120, env=None, mca=None):
    """Run `mpirun -n n python *args` from the repo root and return the CompletedProcess.

    Root and oversubscribe flags are always passed, since tests run as root on 2 cores.
    `mca` adds `--mca KEY VALUE` pairs, e.g. {"btl": "tcp,self"} for the network path.
    A hang becomes a test failure after `timeout` seconds instead of a stuck CI run.
    """
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(n)]
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


def run(cmd, timeout, env):
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
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def check(proc):
    """Assert a finished run exited 0, showing its output if not."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc
