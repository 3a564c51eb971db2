"""Serverless data-parallel SGD on CIFAR-10 (Q2): gradients averaged by all-reduce, no server.

    mpirun -n 4 python dist_sgd_serverless.py                    # MPI_Allreduce
    mpirun -n 4 python dist_sgd_serverless.py --allreduce ring   # hand-written ring (Q7)
    mpirun -n 4 python dist_sgd_serverless.py --dataset synthetic
    mpirun -n 4 python dist_sgd_serverless.py --compress powersgd
                                                         # fewer bytes: fp16, topk, powersgd
    mpirun -n 4 python dist_sgd_serverless.py --checkpoint ckpt.pt --resume   # rerun after a crash
    (as root or in Colab, add: --allow-run-as-root --oversubscribe)

Every rank holds a full replica of the model. Each step, rank r of N computes gradients on
its strided share of a global batch of N x --batch-size samples; one all-reduce of a flat
float32 buffer sums the gradients, each rank divides by N and applies the same SGD step,
so the replicas stay identical. Without BatchNorm this is exactly centralized SGD with
batch N x --batch-size (tests check it). The default lr is cent_sgd.py's, scaled by the
square root of the batch growth (utils.scaled_lr).
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
from extensions import compression


# ----- communication: one function per pattern -----
# Each function sums a 1-D contiguous numpy buffer over all ranks in place and returns
# {"steps", "bytes_sent", "bytes_recv"} for this rank, so tests and benchmarks can check
# the cost model. Only uppercase (buffer) calls: the lowercase ones would pickle.

@utils.traced("all", late=True)  # --trace: a comm span per call (utils.traced)
def mpi_allreduce_(buf, comm):
    """Sum `buf` over all ranks in place with the library's MPI_Allreduce (the reference).

    Open MPI picks the algorithm by message size and process count, so steps and bytes
    are unknown here and reported as None.
    """
    ### BEGIN SOLUTION
    # Q2: sum buf over all ranks in place with one comm.Allreduce; counts: None
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return {"steps": None, "bytes_sent": None, "bytes_recv": None}
    ### END SOLUTION


@utils.traced("all", late=True)
def ring_allreduce_(buf, comm):
    """Sum `buf` over all ranks in place with a ring: reduce-scatter, then all-gather.

    The buffer is cut into N chunks with np.array_split boundaries (sizes differ by at
    most one; chunks may be empty when P < N). Each of the 2(N-1) steps sends one chunk
    to the right neighbour and receives one from the left, so every rank sends about
    2(N-1)/N * P elements, whatever N is: bandwidth-optimal, but 2(N-1) latencies.
    Exactly, with c[i] the size of chunk i and P = len(buf), rank r
      sends    2P - c[(r+1) % N] - c[(r+2) % N]  elements,
      receives 2P - c[r]         - c[(r+1) % N]  elements.
    """
    ### BEGIN SOLUTION
    # Q7: the ring all-reduce: reduce-scatter, then all-gather; count steps, bytes
    rank, n = comm.Get_rank(), comm.Get_size()
    stats = {"steps": 2 * (n - 1), "bytes_sent": 0, "bytes_recv": 0}
    if n == 1:
        return stats
    chunks = np.array_split(buf, n)  # views into buf, so writing a chunk writes buf
    # One scratch chunk for the whole call: incoming partial sums must not overwrite our
    # own partial sum before we add them. Chunk 0 is the largest.
    scratch = np.empty_like(chunks[0])
    right, left = (rank + 1) % n, (rank - 1) % n

    # Reduce-scatter: after step s, chunk (rank - s - 1) holds the sum over s + 2 ranks;
    # after N-1 steps this rank owns the full sum of chunk (rank + 1).
    for s in range(n - 1):
        send, recv = chunks[(rank - s) % n], chunks[(rank - s - 1) % n]
        incoming = scratch[:recv.size]
        comm.Sendrecv(send, dest=right, recvbuf=incoming, source=left)
        np.add(recv, incoming, out=recv)
        stats["bytes_sent"] += send.nbytes
        stats["bytes_recv"] += incoming.nbytes

    # All-gather: pass the finished chunks around; they are final, so receive in place.
    for s in range(n - 1):
        send, recv = chunks[(rank + 1 - s) % n], chunks[(rank - s) % n]
        comm.Sendrecv(send, dest=right, recvbuf=recv, source=left)
        stats["bytes_sent"] += send.nbytes
        stats["bytes_recv"] += recv.nbytes
    return stats
    ### END SOLUTION


@utils.traced("all", late=True)
def tree_allreduce_(buf, comm):
    """Sum `buf` over all ranks in place: binomial-tree reduce to rank 0, then broadcast.

    Round k pairs ranks 2^k apart, so there are ceil(log2 N) rounds each way, for any N.
    The whole buffer moves on every edge: few latencies but P elements per message, and
    rank 0 sends and receives ceil(log2 N) * P elements, a bottleneck for large P.
    Rank r > 0 has one parent and children r + 2^k for 2^k < lowbit(r) and r + 2^k < N
    (rank 0: all 2^k < N); it sends and receives (parent + children) * P elements.
    """
    ### BEGIN SOLUTION
    # Q7: the tree all-reduce: binomial-tree reduce to rank 0, then broadcast
    rank, n = comm.Get_rank(), comm.Get_size()
    masks = [1 << k for k in range((n - 1).bit_length())]  # ceil(log2 N) rounds
    stats = {"steps": 2 * len(masks), "bytes_sent": 0, "bytes_recv": 0}
    scratch = None

    # Reduce: a rank adds in its children's sums, then hands its own up and stops.
    for mask in masks:
        if rank & mask:
            comm.Send(buf, dest=rank - mask)
            stats["bytes_sent"] += buf.nbytes
            break
        if rank + mask < n:
            if scratch is None:  # allocated once, and only on ranks that have children
                scratch = np.empty_like(buf)
            comm.Recv(scratch, source=rank + mask)
            np.add(buf, scratch, out=buf)
            stats["bytes_recv"] += scratch.nbytes

    # Broadcast down the same tree, largest subtree first, so rank 0's sum reaches all.
    for mask in reversed(masks):
        if rank % (2 * mask) == 0 and rank + mask < n:
            comm.Send(buf, dest=rank + mask)
            stats["bytes_sent"] += buf.nbytes
        elif rank % (2 * mask) == mask:
            comm.Recv(buf, source=rank - mask)
            stats["bytes_recv"] += buf.nbytes
    return stats
    ### END SOLUTION


ALLREDUCE = {"mpi": mpi_allreduce_, "ring": ring_allreduce_, "tree": tree_allreduce_}


def broadcast_parameters_(flat_params, comm):
    """Every replica starts from rank 0's weights. Seeding alone would also do here, but
    this holds even when ranks' RNGs differ (another torch build, another GPU)."""
    with utils.staged(flat_params) as buf:
        comm.Bcast(buf, root=0)


