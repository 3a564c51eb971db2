"""Pickle against buffer: one gradient all-reduce three ways, mpi4py's lowercase and uppercase calls.

    mpirun --allow-run-as-root --oversubscribe -n 4 python bench/pickle_vs_buffer.py --out results/bench/pickle_n4.json

The gradient has the model's shape (8 tensors, 113,738 float32 in all):
  allreduce(tensor)     comm.allreduce(flat tensor, op=MPI.SUM): pickles the tensor, and
                        mpi4py adds the unpickled objects in Python
  allreduce per tensor  the same, one call per parameter tensor: 8 latencies as well
  Allreduce(buffer)     comm.Allreduce(MPI.IN_PLACE, flat.numpy()): the buffer as is, summed
                        by MPI in C; what dist_sgd_serverless.py does
Each call runs after a Barrier, the ways interleaved; a call's time is the slowest rank's,
and the table shows the median over --repeats. Rank 0 writes --out (JSON).
"""
import json
import os
import sys
import time

# the script lives in bench/, but imports utils from the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

import utils  # noqa: E402


def main():
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=utils.HelpFormatter)
    parser.add_argument("--repeats", type=utils.positive(int), default=30, help="timed calls per way")
    parser.add_argument("--out", required=True, help="results JSON path")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    is_root = rank == 0
    utils.abort_on_exception(comm)
    utils.set_threads(torch.device("cpu"))

    # a gradient shaped like the model's, different on every rank
    torch.manual_seed(rank)
    grads = [torch.randn(p.shape) for p in utils.make_model(torch.device("cpu"), seed=0).parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    buf = torch.empty_like(flat)

    def buffer_allreduce():
        comm.Allreduce(MPI.IN_PLACE, buf.numpy(), op=MPI.SUM)
        return buf

    ways = {"allreduce(tensor)": lambda: comm.allreduce(flat, op=MPI.SUM),
            "allreduce per tensor": lambda: torch.cat([comm.allreduce(g, op=MPI.SUM).reshape(-1) for g in grads]),
            "Allreduce(buffer)": buffer_allreduce}

    # all three give the same sum
    buf.copy_(flat)
    sums = [way() for way in ways.values()]
    assert all(torch.allclose(s, sums[-1], rtol=1e-5, atol=1e-5) for s in sums), "the three sums differ"

    times = np.zeros((len(ways), args.repeats))
    for i in range(args.repeats + 2):  # 2 warmup rounds
        for j, way in enumerate(ways.values()):
            buf.copy_(flat)  # fresh input, untimed: in place, the sums would add up
            comm.Barrier()
            t0 = time.perf_counter()
            way()
            if i >= 2:
                times[j, i - 2] = time.perf_counter() - t0
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    ms = {name: 1e3 * float(np.median(t)) for name, t in zip(ways, times)}
    utils.print0(f"N={world_size}, {flat.numel():,} float32: " + " | ".join(
        f"{name} {t:.3f} ms ({t / ms['Allreduce(buffer)']:.1f}x)" for name, t in ms.items()))
    if is_root:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"n": world_size, "floats": flat.numel(), "tensors": len(grads),
                       "repeats": args.repeats, "median_ms": ms}, f, indent=1)


if __name__ == "__main__":
    main()
