"""Run a script with a fault injected on one rank, to test that the job ends instead of hanging.

    mpirun -n 4 python tests/inject_failure.py RANK CALL FUNCTION SCRIPT [ARGS...]

makes utils.FUNCTION raise RuntimeError on its CALL-th call (1-based) on rank RANK, then
runs SCRIPT as __main__ with ARGS. The product code is not changed.
"""
import os
import runpy
import sys

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
        raise RuntimeError(f"injected fault in utils.{name}, call {call}, rank {rank}")
    return original(*args, **kwargs)


setattr(utils, name, faulty)
runpy.run_path(script, run_name="__main__")
