"""A slow worker on demand, for experiments: `--straggler RANK:FACTOR` makes rank RANK compute
FACTOR times slower, so that the cost of waiting for the slowest rank can be measured.

    mpirun -n 5 python dist_sgd_param_server.py --straggler 2:3                       # sleeps
    mpirun -n 5 python dist_sgd_param_server.py --straggler 2:3 --straggler-wait busy # spins
    mpirun -n 4 python dist_sgd_serverless.py --straggler 1:3

After each of its training steps (forward and backward), the slowed rank waits (FACTOR - 1)
times the step's measured duration, so its compute takes FACTOR times as long; what it
computes does not change, only when. `sleep` frees the core while it waits, which on a machine
with fewer cores than ranks speeds the other ranks up; `busy` spins on the core instead, as
a truly slower worker would occupy it. This is a measurement tool, not a model of any
particular hardware.

The seam: `slowdown(args, rank, device)` returns a context manager factory, which
extensions.configure puts in the script's Parts (`straggle`); a step's compute runs in
`with parts.straggle():`. With no --straggler, or on any other rank, it is
contextlib.nullcontext, so nothing is timed and nothing changes.
"""
import argparse
import contextlib
import time

import utils



def busy_wait(seconds):
    """Spin on the core for `seconds`, as a slower worker would keep it busy."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


WAIT = {"sleep": time.sleep, "busy": busy_wait}


def parse_straggler(text):
    """'RANK:FACTOR' -> (rank, factor), with rank >= 0 and factor >= 1."""
    try:
        rank, factor = text.split(":")
        rank, factor = int(rank), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK:FACTOR such as 1:3, got {text!r}")
    if rank < 0 or not factor >= 1:
        raise argparse.ArgumentTypeError(f"needs RANK >= 0 and FACTOR >= 1, got {text!r}")
    return rank, factor


TITLE = "stragglers, for experiments (extensions/stragglers.py)"


def add_flags(parser):
    """--straggler and --straggler-wait, the same in every script that takes them."""
    parser.add_argument("--straggler", type=parse_straggler, default=None, metavar="RANK:FACTOR",
                        help="for experiments: rank RANK computes FACTOR times slower (it waits "
                             "FACTOR - 1 times each step's compute time); default: no straggler")
    parser.add_argument("--straggler-wait", choices=tuple(WAIT), default="sleep",
                        help="how the straggler waits: sleep frees its core, busy spins on it")


def check(args, world_size, script):
    """Refuse a straggler rank outside the script's computing ranks (call it on every rank)."""
    first = 1 if script == "dist_sgd_param_server" else 0  # rank 0 is the server
    if args.straggler and not first <= args.straggler[0] < world_size:
        utils.fail(f"--straggler rank {args.straggler[0]} is not one of the ranks {first}..{world_size - 1}"
                   + (" (rank 0 is the server)" if first else ""))


def slowdown(args, rank, device):
    """The factory of the context manager that wraps this rank's training step."""
    if not args.straggler or args.straggler[0] != rank or args.straggler[1] == 1:
        return contextlib.nullcontext
    factor, wait = args.straggler[1], WAIT[args.straggler_wait]

    @contextlib.contextmanager
    def straggle():
        t0 = time.perf_counter()
        yield
        utils.sync(device)  # the GPU's queued kernels are part of the compute time
        with utils.span("compute", f"slowed {factor:g}x"):  # --trace: part of its compute
            wait((factor - 1) * (time.perf_counter() - t0))
    return straggle
