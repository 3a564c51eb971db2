"""Asynchronous and bounded-staleness parameter servers, next to the synchronous one of
dist_sgd_param_server.py (which stays the default, --mode sync).

    mpirun -n 5 python dist_sgd_param_server.py --mode async                    # Downpour SGD
    mpirun -n 5 python dist_sgd_param_server.py --mode ssp --staleness 2        # bounded staleness
    mpirun -n 5 python dist_sgd_param_server.py --mode async --staleness-lr --straggler 2:3

async (Dean et al. 2012, "Large Scale Distributed Deep Networks", Downpour SGD): the server
takes the workers' gradients in the order they arrive, applies each at once, and sends that
worker the new weights; no worker waits for another.

ssp (Ho et al. 2013, "More Effective Distributed ML via a Stale Synchronous Parallel
Parameter Server"): the same, but no gradient is ever applied more than --staleness s server
versions after the weights it was computed on were read. The server applies a gradient at
once only if every gradient still being computed stays within s versions of its read; if
not, it holds the gradient, and with it its worker's reply, until the slower workers'
gradients are in. Gradients computed on the oldest weights are applied together, as one
update of their mean (the lr scaled by sqrt(their number), as utils.scaled_lr scales it):
so s = 0 is the synchronous server (W gradients per update, every tau = 0), and a large s
is async. The staleness tau of a gradient is the number of server updates between its
worker's read and its application; every tau goes into the epoch's histogram.

--staleness-lr (Zhang et al. 2016, "Staleness-aware Async-SGD for Distributed Deep
Learning") divides an update's lr by max(1, tau).

--dana (Hakimi et al. 2019, "Taming Momentum in a Distributed Asynchronous Environment",
DANA-Zero): the server keeps one momentum buffer per worker, and applies each worker's
gradient with that worker's buffer. DANA sends each worker the weights where the next W
updates are expected to take them, theta - lr momentum (v_1 + ... + v_W), so that a gradient
is computed close to where it will be applied. Kept in Nesterov's lookahead form, as torch's
SGD keeps its weights, that is exactly one torch Nesterov step per gradient with the sender's
own buffer (tests check the two forms agree). Round robin, W updates then act like one
synchronous step of W batches at W x the lr, with the same momentum: so --dana's default lr
is the synchronous server's over W. With one shared buffer instead, the stale gradients
of all workers compound in it (Mitliagkas et al. 2016), and the lr and momentum must come down.

Data and schedule: a step here is one worker's gradient of --batch-size samples. Each epoch
walks the batches of utils.epoch_order in batches of --batch-size, as cent_sgd.py does with
that batch; the server hands batch k to whichever worker asks next, in the reply's tag, so
that a slow worker takes fewer batches and no batch is taken twice (the first W batches go
one to each worker, unasked). The lr of an update of one gradient is utils.lr_at(gradients
applied before it, gradients in the run), so that with one worker this is centralized SGD
with that batch (tests check it); the default peak lr is utils.scaled_lr(--batch-size),
as each update applies one worker's batch. An epoch ends when all its batches are
applied: the server then sends every worker the final weights with the tag END, in reply to
its last gradient; a worker with no batch this epoch (a run cut short by --max-steps) gets
them too. Every gradient (4P bytes) thus gets exactly one reply of 4P bytes.

--elastic (extensions/elastic.py, under MPI's fault tolerance): when the server's receive from
a worker, or its reply to it, fails because the worker died, the server drops it (Server.lose)
and puts the batch it was computing back at the front of the queue, for the next worker that
asks (or one already done with the epoch). So every batch is still applied once per epoch.
"""
import collections
import math
import time

import numpy as np
import torch
from mpi4py import MPI

import utils
from extensions import elastic

SERVER = 0
GRADIENT = 1  # worker -> server
END = 32767  # server -> worker: the epoch is over, here are the final weights. Any smaller tag
# is the index of the worker's next batch; 32767 is the largest tag every MPI must accept.


TITLE = "asynchronous and bounded-staleness servers (extensions/async_ps.py)"


def add_flags(parser):
    parser.add_argument("--mode", choices=("sync", *MODES), default="sync",
                        help="sync: the server waits for all W gradients; async: it applies each as it "
                             "comes; ssp: as async, with staleness at most --staleness")
    parser.add_argument("--staleness", type=int, default=2,
                        help="ssp: the most server updates a gradient may lag behind the weights it is applied to")
    parser.add_argument("--staleness-lr", action="store_true",
                        help="async, ssp: divide each update's lr by max(1, its staleness) (Zhang et al. 2016)")
    parser.add_argument("--dana", action="store_true",
                        help="async: one momentum buffer per worker on the server (DANA-Zero, Hakimi et al. "
                             "2019); the default lr becomes the synchronous server's over the W workers")


