"""--elastic: when a rank dies, the others go on without it, with MPI's own fault tolerance.

    mpirun --with-ft ulfm --mca pml ob1 --mca btl tcp,self -n 4 python dist_sgd_serverless.py --elastic

The data-parallel scripts meet it through extensions.configure, which calls `configure` (below)
to replace their Parts; fed_avg.py through `survive_clients`. Without --elastic a lost rank
ends the whole job (utils.abort_on_exception), which stays the default.

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

Rank 0 of the new communicator prints and writes from then on: the script asks the communicator
in use (its Parts' comm, the survivors' proxy below) which rank it is. A rank lost
outside a training step (in an evaluation, at a checkpoint) still ends the job.

The parameter server (--mode sync) differs in two ways. Its state is the server's alone, so in
step 3 the survivors take the server's weights and its count of updates. And the workers send
their gradients unweighted: the server weighs them by their shares when it averages. A lost
server cannot be replaced by a worker, which holds no momentum: the job ends, with one line.

The asynchronous servers (--mode async, ssp) redo nothing: no update waits for every worker.
The server notices a lost worker when its receive from it fails, puts the batch that worker was
computing back at the front of the epoch's queue, for the next worker that asks, and goes on
(extensions/async_ps.py). Every batch is still applied once per epoch. The other workers talk to
the server only, so they notice nothing until the epoch's end, where the survivors agree on
whether anyone was lost and shrink before the script's evaluation. DANA's momentum buffers
belong to the workers' ranks in the whole job, so a lost worker's is simply never used again.

FedAvg works in rounds, not steps, and a round is all or nothing. Every rank holds the whole
training set, and a client's batches are seeded by (seed, round, client), not by the rank that
runs it, so a lost rank's clients can run anywhere and compute the same. After each round the
survivors agree (Agree, whose outcome ULFM makes the same on every survivor) on whether every
one of them finished it. If not, they shrink, the lost rank's clients move to the surviving client
ranks, the server puts back the global model (and FedAvgM's momentum) it held at the round's
start, and the whole round is redone with the same clients. The final model equals the
uninterrupted run's, up to the order in which the server adds the clients' weights. SCAFFOLD's
client control variates live on their rank and die with it: --elastic refuses SCAFFOLD.
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


TITLE = "surviving a lost rank (extensions/elastic.py)"


def add_flags(parser):
    parser.add_argument("--elastic", action="store_true",
                        help=f"go on without a rank that dies (needs `{MPIRUN}`); "
                             "default: a lost rank ends the job")


def check(args, world_size, script):
    """--elastic needs an MPI library with ULFM, and mpirun's switch that turns it on."""
    if not args.elastic:
        return
    if not hasattr(MPI.Comm, "Shrink"):
        utils.fail("--elastic needs an MPI library with fault tolerance (ULFM), "
                   "such as Open MPI 5, and mpi4py >= 4")
    if os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() not in ("1", "true", "yes"):
        utils.fail(f"--elastic needs MPI's fault tolerance switched on: launch with `{MPIRUN} -n N ...`")


class ShrinkingComm:
    """A communicator that becomes the survivors' communicator after a failure. It forwards
    every call to the current one, so that the script's code after a recovery (evaluation, the
    results) uses the survivors without being told."""

    def __init__(self, comm):
        self.comm, self.failures = comm, []  # failures: what the results record, one entry per loss

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def shrink(self):
        """Revoke the communicator, so that no survivor stays blocked on it, and make a new
        one of the survivors. Returns the ranks lost, as numbered before."""
        old_rank, old_size = self.comm.Get_rank(), self.comm.Get_size()
        self.comm.Revoke()
        self.comm = self.comm.Shrink()
        self.old_ranks = self.comm.allgather(old_rank)  # the survivors' ranks before, in their new order
        return sorted(set(range(old_size)) - set(self.old_ranks))


