"""Synchronous data-parallel SGD with a parameter server on CIFAR-10 (Q3).

    mpirun -n 5 python dist_sgd_param_server.py                       # 1 server + 4 workers
    mpirun -n 3 python dist_sgd_param_server.py --dataset synthetic   # 1 server + 2 workers
    mpirun -n 5 python dist_sgd_param_server.py --checkpoint ckpt.pt --resume
                                                                      # rerun after a crash
    (as root or in Colab, add: --allow-run-as-root --oversubscribe)

Rank 0 is the server and ranks 1..N-1 are the W = N-1 workers. Each step, worker w computes
gradients on its strided share of a global batch of W x --batch-size samples and sends
them to the server as one flat float32 buffer. The server averages the W gradients, takes
the SGD step (only the server holds optimizer state, such as momentum) and sends the new
parameters back to every worker. Without BatchNorm this is exactly centralized SGD with
batch W x --batch-size, and serverless SGD with W ranks (tests check it). The default lr
is scaled with the global batch as in dist_sgd_serverless.py, so 5 ranks here (4 workers)
train like `mpirun -n 4 python dist_sgd_serverless.py`.

Per step, each worker sends and receives P float32 (4P bytes each way) and the server
receives and sends W x 4P bytes: all traffic goes through the server's link.

Beyond the assignment: --mode async (Downpour SGD) and --mode ssp (bounded staleness), in
extensions/async_ps.py; --straggler RANK:FACTOR, a worker slowed on purpose for
experiments, in extensions/stragglers.py; and --elastic, which goes on without a worker that
dies (extensions/elastic.py). The default, --mode sync, is the server above.
"""
import argparse
import contextlib
import dataclasses
import time
import typing

import numpy as np
import torch
from mpi4py import MPI

import extensions
import utils

SERVER = 0
GRADIENTS, PARAMETERS = 1, 2  # message tags, so a reader sees which is which


# ----- communication: one function per pattern -----
# Point-to-point (Send/Recv) rather than MPI_Gather and MPI_Bcast: a collective may pick a
# tree in which workers forward each other's data, so the per-rank traffic would be the
# library's choice. With Send/Recv every gradient goes from a worker straight to the
# server and every parameter copy straight back: what runs is the parameter-server
# pattern, and the bytes each function counts are exactly what its rank puts on (or takes
# off) the wire. Each returns {"bytes_sent", "bytes_recv"} for this rank.
# Only uppercase (buffer) calls: the lowercase ones would pickle.

@utils.traced("star", late=True)  # --trace: one comm span per call
def gather_gradients_(buf, comm):
    """Bring every worker's flat gradient to the server.

    On a worker, `buf` is its flat gradient (P,), which it sends. On the server, `buf` is
    the (W, P) inbox: row w - 1 receives worker w's gradient. The server posts all W
    receives at once and takes the messages in whatever order they arrive, so no worker
    waits for a slower one to be received first.
    """
    ### BEGIN SOLUTION
    # Q3: each worker sends its gradient; the server receives worker w's into row w - 1
    if comm.Get_rank() == SERVER:
        requests = [comm.Irecv(buf[w - 1], source=w, tag=GRADIENTS)
                    for w in range(1, comm.Get_size())]
        MPI.Request.Waitall(requests)
        return {"bytes_sent": 0, "bytes_recv": buf.nbytes}  # W x P x 4
    comm.Send(buf, dest=SERVER, tag=GRADIENTS)
    return {"bytes_sent": buf.nbytes, "bytes_recv": 0}
    ### END SOLUTION


@utils.traced("star")
def send_parameters_(buf, comm):
    """Send the server's flat parameters `buf` (P,) to every worker, one Isend each; a worker
    receives them into its `buf`, in place."""
    ### BEGIN SOLUTION
    # Q3: the server sends its parameters to every worker, which receives them into buf
    if comm.Get_rank() == SERVER:
        requests = [comm.Isend(buf, dest=w, tag=PARAMETERS) for w in range(1, comm.Get_size())]
        MPI.Request.Waitall(requests)
        return {"bytes_sent": (comm.Get_size() - 1) * buf.nbytes, "bytes_recv": 0}
    comm.Recv(buf, source=SERVER, tag=PARAMETERS)
    return {"bytes_sent": 0, "bytes_recv": buf.nbytes}
    ### END SOLUTION


