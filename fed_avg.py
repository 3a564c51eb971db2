"""Federated averaging (FedAvg) on CIFAR-10 (Q4, Q5): a server, and clients that train locally.

    mpirun -n 5 python fed_avg.py                                      # 4 iid clients (Q4)
    mpirun -n 5 python fed_avg.py --split-method non-iid               # 2 label shards each (Q5)
    mpirun -n 5 python fed_avg.py --split-method non-iid --alpha 0.1   # Dirichlet label skew
    mpirun -n 5 python fed_avg.py --num-clients 20 --client-fraction 0.25   # 5 of 20 per round
    mpirun -n 3 python fed_avg.py --dataset synthetic --rounds 2 --max-steps 5   # a quick look
    mpirun -n 5 python fed_avg.py --checkpoint ckpt.pt --resume        # rerun after a crash
    mpirun -n 5 python fed_avg.py --split-method non-iid --algorithm scaffold --measure-drift
                                                                       # beyond
    (as root or in Colab, add: --allow-run-as-root --oversubscribe)

Rank 0 is the server and holds the global model; ranks 1..N-1 host the clients, each of
which owns a fixed shard of the training set (split_indices). Each round, as in
McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data", Algorithm 1 (server_round is its "Server executes", client_update its "ClientUpdate"):
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
tests check; exactly so while no client's gradient is longer than --clip-norm, since each
client clips its own. The lr follows a one-cycle schedule over each client's local steps of
the run. Results go to results/fed_avg_<split>.json, the split's plot to
figures/data_distribution_<split>.png.

Beyond the assignment, each through the script's Parts (extensions.configure):
--algorithm fedprox|fedavgm|scaffold|fedrs|fedlc builds a variant around FedAvg's hooks
(extensions/fed_algorithms.py), which may amend the client's loss and step, send more beside the
weights, and set the new global weights otherwise than the average; --measure-drift records each
client rank's model against the global one each round (extensions/drift.py); --elastic goes on
without a client rank that dies, its clients moved to the others (extensions/elastic.py). With
the defaults (fedavg, no drift) the script computes what it computed without them, bit for bit.
"""
import argparse
import dataclasses
import itertools
import os
import time
import typing

import numpy as np
import torch
from mpi4py import MPI

import extensions
import utils

SERVER = 0
TABLE = 1  # the tag of the round statistics; the weights go with tag 0
# Q5: change to "non-iid" (or pass --split-method non-iid) to give each client only a few classes.
split_method = "iid"


# ----- the clients' data: each owns a fixed shard of the training set -----

SPLIT_METHODS = ("iid", "non-iid")


def split_indices(labels, num_clients, method, seed, alpha=None):
    """Deal the training indices out to clients: a list of `num_clients` sorted int64 tensors.

    Every index goes to exactly one client, every client gets at least one, and the same
    (labels, num_clients, method, seed, alpha) always gives the same split.
      iid                a seeded shuffle cut into near-equal parts (sizes differ by at most 1).
      non-iid            label skew after the "pathological" split of McMahan et al. 2017: sort
                         by label, cut into 2 x num_clients equal shards, deal each client 2 random
                         shards. McMahan's 200 shards of 300 images each held one class, so a client
                         had at most 2; here a shard holds one class only when shards align with
                         classes (10 classes, 5 clients), and a client of 4 sees 3 or 4 classes.
      non-iid, alpha=a   Dirichlet label skew (Hsu et al. 2019): each class is divided among the
                         clients in proportions drawn from Dirichlet(a, ..., a). Small a (0.1):
                         few classes per client and unequal sizes; large a (1000): nearly iid.
    Raises ValueError, with a message for the user, when the request cannot be met.
    """
    if method not in SPLIT_METHODS:
        raise ValueError(f"unknown split method {method!r}; choose from {', '.join(SPLIT_METHODS)}")
    if alpha is not None and method != "non-iid":
        raise ValueError("alpha (a Dirichlet split) applies only to the non-iid split, "
                         f"not {method}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    y = torch.as_tensor(labels).cpu().numpy()
    needed = 2 * num_clients if method == "non-iid" and alpha is None else num_clients
    if not 1 <= needed <= len(y):
        raise ValueError(f"cannot split {len(y)} samples into {needed} non-empty "
                         f"{'shards' if needed > num_clients else 'parts'} for "
                         f"{num_clients} clients")
    rng = np.random.default_rng(seed)

    if method == "iid":
        parts = np.array_split(rng.permutation(len(y)), num_clients)
    elif alpha is None:
        ### BEGIN SOLUTION
        # Q5: the non-iid split: sort by label, cut 2N shards, deal each client 2
        order = rng.permutation(len(y))
        order = order[np.argsort(y[order], kind="stable")]  # sorted by label, random within a label
        shards = np.array_split(order, 2 * num_clients)
        deal = rng.permutation(2 * num_clients)
        parts = [np.concatenate([shards[deal[2 * i]], shards[deal[2 * i + 1]]])
                 for i in range(num_clients)]
        ### END SOLUTION
    else:
        pieces = [[] for _ in range(num_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients))[:-1] * len(idx)).astype(int)
            for client, piece in enumerate(np.split(idx, cuts)):
                pieces[client].append(piece)
        parts = [np.concatenate(p) for p in pieces]
        # Small alpha can leave a client with nothing: it takes one sample from the largest.
        for i in range(num_clients):
            if len(parts[i]) == 0:
                j = max(range(num_clients), key=lambda k: len(parts[k]))
                parts[i], parts[j] = parts[j][-1:], parts[j][:-1]
    return [torch.from_numpy(np.sort(p)) for p in parts]


