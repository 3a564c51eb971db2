"""What the four scripts share: flags, setup, MPI buffers, data, batching, the model, evaluation,
results and checkpoints. What only one script uses lives in that script (FedAvg's client
splits are in fed_avg.py).

Communication is deliberately NOT here: each script shows its own pattern (all-reduce,
gather to a server, FedAvg weighting) so that a reader sees it without jumping files.
This module imports no MPI, so that `python cent_sgd.py` works before mpi4py is installed.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import pickle
import platform
import random
import resource
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The launcher tells each process its rank before MPI is initialised; reading it here
# lets argument errors and logs come from rank 0 only, with no MPI import in this file.
RANK = int(next((os.environ[k] for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
                 if k in os.environ), 0))
LOCAL_SIZE = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", os.environ.get("MPI_LOCALNRANKS", 1)))
LOCAL_RANK = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("MPI_LOCALRANKID", 0)))

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# cent_sgd.py's lr and batch; the distributed scripts scale the lr from these (scaled_lr)
BASE_LR, BASE_BATCH = 0.05, 64
# Without BatchNorm this model sits at the edge of stability near the peak lr: a few steps'
# gradients grow many times their usual norm, and on some seeds and hosts the run then diverges or
# falls to chance. Clipping the norm bounds those steps and leaves the typical ones alone
# (clip_gradients_).
CLIP_NORM = 5.0


def print0(*args, comm=None, **kwargs):
    """print() from rank 0 only, flushed so mpirun shows lines as they happen. Rank 0 of `comm`,
    the communicator in use, when there is one (--elastic: the survivors'); else of the job."""
    if (RANK if comm is None else comm.Get_rank()) == 0:
        print(*args, **kwargs, flush=True)


def abort_on_exception(comm):
    """If this rank raises, print its traceback and end every rank with MPI_Abort.

    Without it the other ranks would wait forever in their next collective: a hang.
    (`python -m mpi4py script.py` does the same; this works with plain `python` too.)
    A NotImplementedError is a TODO of the students' handout (grading/handout.py): one line,
    no traceback. Every rank may reach the TODO at once, so rank r waits r/4 s before it
    prints: the lowest rank there prints, and its MPI_Abort ends the others first.
    """
    def hook(kind, value, tb):
        if issubclass(kind, NotImplementedError):
            time.sleep(0.25 * min(comm.Get_rank(), 8))
            print(f"error: not implemented yet: {value}", file=sys.stderr, flush=True)
        else:
            sys.__excepthook__(kind, value, tb)
        sys.stderr.flush()
        if comm.Get_size() > 1:
            comm.Abort(1)
    sys.excepthook = hook


def fail(message, code=2, comm=None):
    """Exit with one line on stderr. Call it on every rank at the same point: rank 0 (of `comm`,
    as print0) prints."""
    if (RANK if comm is None else comm.Get_rank()) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def stop_if_diverged(train_loss, comm=None):
    """Stop every rank, with one line, once the train loss is no longer finite: a NaN spreads
    through the weights, and the rest of the run would compute nothing."""
    if not math.isfinite(train_loss):
        fail(f"training diverged (train loss {train_loss}); lower --lr", code=1, comm=comm)


# ----------------------------------------------------------------------------- flags

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" in --help, except where the default is None and the help says
    what happens."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are printed once, by rank 0, instead of once per rank."""

    def error(self, message):
        if RANK == 0:
            self.print_usage(sys.stderr)
        fail(message)


def positive(kind):
    """An argparse type that refuses zero and negative values with a clear message."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def get_parser(script, description, *, epochs, batch_size, lr, batch_help="samples per step",
               max_steps_help="stop after this many optimizer steps (tests, quick looks)",
               results_help=None):
    """The flags every script shares, with per-script defaults. Scripts add their own.
    epochs=None leaves --epochs out (FedAvg counts rounds instead)."""
    p = ArgumentParser(description=description, formatter_class=HelpFormatter)
    # optimization
    if epochs is not None:
        p.add_argument("--epochs", type=positive(int), default=epochs,
                       help="passes over the training set")
    p.add_argument("--batch-size", type=positive(int), default=batch_size, help=batch_help)
    p.add_argument("--lr", type=positive(float), default=lr,
                   help="peak learning rate of the one-cycle schedule"
                        + ("; default: cent_sgd.py's lr, scaled by sqrt(global batch / its batch) "
                           "(utils.scaled_lr)" if lr is None else ""))
    p.add_argument("--momentum", type=float, default=0.9,
                   help="SGD (Nesterov) momentum; 0 for plain SGD")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty")
    p.add_argument("--warmup", type=float, default=0.2,
                   help="fraction of steps spent ramping the lr up")
    p.add_argument("--clip-norm", type=float, default=CLIP_NORM,
                   help="scale the gradient each step uses (the average, where ranks average) "
                        "down to this L2 norm when it is longer; 0: never")
    p.add_argument("--seed", type=int, default=0,
                   help="seed (>= 0) for model init, data order and augmentation")
    # data
    p.add_argument("--dataset", choices=("cifar10", "synthetic"), default="cifar10",
                   help="synthetic: small, CIFAR-shaped and learnable; needs no download")
    p.add_argument("--data-dir", default="data", help="holds (or receives) cifar-10-batches-py/")
    p.add_argument("--train-size", type=positive(int), default=None,
                   help="train on the first N training samples only (quick looks, tests); "
                        "default: all")
    # system
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when present")
    p.add_argument("--results", default=None,
                   help=results_help or f"results JSON path; default: results/{script}.json")
    p.add_argument("--save-model", default=None, metavar="PATH",
                   help="save the final weights, one vector in parameter order (torch.save), "
                        "atomically")
    p.add_argument("--max-steps", type=positive(int), default=None, help=max_steps_help)
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="write one timeline of every rank here (.json, or .json.gz), to open in "
                        "ui.perfetto.dev or chrome://tracing (extensions/timeline.py)")
    # checkpoints
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="after every epoch (round), save the training state here, atomically; "
                        "every rank must be able to read it (one machine, or a shared disk)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint when it exists; "
                        "the flags must match the run that wrote it")
    p.set_defaults(script=script)
    return p


def check_args(args):
    """Invariants argparse cannot express; every rank runs this, so all exit together."""
    if not 0 <= args.momentum < 1:
        fail(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.weight_decay < 0:
        fail(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.clip_norm < 0:
        fail(f"--clip-norm must be >= 0 (0: no clipping), got {args.clip_norm}")
    if not 0 <= args.warmup < 1:
        fail(f"--warmup must be in [0, 1), got {args.warmup}")
    if args.seed < 0:
        fail(f"--seed must be >= 0, got {args.seed}")
    if args.trace and not args.trace.endswith((".json", ".json.gz")):
        fail(f"--trace writes Chrome trace-event JSON: give a .json or .json.gz path, "
             f"not {args.trace!r}")
    if args.resume and not args.checkpoint:
        fail("--resume needs --checkpoint PATH, the file to resume from")
    args.results = args.results or os.path.join("results", f"{args.script}.json")


# ----------------------------------------------------------------------------- setup

def setup(args, comm=None, outputs=()):
    """Check that every output can be written, pick the device and threads, seed the RNGs.
    Returns (device, threads per rank)."""
    check_writable([args.results, args.save_model, args.checkpoint, args.trace, *outputs], comm)
    device = get_device(args.device)
    threads = set_threads(device)
    seed_everything(args.seed)
    start_trace(args, comm, device)
    return device, threads


def check_writable(paths, comm=None):
    """Refuse, before any training, an output path that cannot be written (a missing parent
    that cannot be made, a read-only folder), rather than with a traceback after an epoch.

    Rank 0 writes the outputs, so rank 0 tries, and tells the other ranks what it found
    (agree), so that all ranks exit together.
    A path ending in a separator is a folder (FedAvg's figures); others are files.
    """
    error = None
    if RANK == 0:
        for path in filter(None, paths):
            folder = path if path.endswith(os.sep) else os.path.dirname(path) or "."
            try:
                os.makedirs(folder, exist_ok=True)
                probe = os.path.join(folder, f".write-test-{os.getpid()}")
                with open(probe, "w"):
                    pass
                os.remove(probe)
            except OSError as e:
                error = f"cannot write {path} ({e.strerror or type(e).__name__})"
                break
    agree(error, comm)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name="auto"):
    """Pick the device; with several ranks on one machine, rank i takes GPU i mod #GPUs."""
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but torch sees no CUDA device")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", LOCAL_RANK % torch.cuda.device_count())


def set_threads(device):
    """Give each rank its share of the cores, so ranks x threads <= cores (no oversubscription).

    mpirun may already have bound this rank to some cores; the affinity mask says how many.
    An OMP_NUM_THREADS set by the user wins: torch has already read it.
    """
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, cores // LOCAL_SIZE) if cores == os.cpu_count() else cores)
    return torch.get_num_threads()


def sync(device):
    """Wait for queued GPU work, so that a timer sees finished results."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- MPI buffers

def mpi_is_cuda_aware(device):
    """True if `device` is a GPU and the MPI library can read its memory itself (Open MPI's
    MPIX_Query_cuda_support).

    mpi4py does not wrap that Open MPI extension, so look it up in the loaded library;
    other MPIs lack the symbol, and then we stage through host memory to be safe.
    """
    if device.type != "cuda":
        return False
    import ctypes
    from mpi4py import MPI
    try:
        return bool(ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support())
    except (AttributeError, OSError):
        return False


_pinned = {}  # device tensor's (address, size, dtype) -> its pinned host copy, made once


@contextlib.contextmanager
def staged(t, device_ok=False, read=True, write=True):
    """The buffer an MPI call should use for tensor `t`, so that the call reads as one line:

        with utils.staged(flat_grads) as buf:
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    On the CPU, `buf` is `t`'s own memory as a numpy array: no copy. On a GPU, it is a
    pinned host copy of `t`, which is copied back into `t` after the call; `read=False` skips
    the copy in (MPI only writes the buffer), `write=False` the copy back (MPI only reads it).
    With `device_ok` (a CUDA-aware MPI, and no host arithmetic on `buf`), `buf` is `t` itself.
    """
    if t.device.type == "cpu":
        yield t.numpy()
        return
    torch.cuda.synchronize(t.device)  # MPI must see the results of queued kernels
    if device_ok:
        yield t
        return
    key = (t.data_ptr(), t.numel(), t.dtype)
    if key not in _pinned:
        _pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host = _pinned[key]
    if read:
        host.copy_(t)
    yield host.numpy()
    if write:
        t.copy_(host)


def mpi_empty(shape, device, device_ok=False):
    """An uninitialized float32 tensor that only MPI calls and their arithmetic use: on the
    device when MPI can use device memory there, else in (pinned) host memory, with no
    device copy to stage through."""
    if device.type == "cuda" and device_ok:
        return torch.empty(shape, device=device)
    return torch.empty(shape, pin_memory=device.type == "cuda" and torch.cuda.is_available())


class Traffic:
    """The bytes this rank put on and took off the wire, added up from what the
    communication functions return ({"bytes_sent", "bytes_recv"}; None when unknown)."""

    def __init__(self, sent=0, received=0):
        self.sent, self.received = sent, received

    def add(self, moved):
        if moved["bytes_sent"] is not None:
            self.sent += moved["bytes_sent"]
            self.received += moved["bytes_recv"]
        return moved


# ----------------------------------------------------------------------------- data

def load_data(args, device, comm=None):
    """Return ((x_train, y_train), (x_test, y_test)): uint8 images N x 3 x 32 x 32 and int64
    labels, all on `device`. Uint8 keeps CIFAR-10 at 180 MB per rank instead of 740 MB of float32.

    Under MPI pass `comm`, so that the ranks agree on whether loading worked (see load_cifar10).
    """
    global DATA_READ
    DATA_READ = args.dataset, args.data_dir
    with span("io", "load data"):
        if args.dataset == "synthetic":
            train, test = make_synthetic(seed=1234)
        else:
            train, test = load_cifar10(args.data_dir, comm)
    if args.train_size:
        train = tuple(t[:args.train_size] for t in train)
    return tuple((x.to(device), y.to(device)) for x, y in (train, test))


DATA_READ = None  # (--dataset, --data-dir) of the last load_data, for the record (data_source)
# test_batch of the official cifar-10-python.tar.gz
CIFAR10_TEST_MD5 = "40351d587109b95175f43aff81a1287e"


def data_source():
    """What load_data read, in words: synthetic, the official CIFAR-10 files, or another copy of
    them (one rebuilt from JPEGs, say, whose accuracies are close to but not those of the official
    files)."""
    if DATA_READ is None:
        return None
    dataset, data_dir = DATA_READ
    if dataset == "synthetic":
        return "synthetic (utils.make_synthetic)"
    import hashlib
    with open(os.path.join(data_dir, "cifar-10-batches-py", "test_batch"), "rb") as f:
        official = hashlib.md5(f.read()).hexdigest() == CIFAR10_TEST_MD5
    return ("CIFAR-10, the official files" if official
            else "CIFAR-10, a copy that differs from the official files")


def load_cifar10(data_dir, comm=None):
    """Read cifar-10-batches-py/ directly; download it with torchvision when it is absent.

    Direct reading also accepts copies that torchvision's md5 check would reject
    (such as one rebuilt from JPEGs), and skips torchvision's per-image PIL objects.

    Each machine reads its own disk, so the ranks may find different things: one machine may
    lack the data while another has it. Under MPI (`comm`) the first rank of each machine
    downloads what its machine lacks, and then every rank tells every other whether it
    could read the data, so that all stop together, with one line naming the rank that
    failed, or all go on. A rank that stopped alone would leave the others in a collective.
    """
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    reason = "another rank of this machine tried"
    if not os.path.isdir(folder) and LOCAL_RANK == 0:
        reason = download_cifar10(data_dir)
    if comm is not None:
        comm.Barrier()  # the other ranks of a machine wait for its download
    error = None if os.path.isdir(folder) else (
        f"CIFAR-10 is not in {folder} and downloading it failed ({reason}). Put the "
        f"python-version batches there (see README), or run with --dataset synthetic")
    agree(error, comm)

    def read(name):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        x = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        return x, torch.tensor(batch["labels"], dtype=torch.int64)

    data, name = None, "data_batch_1"
    try:
        train = []
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            train.append(read(name))
        test = train.pop()
        data = (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])), test
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
        error = (f"cannot read {os.path.join(folder, name)} ({type(e).__name__}: {e}); "
                 f"delete {folder} and fetch it again")
    agree(error, comm)
    return data


def agree(error, comm=None):
    """Stop every rank, with one line, if any rank has an `error` (a message, or None).

    For a decision that rests on one rank's local state (its disk, its memory): all ranks
    learn every rank's verdict, so that they exit together rather than one exiting while the
    others wait in a collective. Rank 0 prints the first error, naming the rank and machine.
    """
    if comm is not None and comm.Get_size() > 1:
        errors = comm.allgather(error and (error, platform.node()))  # small: pickling is fine
        rank, first = next(((r, e) for r, e in enumerate(errors) if e), (None, None))
        if first:
            fail(first[0] if rank == 0 else f"on rank {rank} ({first[1]}): {first[0]}")
    elif error:
        fail(error)


def download_cifar10(data_dir):
    """Download with torchvision; return None on success, else a short reason."""
    try:
        import torchvision
        torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        return None
    except Exception as e:  # offline, DNS, disk full, ...: all end in the same advice
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def make_synthetic(seed, n_train=5000, n_test=1000, num_classes=10):
    """A small CIFAR-shaped dataset a CNN can learn in an epoch or two.

    Each class owns a smooth random colour pattern (left-right symmetric, so flips keep
    the label); a sample is its class pattern at a random contrast plus pixel noise.
    """
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=32,
                             mode="bilinear")
    patterns = (patterns + patterns.flip(-1)) / 2

    def sample(n):
        y = torch.randint(num_classes, (n,), generator=g)
        contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
        noise = torch.randn(n, 3, 32, 32, generator=g)
        # 0.5 + contrast * (pattern - 0.5) + 0.25 * noise, the same bits computed in place:
        # every process the tests start makes this set, and new 60 MB arrays cost more than the math
        x = patterns[y].sub_(0.5).mul_(contrast).add_(0.5).add_(noise.mul_(0.25))
        return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8), y

    return sample(n_train), sample(n_test)


def normalize(x_uint8, flip=None):
    """uint8 batch -> normalized float32 batch, channels-last; `flip` is a bool mask of
    images to mirror."""
    x = x_uint8.float().div_(255)
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    mean = torch.tensor(CIFAR10_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(CIFAR10_STD, device=x.device)[:, None, None]
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def epoch_order(n, seed, epoch):
    """This epoch's sample order and flip decisions: the same on every rank and in every script.

    Global batch k is order[k*B:(k+1)*B]. Rank r of N takes the strided share
    order[k*B + r:(k+1)*B:N], so the N ranks together see exactly centralized batch k,
    with the same flips; that is what makes data-parallel SGD equal centralized SGD.
    """
    g = torch.Generator().manual_seed(stream_seed(seed, epoch))
    return torch.randperm(n, generator=g), torch.rand(n, generator=g) < 0.5


def stream_seed(*keys):
    """The seed of one random stream, named by non-negative integer keys (seed, epoch, ...).

    numpy's SeedSequence mixes the keys, so that distinct keys give unrelated streams: no
    two of (0, 100003) and (1, 0), or (0, 1, 2) and (0, 2, 1), collide, as they could if
    the keys were combined arithmetically.
    """
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def batches(order, flips, global_batch, rank=0, world_size=1, start=0):
    """Yield (indices, flip mask) of this rank's share of each full global batch, from batch
    `start` of the epoch on (a resumed run's first, or the step --elastic redoes).

    The last partial global batch is dropped: each epoch's order differs, so no sample is
    left out for good, and every step has the same size on every rank.
    """
    for k in range(start, len(order) // global_batch):
        s = slice(k * global_batch + rank, (k + 1) * global_batch, world_size)
        yield order[s], flips[s]


def count_steps(n_train, global_batch, args):
    """Optimizer steps of the run: full global batches per epoch x epochs, capped by
    --max-steps. A global batch larger than the training set is refused here, on every rank."""
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch == 0:
        fail(f"the global batch of {global_batch} samples is larger than the {n_train} "
             "training samples")
    return min(args.epochs * steps_per_epoch, args.max_steps or float("inf"))


def scaled_lr(global_batch):
    """Default peak lr of the distributed scripts: cent_sgd.py's BASE_LR at BASE_BATCH, scaled
    by the square root of the batch growth. N times fewer steps can each take a larger lr,
    but the linear rule (x N) diverges here without BatchNorm."""
    return BASE_LR * math.sqrt(global_batch / BASE_BATCH)


def lr_at(step, total_steps, peak_lr, warmup=0.2):
    """The lr of step `step` (0-based) of `total_steps` under a one-cycle schedule: a linear
    ramp from 0 up to `peak_lr` over the first `warmup` of the run, then linearly down to 0.

    Step s is taken at t = (s + 1) / (total_steps + 1), strictly inside (0, 1), so that
    neither the first nor the last step has lr 0 (a step that would change nothing).
    """
    t = (step + 1) / (total_steps + 1)
    return peak_lr * (t / warmup if t < warmup else (1 - t) / (1 - warmup))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- model

class Net(nn.Module):
    """A small CIFAR-10 CNN (~114k parameters) with no BatchNorm.

    Without BatchNorm a sample's gradient depends on no other sample in its batch, so
    averaging the gradients of N shards of a batch gives exactly the gradient of the
    whole batch: data-parallel SGD then equals centralized SGD, which tests check.
    """

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 4 * 4, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)   # 32 -> 16
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)   # 16 -> 8
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)   # 8 -> 4
        return self.fc(torch.flatten(x, 1))


def make_model(device, seed):
    """The same seed gives the same initial weights on every rank and in every script."""
    torch.manual_seed(seed)
    return Net().to(device, memory_format=torch.channels_last)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def parameters_vector(model):
    """All weights as one vector in logical (NCHW) order, whatever each tensor's memory layout:
    what --save-model writes, so that models from different scripts compare element by element."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()


def flatten_parameters(model):
    """Make every parameter and its .grad views into two flat float32 buffers; return both.

    Then one MPI call moves all gradients (or all weights) with no packing copy, as
    PyTorch DDP does with gradient_as_bucket_view. Backward accumulates into .grad in
    place, so the views persist; zero the flat gradient, do not set grads to None.
    """
    params = list(model.parameters())
    device = params[0].device
    n = sum(p.numel() for p in params)
    flat_params = torch.empty(n, dtype=torch.float32, device=device)
    flat_grads = torch.zeros(n, dtype=torch.float32, device=device)
    offset = 0
    for p in params:
        k = p.numel()
        # keep each tensor's memory format (channels-last convs) by viewing through its strides
        view = flat_params[offset:offset + k].as_strided(p.shape, p.stride())
        view.copy_(p.data)
        p.data = view
        p.grad = flat_grads[offset:offset + k].as_strided(p.shape, p.stride())
        offset += k
    return flat_params, flat_grads


# ----------------------------------------------------------------------------- train / eval

def make_optimizer(params, args):
    """SGD with Nesterov momentum (plain SGD at --momentum 0) and weight decay, as every
    script uses."""
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0,
                           weight_decay=args.weight_decay)


def clip_gradients_(optimizer, max_norm):
    """Scale the gradients of the optimizer's parameters in place so that their joint L2 norm is at
    most `max_norm` (--clip-norm; 0: leave them). Every script calls it on the gradient its step
    uses, after any average over ranks, so the equivalences with centralized SGD still hold."""
    if max_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def train_step(model, x, y, flip, loss_fn=F.cross_entropy):
    """Forward and backward on one batch (or one rank's share of it); returns its mean loss."""
    with span("compute", "forward+backward"):
        loss = loss_fn(model(normalize(x, flip)), y)
        loss.backward()
    return loss.detach()


@torch.no_grad()
def evaluate(model, x, y, batch_size=1000):
    """Summed loss and number correct over (x, y); sums, so that ranks can add them up."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    with span("eval", "evaluate"):
        for i in range(0, len(x), batch_size):
            logits = model(normalize(x[i:i + batch_size]))
            loss_sum += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum")
            correct += (logits.argmax(1) == y[i:i + batch_size]).sum()
        model.train()
        return loss_sum.item(), correct.item()


# ----------------------------------------------------------------------------- --trace

TRACER = None    # this rank's extensions.timeline.Tracer while --trace records, else None
TIMELINE = None  # rank 0, after the trace is written: its summary, for the results JSON


def start_trace(args, comm, device):
    """--trace: start recording this rank's spans (setup calls it); without it, nothing."""
    global TRACER
    if args.trace:
        from extensions import timeline  # only when asked
        TRACER = timeline.start(comm, timeline.role(args.script, comm), device)


def finish_trace(args, comm=None):
    """--trace: stop recording; rank 0 merges every rank's spans into args.trace. Call it on
    every rank, with the communicator in use (under --elastic, the survivors')."""
    global TRACER, TIMELINE
    if TRACER is not None:
        from extensions import timeline
        tracer, TRACER = TRACER, None
        TIMELINE = timeline.finish(tracer, comm, args.trace, args.script)


def span(cat, name):
    """--trace: time the block as a span of category `cat` (compute, eval, io); else nothing."""
    return TRACER.span(cat, name) if TRACER is not None else contextlib.nullcontext()


def traced(meets=None, late=False):
    """--trace: each call of the decorated communication pattern is a `comm` span, with the bytes
    it returns. `meets`: "all" when no rank leaves before the last one arrives (an all-reduce),
    "star" when rank 0 meets each other rank (a server); `late`: the pattern is a step's exchange,
    whose last arrival is that step's late rank. Without --trace: the plain call."""
    def decorate(pattern):
        name = pattern.__name__.rstrip("_")

        @functools.wraps(pattern)
        def call(*args, **kwargs):
            if TRACER is None:
                return pattern(*args, **kwargs)
            # inside another pattern (the average's all-reduce): one span, named after both
            with TRACER.within(name) or TRACER.span("comm", name, meets, late) as details:
                moved = pattern(*args, **kwargs)
                if isinstance(moved, dict):  # its bytes (and a ring's or tree's steps)
                    details.update({k: v for k, v in moved.items() if isinstance(v, int)})
            return moved
        return call
    return decorate


# ----------------------------------------------------------------------------- results

def save_results(path, results):
    """Write the run's record (config, metrics, timings, hardware) as JSON, atomically.
    `max_rss_mb` is the peak resident memory of the process that writes it (rank 0)."""
    results = dict(results, data=data_source(), hardware=hardware(), torch=torch.__version__,
                   max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                   **({"timeline": TIMELINE} if TIMELINE else {}))
    write_atomically(path, lambda f: json.dump(results, f, indent=1))


def save_model(path, model):
    """--save-model: the final weights as one vector (parameters_vector), written atomically."""
    write_atomically(path, lambda f: torch.save(parameters_vector(model), f), binary=True)


def write_atomically(path, write, binary=False):
    """Call write(f) on a temporary file beside `path`, then rename it over `path` (os.replace).

    A crash or a disconnect in the middle leaves the previous file whole, and no temporary
    file behind.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def hardware():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}


# ----------------------------------------------------------------------------- checkpoints

# Flags that name files, pick hardware or say what a failure does: a run may resume with other
# values of these, but any other flag changes what is computed (even --epochs: it stretches
# the lr schedule).
NOT_CONFIG = ("results", "save_model", "checkpoint", "resume", "data_dir", "device", "figures_dir",
              "script", "elastic", "trace")
CHECKPOINT_FORMAT = "ee599-hw5-checkpoint-2"  # a tag, so that any other file is refused by name


def run_config(args):
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_CONFIG}


def save_checkpoint(args, world_size, model, optimizer, progress):
    """Save a run's full state to --checkpoint, atomically (a crash while saving keeps the
    previous checkpoint): the model, the optimizer (momentum) and `progress`, the script's
    own counters (epoch or round, step, history, wall time, traffic, ...).

    Every random choice is drawn from a generator seeded by (seed, epoch, ...) or saved in
    `progress` (FedAvg's client sampler), so no global RNG state needs saving.
    """
    progress = json_safe(progress)
    state = dict(format=CHECKPOINT_FORMAT, script=args.script, world_size=world_size,
                 config=run_config(args), model=model.state_dict(),
                 optimizer=optimizer.state_dict() if optimizer else None, progress=progress)
    with span("io", "save checkpoint"):
        write_atomically(args.checkpoint, lambda f: torch.save(state, f), binary=True)


def json_safe(value):
    """numpy numbers -> Python numbers, in nested lists and dicts (tensors untouched), which
    torch.load(weights_only=True) accepts."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def load_checkpoint(args, world_size, model, optimizer, progress):
    """With --resume and an existing --checkpoint, load its model and optimizer in place and
    update `progress` from it; otherwise leave everything as it is (so that one command
    both starts a run and resumes it). Returns `progress`.

    torch.load(weights_only=True) builds only tensors and plain containers: a checkpoint
    from elsewhere cannot run code. A file that is corrupt, or was written by another
    script, process count or configuration, ends the run with one line. load_state_dict
    copies into the existing parameters, so they stay views of the flat buffers.
    """
    path = args.checkpoint
    if not args.resume:
        return progress
    if not os.path.exists(path):
        print0(f"no checkpoint at {path} yet: starting from scratch")
        return progress
    try:
        with span("io", "load checkpoint"):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with code in it, ...
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); delete it to start from scratch")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        fail(f"{path} is not a checkpoint of these scripts (or of an older version of them)")
    if state["script"] != args.script:
        fail(f"{path} was written by {state['script']}.py, not {args.script}.py")
    if state["world_size"] != world_size:
        fail(f"{path} was written by a run of {state['world_size']} ranks; "
             f"this one has {world_size}")
    config = run_config(args)
    changed = [k for k in sorted(set(config) | set(state["config"]))
               if config.get(k) != state["config"].get(k)]
    if changed:
        k, more = changed[0], f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        fail(f"{path} was written with another configuration: --{k.replace('_', '-')} was "
             f"{state['config'].get(k)}, now {config.get(k)}{more}")
    model.load_state_dict(state["model"])
    if optimizer:
        optimizer.load_state_dict(state["optimizer"])
    progress.update(state["progress"])
    # a run that lost ranks (--elastic) counted fewer than it restarts with
    if "traffic" in progress:
        progress["traffic"] += [[0, 0]] * (world_size - len(progress["traffic"]))
    done = ", ".join(f"{k} {progress[k]}" for k in ("epoch", "round", "step") if k in progress)
    print0(f"resumed from {path}: {done}")
    return progress
