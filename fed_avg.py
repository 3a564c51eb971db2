"""Federated averaging (FedAvg) on CIFAR-10 (Q4, Q5): a server, and clients that train locally.

    mpirun -n 5 python fed_avg.py                                      # 4 iid clients (Q4)
    mpirun -n 5 python fed_avg.py --split-method non-iid               # 2 label shards each (Q5)
    mpirun -n 5 python fed_avg.py --split-method non-iid --alpha 0.1   # Dirichlet label skew
    mpirun -n 5 python fed_avg.py --num-clients 20 --client-fraction 0.25   # 5 of 20 per round
    mpirun -n 3 python fed_avg.py --dataset synthetic --rounds 2 --max-steps 5   # a quick look
    mpirun -n 5 python fed_avg.py --checkpoint ckpt.pt --resume        # rerun after a crash
    (as root or in Colab, add: --allow-run-as-root --oversubscribe)

Rank 0 is the server and holds the global model; ranks 1..N-1 host the clients, each of
which owns a fixed shard of the training set (utils.split_indices). Each round, as in
McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data":
  1. the server samples the round's clients and sends each of their ranks the global
     weights, one flat float32 buffer of P values;
  2. each sampled client starts from those weights and runs --local-epochs passes of SGD
     over its own shard, with a fresh optimizer;
  3. each client returns n_k * w_k and n_k, its weights times its sample count, and the
     count. The server adds them up and sets the global weights to sum n_k w_k / sum n_k.
The server then evaluates the global model on the test set. Samples never leave a client:
only weights travel, P floats down and P + 1 up per client per round, however many local
steps it takes.

FedAvg counts --rounds and --local-epochs (E in the paper), so this script has no --epochs.
--max-steps S caps each client's SGD steps per round. With S = 1 and --momentum 0 each
round is one data-parallel SGD step whose gradient weights client k by n_k (FedSGD), which
tests check. The lr follows a one-cycle schedule over each client's local steps of the run.
Results go to results/fed_avg_<split>.json, the split's plot to figures/data_distribution_<split>.png.
"""
import itertools
import os
import time

import numpy as np
import torch
from mpi4py import MPI

import utils

# Q5: change to "non-iid" (or pass --split-method non-iid) to give each client only a few classes.
split_method = "iid"


# ----- communication: one function per pattern -----
# The server talks to each client's rank on its own, with point-to-point buffer calls, as in
# federated learning: clients never relay each other's weights, let alone add them up. One
# comm.Bcast and one comm.Reduce(op=MPI.SUM) would move the same data, but the library may
# route it through a tree of clients, and then a rank's bytes are unknown; here they are
# exact. Each function returns {"bytes_sent", "bytes_recv"} for the calling rank.

def wait_quietly(requests, interval=1e-3):
    """MPI.Request.Waitall, but sleeping between checks.

    A blocking MPI wait spins on a core. Here ranks wait a lot (the server while clients
    train, clients while the server evaluates), and with 5 ranks on 2 cores a spinning
    rank would take the cores from the ones doing the work.
    """
    while not MPI.Request.Testall(requests):
        time.sleep(interval)


def send_global_model_(buf, comm, workers):
    """Server: send `buf`, the P global weights, to each rank in `workers`.
    A rank in `workers`: receive them into `buf`, in place."""
    if comm.Get_rank() == 0:
        wait_quietly([comm.Isend(buf, dest=w) for w in workers])
        return {"bytes_sent": len(workers) * buf.nbytes, "bytes_recv": 0}
    wait_quietly([comm.Irecv(buf, source=0)])
    return {"bytes_sent": 0, "bytes_recv": buf.nbytes}


def reduce_weighted_sums_(buf, comm, workers):
    """Server: receive `buf` from each rank in `workers` and store their sum in its own `buf`.
    A rank in `workers`: send its `buf`, [sum_k n_k w_k, sum_k n_k] over the clients it ran.

    Sums and counts, not averages: adding up is all the server has to do, and the weighted
    mean comes out right however the clients sit on ranks. All receives are posted at once,
    so a client that finishes early is not kept waiting for one that finishes late.
    """
    if comm.Get_rank() == 0:
        parts = np.empty((len(workers), len(buf)), dtype=buf.dtype)
        wait_quietly([comm.Irecv(parts[i], source=w) for i, w in enumerate(workers)])
        np.sum(parts, axis=0, out=buf)  # in rank order, so the result is reproducible
        return {"bytes_sent": 0, "bytes_recv": parts.nbytes}
    wait_quietly([comm.Isend(buf, dest=0)])
    return {"bytes_sent": buf.nbytes, "bytes_recv": 0}