def configure(script, parts, replica, plan):
    """--elastic: make the script's Parts go on without a rank that dies. The survivors' communicator
    replaces the script's; the serverless script and the synchronous server also get the weighted
    average, and an epoch that redoes the step a lost rank interrupted."""
    if script == "dist_sgd_serverless":
        survive(parts, replica, plan)
    elif plan.args.mode == "sync":
        survive_server(parts, replica, plan)
    else:
        survive_async(parts)


def survive(parts, replica, plan):
    """dist_sgd_serverless.py: a lost rank is dropped and the epoch goes on without it."""
    survivors, done, global_batch = ShrinkingComm(parts.comm), {"step": 0}, plan.global_batch

    def weighted_average_(flat_grads, comm, allreduce_, device_ok=False):
        """Weight this rank's gradient by its share of the global batch, then sum: the mean
        over the batch, for shares of any size."""
        flat_grads.mul_(share(comm.Get_rank(), comm.Get_size(), global_batch) / global_batch)
        with utils.staged(flat_grads, device_ok) as buf:
            moved = allreduce_(buf, comm)
        step_done(done, survivors.failures)  # the update that follows is local and cannot fail
        return moved

    def recover():
        return agree_on_state(survivors, done["step"], replica.model, replica.optimizer, replica.flat_params)

    parts.comm, parts.average_ = survivors, weighted_average_
    parts.train_epoch = retrying(parts.train_epoch, survivors, done, recover)


def share(rank, size, global_batch):
    """How many of the global batch's samples rank `rank` of `size` takes, as utils.batches cuts it."""
    return len(range(rank, global_batch, size))


def survive_server(parts, replica, plan):
    """dist_sgd_param_server.py --mode sync: a lost worker is dropped. The server (rank 0) holds the
    only optimizer state, so after a failure the workers take its weights and its step count. A
    lost server ends the job, with a line that says how to restart from the last checkpoint."""
    survivors, done, global_batch = ShrinkingComm(parts.comm), {"step": 0}, plan.global_batch

    def weighted_average_(flat_grads, inbox):
        """The server's average, each worker's gradient weighted by its share of the global
        batch: the batch mean for shares of any size; the plain mean while they are equal."""
        shares = [share(w, len(inbox), global_batch) for w in range(len(inbox))]
        if len(set(shares)) == 1:
            flat_grads.copy_(inbox.sum(dim=0)).div_(len(inbox))
        else:
            weights = torch.tensor(shares, dtype=inbox.dtype, device=inbox.device) / global_batch
            flat_grads.copy_((weights[:, None] * inbox).sum(dim=0))
        step_done(done, survivors.failures)  # the update that follows is local and cannot fail

    def recover():
        step = survivors.bcast(done["step"], root=0)  # the server's count of updates
        with utils.staged(replica.flat_params) as buf:
            survivors.Bcast(buf, root=0)
        return step

    parts.comm, parts.average_ = survivors, weighted_average_
    parts.train_epoch = retrying(parts.train_epoch, survivors, done, recover,
                                 fatal=(0, "the parameter server (rank 0)"))


def survive_async(parts):
    """dist_sgd_param_server.py --mode async or ssp: no step waits for every worker, so nothing
    is redone. The server notices a lost worker mid-epoch, gives the batch it was computing to
    another worker and goes on without it (extensions/async_ps.py); the other workers talk to
    the server only and never notice. At the epoch's end the survivors agree on whether anyone
    was lost, and if so shrink, before the script's evaluation and its collectives. A lost
    server ends the job, with a line that says how to restart."""
    survivors, train_epoch = ShrinkingComm(parts.comm), parts.train_epoch

    def train_epoch_(replica, train, plan, parts, epoch, step):
        try:
            out = train_epoch(replica, train, plan, parts, epoch, step)
            complete = 0 if out["stats"].get("lost") else 1  # only the server's record names the lost
        except MPI.Exception as e:  # a worker's receive from the server failed: the server is lost
            if not lost_a_rank(e, survivors):
                raise
            out, complete = None, 0
        lost, t0 = shrink_unless_all_finished(survivors, complete, "the parameter server (rank 0)", "every worker",
                                              f"in the epoch that began at step {step}")
        if not lost:
            return out
        survivors.failures.append(dict(ranks=lost, step=out["step"] if out else step,
                                       world_size=survivors.Get_size(), recovery_time=time.perf_counter() - t0))
        utils.print0(f"rank {', '.join(map(str, lost))} lost: the epoch ended without it; continuing on "
                     f"{survivors.Get_size()} ranks ({survivors.failures[-1]['recovery_time']:.1f} s)", comm=survivors)
        return out

    parts.comm, parts.train_epoch = survivors, train_epoch_


