"""The serverless training step against PyTorch DDP (gloo), and variants of the step, in one job.

    mpirun --allow-run-as-root --oversubscribe -n 2 python bench/ddp.py --port 29511 --out results/bench/ddp_n2.json
    mpirun --allow-run-as-root --oversubscribe -n 4 python bench/ddp.py --port 29512 --out results/bench/ddp_n4.json

Every rank builds the same model (utils.make_model, same seed) once per variant:
  serverless  dist_sgd_serverless.py's step: grads are views of one flat buffer, one
              MPI_Allreduce (ALLREDUCE["mpi"]) on it, divide by N, SGD step
  ddp         torch.nn.parallel.DistributedDataParallel, gloo backend, default buckets
  skip        the serverless step without the all-reduce: what the step costs uncoupled
  copy        grads left where autograd puts them: torch.cat into a flat buffer, all-reduce,
              copy back, the packing that flatten_parameters avoids
  overlap     DDP's idea by hand: buckets of ~25% of the parameters, filled in backward's
              order; a post-accumulate-grad hook starts an Iallreduce when one is full,
              and the step waits for all of them before the optimizer step
First a check: with momentum 0, after 3 steps on the same batches from the same weights,
every variant but `skip` must hold the serverless parameters to float32 reduction noise.
Then the timing: warmup, then --blocks rounds in which each variant runs --steps steps
(a round's order rotates), so that machine noise hits all of them alike. steps/s is
total steps / total wall of the slowest rank. Rank 0 writes --out (JSON).
"""
import json
import os
import sys
import time

# the script lives in bench/, but imports utils and dist_sgd_serverless from the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mpi4py import MPI  # noqa: E402

import utils  # noqa: E402
from dist_sgd_serverless import ALLREDUCE  # noqa: E402

VARIANTS = ("serverless", "ddp", "skip", "copy", "overlap")
CHECK_STEPS, TOLERANCE = 3, 1e-5


def build(variant, comm, lr, momentum, weight_decay):
    """A fresh model and its step(x, y, flip) for one variant; step returns its seconds in communication."""
    model = utils.make_model(torch.device("cpu"), seed=0)
    if variant == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif variant != "copy":
        flat_params, flat_grads = utils.flatten_parameters(model)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0,
                                weight_decay=weight_decay)
    if variant in ("serverless", "skip"):
        step = flat_step(model, optimizer, flat_grads, comm, reduce=variant == "serverless")
    elif variant == "ddp":
        step = ddp_step(model, optimizer)
    elif variant == "copy":
        step = copy_step(model, optimizer, params, comm)
    else:  # overlap
        step = overlap_step(model, optimizer, params, flat_grads, comm)
    inner = model.module if variant == "ddp" else model
    return inner, step


def flat_step(model, optimizer, flat_grads, comm, reduce):
    """serverless (reduce) and skip (not): the grads are views of flat_grads, all-reduced in one call."""
    world_size = comm.Get_size()

    def step(x, y, flip):
        flat_grads.zero_()
        utils.train_step(model, x, y, flip)
        t = time.perf_counter()
        if reduce:
            ALLREDUCE["mpi"](flat_grads.numpy(), comm)
            flat_grads.div_(world_size)
        t = time.perf_counter() - t
        utils.clip_gradients_(optimizer, utils.CLIP_NORM)  # as the scripts' step, in every variant
        optimizer.step()
        return t
    return step


def ddp_step(model, optimizer):
    """ddp: the model is DDP's, which all-reduces the grads in buckets inside backward."""
    def step(x, y, flip):
        optimizer.zero_grad()
        utils.train_step(model, x, y, flip)  # DDP all-reduces inside backward
        utils.clip_gradients_(optimizer, utils.CLIP_NORM)  # as the scripts' step, in every variant
        optimizer.step()
        return 0.0
    return step


def copy_step(model, optimizer, params, comm):
    """The grads where autograd left them: packed into one buffer, all-reduced, unpacked."""
    world_size = comm.Get_size()
    sizes = [p.numel() for p in params]

    def step(x, y, flip):
        optimizer.zero_grad()
        utils.train_step(model, x, y, flip)
        t = time.perf_counter()
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # pack: one copy
        comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
        flat.div_(world_size)
        for p, g in zip(params, flat.split(sizes)):  # unpack: another copy
            p.grad.copy_(g.view(p.shape))
        t = time.perf_counter() - t
        utils.clip_gradients_(optimizer, utils.CLIP_NORM)  # as the scripts' step, in every variant
        optimizer.step()
        return t
    return step


def overlap_step(model, optimizer, params, flat_grads, comm):
    """DDP's idea by hand: a hook starts a bucket's Iallreduce inside backward once its last grad is in."""
    world_size = comm.Get_size()
    buckets, bucket_of = gradient_buckets(params, flat_grads)
    pending, requests = [0] * len(buckets), []

    def hook(p):  # runs inside backward, right after p.grad was accumulated
        b = bucket_of[p]
        pending[b] -= 1
        if pending[b] == 0:  # same order on every rank, as collectives require
            requests.append(comm.Iallreduce(MPI.IN_PLACE, buckets[b][0], op=MPI.SUM))

    for p in params:
        p.register_post_accumulate_grad_hook(hook)

    def step(x, y, flip):
        flat_grads.zero_()
        pending[:] = [n for _, n in buckets]
        requests.clear()
        utils.train_step(model, x, y, flip)
        t = time.perf_counter()
        MPI.Request.Waitall(requests)
        flat_grads.div_(world_size)
        t = time.perf_counter() - t
        utils.clip_gradients_(optimizer, utils.CLIP_NORM)  # as the scripts' step, in every variant
        optimizer.step()
        return t
    return step