# ----- local training -----

def local_steps(shard_size, args):
    """SGD steps a client with `shard_size` samples takes per round."""
    steps = args.local_epochs * (shard_size // args.batch_size)
    return min(steps, args.max_steps or steps)


def client_update(model, x, y, shard, client, round_, args):
    """Train `model`, which holds the global weights, on one client's shard for one round.

    The optimizer is new each round: momentum does not carry over from a model the
    server has since replaced. Returns (summed loss, steps).
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.momentum > 0, weight_decay=args.weight_decay)
    steps = local_steps(len(shard), args)
    seed = utils.client_seed(args.seed, round_, client)
    batches = utils.client_batches(shard, args.batch_size, args.local_epochs, seed)
    loss_sum = torch.zeros((), device=x.device)
    for s, (idx, flip) in enumerate(itertools.islice(batches, steps)):
        for group in optimizer.param_groups:
            group["lr"] = utils.lr_at(round_ * steps + s, args.rounds * steps, args.lr, args.warmup)
        optimizer.zero_grad(set_to_none=False)  # keep .grad as views into the flat buffer
        loss_sum += utils.train_step(model, x[idx], y[idx], flip)
        optimizer.step()
    return loss_sum, steps


# ----- training -----

def main():
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    is_root = rank == 0  # the server
    utils.abort_on_exception(comm)

    parser = utils.get_parser(__doc__.splitlines()[0], epochs=None, batch_size=64, lr=0.05,
                              batch_help="samples per client SGD step",
                              max_steps_help="cap on each client's SGD steps per round (1 with "
                                             "--momentum 0: FedSGD)")
    # federated learning
    parser.add_argument("--rounds", type=utils.positive(int), default=10,
                        help="communication rounds: the server updates the global model once per round")
    parser.add_argument("--local-epochs", type=utils.positive(int), default=1,
                        help="passes each client makes over its own shard per round (E)")
    parser.add_argument("--split-method", choices=utils.SPLIT_METHODS, default=split_method,
                        help="how the training set is dealt to clients (see utils.split_indices)")
    parser.add_argument("--alpha", type=utils.positive(float), default=None,
                        help="non-iid only: Dirichlet(alpha) label skew instead of 2 shards per "
                             "client; smaller is more skewed")
    parser.add_argument("--num-clients", type=utils.positive(int), default=None,
                        help="clients, spread over ranks 1..N-1; None: N-1, one per rank")
    parser.add_argument("--client-fraction", type=float, default=1.0,
                        help="fraction C of the clients that train each round")
    parser.add_argument("--figures-dir", default="figures", help="where the data-distribution plot goes")
    args = parser.parse_args()
    utils.check_args(args)
    if world_size < 2:
        utils.fail("FedAvg needs a server and at least one client: mpirun -n 5 python fed_avg.py "
                   "(rank 0 serves, ranks 1-4 are clients)")
    if args.seed < 0:
        utils.fail(f"--seed must be >= 0, got {args.seed}")
    args.num_clients = args.num_clients or world_size - 1
    if args.num_clients < world_size - 1:
        utils.fail(f"--num-clients {args.num_clients} leaves ranks idle: give each of the "
                   f"{world_size - 1} client ranks at least one client, or start fewer ranks")
    if not 0 < args.client_fraction <= 1:
        utils.fail(f"--client-fraction must be in (0, 1], got {args.client_fraction}")
    if args.split_method == "iid":
        split_name = "iid"
    elif args.alpha:
        split_name = f"non-iid, Dirichlet(alpha={args.alpha:g})"
    else:
        split_name = "non-iid, 2 label shards per client"
    tag = args.split_method + (f"_alpha{args.alpha:g}" if args.alpha else "")  # names the output files
    args.results = args.results or os.path.join("results", f"fed_avg_{tag}.json")

    # setup
    device = utils.get_device(args.device)
    threads = utils.set_threads(device)
    utils.seed_everything(args.seed)

    # data: every rank loads it all and computes the same split; a client trains on its shard only
    (x_train, y_train), (x_test, y_test) = utils.load_data(args, device, comm)
    try:
        shards = utils.split_indices(y_train, args.num_clients, args.split_method, args.seed, args.alpha)
    except ValueError as e:
        utils.fail(str(e))
    sizes = [len(s) for s in shards]  # n_k, the FedAvg weights
    if min(sizes) < args.batch_size:
        k = sizes.index(min(sizes))
        utils.fail(f"client {k} has {sizes[k]} samples, fewer than one batch of {args.batch_size}: lower "
                   f"--batch-size, use fewer --num-clients" + (", or a larger --alpha" if args.alpha else ""))
    # The split is seeded, so every rank computed the same one: check rather than trust.
    fingerprint = sizes + [int(s.sum()) for s in shards]
    if any(other != fingerprint for other in comm.allgather(fingerprint)):
        utils.fail("ranks computed different client splits", code=1)
    host = [1 + k % (world_size - 1) for k in range(args.num_clients)]  # client k runs on rank host[k]
    shards = [s.to(device) for s in shards]
    per_round = max(1, round(args.client_fraction * args.num_clients))
    steps = [local_steps(n, args) for n in sizes]
    steps_text = f"{steps[0]}" if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"

    if is_root:
        figure = os.path.join(args.figures_dir, f"data_distribution_{tag}.png")
        dataset = {"cifar10": "CIFAR-10"}.get(args.dataset, args.dataset)
        utils.plot_split(y_train, shards, f"{split_name}\n{len(y_train)} {dataset} training samples "
                         f"over {args.num_clients} clients", figure)

    # model: the weights live in one flat buffer, so one call moves them all
    model = utils.make_model(device, args.seed)
    flat_params, _ = utils.flatten_parameters(model)
    P = len(flat_params)
    sums = torch.zeros(P + 1, device=device)  # [sum_k n_k w_k, sum_k n_k]
    # What MPI reads and writes. On the CPU: the same memory, no copy. On a GPU: pinned host
    # copies, even for a CUDA-aware MPI, since the server adds the clients' sums with numpy.
    model_buf = utils.mpi_staging(flat_params, cuda_aware=False)
    sums_buf = utils.mpi_staging(sums, cuda_aware=False)
    staged = model_buf is not flat_params

    utils.print0(f"fed_avg | server + {world_size - 1} client ranks | {args.num_clients} clients, "
                 f"{per_round} per round | {split_name} | {args.dataset}: {len(x_train)} train | "
                 f"{P:,} params | local: {args.local_epochs} epoch(s) = {steps_text} steps "
                 f"of {args.batch_size}, lr {args.lr:g} | {args.rounds} rounds | "
                 f"{device} x {threads} threads per rank")
    if is_root:
        print(f"wrote {figure}", flush=True)

    sampler = torch.Generator().manual_seed(args.seed)  # which clients train: a stream of its own

    # resume: the global model, the client sampler and the metrics are all a round depends on
    # (clients start each round from the global model with a fresh optimizer); every rank reads it
    history, start, traffic = [], 0, np.zeros((world_size, 2))
    state = utils.load_checkpoint(args, "fed_avg", world_size)
    if state:
        utils.restore(state, model, None)
        sampler.set_state(state["sampler"])
        history, start, traffic = state["history"], state["round"], np.array(state["traffic"])
        utils.print0(f"resumed from {args.checkpoint}: round {start}")
    sent, received = traffic[rank]

    # train
    t_start = time.perf_counter()
    for round_ in range(start, args.rounds):
        t0 = time.perf_counter()
        clients = sorted(torch.randperm(args.num_clients, generator=sampler)[:per_round].tolist())
        workers = sorted({host[k] for k in clients})  # the ranks this round's clients run on
        mine = [k for k in clients if host[k] == rank]
        loss_sum, n_steps, train_time, comm_time = 0.0, 0, 0.0, 0.0

        if is_root:
            # 1. send the global weights to the ranks of this round's clients
            if staged:
                model_buf.copy_(flat_params)
            tc = time.perf_counter()
            moved = [send_global_model_(utils.as_mpi_buffer(model_buf), comm, workers)]
            comm_time = time.perf_counter() - tc
            # 2. wait while they train; 3. add up their sums and counts, then divide
            moved.append(reduce_weighted_sums_(utils.as_mpi_buffer(sums_buf), comm, workers))
            if staged:
                sums.copy_(sums_buf)
            flat_params.copy_(sums[:P] / sums[P])  # the FedAvg step: sum n_k w_k / sum n_k

        elif mine:
            # 1. receive the global weights
            moved = [send_global_model_(utils.as_mpi_buffer(model_buf), comm, workers)]
            if staged:
                flat_params.copy_(model_buf)
            # 2. each client hosted here trains on its own shard, starting from the global weights
            t1 = time.perf_counter()
            global_weights = flat_params.clone()
            sums.zero_()
            for k in mine:
                flat_params.copy_(global_weights)
                loss, steps_run = client_update(model, x_train, y_train, shards[k], k, round_, args)
                sums[:P] += sizes[k] * flat_params  # n_k w_k
                sums[P] += sizes[k]                 # n_k
                loss_sum, n_steps = loss_sum + loss.item(), n_steps + steps_run
            utils.sync(device)
            train_time = time.perf_counter() - t1
            # 3. send back sum n_k w_k and sum n_k over those clients
            if staged:
                sums_buf.copy_(sums)
            tc = time.perf_counter()
            moved.append(reduce_weighted_sums_(utils.as_mpi_buffer(sums_buf), comm, workers))
            comm_time = time.perf_counter() - tc
        else:
            moved = []  # no client of this rank was sampled: it sits the round out
        sent += sum(m["bytes_sent"] for m in moved)
        received += sum(m["bytes_recv"] for m in moved)

        # Round statistics, one row per rank, to every rank: all stop together if training diverged.
        row = np.array([loss_sum, n_steps, train_time, comm_time, sent, received], dtype=np.float64)
        table = np.empty((world_size, len(row)))
        wait_quietly([comm.Iallgather(row, table)])
        train_loss = table[:, 0].sum() / max(1, table[:, 1].sum())
        if not np.isfinite(train_loss):
            utils.fail(f"training diverged (train loss {train_loss}); lower --lr", code=1)
        if is_root:
            round_time = time.perf_counter() - t0
            test_loss, correct = utils.evaluate(model, x_test, y_test)
            history.append(dict(
                round=round_ + 1, clients=clients, train_loss=train_loss,
                test_loss=test_loss / len(x_test), test_acc=100 * correct / len(x_test),
                train_time=table[1:, 2].max(),  # the slowest client rank
                # moving weights: the server's sends, then the slowest upload (not the waiting)
                comm_time=table[0, 3] + table[1:, 3].max(),
                round_time=round_time, eval_time=time.perf_counter() - t0 - round_time))
            h = history[-1]
            print(f"round {h['round']:3d}/{args.rounds} | train loss {h['train_loss']:.4f} | "
                  f"test acc {h['test_acc']:6.2f}% | {h['round_time'] + h['eval_time']:6.1f} s | "
                  f"comm {h['comm_time']:5.2f} s", flush=True)
        traffic = table[:, 4:]  # every rank's bytes so far
        if args.checkpoint and is_root:  # the server's weights are the global model
            utils.save_checkpoint(args.checkpoint, utils.checkpoint(
                "fed_avg", args, world_size, model, None, history, round=round_ + 1,
                sampler=sampler.get_state(), traffic=traffic.tolist()))

    # report
    wall = time.perf_counter() - t_start
    if is_root:
        per_rank_bytes = [{"bytes_sent": int(s), "bytes_recv": int(r)} for s, r in traffic]
        print(f"Final test accuracy: {history[-1]['test_acc']:.2f}%", flush=True)
        class_counts = [torch.bincount(y_train[s], minlength=len(utils.CLASSES)).tolist() for s in shards]
        utils.save_results(args.results, dict(
            script="fed_avg", config=vars(args), world_size=world_size, split=split_name,
            clients_per_round=per_round, client_sizes=sizes, client_ranks=host,
            client_class_counts=class_counts, local_steps=steps, threads=threads, device=str(device),
            params=P, wall_time=wall, final_test_acc=history[-1]["test_acc"], history=history,
            bytes_per_rank=per_rank_bytes, figure=figure))
        if args.save_model:
            torch.save(utils.parameters_vector(model), args.save_model)


if __name__ == "__main__":
    main()