# ----- the two roles -----

@dataclasses.dataclass
class Replica:
    """This rank's copy of what trains. The model's parameters and gradients are views of the two
    flat buffers, so that one call moves them all. Only the server has an optimizer (it alone
    holds the momentum) and an inbox, one row per worker's gradient; `traffic` counts the bytes."""
    model: torch.nn.Module
    optimizer: typing.Optional[torch.optim.Optimizer]
    flat_params: torch.Tensor
    flat_grads: torch.Tensor
    inbox: typing.Optional[torch.Tensor]
    traffic: utils.Traffic


@dataclasses.dataclass
class Plan:
    """What every epoch follows: the flags, the run's steps in all, one step's samples
    over all workers."""
    args: argparse.Namespace
    total_steps: int
    global_batch: int


def average_gradients_(flat_grads, inbox):
    """The mean of the W gradients in the server's inbox: the global batch's mean gradient, as
    every worker's share has the same size. (--elastic weighs unequal shares instead.)"""
    ### BEGIN SOLUTION
    # Q3: flat_grads = the mean of the W gradients in the inbox
    flat_grads.copy_(inbox.sum(dim=0)).div_(len(inbox))
    ### END SOLUTION


def server_step(replica, parts, lr, clip_norm, device_ok):
    """The server's step: wait for all W gradients, average them, take the SGD step (the server
    alone holds the momentum; --clip-norm first), and send the new weights to every worker.
    Returns the seconds spent on the update itself."""
    inbox = replica.inbox[:parts.comm.Get_size() - 1]  # --elastic: fewer workers, fewer rows
    with utils.staged(inbox) as buf:  # (W, P): on the host unless MPI reads GPU memory
        replica.traffic.add(gather_gradients_(buf, parts.comm))
    t0 = time.perf_counter()
    ### BEGIN SOLUTION
    # Q3: average the inbox (parts.average_), clip, set the lr, take the SGD step
    parts.average_(replica.flat_grads, inbox)
    # the global batch's gradient, as cent_sgd.py clips
    utils.clip_gradients_(replica.optimizer, clip_norm)
    utils.set_lr(replica.optimizer, lr)
    replica.optimizer.step()
    ### END SOLUTION
    utils.sync(replica.flat_params.device)
    update_time = time.perf_counter() - t0
    with utils.staged(replica.flat_params, device_ok, write=False) as buf:
        replica.traffic.add(send_parameters_(buf, parts.comm))
    return update_time


def worker_step(replica, parts, batch, device_ok):
    """A worker's step: the gradient of its share of the global batch, `batch` = (images, labels,
    flips), to the server; then the server's new weights, which the model's parameters are views
    of. Returns (the batch's loss, the seconds spent communicating)."""
    replica.flat_grads.zero_()
    with parts.straggle():  # --straggler: a no-op unless this worker is slowed
        loss = utils.train_step(replica.model, *batch)
    t0 = time.perf_counter()
    with utils.staged(replica.flat_grads, device_ok, write=False) as buf:
        replica.traffic.add(gather_gradients_(buf, parts.comm))
    with utils.staged(replica.flat_params, device_ok, read=False) as buf:
        replica.traffic.add(send_parameters_(buf, parts.comm))
    return loss, time.perf_counter() - t0


