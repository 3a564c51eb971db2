"""Run a script with a fault injected on one rank, to test that the job ends instead of hanging.

    mpirun -n 4 python tests/inject_failure.py RANK CALL FUNCTION SCRIPT [ARGS...]

makes utils.FUNCTION fail on its CALL-th call (1-based) on rank RANK, then runs SCRIPT as
__main__ with ARGS (SCRIPT may be this file again, for a second fault). The product code is
not changed. The fault is a RuntimeError, or with INJECT=kill in the environment a SIGKILL of
the rank itself (an out-of-memory kill, a crash), with INJECT=exit an os._exit(1) (a process
that quits without a word to MPI), or with INJECT=perturb a silent one: the call's first
argument, a model, has its weights nudged on that rank before the call goes on (a bit flip,
a broken collective).
Either way the wrapper first prints "injected fault ... at T" to stderr, T being time.time(),
so that a test can measure how long the job took to end after it.
"""
import os
import runpy
import signal
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
import utils  # noqa: E402

rank, call, name, script = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.argv = [script] + sys.argv[5:]
original = getattr(utils, name)
calls = 0


def faulty(*args, **kwargs):
    global calls
    calls += 1
    if utils.RANK == rank and calls == call:
        message = f"injected fault in utils.{name}, call {call}, rank {rank} at {time.time():.3f}"
        if os.environ.get("INJECT") == "perturb":
            print(message, file=sys.stderr, flush=True)
            with torch.no_grad():
                next(args[0].parameters()).add_(1e-3)
            return original(*args, **kwargs)
        if os.environ.get("INJECT") == "kill":
            print(message, file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("INJECT") == "exit":
            print(message, file=sys.stderr, flush=True)
            os._exit(1)
        raise RuntimeError(message)
    return original(*args, **kwargs)


setattr(utils, name, faulty)
try:
    runpy.run_path(script, run_name="__main__")
finally:  # for tests/mpi.py's in_process, which runs this inside the test's process
    setattr(utils, name, original)