@utils.traced("all", late=True)
def average_gradients_(flat_grads, comm, allreduce_, device_ok=False):
    """Sum the flat gradient over the ranks with `allreduce_`, then divide: every rank gets the
    global mean. `device_ok`: a CUDA-aware MPI_Allreduce reads GPU memory itself."""
    ### BEGIN SOLUTION
    # Q2: sum flat_grads over the ranks with allreduce_, divide by N; return its counts
    with utils.staged(flat_grads, device_ok) as buf:
        moved = allreduce_(buf, comm)
    flat_grads.div_(comm.Get_size())
    return moved
    ### END SOLUTION


# ----- training -----

@dataclasses.dataclass
class Replica:
    """This rank's copy of what trains. The model's parameters and gradients are views of the two
    flat buffers, so that one call moves them all; `traffic` counts the bytes this rank moved."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    flat_params: torch.Tensor
    flat_grads: torch.Tensor
    traffic: utils.Traffic


@dataclasses.dataclass
class Plan:
    """What every epoch follows: the flags, the run's steps in all, one step's samples
    over all ranks."""
    args: argparse.Namespace
    total_steps: int
    global_batch: int


def train_epoch(replica, train, plan, parts, epoch, step):
    """Epoch `epoch`, from global step `step` (its first, unless a resumed run or --elastic starts
    later). Each step: the gradient of this rank's strided share of the global batch (N x
    --batch-size), its average over the ranks (parts.average_), and the same SGD step on every
    rank. Returns {"step": the next step, "loss": the mean loss, "in_call": the seconds this rank
    spent in the average at each step}."""
    args, comm, (x_train, y_train) = plan.args, parts.comm, train
    allreduce_ = ALLREDUCE[args.allreduce]
    device_ok = args.allreduce == "mpi" and utils.mpi_is_cuda_aware(x_train.device)
    order, flips = utils.epoch_order(len(x_train), args.seed, epoch)
    taken = step - epoch * (len(x_train) // plan.global_batch)  # steps of this epoch already taken
    shares = utils.batches(order.to(x_train.device), flips.to(x_train.device), plan.global_batch,
                           comm.Get_rank(), comm.Get_size(), start=taken)
    loss_sum, in_call = torch.zeros((), device=x_train.device), []
    for idx, flip in shares:
        if step == plan.total_steps:
            break
        utils.set_lr(replica.optimizer, utils.lr_at(step, plan.total_steps, args.lr, args.warmup))
        replica.flat_grads.zero_()
        with parts.straggle():
            loss_sum += utils.train_step(replica.model, x_train[idx], y_train[idx], flip)
        t0 = time.perf_counter()
        replica.traffic.add(parts.average_(replica.flat_grads, comm, allreduce_, device_ok))
        in_call.append(time.perf_counter() - t0)
        # the global batch's, as cent_sgd.py clips
        utils.clip_gradients_(replica.optimizer, args.clip_norm)
        replica.optimizer.step()
        step += 1
    return {"step": step, "loss": loss_sum.item() / max(1, len(in_call)),
            "in_call": np.array(in_call)}


@dataclasses.dataclass
class Parts:
    """The parts of training that a feature beyond the assignment may replace, each by one flag
    (extensions.configure, once, before the loop); the defaults are the assignment's own."""
    comm: MPI.Comm                                   # --elastic: the survivors' communicator
    # --compress: a compressed average; --elastic: weighted
    average_: typing.Callable = average_gradients_
    straggle: typing.Callable = contextlib.nullcontext   # --straggler: around one rank's compute
    train_epoch: typing.Callable = train_epoch       # --elastic: redoes a step without a lost rank