def shrink_unless_all_finished(survivors, finished, server, others, when):
    """Agree (ULFM's MPI_Comm_agree, the same answer on every survivor) on whether every
    survivor `finished` (1) its round or epoch. If so, return ([], None). If not, shrink to the
    survivors and return (the ranks lost, the time the recovery began). A lost `server` (rank 0),
    or the loss of all the `others`, ends the job with one line that says `when`."""
    try:
        finished = survivors.Agree(finished)
    except MPI.Exception as e:  # raised on every survivor alike
        if not lost_a_rank(e, survivors):
            raise
        finished = 0
    if finished:
        return [], None
    t0 = time.perf_counter()
    lost = survivors.shrink()
    if 0 in lost:
        give_up(server, when, survivors)
    if survivors.Get_size() < 2:
        give_up(others, when, survivors)
    leave_without_finalize(survivors)
    return lost, t0


def lost_ranks(error, comm):
    """The ranks of `comm` known to be lost, after the MPI error `error` (re-raised if it is not
    a rank's loss)."""
    if not lost_a_rank(error, comm):
        raise error
    failed = comm.Get_failed()
    return set(MPI.Group.Translate_ranks(failed, list(range(failed.Get_size())), comm.Get_group()))


def survive_clients(parts, replica, fed):
    """fed_avg.py: its Parts' federated_round, made to redo a round in which a client rank is lost
    on the survivors, the lost rank's clients moved to them (`fed.host`, client k's rank, changes
    in place). A lost server ends the job, with a line that says how to restart."""
    survivors, federated_round, interrupted = ShrinkingComm(parts.comm), parts.federated_round, []
    algo, flat_params, host = parts.algorithm, replica.flat_params, fed.host

    def federated_round_(replica, train, fed, parts, clients, round_):
        server = survivors.Get_rank() == 0
        if server:  # what the round changes on the server, to put back if it is redone
            start = flat_params.clone(), {k: v.clone() for k, v in algo.state(survivors, [], host).items()}
        while True:
            try:
                result, finished = federated_round(replica, train, fed, parts, clients, round_), 1
            except MPI.Exception as e:
                if not lost_a_rank(e, survivors):
                    raise
                survivors.Revoke()  # wake the ranks still waiting on this round
                # fed_avg.py's waits test their requests (MPI.Request.Testall), so some were still
                # pending when this was raised. Keep them, through the error's traceback: a
                # request freed while pending reports its failure later as fatal (seen).
                interrupted.append(e)
                result, finished = None, 0
            lost, t0 = shrink_unless_all_finished(survivors, finished, "the server (rank 0)", "every client rank",
                                                  f"in round {round_ + 1}")
            if not lost:
                return result
            moved = move_clients_(host, lost, survivors.old_ranks)
            if server:
                flat_params.copy_(start[0])
                algo.load_state_(start[1])
            survivors.failures.append(dict(ranks=lost, round=round_ + 1, world_size=survivors.Get_size(),
                                           moved=moved, recovery_time=time.perf_counter() - t0))
            utils.print0(f"rank {', '.join(map(str, lost))} lost in round {round_ + 1}: clients "
                         f"{', '.join(map(str, moved))} moved; redoing the round on {survivors.Get_size()} "
                         f"ranks ({survivors.failures[-1]['recovery_time']:.1f} s)", comm=survivors)

    parts.comm, parts.federated_round = survivors, federated_round_


