"""Time MPI_Allreduce against the hand-written ring and tree all-reduces.

    mpirun --allow-run-as-root --oversubscribe -n 4 python -m mpi4py bench/allreduce.py

For each float32 buffer size (--min-bytes times powers of --factor, up to --max-bytes) every
algorithm runs a few warmup calls, then --repeats timed calls, each after a Barrier.
A call's time is the slowest rank's; the table shows the median over repeats.
The physical reference `copy`: every rank copies the buffer with np.copyto in the same
run, timed the same way, times 2(N-1)/N: a ring's traffic per rank at memcpy speed.
Rank 0 prints the table and writes results/allreduce_n{N}.json and
figures/allreduce_n{N}.png.
"""
import json
import os
import sys
import time

# the script lives in bench/, but imports utils and dist_sgd_serverless from the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from mpi4py import MPI  # noqa: E402

import utils  # noqa: E402
from dist_sgd_serverless import ALLREDUCE  # noqa: E402

WARMUP = 2


def time_allreduce(fn, x, buf, comm, repeats):
    """Median over repeats of the slowest rank's time for fn(buf, comm), in seconds."""
    times = np.empty(repeats)
    for i in range(WARMUP + repeats):
        np.copyto(buf, x)  # same input every call, so the sums never overflow
        comm.Barrier()
        t0 = time.perf_counter()
        fn(buf, comm)
        if i >= WARMUP:
            times[i - WARMUP] = time.perf_counter() - t0
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return float(np.median(times))


def parse_args():
    parser = utils.ArgumentParser(description=__doc__.split("\n")[0],
                                  formatter_class=utils.HelpFormatter)
    # sizes and repeats
    parser.add_argument("--min-bytes", type=int, default=1 << 10, help="smallest buffer")
    parser.add_argument("--max-bytes", type=int, default=16 << 20, help="largest buffer")
    parser.add_argument("--factor", type=int, default=4, help="each buffer is this many times the last")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per point")
    # output
    parser.add_argument("--results-dir", default="results", help="where the JSON goes")
    parser.add_argument("--figures-dir", default="figures", help="where the PNG goes")
    args = parser.parse_args()
    if not 4 <= args.min_bytes <= args.max_bytes or args.repeats < 1 or args.factor < 2:
        parser.error("need 4 <= --min-bytes <= --max-bytes, --repeats >= 1 and --factor >= 2")
    return args


def main():
    args = parse_args()
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    is_root = rank == 0

    sizes = []
    nbytes = args.min_bytes
    while nbytes <= args.max_bytes:
        sizes.append(nbytes)
        nbytes *= args.factor
    hw = utils.hardware()
    machine = f"{hw['cpu']}, {hw['cores']} CPUs"
    utils.print0(f"all-reduce of float32, N={world_size} ranks, {machine}, "
                 f"median of {args.repeats} after {WARMUP} warmup")
    utils.print0(f"{'size':>10} {'mpi ms':>9} {'ring ms':>9} {'tree ms':>9} {'copy ms':>9} {'ring/mpi':>9}")
    rows = [measure_size(nbytes, comm, args.repeats) for nbytes in sizes]

    if is_root:
        os.makedirs(args.results_dir, exist_ok=True)
        os.makedirs(args.figures_dir, exist_ok=True)
        json_path = os.path.join(args.results_dir, f"allreduce_n{world_size}.json")
        with open(json_path, "w") as f:
            json.dump({"n": world_size, "machine": machine, "repeats": args.repeats,
                       "warmup": WARMUP,
                       "command": f"mpirun -n {world_size} python {' '.join(sys.argv)}",
                       "mpi": MPI.Get_library_version().rstrip("\x00").splitlines()[0],
                       "rows": rows},
                      f, indent=1)
        png_path = os.path.join(args.figures_dir, f"allreduce_n{world_size}.png")
        plot(sizes, rows, world_size, machine, png_path)
        utils.print0(f"wrote {json_path} and {png_path}")


def measure_size(nbytes, comm, repeats):
    """One row of the table: every algorithm, and the memcpy reference, on a buffer of nbytes."""
    rank, world_size = comm.Get_rank(), comm.Get_size()
    x = np.random.default_rng(rank).random(nbytes // 4, dtype=np.float32)
    buf, dst = np.empty_like(x), np.empty_like(x)
    ms = {name: 1e3 * time_allreduce(fn, x, buf, comm, repeats)
          for name, fn in ALLREDUCE.items()}
    copy = time_allreduce(lambda b, c: np.copyto(dst, b), x, buf, comm, repeats)
    ms["copy"] = 1e3 * copy * 2 * (world_size - 1) / world_size
    size = f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"
    utils.print0(f"{size:>10} {ms['mpi']:9.3f} {ms['ring']:9.3f} {ms['tree']:9.3f} "
                 f"{ms['copy']:9.3f} {ms['ring'] / ms['mpi']:9.2f}")
    return {"bytes": nbytes, **{f"{name}_ms": t for name, t in ms.items()},
            "copy_gb_per_s": nbytes / copy / 1e9}


def plot(sizes, rows, world_size, machine, path):
    fig = Figure(figsize=(6, 4))  # no pyplot: no global backend state
    ax = fig.subplots()
    for name in ALLREDUCE:
        ax.loglog(sizes, [r[f"{name}_ms"] for r in rows], marker="o", label=name)
    if world_size > 1:  # 2(N-1)/N = 0 for one rank: nothing to draw on a log axis
        ax.loglog(sizes, [r["copy_ms"] for r in rows], "k--", label="memcpy x 2(N-1)/N")
    ax.set_xlabel("buffer size (bytes, float32)")
    ax.set_ylabel("time per all-reduce (ms, median)")
    ax.set_title(f"all-reduce, N={world_size} ranks\n{machine}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
