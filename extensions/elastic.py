"""--elastic: when a rank dies, the others go on without it, with MPI's own fault tolerance.

    mpirun --with-ft ulfm --mca pml ob1 --mca btl tcp,self -n 4 python dist_sgd_serverless.py --elastic

Used by dist_sgd_serverless.py through one hook (`survive`); without --elastic a lost rank ends
the whole job (utils.abort_on_exception), which stays the default.

ULFM, User-Level Failure Mitigation (Bland, Bouteiller, Herault, Bosilca, Dongarra, "Post-failure
recovery of MPI communication capability: design and rationale", IJHPCA 2013), is built into Open
MPI 5 and switched on by `mpirun --with-ft ulfm`. On one machine it works over TCP (`--mca pml ob1
--mca btl tcp,self`); with the shared-memory transport a probe hung. What a step does here:

1. An MPI call on a communicator with a dead member raises MPI.Exception: ERR_PROC_FAILED on a
   rank that noticed the death, ERR_REVOKED on a rank another survivor has warned.
2. The survivor revokes the communicator (Revoke), so that every rank still blocked in a call on
   it raises too, and all of them make a new one of the survivors (Shrink).
3. A collective can complete on some ranks and fail on others, so some survivors may hold the
   step's update and others not. They agree on the furthest step any of them finished, and the
   lowest rank that holds it broadcasts its weights and momentum: the replicas are equal again.
4. The epoch goes on from that step: the same global batch, now cut into N-1 strided shares. Each
   rank weights its gradient by its share of the batch before the all-reduce sums them, so the
   sum is the batch mean whatever the shares are, and training still equals centralized SGD.

Rank 0 of the new communicator prints and writes from then on (utils.RANK is updated). A rank lost
outside a training step (in an evaluation, at a checkpoint) still ends the job.
"""
import os
import time

import torch
from mpi4py import MPI

import utils

LOST = (MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED)
MPIRUN = "mpirun --with-ft ulfm --mca pml ob1 --mca btl tcp,self"


def add_flags(parser):
    parser.add_argument("--elastic", action="store_true",
                        help=f"go on without a rank that dies (needs `{MPIRUN}`); "
                             "default: a lost rank ends the job")


def check(args):
    """--elastic needs an MPI library with ULFM, and mpirun's switch that turns it on."""
    if not args.elastic:
        return
    if not hasattr(MPI.Comm, "Shrink"):
        utils.fail("--elastic needs an MPI library with fault tolerance (ULFM), "
                   "such as Open MPI 5, and mpi4py >= 4")
    if os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() not in ("1", "true", "yes"):
        utils.fail(f"--elastic needs MPI's fault tolerance switched on: launch with `{MPIRUN} -n N ...`")
    if getattr(args, "compress", "none") != "none":
        utils.fail("--elastic works with the uncompressed average only (--compress none)")


class ShrinkingComm:
    """A communicator that becomes the survivors' communicator after a failure. It forwards
    every call to the current one, so that the script's code after a recovery (evaluation, the
    results) uses the survivors without being told."""

    def __init__(self, comm):
        self.comm = comm

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def shrink(self):
        """Revoke the communicator, so that no survivor stays blocked on it, and make a new
        one of the survivors. Returns the ranks lost, as numbered before."""
        old_rank, old_size = self.comm.Get_rank(), self.comm.Get_size()
        self.comm.Revoke()
        self.comm = self.comm.Shrink()
        survivors = self.comm.allgather(old_rank)
        utils.RANK = self.comm.Get_rank()  # the new rank 0 prints and writes
        return sorted(set(range(old_size)) - set(survivors))


def survive(comm, train_epoch, model, optimizer, flat_params, global_batch):
    """Wrap train_epoch so that a lost rank is dropped and the epoch goes on without it.
    Returns (the communicator to use from now on, the wrapped train_epoch, the list of
    failures, which the results record)."""
    survivors = ShrinkingComm(comm)
    failures = []
    done = {"step": 0}  # steps this rank has finished, all-reduce and update included

    def weighted_average_(flat_grads, comm, allreduce_, device_ok=False):
        """Weight this rank's gradient by its share of the global batch, then sum: the mean
        over the batch, for shares of any size."""
        share = len(range(comm.Get_rank(), global_batch, comm.Get_size()))  # as utils.batches cuts it
        flat_grads.mul_(share / global_batch)
        with utils.staged(flat_grads, device_ok) as buf:
            moved = allreduce_(buf, comm)
        done["step"] += 1  # the update that follows is local and cannot fail
        if failures and "next_step_at" not in failures[-1]:
            failures[-1]["next_step_at"] = time.time()  # the first step after a recovery
        return moved

    def train_epoch_(*args, step, comm=None, average_=None):  # the script's comm and average_ give way
        while True:
            done["step"] = step
            try:
                return train_epoch(*args, step=step, comm=survivors, average_=weighted_average_)
            except MPI.Exception as e:
                if e.Get_error_class() not in LOST:
                    raise
            t0 = time.perf_counter()
            lost = survivors.shrink()
            step = agree_on_state(survivors, done["step"], model, optimizer, flat_params)
            failures.append(dict(ranks=lost, step=step, world_size=survivors.Get_size(),
                                 recovery_time=time.perf_counter() - t0))
            utils.print0(f"rank {', '.join(map(str, lost))} lost at step {step}: continuing on "
                         f"{survivors.Get_size()} ranks ({failures[-1]['recovery_time']:.1f} s)")
    return survivors, train_epoch_, failures


def agree_on_state(comm, step, model, optimizer, flat_params):
    """The survivors take the state of the lowest rank that finished the most steps: its
    weights, and its momentum in one flat buffer. Returns that step count, from which every
    survivor goes on."""
    steps = comm.allgather(step)
    holder = steps.index(max(steps))
    with utils.staged(flat_params) as buf:
        comm.Bcast(buf, root=holder)
    if max(steps) > 0 and optimizer.defaults["momentum"] > 0:  # buffers exist after a step
        state = [optimizer.state[p] for p in model.parameters()]
        for s, p in zip(state, model.parameters()):
            if s.get("momentum_buffer") is None:  # a rank that has not taken a step yet
                s["momentum_buffer"] = torch.zeros_like(p)
        flat = torch.cat([s["momentum_buffer"].reshape(-1) for s in state])
        with utils.staged(flat) as buf:
            comm.Bcast(buf, root=holder)
        offset = 0
        for s in state:
            m = s["momentum_buffer"]
            m.copy_(flat[offset:offset + m.numel()].view(m.shape))  # copy_ keeps channels-last
            offset += m.numel()
    return max(steps)
