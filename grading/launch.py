"""Starting the scripts, for the grader (grading/checks.py) and the tests (tests/mpi.py) alike.

Under mpirun, a run gets a process group of its own, so that a deadline kills mpirun and every
rank (killing mpirun alone leaves the ranks holding the output pipes open). Code that runs on one
rank and cannot hang (cent_sgd.py, the given code) may instead run inside this process, which
saves a process start: importing torch, then torch._dynamo, which the first torch.optim call
pulls in, is most of a short run on 2 cores.
"""
import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback

# Open MPI's launcher now and then fails before any rank runs (a known PMIx flake, seen in other
# projects' CI too; bench/cluster.py meets it on the emulated hosts too): that launch ran nothing,
# so it is run once more
LAUNCHER_FLAKE = "The PMIx server's listener thread failed to start"
# Open MPI's PyPI build probes for a libfabric network (its `ofi` transport) in MPI_Init, which
# costs every rank about 1 s on a machine without one. These runs stay on one machine, over
# shared memory (or TCP where a run asks for it with --mca btl, which overrides this), so skip it.
# A user's own OMPI_MCA_btl wins.
ENV = {"PYTHONUNBUFFERED": "1", "OMPI_MCA_btl": os.environ.get("OMPI_MCA_btl", "^ofi")}


class Timeout(Exception):
    """A run passed its deadline and was killed, with mpirun and every rank; it keeps what the
    run printed."""

    def __init__(self, message, stdout="", stderr=""):
        super().__init__(message)
        self.stdout, self.stderr = stdout, stderr


def mpirun_cmd(n, *args, mca=None, ft=False):
    """`mpirun -n n python *args`, as root and with more ranks than cores allowed. `mca` adds
    `--mca KEY VALUE` pairs ({"btl": "tcp,self"}: TCP, as between machines); `ft` adds
    `--with-ft ulfm`, MPI's fault tolerance, which --elastic needs."""
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", *["--with-ft", "ulfm"] * ft,
           "-n", str(n)]
    for key, value in (mca or {}).items():
        cmd += ["--mca", key, str(value)]
    return cmd + [sys.executable, *map(str, args)]


def shown(cmd):
    """`cmd` as a person would type it: python for this Python, no flags for root and cores."""
    skip = {"--allow-run-as-root", "--oversubscribe"}
    return " ".join("python" if c == sys.executable else c for c in cmd if c not in skip)


def launch(cmd, cwd, timeout, env=None, retry=True):
    """Run `cmd` in `cwd` in its own process group and return the CompletedProcess; after
    `timeout` seconds kill the group and raise Timeout."""
    cmd, started = list(map(str, cmd)), time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(1, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise Timeout(f"`{shown(cmd)}` timed out after {timeout:.0f} s", stdout, stderr) from None
    if retry and proc.returncode != 0 and LAUNCHER_FLAKE in stderr and not stdout:
        return launch(cmd, cwd, timeout - (time.monotonic() - started), env, retry=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def in_process(script, *args, cwd, env=None):
    """Run `python script *args` in `cwd` inside this process and return what launch() would:
    exit status, stdout and stderr. Only for code that runs on one rank and cannot hang or end
    the process: there is no deadline here. An uncaught exception becomes a traceback on stderr
    and exit status 1, as in python."""
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env, saved_cwd = sys.argv, dict(os.environ), os.getcwd()
    sys.argv = [script, *map(str, args)]
    os.environ.update(env or {})
    os.chdir(cwd)
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
