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
is 0.05 x sqrt(global batch / 64), as in dist_sgd_serverless.py, so 5 ranks here (4
workers) train like `mpirun -n 4 python dist_sgd_serverless.py`.

Per step, each worker sends and receives P float32 (4P bytes each way) and the server
receives and sends W x 4P bytes: all traffic goes through the server's link.

Measured on 2 CPU cores (5 ranks, oversubscribed; torch 1 thread per rank), default flags:
78.31% test accuracy in 3 min 13 s of training, 102 ms per step; dist_sgd_serverless.py
with 4 ranks on the same machine just before: 78.42%, 2 min 37 s, 90 ms per step. The
difference is the extra hop through the server and its evaluating the test set alone.
"""
import math
import time

import numpy as np
import torch
from mpi4py import MPI

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

def gather_gradients(buf, comm):
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


def broadcast_parameters_(buf, comm):
    """Send the server's flat parameters `buf` (P,) to every worker, which receives in place."""
    if comm.Get_rank() == SERVER:
        requests = [comm.Isend(buf, dest=w, tag=PARAMETERS) for w in range(1, comm.Get_size())]
        MPI.Request.Waitall(requests)
        return {"bytes_sent": (comm.Get_size() - 1) * buf.nbytes, "bytes_recv": 0}
    comm.Recv(buf, source=SERVER, tag=PARAMETERS)
    return {"bytes_sent": 0, "bytes_recv": buf.nbytes}


# ----- training -----