def move_clients_(host, lost, old_ranks):
    """Renumber `host` (client k's rank) in place for the survivors, `old_ranks[r]` being new rank
    r's rank before, and deal the clients of the `lost` ranks out to the client ranks (1, 2, ...)
    in turn. Returns the clients moved."""
    new_rank = {old: new for new, old in enumerate(old_ranks)}
    moved = [k for k, r in enumerate(host) if r in lost]
    for k, r in enumerate(host):
        if r not in lost:
            host[k] = new_rank[r]
    for i, k in enumerate(moved):
        host[k] = 1 + i % (len(old_ranks) - 1)
    return moved


def lost_a_rank(error, comm):
    """Whether an MPI error means a rank was lost. A Waitall on several requests reports the
    failure of one as ERR_IN_STATUS; then the communicator's group of failed ranks tells."""
    if error.Get_error_class() in LOST:
        return True
    return error.Get_error_class() == MPI.ERR_IN_STATUS and comm.Get_failed().Get_size() > 0


def give_up(who, when, comm):
    """End the job: one line from the survivors' rank 0 (of `comm`), and exit status 1 on every
    survivor. Not through utils.fail: after an earlier recovery, exit_without_finalize would exit 0."""
    if comm.Get_rank() == 0:
        print(f"error: {who} was lost {when}: the run cannot go on without it. Restart from the last "
              "checkpoint: the same command with --checkpoint PATH --resume", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # without MPI_Finalize, which can wait forever on the dead rank


def leave_without_finalize(comm):
    """From now on, end without MPI_Finalize (registered once, however many failures)."""
    atexit.unregister(exit_without_finalize)
    atexit.register(exit_without_finalize, comm)


def exit_without_finalize(comm, patience=120):
    """After a failure, leave without MPI_Finalize: in Open MPI 5 it can wait forever on the
    dead rank (open-mpi/ompi#11404; it hung here now and then). But first wait for the other
    survivors: once a rank has exited with an error, Open MPI's runtime kills the whole job as
    soon as any other rank ends (seen: fed_avg.py's clients, done, killed the server while it
    evaluated the last round). The wait is a barrier, given up after `patience` seconds, for a
    rank that never comes. Registered after mpi4py's own exit handler, so it runs before it."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        request, deadline = comm.Ibarrier(), time.monotonic() + patience
        while not request.Test() and time.monotonic() < deadline:
            time.sleep(0.01)
    except MPI.Exception:  # another failure: nothing to wait for
        pass
    os._exit(0)


def step_done(done, failures):
    done["step"] += 1
    if failures and "next_step_at" not in failures[-1]:
        failures[-1]["next_step_at"] = time.time()  # the first step after a recovery


def retrying(train_epoch, survivors, done, recover, fatal=None):
    """train_epoch on the survivors: when a rank is lost, shrink, `recover()` the step to go on
    from, and go on from it. `fatal`: (rank, its name), a rank whose loss ends the job."""
    def train_epoch_(replica, train, plan, parts, epoch, step):
        while True:
            done["step"] = step
            try:
                return train_epoch(replica, train, plan, parts, epoch, step)
            except MPI.Exception as e:
                if not lost_a_rank(e, survivors):
                    raise
            t0 = time.perf_counter()
            lost = survivors.shrink()
            if fatal and fatal[0] in lost:
                give_up(fatal[1], f"at step {done['step']}", survivors)
            step = recover()
            leave_without_finalize(survivors)
            survivors.failures.append(dict(ranks=lost, step=step, world_size=survivors.Get_size(),
                                           recovery_time=time.perf_counter() - t0))
            utils.print0(f"rank {', '.join(map(str, lost))} lost at step {step}: continuing on "
                         f"{survivors.Get_size()} ranks ({survivors.failures[-1]['recovery_time']:.1f} s)",
                         comm=survivors)
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
