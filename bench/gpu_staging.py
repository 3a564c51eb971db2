"""Time staging a GPU buffer through pinned host memory around MPI_Allreduce, against the call alone.

    mpirun --allow-run-as-root --oversubscribe -n 4 python -m mpi4py bench/gpu_staging.py --out staging.json
    mpirun --allow-run-as-root --oversubscribe -n 2 python -m mpi4py bench/gpu_staging.py --device cpu --out s.json

Every rank holds the same float32 buffers (on a machine with one GPU, all ranks share it,
the Colab shape): the model's P parameters, and 16 MB. For each, after a Barrier, it times
  allreduce  MPI_Allreduce(IN_PLACE, SUM) on a pinned host buffer: the call, no staging
  staged     device -> pinned host copy, the same Allreduce, host -> device copy, each
             synchronized: what a GPU rank pays when the MPI is not CUDA-aware
  device     the Allreduce on the device buffer itself; only if the MPI is CUDA-aware
A call's time is the slowest rank's; the JSON holds the median over --repeats (after
WARMUP calls), the parts of `staged`, and the staging cost, staged - allreduce.
With --device cpu (no GPU here) only `allreduce` is timed, on a plain numpy buffer:
the case with no staging at all. Rank 0 prints one line per buffer and writes --out.
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

WARMUP = 3


def slowest(seconds, comm):
    """Per repeat, the slowest rank's time (an array of repeats) -> its median in ms."""
    times = np.asarray(seconds, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return 1e3 * float(np.median(times))


def time_allreduce(host, comm, repeats):
    """MPI_Allreduce on a host buffer alone: what every rank pays with no staging."""
    times = []
    for i in range(WARMUP + repeats):
        host[:] = 1.0  # same input every call, so the sums never grow
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return {"allreduce_ms": slowest(times, comm)}


def time_staged(flat, pinned, comm, repeats):
    """Device -> pinned host, the Allreduce, pinned host -> device, as utils.staged does it."""
    host = pinned.numpy()
    parts = {"d2h": [], "allreduce": [], "h2d": [], "total": []}
    for i in range(WARMUP + repeats):
        flat.fill_(1.0)
        torch.cuda.synchronize(flat.device)
        comm.Barrier()
        t0 = time.perf_counter()
        pinned.copy_(flat)  # a copy into pinned memory from the default stream; synchronize to be sure
        torch.cuda.synchronize(flat.device)
        t1 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        t2 = time.perf_counter()
        flat.copy_(pinned)
        torch.cuda.synchronize(flat.device)
        t3 = time.perf_counter()
        if i >= WARMUP:
            for key, dt in (("d2h", t1 - t0), ("allreduce", t2 - t1), ("h2d", t3 - t2), ("total", t3 - t0)):
                parts[key].append(dt)
    return {"staged_ms": slowest(parts["total"], comm),
            **{f"staged_{key}_ms": slowest(parts[key], comm) for key in ("d2h", "allreduce", "h2d")}}


def time_device(flat, comm, repeats):
    """The Allreduce straight on device memory: a CUDA-aware MPI's path, with no staging."""
    times = []
    for i in range(WARMUP + repeats):
        flat.fill_(1.0)
        torch.cuda.synchronize(flat.device)
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        torch.cuda.synchronize(flat.device)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return {"device_ms": slowest(times, comm)}


def main():
    parser = utils.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=utils.HelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when present; cpu times the Allreduce alone")
    parser.add_argument("--repeats", type=utils.positive(int), default=20, help="timed calls per buffer and mode")
    parser.add_argument("--out", default=None, help="JSON path for rank 0's record; none: print only")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    is_root = rank == 0
    device = utils.get_device(args.device)
    cuda_aware = utils.mpi_is_cuda_aware(device)
    num_params = utils.num_params(utils.Net())
    buffers = {f"params (P = {num_params:,})": num_params, "16 MB": (16 << 20) // 4}

    utils.print0(f"staging around MPI_Allreduce: {world_size} ranks on {device}"
                 f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
                 f"CUDA-aware MPI: {cuda_aware}, median of {args.repeats} after {WARMUP} warmup, slowest rank")
    rows = []
    for name, numel in buffers.items():
        row = {"buffer": name, "numel": numel, "bytes": 4 * numel}
        if device.type == "cpu":
            row.update(time_allreduce(np.empty(numel, dtype=np.float32), comm, args.repeats))
        else:
            pinned = torch.empty(numel, dtype=torch.float32, pin_memory=True)
            flat = torch.empty(numel, dtype=torch.float32, device=device)
            row.update(time_allreduce(pinned.numpy(), comm, args.repeats))
            row.update(time_staged(flat, pinned, comm, args.repeats))
            row["staging_cost_ms"] = row["staged_ms"] - row["allreduce_ms"]
            if cuda_aware:
                row.update(time_device(flat, comm, args.repeats))
        rows.append(row)
        utils.print0(" | ".join([name] + [f"{k[:-3]} {v:.3f} ms" for k, v in row.items() if k.endswith("_ms")]))

    if is_root and args.out:
        utils.write_atomically(args.out, lambda f: json.dump({
            "ranks": world_size, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cuda_aware_mpi": cuda_aware, "repeats": args.repeats, "warmup": WARMUP,
            "mpi": MPI.Get_library_version().rstrip("\x00").splitlines()[0],
            "command": f"mpirun -n {world_size} python -m mpi4py {' '.join(sys.argv)}",
            "rows": rows}, f, indent=1))
        utils.print0(f"wrote {args.out}")


if __name__ == "__main__":
    main()
