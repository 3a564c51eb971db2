"""Serverless data-parallel SGD on CIFAR-10 (Q2): gradients averaged by all-reduce, no server.

    mpirun -n 4 python dist_sgd_serverless.py                    # MPI_Allreduce
    mpirun -n 4 python dist_sgd_serverless.py --allreduce ring   # hand-written ring (Q7)
    mpirun -n 4 python dist_sgd_serverless.py --dataset synthetic
    mpirun -n 4 python dist_sgd_serverless.py --checkpoint ckpt.pt --resume   # rerun after a crash
    (as root or in Colab, add: --allow-run-as-root --oversubscribe)

Every rank holds a full replica of the model. Each step, rank r of N computes gradients on
its strided share of a global batch of N x --batch-size samples; one all-reduce of a flat
float32 buffer sums the gradients, each rank divides by N and applies the same SGD step,
so the replicas stay identical. Without BatchNorm this is exactly centralized SGD with
batch N x --batch-size (tests check it). The default lr is 0.05 x sqrt(global batch / 64):
cent_sgd.py's 0.05 at batch 64, scaled by the square root of the batch growth.
"""
import math
import time

import numpy as np
import torch
from mpi4py import MPI

import utils


# ----- communication: one function per pattern -----
# Each function sums a 1-D contiguous numpy buffer over all ranks in place and returns
# {"steps", "bytes_sent", "bytes_recv"} for this rank, so tests and benchmarks can check
# the cost model. Only uppercase (buffer) calls: the lowercase ones would pickle.

def allreduce_mpi_(buf, comm):
    """Sum `buf` over all ranks in place with the library's MPI_Allreduce (the reference).

    Open MPI picks the algorithm by message size and process count, so steps and bytes
    are unknown here and reported as None.
    """
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return {"steps": None, "bytes_sent": None, "bytes_recv": None}


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


def tree_allreduce_(buf, comm):
    """Sum `buf` over all ranks in place: binomial-tree reduce to rank 0, then broadcast.

    Round k pairs ranks 2^k apart, so there are ceil(log2 N) rounds each way, for any N.
    The whole buffer moves on every edge: few latencies but P elements per message, and
    rank 0 sends and receives ceil(log2 N) * P elements, a bottleneck for large P.
    Rank r > 0 has one parent and children r + 2^k for 2^k < lowbit(r) and r + 2^k < N
    (rank 0: all 2^k < N); it sends and receives (parent + children) * P elements.
    """
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


ALLREDUCE = {"mpi": allreduce_mpi_, "ring": ring_allreduce_, "tree": tree_allreduce_}


# ----- training -----

