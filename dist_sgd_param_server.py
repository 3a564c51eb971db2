"""Synchronous data-parallel SGD with a parameter server on CIFAR-10 (Q3).

    mpirun -n 5 python dist_sgd_param_server.py                       # 1 server + 4 workers
    mpirun -n 3 python dist_sgd_param_server.py --dataset synthetic   # 1 server + 2 workers
    mpirun -n 5 python dist_sgd_param_server.py --checkpoint ckpt.pt --resume   # rerun after a crash
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
import contextlib
import itertools
import math
import time

import numpy as np
import torch
from mpi4py import MPI

import utils
from extensions import async_ps, elastic, stragglers

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

def gather_gradients_(buf, comm):
    """Bring every worker's flat gradient to the server.

    On a worker, `buf` is its flat gradient (P,), which it sends. On the server, `buf` is
    the (W, P) inbox: row w - 1 receives worker w's gradient. The server posts all W
    receives at once and takes the messages in whatever order they arrive, so no worker
    waits for a slower one to be received first.
    """
    if comm.Get_rank() == SERVER:
        requests = [comm.Irecv(buf[w - 1], source=w, tag=GRADIENTS) for w in range(1, comm.Get_size())]
        MPI.Request.Waitall(requests)
        return {"bytes_sent": 0, "bytes_recv": buf.nbytes}  # W x P x 4
    comm.Send(buf, dest=SERVER, tag=GRADIENTS)
    return {"bytes_sent": buf.nbytes, "bytes_recv": 0}


def send_parameters_(buf, comm):
    """Send the server's flat parameters `buf` (P,) to every worker, one Isend each; a worker
    receives them into its `buf`, in place."""
    if comm.Get_rank() == SERVER:
        requests = [comm.Isend(buf, dest=w, tag=PARAMETERS) for w in range(1, comm.Get_size())]
        MPI.Request.Waitall(requests)
        return {"bytes_sent": (comm.Get_size() - 1) * buf.nbytes, "bytes_recv": 0}
    comm.Recv(buf, source=SERVER, tag=PARAMETERS)
    return {"bytes_sent": 0, "bytes_recv": buf.nbytes}


# ----- the two roles -----

def average_gradients_(flat_grads, inbox):
    """The mean of the W gradients in the server's inbox: the global batch's mean gradient, as
    every worker's share has the same size. (--elastic weighs unequal shares instead.)"""
    flat_grads.copy_(inbox.sum(dim=0)).div_(len(inbox))


def server_step(optimizer, flat_params, flat_grads, inbox, lr, comm, traffic, device_ok, average_, clip_norm):
    """The server's step: wait for all W gradients, average them, take the SGD step (the
    server alone holds the momentum; --clip-norm first), and send the new weights to every worker.
    Returns the seconds spent on the update itself."""
    with utils.staged(inbox) as buf:  # (W, P): on the host unless MPI reads GPU memory
        traffic.add(gather_gradients_(buf, comm))
    t0 = time.perf_counter()
    average_(flat_grads, inbox)
    utils.clip_gradients_(optimizer, clip_norm)  # the global batch's gradient, as cent_sgd.py clips
    utils.set_lr(optimizer, lr)
    optimizer.step()
    utils.sync(flat_params.device)
    update_time = time.perf_counter() - t0
    with utils.staged(flat_params, device_ok, write=False) as buf:
        traffic.add(send_parameters_(buf, comm))
    return update_time


def worker_step(model, flat_params, flat_grads, x, y, flip, comm, traffic, device_ok,
                straggle=contextlib.nullcontext):
    """A worker's step: the gradient of its share of the global batch, to the server; then
    the server's new weights, which the model's parameters are views of. `straggle` wraps
    the compute (--straggler). Returns (the batch's loss, the seconds spent communicating)."""
    flat_grads.zero_()
    with straggle():
        loss = utils.train_step(model, x, y, flip)
    t0 = time.perf_counter()
    with utils.staged(flat_grads, device_ok, write=False) as buf:
        traffic.add(gather_gradients_(buf, comm))
    with utils.staged(flat_params, device_ok, read=False) as buf:
        traffic.add(send_parameters_(buf, comm))
    return loss, time.perf_counter() - t0