def train_epoch(replica, train, plan, parts, epoch, step):
    """Epoch `epoch` from global step `step` (its first, unless a resumed run or --elastic starts
    later), in global batches of W x --batch-size: the server runs server_step and each worker
    worker_step on its strided share, in lockstep. Returns {"step", "loss": this rank's mean loss,
    "comm_time": its communication time, "update_time": the server's update time}."""
    args, comm, (x_train, y_train) = plan.args, parts.comm, train
    rank, num_workers = comm.Get_rank(), comm.Get_size() - 1
    device_ok = utils.mpi_is_cuda_aware(x_train.device)
    order, flips = utils.epoch_order(len(x_train), args.seed, epoch)
    taken = step - epoch * (len(x_train) // plan.global_batch)  # steps of this epoch already taken
    # The server walks the same batches only to count the steps; it never reads them.
    shares = utils.batches(order.to(x_train.device), flips.to(x_train.device), plan.global_batch,
                           max(rank - 1, 0), num_workers, start=taken)
    loss_sum, n_steps, comm_time, update_time = torch.zeros((), device=x_train.device), 0, 0.0, 0.0
    for idx, flip in shares:
        if step == plan.total_steps:
            break
        if rank == SERVER:
            lr = utils.lr_at(step, plan.total_steps, args.lr, args.warmup)
            update_time += server_step(replica, parts, lr, args.clip_norm, device_ok)
        else:
            loss, seconds = worker_step(replica, parts, (x_train[idx], y_train[idx], flip),
                                        device_ok)
            loss_sum, comm_time = loss_sum + loss, comm_time + seconds
        step, n_steps = step + 1, n_steps + 1
    return {"step": step, "loss": loss_sum.item() / max(1, n_steps), "comm_time": comm_time,
            "update_time": update_time}


@dataclasses.dataclass
class Parts:
    """The parts of training that a feature beyond the assignment may replace, each by one flag
    (extensions.configure, once, before the loop); the defaults are the assignment's own."""
    comm: MPI.Comm                                   # --elastic: the survivors' communicator
    average_: typing.Callable = average_gradients_   # --elastic: each worker weighed by its share
    straggle: typing.Callable = contextlib.nullcontext   # --straggler: around one worker's compute
    # --mode async|ssp; --elastic: goes on without a worker
    train_epoch: typing.Callable = train_epoch


def check_replicas(flat_params, comm):
    """Every worker must hold the server's final weights: the last send reached them all."""
    checksums = comm.gather(float(flat_params.double().sum()), root=SERVER)
    if comm.Get_rank() == SERVER and len(set(checksums)) != 1:
        utils.fail("the workers' weights differ from the server's: parameter sums "
                   f"{checksums}", code=1)


# ----- training -----

def parse_args(world_size):
    parser = utils.get_parser("dist_sgd_param_server", __doc__.splitlines()[0], epochs=8,
                              batch_size=utils.BASE_BATCH, lr=None,
                              batch_help="samples per worker per step; the global batch is "
                                         "(N-1) x this")
    extensions.add_flags(parser, "dist_sgd_param_server")
    args = parser.parse_args()
    utils.check_args(args)
    if world_size < 2:
        utils.fail("a parameter server needs at least one worker: run with mpirun -n 2 or more "
                   "(rank 0 is the server, ranks 1..N-1 the workers)")
    extensions.check(args, world_size, "dist_sgd_param_server")
    # sync: one step applies W x --batch-size samples; async, ssp: one worker's --batch-size
    # (--dana sets its own)
    args.lr = args.lr or utils.scaled_lr(
        (world_size - 1 if args.mode == "sync" else 1) * args.batch_size)
    return args


def end_epoch(out, model, test, comm, args, t0):
    """After an epoch's steps: the server evaluates, the workers add up their losses and times
    (the server adds zeros), rank 0 prints the epoch's line; every rank stops if training diverged.
    Returns the epoch's record."""
    (x_test, y_test), train_time = test, time.perf_counter() - t0
    test_loss, correct = utils.evaluate(model, x_test, y_test) if comm.Get_rank() == SERVER \
        else (0.0, 0)
    num_workers = comm.Get_size() - 1  # --elastic: the workers still here
    # small
    train_loss, comm_time = comm.allreduce(np.array([out["loss"], out["comm_time"]])) / num_workers
    h = dict(epoch=out["epoch"] + 1, steps=out["step"], train_loss=train_loss,
             test_loss=test_loss / len(x_test), test_acc=100 * correct / len(x_test),
             train_time=train_time, comm_time=comm_time, server_update_time=out["update_time"],
             step_time=train_time / max(1, out["step"] - out["first"]),
             epoch_time=time.perf_counter() - t0, **out.get("stats", {}))
    utils.print0(f"epoch {h['epoch']:3d}/{args.epochs} | train loss {h['train_loss']:.4f} | "
                 f"test acc {h['test_acc']:6.2f}% | {h['epoch_time']:6.1f} s | "
                 f"comm {comm_time:5.2f} s", comm=comm)
    utils.stop_if_diverged(train_loss, comm)
    return h


def report(replica, plan, parts, progress, t_start):
    """Check the workers' weights, gather every rank's bytes, and on the server print and
    save the results."""
    args, comm = plan.args, parts.comm
    check_replicas(replica.flat_params, comm)
    utils.finish_trace(args, comm)
    per_rank_bytes = comm.gather({"bytes_sent": replica.traffic.sent,
                                  "bytes_recv": replica.traffic.received}, root=SERVER)
    if comm.Get_rank() != SERVER:
        return
    history = progress["history"]
    print(f"Final test accuracy: {history[-1]['test_acc']:.2f}%", flush=True)
    utils.save_results(args.results, dict(
        script="dist_sgd_param_server", config=vars(args), world_size=MPI.COMM_WORLD.Get_size(),
        num_workers=comm.Get_size() - 1, global_batch=plan.global_batch,
        threads=torch.get_num_threads(), device=str(replica.flat_params.device),
        params=utils.num_params(replica.model), steps=progress["step"],
        wall_time=time.perf_counter() - t_start, final_test_acc=history[-1]["test_acc"],
        history=history,
        bytes_per_rank=per_rank_bytes,  # index 0 is the server; the setup Bcast is not counted
        comm_fraction=sum(h["comm_time"] for h in history) / sum(h["train_time"] for h in history),
        **({"failures": comm.failures} if args.elastic else {})))
    if args.save_model:
        utils.save_model(args.save_model, replica.model)


def main():
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    utils.abort_on_exception(comm)
    args = parse_args(world_size)
    device, threads = utils.setup(args, comm)
    num_workers, is_server = world_size - 1, rank == SERVER
    global_batch = num_workers * args.batch_size

    # data: every worker holds the whole set and takes its strided share of each global
    # batch; the server uses only the test set
    train, test = utils.load_data(args, device, comm)
    # async: one worker's batch a step
    step_batch = global_batch if args.mode == "sync" else args.batch_size
    plan = Plan(args, utils.count_steps(len(train[0]), step_batch, args), global_batch)

    # model: two flat buffers, so one call moves them all; the server alone has an optimizer
    # and an inbox
    model = utils.make_model(device, args.seed)
    flat_params, flat_grads = utils.flatten_parameters(model)
    optimizer = utils.make_optimizer(model.parameters(), args) if is_server else None
    inbox = utils.mpi_empty((num_workers, utils.num_params(model)), device,
                            utils.mpi_is_cuda_aware(device)) if is_server else None
    utils.print0(f"dist_sgd_param_server | 1 server + {num_workers} workers | "
                 f"{args.dataset}: {len(train[0])} train | {utils.num_params(model):,} params | "
                 f"batch {num_workers} x {args.batch_size} = {global_batch} | lr {args.lr:.4g} | "
                 f"{plan.total_steps} steps | {device} x {threads} threads per rank")

    # resume: every rank reads the checkpoint, though only the server needs the model and optimizer
    progress = utils.load_checkpoint(args, world_size, model, optimizer, dict(
        epoch=0, step=0, history=[], wall_time=0.0, traffic=[[0, 0]] * world_size))
    replica = Replica(model, optimizer, flat_params, flat_grads, inbox,
                      utils.Traffic(*progress["traffic"][rank]))
    # Every worker starts from the server's weights, even if a rank's RNG differs (not counted)
    with utils.staged(flat_params) as buf:
        comm.Bcast(buf, root=SERVER)
    # what --mode, --straggler and --elastic replace (extensions/): nothing, at the defaults
    parts = extensions.configure(args, "dist_sgd_param_server", Parts(comm), replica, plan)

    # train
    t_start = time.perf_counter() - progress["wall_time"]
    for epoch in range(progress["epoch"], args.epochs):
        if progress["step"] == plan.total_steps:
            break
        t0 = time.perf_counter()
        out = parts.train_epoch(replica, train, plan, parts, epoch, progress["step"])
        utils.sync(device)
        h = end_epoch(dict(out, epoch=epoch, first=progress["step"]), model, test, parts.comm,
                      args, t0)
        progress.update(epoch=epoch + 1, step=out["step"], history=progress["history"] + [h],
                        wall_time=time.perf_counter() - t_start,
                        traffic=parts.comm.allgather([replica.traffic.sent,
                                                      replica.traffic.received]))
        # the workers hold nothing the server does not
        if args.checkpoint and parts.comm.Get_rank() == SERVER:
            utils.save_checkpoint(args, world_size, model, optimizer, progress)
    report(replica, plan, parts, progress, t_start)


if __name__ == "__main__":
    main()