def check(args, world_size, script):
    num_workers = world_size - 1
    if args.staleness < 0:
        utils.fail(f"--staleness must be >= 0, got {args.staleness}")
    if args.dana and args.mode != "async":
        utils.fail(f"--dana needs --mode async, got --mode {args.mode}")
    if args.dana and args.momentum == 0:
        utils.fail("--dana keeps one momentum buffer per worker: it needs --momentum > 0")
    if args.dana and args.lr is None:  # W updates act like one synchronous step (see above)
        args.lr = utils.scaled_lr(num_workers * args.batch_size) / num_workers


# ----- the server -----

class Server:
    """The server's state during one epoch: the version (updates applied), what each worker
    read and which batch it computes, which workers are computing, the gradients held, and
    the batches still to hand out."""

    def __init__(self, num_workers, batches, staleness):
        self.version, self.read = 0, {w: 0 for w in range(1, num_workers + 1)}
        self.batch = {w: w - 1 for w in self.read if w - 1 < batches}  # the first W batches: one each
        self.computing, self.todo = set(self.batch), collections.deque(range(len(self.batch), batches))
        self.held, self.staleness, self.lost = [], staleness, {}  # lost: {worker: when the server noticed}
        self.tau, self.gradients = {}, {w: 0 for w in self.read}

    def lag_after_update(self, applied):
        """How stale the oldest gradient still pending would be after one more update."""
        pending = [self.read[w] for w in self.computing | set(self.held) if w not in applied]
        return self.version + 1 - min(pending, default=self.version + 1)

    def next_update(self):
        """The workers whose held gradients to apply now, as one update, or [] to wait.
        One at a time in arrival order while that keeps every pending gradient within the
        bound; else, once all of them are in, the gradients computed on the oldest weights."""
        for w in self.held:
            if self.lag_after_update({w}) <= self.staleness:
                return [w]
        oldest = min(self.read[w] for w in self.computing | set(self.held)) if self.held else None
        group = sorted(w for w in self.held if self.read[w] == oldest)
        waiting = any(self.read[w] == oldest for w in self.computing)
        return [] if not group or waiting else group

    def arrived(self, worker):
        self.computing.remove(worker)
        self.held.append(worker)

    def applied(self, group):
        """Record one update made of `group`'s gradients; returns their staleness tau."""
        tau = self.version - self.read[group[0]]
        self.version += 1
        self.tau[tau] = self.tau.get(tau, 0) + len(group)
        for w in group:
            self.held.remove(w)
            self.gradients[w] += 1
        return tau

    def assign(self, worker):
        """The next batch for `worker`, which reads the current version; None when none is left."""
        if not self.todo:
            return None
        self.read[worker], self.batch[worker] = self.version, self.todo.popleft()
        self.computing.add(worker)
        return self.batch[worker]

    def lose(self, worker, step=None):
        """--elastic: `worker` is gone (noticed at global `step`). The batch it was computing goes
        first to the next worker that asks; a gradient of its that arrived is still applied.
        Returns that batch, if any."""
        self.lost[worker] = dict(step=step, time=time.time())
        if worker in self.computing:
            self.computing.remove(worker)
            self.todo.appendleft(self.batch[worker])
            return self.batch[worker]
        return None


def serve_epoch(replica, plan, comm, step, batches):
    """Server executes: receive gradients as they come, apply them (see Server.next_update),
    reply to each worker with the new weights and its next batch. With --elastic, a worker
    whose receive or reply fails is dropped (Server.lose). Returns (step, update seconds, stats)."""
    server = EpochServer(replica, plan, comm, step, batches)
    state = server.state
    while state.computing or state.held:
        group = state.next_update()
        if not group:  # wait for the next gradient, from whichever worker sends first
            server.receive_any()
            continue
        server.apply_update(group)
        for w in group:
            if w not in state.lost:
                server.hand_out(w)
    server.send_final_weights()
    return server.step, server.update_time, server.stats()


