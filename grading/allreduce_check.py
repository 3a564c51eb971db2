"""Check the hand-written all-reduces against MPI_Allreduce and their cost formulas.

    mpirun -n 5 python -m mpi4py grading/allreduce_check.py [ring] [tree]

Imports dist_sgd_serverless from the current folder (a submission's: grading/checks.py runs it
there, for grade.py and for tests/test_grading.py). Checks every group size N = 1..5 in one
launch (the first N ranks, split off COMM_WORLD, for each N in turn), and for each N the buffer
sizes that stress the chunking (1, N-1, N, N+1, ~3000), against comm.Allreduce itself. Every rank prints its
failures; rank 0 prints "allreduce OK: N=..." for each N without any. Exits non-zero on any
failure. The bytes count twice: as the function reports them, and as its messages put them on the
wire (grading/wire.py), so that counts written by hand, or a "ring" that calls MPI's own
all-reduce, fail.
"""
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grading import formulas  # noqa: E402
from grading.wire import Meter  # noqa: E402

sys.path.insert(0, os.getcwd())  # before the grader's folder: the submission's script
from dist_sgd_serverless import ALLREDUCE  # noqa: E402


EXPECTED = {"ring": formulas.ring, "tree": formulas.tree}


def check_one(name, x, reference, comm):
    """The failures of all-reduce `name` on buffer `x` (reference: its MPI_Allreduce sum)."""
    rank, n, p = comm.Get_rank(), comm.Get_size(), len(x)
    buf, wire = x.copy(), Meter(comm)
    try:
        stats = ALLREDUCE[name](buf, wire)
    except NotImplementedError as e:  # a handout's TODO: the same on every rank, at the start
        return [f"{name}: not implemented yet: {e}"]
    failures = []
    if wire.other:
        failures.append(f"{name} P={p}: calls {', '.join(sorted(wire.other))}: write it with "
                        "messages of buffers (Send, Recv, Sendrecv)")
    if not np.allclose(buf, reference, rtol=1e-5):
        err = np.max(np.abs(buf - reference))
        failures.append(f"{name} P={p}: max abs error {err:.3g} vs MPI_Allreduce")
    # Data-parallel SGD needs bitwise-identical results on every rank.
    root_buf = buf.copy()
    comm.Bcast(root_buf, root=0)
    if not np.array_equal(buf, root_buf):
        failures.append(f"{name} P={p}: result differs from rank 0's")
    steps, sent, received = EXPECTED[name](rank, n, p, x.itemsize)
    measured = (wire.sent, wire.received())
    if measured != (sent, received):
        failures.append(f"{name} P={p}: its messages moved (sent, received) = {measured} bytes, "
                        f"the formula says {(sent, received)}")
    reported = (stats["steps"], stats["bytes_sent"], stats["bytes_recv"])
    if reported != (steps, sent, received):
        failures.append(f"{name} P={p}: it reports (steps, sent, recv) = {reported}, "
                        f"expected {(steps, sent, received)}")
    return failures


def check(comm, names=tuple(EXPECTED)):
    """The failures of the all-reduces `names` on communicator `comm`."""
    rank, n = comm.Get_rank(), comm.Get_size()
    sizes = sorted({1, n - 1, n, n + 1, 3001} - {0})
    failures = []
    for name in names:
        for p in sizes:
            # Positive data, so float32 sums have no cancellation and rtol 1e-5 is safe.
            x = np.random.default_rng(rank).random(p, dtype=np.float32)
            reference = x.copy()
            comm.Allreduce(MPI.IN_PLACE, reference, op=MPI.SUM)
            found = check_one(name, x, reference, comm)
            failures += found
            if found and "not implemented" in found[0]:
                break
    for f in failures:
        print(f"rank {rank}: FAIL N={n} {f}", flush=True)
    n_failed = comm.allreduce(len(failures))
    if rank == 0 and n_failed == 0:
        print(f"allreduce OK: N={n} sizes={sizes} algorithms={sorted(names)}", flush=True)
    return n_failed


def main():
    names = tuple(sys.argv[1:]) or tuple(EXPECTED)
    world = MPI.COMM_WORLD
    n_failed = 0
    for n in range(1, world.Get_size() + 1):
        group = world.Split(0 if world.Get_rank() < n else MPI.UNDEFINED)
        if group != MPI.COMM_NULL:
            n_failed += check(group, names)
            group.Free()
    sys.exit(1 if world.allreduce(n_failed) else 0)


if __name__ == "__main__":
    main()