def gradient_buckets(params, flat_grads):
    """[(a bucket's slice of flat_grads, its number of parameters)], and each parameter's bucket."""
    # Backward produces grads last layer first, so walk the parameters in reverse and
    # close a bucket once it holds >= 25% of P (DDP's rule, with its cap scaled down):
    # each bucket is then a contiguous slice of the flat gradient.
    offsets = np.cumsum([0] + [p.numel() for p in params])
    buckets, members, hi = [], [], len(flat_grads)
    bucket_of = {}
    for i in reversed(range(len(params))):
        members.append(params[i])
        if hi - offsets[i] >= len(flat_grads) // 4 or i == 0:
            for p in members:
                bucket_of[p] = len(buckets)
            buckets.append((flat_grads[offsets[i]:hi].numpy(), len(members)))
            members, hi = [], offsets[i]
    return buckets, bucket_of


def parse_args():
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=utils.HelpFormatter)
    # the step
    parser.add_argument("--batch-size", type=utils.positive(int), default=64, help="samples per rank per step")
    parser.add_argument("--lr", type=utils.positive(float), default=0.05, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum while timing")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty")
    # timing
    parser.add_argument("--warmup", type=utils.positive(int), default=5, help="untimed steps per variant")
    parser.add_argument("--steps", type=utils.positive(int), default=20, help="steps per variant per block")
    parser.add_argument("--blocks", type=utils.positive(int), default=5, help="interleaved blocks")
    # data and system
    parser.add_argument("--dataset", choices=("cifar10", "synthetic"), default="cifar10", help="training images")
    parser.add_argument("--data-dir", default="data", help="holds cifar-10-batches-py/")
    parser.add_argument("--port", type=int, default=29500, help="MASTER_PORT of torch.distributed")
    parser.add_argument("--out", required=True, help="results JSON path")
    return parser.parse_args()


def main():
    args = parse_args()
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    is_root = rank == 0
    utils.abort_on_exception(comm)
    threads = utils.set_threads(torch.device("cpu"))
    # DDP's process group over the very processes mpirun started, told where to meet
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)

    # data: this rank's shares of the global batches of epoch 0, as the scripts take them
    synthetic = args.dataset == "synthetic"
    x, y = utils.make_synthetic(seed=1234)[0] if synthetic else utils.load_cifar10(args.data_dir, comm)[0]
    order, flips = utils.epoch_order(len(x), seed=0, epoch=0)
    shares = list(utils.batches(order, flips, world_size * args.batch_size, rank, world_size))

    def batch(i):
        idx, flip = shares[i % len(shares)]
        return x[idx], y[idx], flip

    max_diff = check_variants(batch, comm, args)
    result, n_steps = time_variants(batch, comm, args)
    for v, r in result.items():
        utils.print0(f"N={world_size} {v:>10}: {r['steps_per_s']:7.2f} steps/s | {r['step_ms']:7.2f} ms/step | "
                     f"{r['comm_ms']:6.2f} ms in communication")
    if is_root:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"n": world_size, "threads": threads, "batch_size": args.batch_size,
                       "dataset": args.dataset, "steps": n_steps, "blocks": args.blocks,
                       "check_steps": CHECK_STEPS, "max_abs_diff": max_diff, "variants": result}, f, indent=1)
    dist.destroy_process_group()


def check_variants(batch, comm, args):
    """The same parameters after a few steps of plain SGD (momentum 0), or the job ends; returns
    each variant's max |parameter - serverless's|."""
    check = {}
    for variant in VARIANTS:
        model, step = build(variant, comm, args.lr, 0.0, args.weight_decay)
        for i in range(CHECK_STEPS):
            step(*batch(i))
        check[variant] = utils.parameters_vector(model)
    max_diff = {v: float((check[v] - check["serverless"]).abs().max()) for v in VARIANTS if v != "skip"}
    utils.print0(f"after {CHECK_STEPS} steps, max |param - serverless|: " +
                 ", ".join(f"{v} {d:.2e}" for v, d in max_diff.items()))
    bad = {v: d for v, d in max_diff.items() if not d <= TOLERANCE}
    if bad:
        utils.fail(f"parameters differ from the serverless step by more than {TOLERANCE}: {bad}", code=1)
    return max_diff


def time_variants(batch, comm, args):
    """Warmup, then --blocks rounds of --steps steps of each variant, in an order that rotates each
    round. Returns ({variant: steps/s, ms per step, ms of it in communication}, the steps timed)."""
    world_size = comm.Get_size()
    steps = {v: build(v, comm, args.lr, args.momentum, args.weight_decay)[1] for v in VARIANTS}
    for v in VARIANTS:
        for i in range(args.warmup):
            steps[v](*batch(i))
    wall, in_comm = np.zeros(len(VARIANTS)), np.zeros(len(VARIANTS))
    for block in range(args.blocks):
        for j in np.roll(np.arange(len(VARIANTS)), -block):
            comm.Barrier()
            t0 = time.perf_counter()
            for i in range(args.steps):
                in_comm[j] += steps[VARIANTS[j]](*batch(block * args.steps + i))
            wall[j] += time.perf_counter() - t0
    comm.Allreduce(MPI.IN_PLACE, wall, op=MPI.MAX)      # the slowest rank sets the pace
    comm.Allreduce(MPI.IN_PLACE, in_comm, op=MPI.SUM)   # then the mean over ranks
    n_steps = args.blocks * args.steps
    result = {v: {"steps_per_s": n_steps / wall[j], "step_ms": 1e3 * wall[j] / n_steps,
                  "comm_ms": 1e3 * in_comm[j] / world_size / n_steps} for j, v in enumerate(VARIANTS)}
    return result, n_steps


if __name__ == "__main__":
    main()