class EpochServer:
    """serve_epoch's working state: the schedule (Server), the receive posted to each worker
    computing, the workers done with the epoch's batches (`idle`: they wait for its final
    weights), the global step and the seconds spent updating."""

    def __init__(self, replica, plan, comm, step, batches):
        self.replica, self.plan, self.comm, self.step = replica, plan, comm, step
        args = plan.args
        self.device_ok = utils.mpi_is_cuda_aware(replica.flat_params.device)
        staleness = args.staleness if args.mode == "ssp" else math.inf
        num_workers = comm.Get_size() - 1  # --elastic: the workers still here
        self.inbox = replica.inbox[:num_workers]
        self.in_job = job_ranks(comm)  # DANA's buffers are the workers' ranks in the whole job
        self.workers_in_job = MPI.COMM_WORLD.Get_size() - 1
        self.state = state = Server(num_workers, batches, staleness)
        self.requests = [comm.Irecv(self.inbox[w - 1], source=w, tag=GRADIENT) if w in state.computing
                         else MPI.REQUEST_NULL for w in state.read]
        self.idle, self.orphans = [w for w in state.read if w not in state.computing], []
        self.update_time = 0.0

    def receive_any(self):
        """Wait for the first gradient to arrive, and hold it for Server.next_update."""
        try:
            with utils.span("wait", "wait for a worker"):  # --trace: the server idling
                w = MPI.Request.Waitany(self.requests) + 1
        except MPI.Exception as e:
            self.drop_lost_workers(e)
            return
        self.replica.traffic.add({"bytes_sent": 0, "bytes_recv": self.inbox[w - 1].nbytes})
        self.state.arrived(w)

    def apply_update(self, group):
        """One optimizer step on the mean of `group`'s held gradients."""
        replica, args, state = self.replica, self.plan.args, self.state
        optimizer, k = replica.optimizer, len(group)
        tau = state.version - state.read[group[0]]
        # an update of k gradients sits at step / k of total / k steps of a batch k x larger
        lr = utils.lr_at(self.step // k, self.plan.total_steps // k, args.lr * math.sqrt(k), args.warmup)
        t0 = time.perf_counter()
        replica.flat_grads.copy_(self.inbox[[w - 1 for w in group]].sum(dim=0)).div_(k)
        utils.set_lr(optimizer, lr / max(1, tau) if args.staleness_lr else lr)
        if args.dana:
            use_momentum_of(optimizer, self.in_job[group[0]], self.workers_in_job)
        utils.clip_gradients_(optimizer, args.clip_norm)
        optimizer.step()
        utils.sync(replica.flat_params.device)
        self.update_time += time.perf_counter() - t0
        state.applied(group)
        self.step += k

    def hand_out(self, w):
        """Reply to worker w with the new weights and its next batch, or hold it till the end."""
        k = self.state.assign(w)
        if k is None:  # nothing left: it waits for the epoch's final weights
            self.idle.append(w)
            return
        try:
            # its next batch, and the weights to start from
            reply(self.replica.flat_params, self.device_ok, w, k, self.comm, self.replica.traffic)
            self.requests[w - 1] = self.comm.Irecv(self.inbox[w - 1], source=w, tag=GRADIENT)
        except MPI.Exception as e:
            self.drop_lost_workers(e)

    def drop_lost_workers(self, error):
        """--elastic: after a receive or a reply failed, drop every worker now known lost; the
        requests still posted to them are kept, unwaited: one freed while pending is fatal."""
        state, step = self.state, self.step
        lost = (sorted(elastic.lost_ranks(error, self.comm) - {SERVER} - set(state.lost))
                if self.plan.args.elastic else [])
        if not lost:
            raise error
        for w in lost:
            batch = state.lose(w, step)
            self.orphans.append(self.requests[w - 1])
            self.requests[w - 1] = MPI.REQUEST_NULL
            if w in self.idle:
                self.idle.remove(w)
            utils.print0(f"worker {w} lost at step {step}" + ("" if batch is None else
                         f": batch {batch} of the epoch goes to the next worker that asks"), comm=self.comm)
        while state.todo and self.idle:  # a requeued batch, and workers done with the epoch's others
            self.hand_out(self.idle.pop())

    def send_final_weights(self):
        """The epoch's last weights, tagged END, to every worker still waiting for them."""
        for w in list(self.idle):  # a copy: a worker found lost here leaves `idle`
            try:
                reply(self.replica.flat_params, self.device_ok, w, END, self.comm, self.replica.traffic)
            except MPI.Exception as e:  # lost at the end: the survivors learn of it after the epoch
                self.drop_lost_workers(e)

    def stats(self):
        """The epoch's staleness histogram, gradients per worker and (--elastic) the workers lost."""
        state = self.state
        stats = dict(staleness={str(t): n for t, n in sorted(state.tau.items())},
                     gradients_per_worker=[state.gradients[w] for w in sorted(state.gradients)])
        if state.lost:
            stats["lost"] = [dict(rank=w, **when) for w, when in state.lost.items()]
        return stats


def job_ranks(comm):
    """Each rank of `comm`'s rank in the whole job (MPI.COMM_WORLD): the same numbers unless
    --elastic has dropped a rank."""
    return MPI.Group.Translate_ranks(comm.Get_group(), list(range(comm.Get_size())), MPI.COMM_WORLD.Get_group())


def use_momentum_of(optimizer, worker, num_workers):
    """DANA-Zero: make `worker`'s momentum buffers the ones the optimizer's next step updates.
    torch's SGD updates a buffer it finds in place, so each worker's stays its own. They live
    in the optimizer's state, so a checkpoint keeps them. `worker` is its rank in the job: with
    --elastic, a lost worker's buffers are never used again, and the weights keep the lookahead
    they had given them."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if "worker_momentum" not in state:
                state["worker_momentum"] = [torch.zeros_like(p) for _ in range(num_workers)]
            state["momentum_buffer"] = state["worker_momentum"][worker - 1]


def reply(flat_params, device_ok, worker, tag, comm, traffic):
    with utils.staged(flat_params, device_ok, write=False) as buf:
        comm.Send(buf, dest=worker, tag=tag)
    traffic.add({"bytes_sent": flat_params.numel() * 4, "bytes_recv": 0})


# ----- a worker -----

def work_epoch(replica, train, plan, parts, epoch, batches):
    """A worker executes: the gradient of batch k, to the server; the new weights back, and
    in their tag the next k (or END). Returns (mean loss, seconds communicating)."""
    model, flat_params, flat_grads, traffic = replica.model, replica.flat_params, replica.flat_grads, replica.traffic
    args, comm, straggle = plan.args, parts.comm, parts.straggle
    x_train, y_train = train
    device_ok = utils.mpi_is_cuda_aware(x_train.device)
    order, flips = utils.epoch_order(len(x_train), args.seed, epoch)
    order, flips = order.to(x_train.device), flips.to(x_train.device)
    b, status = args.batch_size, MPI.Status()
    k = comm.Get_rank() - 1 if comm.Get_rank() - 1 < batches else None  # the first W batches: one each
    loss_sum, n, comm_time = torch.zeros((), device=x_train.device), 0, 0.0
    while True:
        if k is not None:
            idx, flip = order[k * b:(k + 1) * b], flips[k * b:(k + 1) * b]
            flat_grads.zero_()
            with straggle():
                loss_sum, n = loss_sum + utils.train_step(model, x_train[idx], y_train[idx], flip), n + 1
        t0 = time.perf_counter()
        if k is not None:
            with utils.staged(flat_grads, device_ok, write=False) as buf:
                comm.Send(buf, dest=SERVER, tag=GRADIENT)
            traffic.add({"bytes_sent": flat_grads.numel() * 4, "bytes_recv": 0})
        with utils.staged(flat_params, device_ok, read=False) as buf:
            comm.Recv(buf, source=SERVER, tag=MPI.ANY_TAG, status=status)
        traffic.add({"bytes_sent": 0, "bytes_recv": status.Get_count(MPI.FLOAT) * 4})
        comm_time += time.perf_counter() - t0
        if status.Get_tag() == END:
            return loss_sum.item() / max(1, n), comm_time
        k = status.Get_tag()


# ----- the hook: the epoch that extensions.configure gives dist_sgd_param_server.py -----

def train_epoch(replica, train, plan, parts, epoch, step):
    """One epoch of --mode async or ssp, in the place of the script's synchronous train_epoch
    (each update here is one worker's --batch-size). Returns {"step", "loss": this rank's mean
    loss, "comm_time": its communication time, "update_time": the server's, "stats": the epoch's
    staleness statistics}."""
    args, comm = plan.args, parts.comm
    batches = min(len(train[0]) // args.batch_size, plan.total_steps - step)
    if len(train[0]) // args.batch_size >= END:  # every rank gets here with the same numbers
        utils.fail(f"{len(train[0]) // args.batch_size} batches per epoch: --mode {args.mode} numbers "
                   f"them in message tags below {END}; raise --batch-size", comm=comm)
    if comm.Get_rank() == SERVER:
        step, update_time, stats = serve_epoch(replica, plan, comm, step, batches)
        return {"step": step, "loss": 0.0, "comm_time": 0.0, "update_time": update_time, "stats": stats}
    loss, comm_time = work_epoch(replica, train, plan, parts, epoch, batches)
    return {"step": step + batches, "loss": loss, "comm_time": comm_time, "update_time": 0.0, "stats": {}}


MODES = {"async": train_epoch, "ssp": train_epoch}


def staleness_summary(history):
    """The run's staleness histogram {tau: gradients}, added up over the epochs' histograms."""
    total = {}
    for h in history:
        for tau, n in h.get("staleness", {}).items():
            total[tau] = total.get(tau, 0) + n
    return dict(sorted(total.items(), key=lambda item: int(item[0])))


def histogram_stats(histogram):
    """(mean, max) tau of a {tau: count} histogram."""
    taus = np.array([int(t) for t in histogram], dtype=float)
    counts = np.array(list(histogram.values()), dtype=float)
    return float((taus * counts).sum() / counts.sum()), int(taus.max())