def main():
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    is_server = rank == SERVER  # rank 0: it also evaluates, prints and saves
    utils.abort_on_exception(comm)

    parser = utils.get_parser(__doc__.splitlines()[0], epochs=8, batch_size=64, lr=None,
                              batch_help="samples per worker per step; the global batch is (N-1) x this")
    args = parser.parse_args()
    utils.check_args(args)
    if world_size < 2:
        utils.fail("a parameter server needs at least one worker: run with mpirun -n 2 or more "
                   "(rank 0 is the server, ranks 1..N-1 the workers)")
    num_workers = world_size - 1
    worker = rank - 1  # this rank's index among the workers; -1 on the server
    global_batch = num_workers * args.batch_size
    args.lr = args.lr or utils.scaled_lr(global_batch)  # square-root scaling with the batch

    # setup
    device = utils.get_device(args.device)
    threads = utils.set_threads(device)
    utils.seed_everything(args.seed)

    # data: every worker holds the whole set and takes its strided share of each global
    # batch; the server uses only the test set
    (x_train, y_train), (x_test, y_test) = utils.load_data(args, device, comm)
    total_steps = utils.count_steps(len(x_train), global_batch, args)

    # model: parameters and gradients live in two flat buffers, so one call moves them all.
    # Only the server has an optimizer; a worker's weights are whatever the server sent last.
    model = utils.make_model(device, args.seed)
    flat_params, flat_grads = utils.flatten_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.momentum > 0, weight_decay=args.weight_decay) if is_server else None
    # What MPI reads and writes: on the CPU the flat buffers themselves; on a GPU, pinned
    # host copies, unless MPI can read device memory (CUDA-aware).
    cuda_aware = device.type == "cuda" and utils.mpi_is_cuda_aware()
    param_buf = utils.mpi_staging(flat_params, cuda_aware)
    grad_buf = utils.mpi_staging(flat_grads, cuda_aware)
    if is_server:  # the server's inbox: one row per worker
        grads_in = utils.mpi_staging(torch.empty(num_workers, len(flat_params), device=device), cuda_aware)

    def send_gradients():
        """Worker: hand the flat gradient to the server."""
        utils.sync(device)
        grad_buf.copy_(flat_grads)  # a no-op when grad_buf is flat_grads (CPU)
        return gather_gradients(utils.as_mpi_buffer(grad_buf), comm)

    def send_parameters():
        """Server: send the flat parameters to every worker."""
        utils.sync(device)
        param_buf.copy_(flat_params)
        return broadcast_parameters_(utils.as_mpi_buffer(param_buf), comm)

    def receive_parameters():
        """Worker: receive the server's flat parameters; the model's weights are views of them."""
        stats = broadcast_parameters_(utils.as_mpi_buffer(param_buf), comm)
        flat_params.copy_(param_buf)
        return stats

    # resume: a checkpoint holds everything the next epoch depends on; every rank reads it,
    # though only the server needs the model and the optimizer
    history, step, start, sent, received = [], 0, 0, 0, 0
    state = utils.load_checkpoint(args, "dist_sgd_param_server", world_size)
    if state:
        utils.restore(state, model, optimizer)
        history, step, start = state["history"], state["step"], state["epoch"]
        sent, received = state["traffic"][rank]

    # Every worker starts from the server's weights (seeding alone would also do, but this
    # also holds when a rank's RNG differs). Setup only: not counted in the bytes below.
    param_buf.copy_(flat_params)
    comm.Bcast(utils.as_mpi_buffer(param_buf), root=SERVER)
    flat_params.copy_(param_buf)

    utils.print0(f"dist_sgd_param_server | 1 server + {num_workers} workers | "
                 f"{args.dataset}: {len(x_train)} train | {utils.num_params(model):,} params | "
                 f"batch {num_workers} x {args.batch_size} = {global_batch} | lr {args.lr:.4g} | "
                 f"{total_steps} steps | {device} x {threads} threads per rank")

    if state:
        utils.print0(f"resumed from {args.checkpoint}: epoch {start}, step {step}")

    # train
    t_start = time.perf_counter()
    for epoch in range(start, args.epochs):
        if step == total_steps:
            break
        t0 = time.perf_counter()
        comm_time = update_time = 0.0
        order, flips = utils.epoch_order(len(x_train), args.seed, epoch)
        order, flips = order.to(device), flips.to(device)
        # The server walks the same batches only to count the steps; it never reads them.
        shares = utils.batches(order, flips, global_batch, max(worker, 0), num_workers)
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        for idx, flip in shares:
            if step == total_steps:
                break
            if is_server:
                # server: wait for all W gradients, average them, step, send the new weights
                stats = gather_gradients(utils.as_mpi_buffer(grads_in), comm)
                tu = time.perf_counter()
                flat_grads.copy_(grads_in.sum(dim=0)).div_(num_workers)
                for group in optimizer.param_groups:
                    group["lr"] = utils.lr_at(step, total_steps, args.lr, args.warmup)
                optimizer.step()
                update_time += time.perf_counter() - tu
                stats2 = send_parameters()
            else:
                # worker: gradient of its share, to the server; then wait for the new weights
                flat_grads.zero_()
                loss_sum += utils.train_step(model, x_train[idx], y_train[idx], flip)
                tc = time.perf_counter()
                stats = send_gradients()
                stats2 = receive_parameters()
                comm_time += time.perf_counter() - tc
            sent += stats["bytes_sent"] + stats2["bytes_sent"]
            received += stats["bytes_recv"] + stats2["bytes_recv"]
            step += 1
            n_steps += 1
        utils.sync(device)
        train_time = time.perf_counter() - t0

        # The server evaluates on the whole test set; the workers add up their training
        # losses and communication times (the server adds zeros: it trains on nothing).
        test_loss, correct = utils.evaluate(model, x_test, y_test) if is_server else (0.0, 0)
        mine = [loss_sum.item() / max(1, n_steps), 0.0 if is_server else comm_time]
        train_loss, worker_comm = comm.allreduce(np.array(mine)) / num_workers  # small: pickling is fine
        history.append(dict(epoch=epoch + 1, steps=step, train_loss=train_loss,
                            test_loss=test_loss / len(x_test), test_acc=100 * correct / len(x_test),
                            train_time=train_time, comm_time=worker_comm, server_update_time=update_time,
                            step_time=train_time / max(1, n_steps),
                            epoch_time=time.perf_counter() - t0))
        h = history[-1]
        utils.print0(f"epoch {h['epoch']:3d}/{args.epochs} | train loss {h['train_loss']:.4f} | "
                     f"test acc {h['test_acc']:6.2f}% | {h['epoch_time']:6.1f} s | comm {worker_comm:5.2f} s")
        if not math.isfinite(h["train_loss"]):
            utils.fail(f"training diverged (train loss {h['train_loss']}); lower --lr", code=1)
        if args.checkpoint:
            traffic = comm.gather((sent, received), root=0)  # each rank's byte counts so far
            if is_server:  # the workers hold nothing the server does not: their weights are its
                utils.save_checkpoint(args.checkpoint, utils.checkpoint(
                    "dist_sgd_param_server", args, world_size, model, optimizer,
                    epoch=epoch + 1, step=step, history=history, traffic=traffic))

    # report
    wall = time.perf_counter() - t_start
    # Every worker must hold the server's final weights: the last send reached them all.
    checksums = comm.gather(float(flat_params.double().sum()), root=0)
    per_rank_bytes = comm.gather({"bytes_sent": sent, "bytes_recv": received}, root=0)
    if is_server:
        assert len(set(checksums)) == 1, f"workers differ from the server: parameter sums {checksums}"
        print(f"Final test accuracy: {history[-1]['test_acc']:.2f}%", flush=True)
        utils.save_results(utils.results_path(args, __file__), dict(
            script="dist_sgd_param_server", config=vars(args), world_size=world_size,
            num_workers=num_workers, global_batch=global_batch, threads=threads, device=str(device),
            params=utils.num_params(model), steps=step, wall_time=wall,
            final_test_acc=history[-1]["test_acc"], history=history,
            bytes_per_rank=per_rank_bytes,  # index 0 is the server; the setup Bcast is not counted
            comm_fraction=sum(h["comm_time"] for h in history) / sum(h["train_time"] for h in history)))
        if args.save_model:
            torch.save(utils.parameters_vector(model), args.save_model)


if __name__ == "__main__":
    main()