def main():
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    is_root = rank == 0
    utils.abort_on_exception(comm)

    parser = utils.get_parser(__doc__.splitlines()[0], epochs=8, batch_size=64, lr=None,
                              batch_help="samples per rank per step; the global batch is N x this")
    parser.add_argument("--allreduce", choices=tuple(ALLREDUCE), default="mpi",
                        help="mpi: MPI_Allreduce; ring, tree: written here from point-to-point calls")
    args = parser.parse_args()
    utils.check_args(args)
    global_batch = world_size * args.batch_size
    args.lr = args.lr or utils.scaled_lr(global_batch)  # square-root scaling with the batch

    # setup
    device = utils.get_device(args.device)
    threads = utils.set_threads(device)
    utils.seed_everything(args.seed)

    # data: every rank holds the whole set and takes its strided share of each global batch
    (x_train, y_train), (x_test, y_test) = utils.load_data(args, device, comm)
    total_steps = utils.count_steps(len(x_train), global_batch, args)

    # model: parameters and gradients live in two flat buffers, so one call moves them all
    model = utils.make_model(device, args.seed)
    flat_params, flat_grads = utils.flatten_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.momentum > 0, weight_decay=args.weight_decay)
    # What MPI reads and writes: on the CPU the flat buffers themselves; on a GPU, pinned
    # host copies, unless MPI can read device memory (CUDA-aware; only MPI_Allreduce can).
    cuda_aware = device.type == "cuda" and args.allreduce == "mpi" and utils.mpi_is_cuda_aware()
    param_buf = utils.mpi_staging(flat_params, cuda_aware)
    grad_buf = utils.mpi_staging(flat_grads, cuda_aware)

    def broadcast_parameters_():
        """Every replica starts from rank 0's weights. Seeding alone would also do here,
        but this holds even when ranks' RNGs differ (another torch build, another GPU)."""
        param_buf.copy_(flat_params)
        comm.Bcast(utils.as_mpi_buffer(param_buf), root=0)
        flat_params.copy_(param_buf)

    allreduce_ = ALLREDUCE[args.allreduce]

    def average_gradients_():
        """Sum the flat gradient over ranks, then divide: every rank gets the global mean."""
        utils.sync(device)
        grad_buf.copy_(flat_grads)  # a no-op when grad_buf is flat_grads (CPU)
        stats = allreduce_(utils.as_mpi_buffer(grad_buf), comm)
        flat_grads.copy_(grad_buf)
        flat_grads.div_(world_size)
        return stats

    # resume: a checkpoint holds everything the next epoch depends on; every rank reads it
    history, step, start, sent, received = [], 0, 0, 0, 0
    state = utils.load_checkpoint(args, "dist_sgd_serverless", world_size)
    if state:
        utils.restore(state, model, optimizer)
        history, step, start = state["history"], state["step"], state["epoch"]
        sent, received = state["traffic"][rank]

    broadcast_parameters_()

    utils.print0(f"dist_sgd_serverless | {world_size} ranks, allreduce={args.allreduce} | "
                 f"{args.dataset}: {len(x_train)} train | {utils.num_params(model):,} params | "
                 f"batch {world_size} x {args.batch_size} = {global_batch} | lr {args.lr:.4g} | "
                 f"{total_steps} steps | {device} x {threads} threads per rank")

    if state:
        utils.print0(f"resumed from {args.checkpoint}: epoch {start}, step {step}")

    # train
    t_start = time.perf_counter()
    for epoch in range(start, args.epochs):
        if step == total_steps:
            break
        t0 = time.perf_counter()
        in_call = []  # seconds this rank spent inside the all-reduce, per step
        order, flips = utils.epoch_order(len(x_train), args.seed, epoch)
        order, flips = order.to(device), flips.to(device)
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        for idx, flip in utils.batches(order, flips, global_batch, rank, world_size):
            if step == total_steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = utils.lr_at(step, total_steps, args.lr, args.warmup)
            flat_grads.zero_()
            loss_sum += utils.train_step(model, x_train[idx], y_train[idx], flip)
            tc = time.perf_counter()
            stats = average_gradients_()
            in_call.append(time.perf_counter() - tc)
            if stats["bytes_sent"] is not None:  # MPI_Allreduce does not say what it moved
                sent += stats["bytes_sent"]
                received += stats["bytes_recv"]
            optimizer.step()
            step += 1
            n_steps += 1
        utils.sync(device)
        train_time = time.perf_counter() - t0
        # Time inside the call = waiting for the last rank to arrive + the all-reduce itself.
        # The last rank to arrive waits for no one, so per step the shortest time in the call
        # over ranks is the all-reduce itself; the rest of this rank's time is waiting, which
        # is load imbalance (with more ranks than cores, the OS runs some ranks later), not traffic.
        in_call = np.array(in_call)
        shortest = in_call.copy()
        comm.Allreduce(MPI.IN_PLACE, shortest, op=MPI.MIN)
        comm_time, wait_time = float(shortest.sum()), float(in_call.sum() - shortest.sum())

        # Evaluate on a 1/N shard each and add up sums and counts: N times less work than rank 0 alone.
        test_loss, correct = utils.evaluate(model, x_test[rank::world_size], y_test[rank::world_size])
        train_loss, test_loss, correct = comm.allreduce(
            np.array([loss_sum.item() / max(1, n_steps), test_loss, correct]))  # small: pickling is fine
        history.append(dict(epoch=epoch + 1, steps=step, train_loss=train_loss / world_size,
                            test_loss=test_loss / len(x_test), test_acc=100 * correct / len(x_test),
                            train_time=train_time, comm_time=comm_time, wait_time=wait_time,
                            step_time=train_time / max(1, n_steps),
                            epoch_time=time.perf_counter() - t0))
        h = history[-1]
        utils.print0(f"epoch {h['epoch']:3d}/{args.epochs} | train loss {h['train_loss']:.4f} | "
                     f"test acc {h['test_acc']:6.2f}% | {h['epoch_time']:6.1f} s | "
                     f"wait {wait_time:5.2f} s | comm {comm_time:5.2f} s")
        if not math.isfinite(h["train_loss"]):
            utils.fail(f"training diverged (train loss {h['train_loss']}); lower --lr", code=1)
        if args.checkpoint:
            traffic = comm.gather((sent, received), root=0)  # each rank's byte counts so far
            if is_root:  # the replicas are identical: rank 0's state is everyone's
                utils.save_checkpoint(args.checkpoint, utils.checkpoint(
                    "dist_sgd_serverless", args, world_size, model, optimizer,
                    epoch=epoch + 1, step=step, history=history, traffic=traffic))

    # report
    wall = time.perf_counter() - t_start
    # The replicas must still be identical: any drift would mean a broken all-reduce.
    checksums = comm.gather(float(flat_params.double().sum()), root=0)
    counted = args.allreduce != "mpi"  # null in the JSON: the library chose its own algorithm
    per_rank_bytes = comm.gather({"bytes_sent": sent if counted else None,
                                  "bytes_recv": received if counted else None}, root=0)
    if is_root:
        assert len(set(checksums)) == 1, f"replicas diverged: parameter sums {checksums}"
        print(f"Final test accuracy: {history[-1]['test_acc']:.2f}%", flush=True)
        utils.save_results(utils.results_path(args, __file__), dict(
            script="dist_sgd_serverless", config=vars(args), world_size=world_size,
            global_batch=global_batch, threads=threads, device=str(device),
            params=utils.num_params(model), steps=step, wall_time=wall,
            final_test_acc=history[-1]["test_acc"], history=history, bytes_per_rank=per_rank_bytes,
            comm_fraction=sum(h["comm_time"] for h in history) / sum(h["train_time"] for h in history),
            wait_fraction=sum(h["wait_time"] for h in history) / sum(h["train_time"] for h in history)))
        if args.save_model:
            torch.save(utils.parameters_vector(model), args.save_model)


if __name__ == "__main__":
    main()