def train_epoch(model, optimizer, flat_params, flat_grads, inbox, train, epoch, total_steps, global_batch,
                args, traffic, *, step, comm, average_=average_gradients_):
    """The rest of an epoch from global step `step` (its start, unless --elastic redoes one), in
    global batches of W x --batch-size: the server runs server_step and each worker worker_step
    on its strided share, in lockstep. Returns (step, this rank's mean loss, its communication
    time, the server's update time, {} (what other modes add to the epoch's record))."""
    rank, num_workers = comm.Get_rank(), comm.Get_size() - 1
    inbox = inbox[:num_workers] if rank == SERVER else None  # --elastic: fewer workers, fewer rows
    x_train, y_train = train
    device_ok = utils.mpi_is_cuda_aware(x_train.device)
    straggle = stragglers.slowdown(args, rank, x_train.device)
    order, flips = utils.epoch_order(len(x_train), args.seed, epoch)
    order, flips = order.to(x_train.device), flips.to(x_train.device)
    # The server walks the same batches only to count the steps; it never reads them.
    shares = utils.batches(order, flips, global_batch, max(rank - 1, 0), num_workers)
    done_this_epoch = step - epoch * (len(x_train) // global_batch)
    loss_sum, n_steps, comm_time, update_time = torch.zeros((), device=x_train.device), 0, 0.0, 0.0
    for idx, flip in itertools.islice(shares, done_this_epoch, None):
        if step == total_steps:
            break
        if rank == SERVER:
            lr = utils.lr_at(step, total_steps, args.lr, args.warmup)
            update_time += server_step(optimizer, flat_params, flat_grads, inbox, lr, comm, traffic, device_ok,
                                       average_, args.clip_norm)
        else:
            loss, seconds = worker_step(model, flat_params, flat_grads, x_train[idx], y_train[idx], flip,
                                        comm, traffic, device_ok, straggle)
            loss_sum, comm_time = loss_sum + loss, comm_time + seconds
        step, n_steps = step + 1, n_steps + 1
    return step, loss_sum.item() / max(1, n_steps), comm_time, update_time, {}


# --mode: the assignment's synchronous epoch, or async / ssp from extensions/async_ps.py
MODES = {"sync": train_epoch, **async_ps.MODES}


def check_replicas(flat_params, comm):
    """Every worker must hold the server's final weights: the last send reached them all."""
    checksums = comm.gather(float(flat_params.double().sum()), root=SERVER)
    if comm.Get_rank() == SERVER and len(set(checksums)) != 1:
        utils.fail(f"the workers' weights differ from the server's: parameter sums {checksums}", code=1)


# ----- training -----

def parse_args(world_size):
    parser = utils.get_parser("dist_sgd_param_server", __doc__.splitlines()[0], epochs=8,
                              batch_size=utils.BASE_BATCH, lr=None,
                              batch_help="samples per worker per step; the global batch is (N-1) x this")
    parser.add_argument("--mode", choices=tuple(MODES), default="sync",
                        help="sync: the server waits for all W gradients; async: it applies each as it "
                             "comes; ssp: as async, with staleness at most --staleness (extensions/async_ps.py)")
    async_ps.add_flags(parser)
    stragglers.add_flags(parser)
    elastic.add_flags(parser)
    args = parser.parse_args()
    utils.check_args(args)
    if world_size < 2:
        utils.fail("a parameter server needs at least one worker: run with mpirun -n 2 or more "
                   "(rank 0 is the server, ranks 1..N-1 the workers)")
    async_ps.check(args, world_size - 1)
    stragglers.check(args, world_size, first=1)
    elastic.check(args)
    # sync: one step applies W x --batch-size samples; async, ssp: one worker's --batch-size (--dana sets its own)
    args.lr = args.lr or utils.scaled_lr((world_size - 1 if args.mode == "sync" else 1) * args.batch_size)
    return args


def main():
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    is_root = rank == SERVER  # the server: it also evaluates, prints and saves
    utils.abort_on_exception(comm)
    args = parse_args(world_size)
    device, threads = utils.setup(args, comm)
    num_workers = world_size - 1
    global_batch = num_workers * args.batch_size

    # data: every worker holds the whole set and takes its strided share of each global
    # batch; the server uses only the test set
    train, (x_test, y_test) = utils.load_data(args, device, comm)
    total_steps = utils.count_steps(len(train[0]), global_batch if args.mode == "sync" else args.batch_size, args)

    # model: two flat buffers, so one call moves them all; the server alone has an optimizer and an inbox
    model = utils.make_model(device, args.seed)
    flat_params, flat_grads = utils.flatten_parameters(model)
    optimizer = utils.make_optimizer(model.parameters(), args) if is_root else None
    inbox = utils.mpi_empty((num_workers, utils.num_params(model)), device, utils.mpi_is_cuda_aware(device)) \
        if is_root else None
    utils.print0(f"dist_sgd_param_server | 1 server + {num_workers} workers | {args.dataset}: {len(train[0])} "
                 f"train | {utils.num_params(model):,} params | batch {num_workers} x {args.batch_size} = "
                 f"{global_batch} | lr {args.lr:.4g} | {total_steps} steps | {device} x {threads} threads per rank")

    # resume: every rank reads the checkpoint, though only the server needs the model and optimizer
    progress = utils.load_checkpoint(args, world_size, model, optimizer, dict(
        epoch=0, step=0, history=[], wall_time=0.0, traffic=[[0, 0]] * world_size))
    traffic = utils.Traffic(*progress["traffic"][rank])
    # Every worker starts from the server's weights, even if a rank's RNG differs (not counted)
    with utils.staged(flat_params) as buf:
        comm.Bcast(buf, root=SERVER)

    # train; with --elastic a lost worker is dropped and the run goes on without it (extensions/elastic.py)
    comm, train_epoch_, failures = (elastic.survive_server(comm, args.mode, MODES[args.mode], flat_params, global_batch)
                                    if args.elastic else (comm, MODES[args.mode], None))
    t_start = time.perf_counter() - progress["wall_time"]
    for epoch in range(progress["epoch"], args.epochs):
        if progress["step"] == total_steps:
            break
        t0 = time.perf_counter()
        step, train_loss, comm_time, update_time, extra = train_epoch_(
            model, optimizer, flat_params, flat_grads, inbox, train, epoch, total_steps, global_batch,
            args, traffic, step=progress["step"], comm=comm)
        utils.sync(device)
        train_time = time.perf_counter() - t0
        # The server evaluates; the workers add up their losses and comm times (the server adds zeros)
        test_loss, correct = utils.evaluate(model, x_test, y_test) if is_root else (0.0, 0)
        num_workers = comm.Get_size() - 1  # --elastic: the workers still here
        train_loss, comm_time = comm.allreduce(np.array([train_loss, comm_time])) / num_workers  # small
        h = dict(epoch=epoch + 1, steps=step, train_loss=train_loss, test_loss=test_loss / len(x_test),
                 test_acc=100 * correct / len(x_test), train_time=train_time, comm_time=comm_time,
                 server_update_time=update_time, step_time=train_time / max(1, step - progress["step"]),
                 epoch_time=time.perf_counter() - t0, **extra)
        utils.print0(f"epoch {h['epoch']:3d}/{args.epochs} | train loss {h['train_loss']:.4f} | "
                     f"test acc {h['test_acc']:6.2f}% | {h['epoch_time']:6.1f} s | comm {comm_time:5.2f} s")
        if not math.isfinite(train_loss):
            utils.fail(f"training diverged (train loss {train_loss}); lower --lr", code=1)
        progress.update(epoch=epoch + 1, step=step, history=progress["history"] + [h],
                        wall_time=time.perf_counter() - t_start,
                        traffic=comm.allgather([traffic.sent, traffic.received]))
        if args.checkpoint and is_root:  # the workers hold nothing the server does not
            utils.save_checkpoint(args, world_size, model, optimizer, progress)

    # report
    check_replicas(flat_params, comm)
    per_rank_bytes = comm.gather({"bytes_sent": traffic.sent, "bytes_recv": traffic.received}, root=SERVER)
    if is_root:
        history = progress["history"]
        print(f"Final test accuracy: {history[-1]['test_acc']:.2f}%", flush=True)
        utils.save_results(args.results, dict(
            script="dist_sgd_param_server", config=vars(args), world_size=world_size,
            num_workers=num_workers, global_batch=global_batch, threads=threads, device=str(device),
            params=utils.num_params(model), steps=progress["step"], wall_time=time.perf_counter() - t_start,
            final_test_acc=history[-1]["test_acc"], history=history,
            bytes_per_rank=per_rank_bytes,  # index 0 is the server; the setup Bcast is not counted
            comm_fraction=sum(h["comm_time"] for h in history) / sum(h["train_time"] for h in history),
            **({"failures": failures} if args.elastic else {})))
        if args.save_model:
            utils.save_model(args.save_model, model)


if __name__ == "__main__":
    main()
