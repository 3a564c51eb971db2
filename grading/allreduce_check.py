"""Check the hand-written all-reduces against MPI_Allreduce and their cost formulas.

    mpirun -n 5 python -m mpi4py grading/allreduce_check.py [ring] [tree]

Imports dist_sgd_serverless from the current folder (a submission's, for grading/grade.py; the
repo's, for tests/test_allreduce.py). Checks every group size N = 1..5 in one launch (the first
N ranks, split off COMM_WORLD, for each N in turn), and for each N the buffer sizes that stress
the chunking (1, N-1, N, N+1, ~3000), against comm.Allreduce itself. Every rank prints its
failures; rank 0 prints "allreduce OK: N=..." for each N without any. Exits non-zero on any
failure.
"""
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.getcwd())
from dist_sgd_serverless import ALLREDUCE  # noqa: E402


def expected_ring(rank, n, p, itemsize):
    """Bytes sent and received by `rank` in a ring all-reduce of p elements."""
    c = [len(chunk) for chunk in np.array_split(np.empty(p), n)]
    sent = 2 * p - c[(rank + 1) % n] - c[(rank + 2) % n]
    recv = 2 * p - c[rank] - c[(rank + 1) % n]
    return 2 * (n - 1), sent * itemsize, recv * itemsize


def expected_tree(rank, n, p, itemsize):
    """Bytes sent and received by `rank` in a binomial-tree reduce + broadcast."""
    rounds = int(np.ceil(np.log2(n))) if n > 1 else 0
    lowbit = rank & -rank if rank else n  # rank 0 is the root: every 2^k < n is a child
    children = sum(1 for k in range(rounds) if 2**k < lowbit and rank + 2**k < n)
    edges = children + (rank > 0)  # one whole-buffer message each way per edge
    return 2 * rounds, edges * p * itemsize, edges * p * itemsize


EXPECTED = {"ring": expected_ring, "tree": expected_tree}


def check_one(name, x, reference, comm):
    """The failures of all-reduce `name` on buffer `x` (reference: its MPI_Allreduce sum)."""
    rank, n, p = comm.Get_rank(), comm.Get_size(), len(x)
    buf = x.copy()
    try:
        stats = ALLREDUCE[name](buf, comm)
    except NotImplementedError as e:  # a handout's TODO: the same on every rank, at the start
        return [f"{name}: not implemented yet: {e}"]
    failures = []
    if not np.allclose(buf, reference, rtol=1e-5):
        err = np.max(np.abs(buf - reference))
        failures.append(f"{name} P={p}: max abs error {err:.3g} vs MPI_Allreduce")
    # Data-parallel SGD needs bitwise-identical results on every rank.
    root_buf = buf.copy()
    comm.Bcast(root_buf, root=0)
    if not np.array_equal(buf, root_buf):
        failures.append(f"{name} P={p}: result differs from rank 0's")
    expected = EXPECTED[name](rank, n, p, x.itemsize)
    got = (stats["steps"], stats["bytes_sent"], stats["bytes_recv"])
    if got != expected:
        failures.append(f"{name} P={p}: (steps, sent, recv) = {got}, expected {expected}")
    # Every byte sent is received by someone.
    total_sent = comm.allreduce(stats["bytes_sent"])
    total_recv = comm.allreduce(stats["bytes_recv"])
    if total_sent != total_recv:
        failures.append(f"{name} P={p}: {total_sent} B sent != {total_recv} B received")
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