def split_comm_and_wait(in_call, comm):
    """Split this rank's time inside the all-reduce into (the all-reduce itself, waiting).

    The time in the call is waiting for the last rank to arrive plus the all-reduce itself.
    The last rank to arrive waits for no one, so per step the shortest time in the call over
    ranks is the all-reduce itself; the rest is load imbalance (with more ranks than cores,
    the OS runs some ranks later), not traffic.
    """
    shortest = in_call.copy()
    comm.Allreduce(MPI.IN_PLACE, shortest, op=MPI.MIN)
    return float(shortest.sum()), float(in_call.sum() - shortest.sum())


def evaluate(model, test, comm):
    """Test loss and accuracy: each rank evaluates a 1/N shard and the sums are added up,
    N times less work than rank 0 alone."""
    x_test, y_test = test
    rank, world_size = comm.Get_rank(), comm.Get_size()
    loss, correct = utils.evaluate(model, x_test[rank::world_size], y_test[rank::world_size])
    loss, correct = comm.allreduce(np.array([loss, correct]))  # small: pickling is fine
    return loss / len(x_test), 100 * correct / len(x_test)


def check_replicas(flat_params, comm):
    """The replicas must still be identical; any drift would mean a broken all-reduce."""
    checksums = comm.gather(float(flat_params.double().sum()), root=0)
    if comm.Get_rank() == 0 and len(set(checksums)) != 1:
        utils.fail(f"the replicas diverged: parameter sums {checksums}", code=1)


def parse_args(world_size):
    parser = utils.get_parser("dist_sgd_serverless", __doc__.splitlines()[0], epochs=8,
                              batch_size=utils.BASE_BATCH, lr=None,
                              batch_help="samples per rank per step; the global batch is N x this")
    parser.add_argument("--allreduce", choices=tuple(ALLREDUCE), default="mpi",
                        help="mpi: MPI_Allreduce; ring, tree: written here from "
                             "point-to-point calls")
    extensions.add_flags(parser, "dist_sgd_serverless")
    args = parser.parse_args()
    utils.check_args(args)
    extensions.check(args, world_size, "dist_sgd_serverless")
    args.lr = args.lr or utils.scaled_lr(world_size * args.batch_size)
    return args


def end_epoch(out, model, test, comm, args, t0):
    """After an epoch's steps: split the time in the average into the call and the wait, evaluate,
    print the epoch's line; stop every rank if training diverged. Returns the epoch's record."""
    train_time = time.perf_counter() - t0
    comm_time, wait_time = split_comm_and_wait(out["in_call"], comm)
    train_loss = comm.allreduce(out["loss"]) / comm.Get_size()
    test_loss, test_acc = evaluate(model, test, comm)
    h = dict(epoch=out["epoch"] + 1, steps=out["step"], train_loss=train_loss, test_loss=test_loss,
             test_acc=test_acc, train_time=train_time, comm_time=comm_time, wait_time=wait_time,
             step_time=train_time / max(1, len(out["in_call"])),
             epoch_time=time.perf_counter() - t0)
    utils.print0(f"epoch {h['epoch']:3d}/{args.epochs} | train loss {h['train_loss']:.4f} | "
                 f"test acc {h['test_acc']:6.2f}% | {h['epoch_time']:6.1f} s | "
                 f"wait {wait_time:5.2f} s | comm {comm_time:5.2f} s", comm=comm)
    utils.stop_if_diverged(train_loss, comm)
    return h