def plot_split(labels, parts, title, path):
    """Save a stacked bar chart of each client's class counts to `path` (a PNG).

    Uses matplotlib's Figure directly, which renders with Agg and never touches pyplot's
    global backend, so it is safe in scripts, tests and notebooks alike; imported here so
    that importing utils stays fast.
    """
    from matplotlib.figure import Figure

    labels = torch.as_tensor(labels).cpu()
    counts = torch.stack([torch.bincount(labels[p.cpu()], minlength=len(utils.CLASSES))
                          for p in parts]).numpy()
    clients = np.arange(len(parts))
    fig = Figure(figsize=(min(16, 4 + 0.4 * len(parts)), 4.5))
    ax = fig.subplots()
    bottom = np.zeros(len(parts))
    for c, name in enumerate(utils.CLASSES):
        bars = ax.bar(clients, counts[:, c], bottom=bottom, width=0.8, color=f"C{c}", label=name)
        bottom += counts[:, c]
    if len(parts) <= 20:  # total on top of each bar, while there is room for it
        ax.bar_label(bars, labels=[f"{int(t)}" for t in bottom], fontsize=8)
    ax.set_xticks(clients if len(parts) <= 20 else clients[::max(1, len(parts) // 20)])
    ax.set_ylim(0, 1.1 * bottom.max())  # headroom for the totals
    ax.set_xlabel("client")
    ax.set_ylabel("training samples")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="class")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def client_batches(shard, batch_size, epochs, seed):
    """Yield (indices, flip mask) for `epochs` passes over a client's `shard` of indices.

    Each pass is a fresh seeded permutation of the shard, cut into full batches the way
    utils.batches cuts the global order (make_shards refuses shards smaller than a batch).
    """
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = shard[torch.randperm(len(shard), generator=g).to(shard.device)]
        flips = (torch.rand(len(shard), generator=g) < 0.5).to(shard.device)
        yield from utils.batches(order, flips, batch_size)


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


@utils.traced("star")  # --trace: one comm span per call
def send_global_model_(buf, comm, workers):
    """Server: send `buf`, the P global weights, to each rank in `workers`.
    A rank in `workers`: receive them into `buf`, in place."""
    if comm.Get_rank() == SERVER:
        wait_quietly([comm.Isend(buf, dest=w) for w in workers])
        return {"bytes_sent": len(workers) * buf.nbytes, "bytes_recv": 0}
    wait_quietly([comm.Irecv(buf, source=SERVER)])
    return {"bytes_sent": 0, "bytes_recv": buf.nbytes}


@utils.traced("star", late=True)
def reduce_weighted_sums_(buf, comm, workers):
    """Server: receive `buf` from each rank in `workers` and store their sum in its own `buf`.
    A rank in `workers`: send its `buf`, [sum_k n_k w_k, sum_k n_k] over the clients it ran.

    Sums and counts, not averages: adding up is all the server has to do, and the weighted
    mean comes out right however the clients sit on ranks. All receives are posted at once,
    so a client that finishes early is not kept waiting for one that finishes late.
    """
    if comm.Get_rank() == SERVER:
        parts = np.empty((len(workers), len(buf)), dtype=buf.dtype)
        wait_quietly([comm.Irecv(parts[i], source=w) for i, w in enumerate(workers)])
        np.sum(parts, axis=0, out=buf)  # in rank order, so the result is reproducible
        # parts: for --measure-drift
        return {"bytes_sent": 0, "bytes_recv": parts.nbytes, "parts": parts}
    wait_quietly([comm.Isend(buf, dest=SERVER)])
    return {"bytes_sent": buf.nbytes, "bytes_recv": 0}


# ----- the two roles: Algorithm 1 of McMahan et al. 2017 -----

@dataclasses.dataclass
class Replica:
    """This rank's copy of what trains: the model, whose parameters are views of one flat buffer,
    the buffer of [sum n_k w_k, sum n_k] that goes up, and the bytes this rank moved."""
    model: torch.nn.Module
    flat_params: torch.Tensor
    sums: torch.Tensor
    traffic: utils.Traffic


@dataclasses.dataclass
class Federation:
    """Who holds what: the flags, each client's shard of the training set (indices), and the rank
    each client runs on (host[k]; --elastic moves the clients of a lost rank)."""
    args: argparse.Namespace
    shards: list
    host: list


class FedAvg:
    """McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
    Data": the hooks of a round, as the assignment computes them. The new global weights are the
    average; nothing else travels or persists. A variant (--algorithm, extensions/fed_algorithms.py)
    replaces some of them."""

    def __init__(self, args, flat_params, flat_grads, sizes):
        self.args, self.params, self.grads, self.sizes = args, flat_params, flat_grads, sizes
        self.downloads, self.uploads = [], []  # what travels beside the weights: nothing

    def local_loss(self, k, labels):  # client k's loss: the cross-entropy
        return torch.nn.functional.cross_entropy

    def local_step(self, k, global_weights):  # how client k takes a step: the optimizer's
        return plain_step

    def client_done_(self, k, n_k, global_weights):
        pass

    def server_update_(self, flat_params, average):  # the new global weights: the average
        flat_params.copy_(average)

    def state(self, comm, clients, host):  # what a checkpoint keeps: nothing
        return {}

    def load_state_(self, state):
        pass


def plain_step(optimizer, lr):
    optimizer.step()


def local_steps(shard_size, args):
    """SGD steps a client with `shard_size` samples takes per round."""
    steps = args.local_epochs * (shard_size // args.batch_size)
    return min(steps, args.max_steps or steps)


def client_update(model, train, fed, k, round_, local):
    """ClientUpdate(k, w): train `model`, which holds the global weights w, for --local-epochs
    passes over client k's shard. The optimizer is new each round: momentum does not carry
    over from a model the server has since replaced. `local` is the algorithm's (step, loss)
    for client k: plain_step and the cross-entropy, which FedProx and SCAFFOLD amend the first
    of and FedRS and FedLC the second (--algorithm). Returns (summed loss, steps)."""
    (x_train, y_train), args, shard = train, fed.args, fed.shards[k]
    step_, loss_fn = local
    optimizer = utils.make_optimizer(model.parameters(), args)
    steps = local_steps(len(shard), args)
    batches = client_batches(shard, args.batch_size, args.local_epochs,
                             utils.stream_seed(args.seed, round_, k))
    loss_sum = torch.zeros((), device=x_train.device)
    ### BEGIN SOLUTION
    # Q4: the client's local SGD steps over `batches` (lr, zero_grad, step, clip)
    for s, (idx, flip) in enumerate(itertools.islice(batches, steps)):
        lr = utils.lr_at(round_ * steps + s, args.rounds * steps, args.lr, args.warmup)
        utils.set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=False)  # keep .grad as views into the flat buffer
        loss_sum += utils.train_step(model, x_train[idx], y_train[idx], flip, loss_fn)
        # the loss's gradient, before a variant amends it
        utils.clip_gradients_(optimizer, args.clip_norm)
        step_(optimizer, lr)
    ### END SOLUTION
    return loss_sum.item(), steps


def server_round(replica, parts, workers):
    """Server executes, one round: send the global weights w to the ranks of the round's
    clients, wait while they train, add up what they return, and set w = sum n_k w_k / sum n_k.
    The algorithm may send and receive more beside them, and may set w otherwise.
    Returns the seconds spent sending, and each client rank's [sum n_k w_k, sum n_k]."""
    comm, traffic, algo, sums = parts.comm, replica.traffic, parts.algorithm, replica.sums
    t0 = time.perf_counter()
    for t in [replica.flat_params, *algo.downloads]:  # SCAFFOLD also sends its control variate
        with utils.staged(t, write=False) as buf:
            traffic.add(send_global_model_(buf, comm, workers))
    send_time = time.perf_counter() - t0
    with utils.staged(sums, read=False) as buf:  # the server adds the parts up with numpy
        uploads = traffic.add(reduce_weighted_sums_(buf, comm, workers))["parts"]
    for t in algo.uploads:  # SCAFFOLD: sum n_k (c_k+ - c_k)
        with utils.staged(t, read=False) as buf:
            traffic.add(reduce_weighted_sums_(buf, comm, workers))
    # the FedAvg step (FedAvg: w = the average)
    ### BEGIN SOLUTION
    # Q4: set the global weights to sum n_k w_k / sum n_k (algo.server_update_)
    algo.server_update_(replica.flat_params, sums[:-1] / sums[-1])
    ### END SOLUTION
    return send_time, uploads


def client_round(replica, train, fed, parts, clients, round_):
    """On a client rank: receive the global weights, run client_update for each of this round's
    `clients` hosted here (each from the global weights), and send back [sum n_k w_k, sum n_k]
    over them (and what the algorithm adds in each direction).
    Returns (summed loss, steps, training and upload seconds)."""
    comm, traffic, algo, sums, flat_params = parts.comm, replica.traffic, parts.algorithm, \
        replica.sums, replica.flat_params
    for t in [flat_params, *algo.downloads]:
        with utils.staged(t, read=False) as buf:
            traffic.add(send_global_model_(buf, comm, None))
    t0 = time.perf_counter()
    global_weights = flat_params.clone()
    for t in [sums, *algo.uploads]:
        t.zero_()
    loss_sum, n_steps = 0.0, 0
    for k in clients:
        flat_params.copy_(global_weights)
        local = algo.local_step(k, global_weights), algo.local_loss(k, train[1][fed.shards[k]])
        loss, steps = client_update(replica.model, train, fed, k, round_, local)
        algo.client_done_(k, len(fed.shards[k]), global_weights)
        ### BEGIN SOLUTION
        # Q4: add client k's n_k * w_k and n_k to sums
        sums[:-1] += len(fed.shards[k]) * flat_params  # n_k w_k
        sums[-1] += len(fed.shards[k])                 # n_k
        ### END SOLUTION
        loss_sum, n_steps = loss_sum + loss, n_steps + steps
    utils.sync(flat_params.device)
    train_time = time.perf_counter() - t0
    for t in [sums, *algo.uploads]:
        with utils.staged(t, write=False) as buf:
            traffic.add(reduce_weighted_sums_(buf, comm, None))
    return loss_sum, n_steps, train_time, time.perf_counter() - t0 - train_time


def federated_round(replica, train, fed, parts, clients, round_):
    """One round on every rank: the server's part, or the part of this rank's clients (`fed.host[k]`
    is client k's rank; a rank with none sits out), then every rank's statistics to every rank.
    Returns (that table, and on the server each client rank's upload, for --measure-drift)."""
    rank = parts.comm.Get_rank()
    workers = sorted({fed.host[k] for k in clients})  # the ranks this round's clients run on
    loss_sum, n_steps, train_time, comm_time, uploads = 0.0, 0, 0.0, 0.0, None
    if rank == SERVER:
        comm_time, uploads = server_round(replica, parts, workers)
    elif rank in workers:
        mine = [k for k in clients if fed.host[k] == rank]
        loss_sum, n_steps, train_time, comm_time = client_round(replica, train, fed, parts, mine,
                                                                round_)
    # every rank's statistics to every rank: all stop together if training diverged
    traffic = replica.traffic
    table = round_table([loss_sum, n_steps, train_time, comm_time, traffic.sent, traffic.received],
                        parts.comm)
    return table, uploads


@dataclasses.dataclass
class Parts:
    """The parts of training that a feature beyond the assignment may replace, each by one flag
    (extensions.configure, once, before the loop); the defaults are the assignment's own."""
    comm: MPI.Comm                                       # --elastic: the survivors' communicator
    algorithm: FedAvg                                    # --algorithm: a variant's hooks
    # --elastic: a round redone without a lost rank
    federated_round: typing.Callable = federated_round
    # --measure-drift: the client drift, each round
    meter: typing.Any = None


# ----- training -----

def parse_args(world_size):
    parser = utils.get_parser(
        "fed_avg", __doc__.splitlines()[0], epochs=None, batch_size=utils.BASE_BATCH,
        lr=utils.BASE_LR, batch_help="samples per client SGD step",
        max_steps_help="cap on each client's SGD steps per round (1 with --momentum 0: FedSGD)",
        results_help="results JSON path; default: results/fed_avg_<split>.json, e.g. "
                     "fed_avg_iid.json, fed_avg_non-iid_alpha0.1.json")
    # federated learning
    parser.add_argument("--rounds", type=utils.positive(int), default=10,
                        help="communication rounds: the server updates the global model once "
                             "per round")
    parser.add_argument("--local-epochs", type=utils.positive(int), default=1,
                        help="passes each client makes over its own shard per round (E)")
    parser.add_argument("--split-method", choices=SPLIT_METHODS, default=split_method,
                        help="how the training set is dealt to clients (see split_indices)")
    parser.add_argument("--alpha", type=utils.positive(float), default=None,
                        help="non-iid only: Dirichlet(alpha) label skew instead of 2 shards per "
                             "client; smaller is more skewed")
    parser.add_argument("--num-clients", type=utils.positive(int), default=None,
                        help="clients, spread over ranks 1..N-1; None: N-1, one per rank")
    parser.add_argument("--client-fraction", type=float, default=1.0,
                        help="fraction C of the clients that train each round")
    parser.add_argument("--figures-dir", default="figures",
                        help="where the data-distribution plot goes")
    extensions.add_flags(parser, "fed_avg")
    args = parser.parse_args()
    # names the outputs
    args.split = args.split_method + (f"_alpha{args.alpha:g}" if args.alpha else "")
    args.results = args.results or os.path.join("results", f"fed_avg_{args.split}.json")
    utils.check_args(args)
    extensions.check(args, world_size, "fed_avg")  # fills in the defaults of the algorithm's flags
    if world_size < 2:
        utils.fail("FedAvg needs a server and at least one client: mpirun -n 5 python fed_avg.py "
                   "(rank 0 serves, ranks 1-4 are clients)")
    args.num_clients = args.num_clients or world_size - 1
    if args.num_clients < world_size - 1:
        utils.fail(f"--num-clients {args.num_clients} leaves ranks idle: give each of the "
                   f"{world_size - 1} client ranks at least one client, or start fewer ranks")
    if not 0 < args.client_fraction <= 1:
        utils.fail(f"--client-fraction must be in (0, 1], got {args.client_fraction}")
    return args


def make_shards(args, y_train, comm):
    """Every rank computes the same seeded split; rank 0 plots it.
    Returns the shards and a title."""
    if args.split_method == "iid":
        title = "iid"
    else:
        title = f"non-iid, Dirichlet(alpha={args.alpha:g})" if args.alpha \
            else "non-iid, 2 label shards per client"
    try:
        shards = split_indices(y_train, args.num_clients, args.split_method, args.seed, args.alpha)
    except ValueError as e:
        utils.fail(str(e))
    sizes = [len(s) for s in shards]  # n_k, the FedAvg weights
    if min(sizes) < args.batch_size:
        k = sizes.index(min(sizes))
        utils.fail(f"client {k} has {sizes[k]} samples, fewer than one batch of "
                   f"{args.batch_size}: lower --batch-size, use fewer --num-clients"
                   + (", or a larger --alpha" if args.alpha else ""))
    # The split is seeded, so every rank computed the same one: check rather than trust.
    fingerprint = sizes + [int(s.sum()) for s in shards]
    if any(other != fingerprint for other in comm.allgather(fingerprint)):
        utils.fail("ranks computed different client splits", code=1)
    if comm.Get_rank() == SERVER:
        dataset = {"cifar10": "CIFAR-10"}.get(args.dataset, args.dataset)
        figure = os.path.join(args.figures_dir, f"data_distribution_{args.split}.png")
        plot_split(y_train, shards, f"{title}\n{len(y_train)} {dataset} training samples over "
                   f"{args.num_clients} clients", figure)
        print(f"wrote {figure}", flush=True)
    return [s.to(y_train.device) for s in shards], title


@utils.traced("star")
def round_table(row, comm):
    """Every rank's row of round statistics, to every rank: the rows to the server, the table back.

    An all-gather, point to point and waited for quietly. Not comm.Iallgather: under --elastic a
    rank can die inside it, and Open MPI's non-blocking collectives then free a send they still
    have pending, whose failure kills the job (seen)."""
    row = np.array(row, dtype=np.float64)
    table = np.empty((comm.Get_size(), len(row)))
    others = range(1, comm.Get_size())
    if comm.Get_rank() == SERVER:
        table[SERVER] = row
        wait_quietly([comm.Irecv(table[r], source=r, tag=TABLE) for r in others])
        wait_quietly([comm.Isend(table, dest=r, tag=TABLE) for r in others])
    else:
        wait_quietly([comm.Isend(row, dest=SERVER, tag=TABLE)])
        wait_quietly([comm.Irecv(table, source=SERVER, tag=TABLE)])
    return table


def round_record(model, test, h, table, t0, args):
    """Server, after a round: evaluate the global model, print the round's line, and return its
    record: `h` (its number, clients and train loss) with the test and the times from `table`."""
    (x_test, y_test), round_time = test, time.perf_counter() - t0
    test_loss, correct = utils.evaluate(model, x_test, y_test)
    h.update(test_loss=test_loss / len(x_test), test_acc=100 * correct / len(x_test),
             train_time=table[1:, 2].max(),  # the slowest client rank
             # moving weights: the server's sends, then the slowest upload (not the waiting)
             comm_time=table[0, 3] + table[1:, 3].max(),
             round_time=round_time, eval_time=time.perf_counter() - t0 - round_time)
    print(f"round {h['round']:3d}/{args.rounds} | train loss {h['train_loss']:.4f} | "
          f"test acc {h['test_acc']:6.2f}% | {h['round_time'] + h['eval_time']:6.1f} s | "
          f"comm {h['comm_time']:5.2f} s", flush=True)
    return h


def report(replica, parts, progress, t_start, about, args):
    """Server: print the final line and save the results, `about` being what the run was."""
    utils.finish_trace(args, parts.comm)
    if parts.comm.Get_rank() != SERVER:
        return
    history = progress["history"]
    print(f"Final test accuracy: {history[-1]['test_acc']:.2f}%", flush=True)
    utils.save_results(args.results, dict(
        script="fed_avg", config=vars(args), world_size=MPI.COMM_WORLD.Get_size(), **about,
        wall_time=time.perf_counter() - t_start, final_test_acc=history[-1]["test_acc"],
        history=history, bytes_per_rank=[{"bytes_sent": int(s), "bytes_recv": int(r)}
                                         for s, r in progress["traffic"]],
        figure=os.path.join(args.figures_dir, f"data_distribution_{args.split}.png"),
        **({"failures": parts.comm.failures} if args.elastic else {})))
    if args.save_model:
        utils.save_model(args.save_model, replica.model)


def describe(args, about, n_train, world_size):
    """The run's first line: the clients, the split, the data, the local steps, the rounds."""
    steps = about["local_steps"]
    return (f"fed_avg | server + {world_size - 1} client ranks | {args.num_clients} clients, "
            f"{about['clients_per_round']} per round | {about['split']} | {args.dataset}: "
            f"{n_train} "
            f"train | {about['params']:,} params | {args.algorithm} | local: {args.local_epochs} "
            f"epoch(s) = {min(steps)}{'' if min(steps) == max(steps) else f'-{max(steps)}'} "
            "steps of "
            f"{args.batch_size}, lr {args.lr:g} | {args.rounds} rounds | {about['device']} x "
            f"{about['threads']} threads per rank")


def main():
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    utils.abort_on_exception(comm)
    args = parse_args(world_size)
    device, threads = utils.setup(args, comm, outputs=[args.figures_dir + os.sep])

    # data: every rank loads it all and computes the same split; a client trains on its shard only
    train, test = utils.load_data(args, device, comm)
    shards, split_title = make_shards(args, train[1], comm)
    hosts = [1 + k % (world_size - 1) for k in range(args.num_clients)]  # client k runs on hosts[k]
    fed = Federation(args, shards, hosts)

    # model: the weights live in one flat buffer, so one call moves them all
    model = utils.make_model(device, args.seed)
    flat_params, flat_grads = utils.flatten_parameters(model)
    per_round = max(1, round(args.client_fraction * args.num_clients))
    counts = [torch.bincount(train[1][s], minlength=len(utils.CLASSES)).tolist() for s in shards]
    about = dict(split=split_title, clients_per_round=per_round,
                 client_sizes=[len(s) for s in shards], client_ranks=hosts,  # --elastic moves them
                 client_class_counts=counts,
                 local_steps=[local_steps(len(s), args) for s in shards], threads=threads,
                 device=str(device), params=len(flat_params))
    utils.print0(describe(args, about, len(train[0]), world_size))

    # resume: a round depends only on the global model, the client sampler and the metrics
    sampler = torch.Generator().manual_seed(args.seed)  # which clients train: a stream of its own
    progress = utils.load_checkpoint(args, world_size, model, None, dict(
        round=0, history=[], wall_time=0.0, traffic=[[0, 0]] * world_size,
        sampler=sampler.get_state(), algorithm={}))
    sampler.set_state(progress["sampler"])
    sums = torch.zeros(len(flat_params) + 1, device=device)  # [sum_k n_k w_k, sum_k n_k]
    replica = Replica(model, flat_params, sums, utils.Traffic(*progress["traffic"][rank]))
    # what --algorithm, --measure-drift and --elastic replace (extensions/): nothing, by default
    fedavg = FedAvg(args, flat_params, flat_grads, about["client_sizes"])
    parts = extensions.configure(args, "fed_avg", Parts(comm, fedavg), replica, fed,
                                 data=(train, test))
    parts.algorithm.load_state_(progress["algorithm"])  # FedAvgM's momentum, SCAFFOLD's c, c_k

    t_start = time.perf_counter() - progress["wall_time"]
    for round_ in range(progress["round"], args.rounds):
        t0 = time.perf_counter()
        clients = sorted(torch.randperm(args.num_clients, generator=sampler)[:per_round].tolist())
        table, uploads = parts.federated_round(replica, train, fed, parts, clients, round_)
        train_loss = table[:, 0].sum() / max(1, table[:, 1].sum())
        utils.stop_if_diverged(train_loss, parts.comm)
        state = parts.algorithm.state(parts.comm, clients, hosts)  # SCAFFOLD: c_k to the server
        progress.update(round=round_ + 1, sampler=sampler.get_state(), algorithm=state,
                        traffic=table[:, 4:].tolist())
        if parts.comm.Get_rank() == SERVER:
            h = dict(round=round_ + 1, clients=clients, train_loss=train_loss)
            h = round_record(model, test, h, table, t0, args)
            if parts.meter:  # --measure-drift: each client rank's model against the new global one
                ranks = sorted({hosts[k] for k in clients})
                h.update(drift=parts.meter.measure(flat_params, uploads, ranks, clients))
            progress.update(history=progress["history"] + [h],
                            wall_time=time.perf_counter() - t_start)
            if args.checkpoint:  # the server's weights are the global model
                utils.save_checkpoint(args, world_size, model, None, progress)
    report(replica, parts, progress, t_start, about, args)


if __name__ == "__main__":
    main()
