"""--elastic: when a rank dies, the others go on without it, with MPI's own fault tolerance.

    mpirun --with-ft ulfm --mca pml ob1 --mca btl tcp,self -n 4 python dist_sgd_serverless.py --elastic

Used by dist_sgd_serverless.py through one hook (`survive`), and by dist_sgd_param_server.py
through `survive_server` (below); without --elastic a lost rank ends the whole job
(utils.abort_on_exception), which stays the default.

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

The parameter server (--mode sync) differs in two ways. Its state is the server's alone, so in
step 3 the survivors take the server's weights and its count of updates. And the workers send
their gradients unweighted: the server weighs them by their shares when it averages. A lost
server cannot be replaced by a worker, which holds no momentum: the job ends, with one line.
"""
import atexit
import os
import sys
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
    if getattr(args, "mode", "sync") != "sync":
        utils.fail("--elastic works with the synchronous parameter server only (--mode sync)")


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
    """dist_sgd_serverless.py: wrap train_epoch so that a lost rank is dropped and the epoch
    goes on without it. Returns (the communicator to use from now on, the wrapped train_epoch,
    the list of failures, which the results record)."""
    survivors, failures, done = ShrinkingComm(comm), [], {"step": 0}

    def weighted_average_(flat_grads, comm, allreduce_, device_ok=False):
        """Weight this rank's gradient by its share of the global batch, then sum: the mean
        over the batch, for shares of any size."""
        share = len(range(comm.Get_rank(), global_batch, comm.Get_size()))  # as utils.batches cuts it
        flat_grads.mul_(share / global_batch)
        with utils.staged(flat_grads, device_ok) as buf:
            moved = allreduce_(buf, comm)
        step_done(done, failures)  # the update that follows is local and cannot fail
        return moved

    def recover():
        return agree_on_state(survivors, done["step"], model, optimizer, flat_params)

    return survivors, retrying(train_epoch, survivors, failures, done, weighted_average_, recover), failures


def survive_server(comm, train_epoch, flat_params, global_batch):
    """dist_sgd_param_server.py: the same for the synchronous parameter server. A lost worker
    is dropped; the server (rank 0) holds the only optimizer state, so after a failure the
    workers take its weights and its step count. A lost server ends the job, with a line
    that says how to restart from the last checkpoint."""
    survivors, failures, done = ShrinkingComm(comm), [], {"step": 0}

    def weighted_average_(flat_grads, inbox):
        """The server's average, each worker's gradient weighted by its share of the global
        batch: the batch mean for shares of any size; the plain mean while they are equal."""
        shares = [len(range(w, global_batch, len(inbox))) for w in range(len(inbox))]  # as utils.batches cuts it
        if len(set(shares)) == 1:
            flat_grads.copy_(inbox.sum(dim=0)).div_(len(inbox))
        else:
            weights = torch.tensor(shares, dtype=inbox.dtype, device=inbox.device) / global_batch
            flat_grads.copy_((weights[:, None] * inbox).sum(dim=0))
        step_done(done, failures)  # the update that follows is local and cannot fail

    def recover():
        step = survivors.bcast(done["step"], root=0)  # the server's count of updates
        with utils.staged(flat_params) as buf:
            survivors.Bcast(buf, root=0)
        return step

    return survivors, retrying(train_epoch, survivors, failures, done, weighted_average_, recover,
                               fatal=(0, "the parameter server (rank 0)")), failures


def lost_a_rank(error, comm):
    """Whether an MPI error means a rank was lost. A Waitall on several requests reports the
    failure of one as ERR_IN_STATUS; then the communicator's group of failed ranks tells."""
    if error.Get_error_class() in LOST:
        return True
    return error.Get_error_class() == MPI.ERR_IN_STATUS and comm.Get_failed().Get_size() > 0


def exit_without_finalize():
    """After a failure, leave without MPI_Finalize: in Open MPI 5 it can wait forever on the
    dead rank (open-mpi/ompi#11404; it hung here now and then). Registered after
    mpi4py's own exit handler, so it runs before it: the process ends here, its output flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def step_done(done, failures):
    done["step"] += 1
    if failures and "next_step_at" not in failures[-1]:
        failures[-1]["next_step_at"] = time.time()  # the first step after a recovery


def retrying(train_epoch, survivors, failures, done, weighted_average_, recover, fatal=None):
    """train_epoch on the survivors, with `weighted_average_` for the gradients; when a rank is lost,
    shrink, `recover()` the step to go on from, and go on. `fatal`: (rank, its name), a rank
    whose loss ends the job."""
    def train_epoch_(*args, step, comm, average_=None):
        # `comm`, the script's, is the survivors' proxy itself. The script's `average_` gives
        # way to the weighted one; check() has refused any other than the plain mean.
        del comm, average_
        while True:
            done["step"] = step
            try:
                return train_epoch(*args, step=step, comm=survivors, average_=weighted_average_)
            except MPI.Exception as e:
                if not lost_a_rank(e, survivors):
                    raise
            t0 = time.perf_counter()
            lost = survivors.shrink()
            if fatal and fatal[0] in lost:
                utils.fail(f"{fatal[1]} was lost at step {done['step']}: the run cannot go on without it. "
                           "Restart from the last checkpoint: the same command with --checkpoint PATH --resume",
                           code=1)
            step = recover()
            atexit.register(exit_without_finalize)
            failures.append(dict(ranks=lost, step=step, world_size=survivors.Get_size(),
                                 recovery_time=time.perf_counter() - t0))
            utils.print0(f"rank {', '.join(map(str, lost))} lost at step {step}: continuing on "
                         f"{survivors.Get_size()} ranks ({failures[-1]['recovery_time']:.1f} s)")
    return train_epoch_


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