def report(replica, plan, parts, progress, t_start):
    """Check the replicas, gather every rank's bytes, and on rank 0 print and save the results."""
    args, comm = plan.args, parts.comm
    check_replicas(replica.flat_params, comm)
    utils.finish_trace(args, comm)
    counted = args.allreduce != "mpi"  # null in the JSON: the library chose its own algorithm
    per_rank_bytes = comm.gather({"bytes_sent": replica.traffic.sent if counted else None,
                                  "bytes_recv": replica.traffic.received if counted else None},
                                 root=0)
    if comm.Get_rank() != 0:
        return
    history, train_time = progress["history"], sum(h["train_time"] for h in progress["history"])
    print(f"Final test accuracy: {history[-1]['test_acc']:.2f}%", flush=True)
    utils.save_results(args.results, dict(
        script="dist_sgd_serverless", config=vars(args), world_size=MPI.COMM_WORLD.Get_size(),
        global_batch=plan.global_batch, threads=torch.get_num_threads(),
        device=str(replica.flat_params.device), params=utils.num_params(replica.model),
        steps=progress["step"], wall_time=time.perf_counter() - t_start,
        final_test_acc=history[-1]["test_acc"], history=history, bytes_per_rank=per_rank_bytes,
        comm_fraction=sum(h["comm_time"] for h in history) / train_time,
        wait_fraction=sum(h["wait_time"] for h in history) / train_time,
        compression=compression.record(parts.average_, replica.flat_grads, per_rank_bytes,
                                       progress["step"]),
        **({"failures": comm.failures} if args.elastic else {})))
    if args.save_model:
        utils.save_model(args.save_model, replica.model)


def main():
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    utils.abort_on_exception(comm)
    args = parse_args(world_size)
    device, threads = utils.setup(args, comm)
    global_batch = world_size * args.batch_size

    # data: every rank holds the whole set and takes its strided share of each global batch
    train, test = utils.load_data(args, device, comm)
    plan = Plan(args, utils.count_steps(len(train[0]), global_batch, args), global_batch)

    # model: parameters and gradients live in two flat buffers, so one call moves them all
    model = utils.make_model(device, args.seed)
    flat_params, flat_grads = utils.flatten_parameters(model)
    optimizer = utils.make_optimizer(model.parameters(), args)
    # default: today's line
    compressed = "" if args.compress == "none" else f", compress={args.compress}"
    utils.print0(f"dist_sgd_serverless | {world_size} ranks, "
                 f"allreduce={args.allreduce}{compressed} | "
                 f"{args.dataset}: {len(train[0])} train | {utils.num_params(model):,} params | "
                 f"batch {world_size} x {args.batch_size} = {global_batch} | lr {args.lr:.4g} | "
                 f"{plan.total_steps} steps | {device} x {threads} threads per rank")

    # resume: every rank reads the checkpoint; then all start from rank 0's weights
    progress = utils.load_checkpoint(args, world_size, model, optimizer, dict(
        epoch=0, step=0, history=[], wall_time=0.0, traffic=[[0, 0]] * world_size))
    replica = Replica(model, optimizer, flat_params, flat_grads,
                      utils.Traffic(*progress["traffic"][rank]))
    broadcast_parameters_(flat_params, comm)
    # what --compress, --straggler and --elastic replace (extensions/): nothing, at the defaults
    parts = extensions.configure(args, "dist_sgd_serverless", Parts(comm), replica, plan)

    # train
    t_start = time.perf_counter() - progress["wall_time"]
    for epoch in range(progress["epoch"], args.epochs):
        if progress["step"] == plan.total_steps:
            break
        t0 = time.perf_counter()
        out = parts.train_epoch(replica, train, plan, parts, epoch, progress["step"])
        utils.sync(device)
        h = end_epoch(dict(out, epoch=epoch), model, test, parts.comm, args, t0)
        progress.update(epoch=epoch + 1, step=out["step"], history=progress["history"] + [h],
                        wall_time=time.perf_counter() - t_start,
                        traffic=parts.comm.allgather([replica.traffic.sent,
                                                      replica.traffic.received]))
        # identical replicas: rank 0's state is everyone's
        if args.checkpoint and parts.comm.Get_rank() == 0:
            utils.save_checkpoint(args, world_size, model, optimizer, progress)
    report(replica, plan, parts, progress, t_start)


if __name__ == "__main__":
    main()
