"""What all four scripts share: flags, setup, data, model, batching, splits, evaluation, logging,
checkpoints.

Communication is deliberately NOT here: each script shows its own pattern (all-reduce,
gather to a server, FedAvg weighting) so that a reader sees it without jumping files.
This module imports no MPI, so that `python cent_sgd.py` works before mpi4py is installed.
"""
import argparse
import json
import math
import os
import pickle
import platform
import random
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


def print0(*args, **kwargs):
    """print() from rank 0 only, flushed so mpirun shows lines as they happen."""
    if RANK == 0:
        print(*args, **kwargs, flush=True)


def abort_on_exception(comm):
    """If this rank raises, print its traceback and end every rank with MPI_Abort.

    Without it the other ranks would wait forever in their next collective: a hang.
    (`python -m mpi4py script.py` does the same; this works with plain `python` too.)
    """
    def hook(kind, value, tb):
        sys.__excepthook__(kind, value, tb)
        sys.stderr.flush()
        comm.Abort(1)
    if comm.Get_size() > 1:
        sys.excepthook = hook


def fail(message, code=2):
    """Exit with one line on stderr. Call it on every rank at the same point: rank 0 prints."""
    if RANK == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# ----------------------------------------------------------------------------- flags

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" in --help, except where the default is None and the help says what happens."""

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


def get_parser(description, *, epochs, batch_size, lr, batch_help="samples per step",
               max_steps_help="stop after this many optimizer steps (tests, quick looks)"):
    """The flags every script shares, with per-script defaults. Scripts add their own.
    epochs=None leaves --epochs out (FedAvg counts rounds instead)."""
    p = ArgumentParser(description=description, formatter_class=HelpFormatter)
    # optimization
    if epochs is not None:
        p.add_argument("--epochs", type=positive(int), default=epochs, help="passes over the training set")
    p.add_argument("--batch-size", type=positive(int), default=batch_size, help=batch_help)
    p.add_argument("--lr", type=positive(float), default=lr, help="peak learning rate of the one-cycle schedule" + (
        "; default: 0.05 x sqrt(global batch / 64), cent_sgd.py's lr scaled with the batch" if lr is None else ""))
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum; 0 for plain SGD")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of steps spent ramping the lr up")
    p.add_argument("--seed", type=int, default=0, help="seed for model init, data order and augmentation")
    # data
    p.add_argument("--dataset", choices=("cifar10", "synthetic"), default="cifar10",
                   help="synthetic: small, CIFAR-shaped and learnable; needs no download")
    p.add_argument("--data-dir", default="data", help="holds (or receives) cifar-10-batches-py/")
    p.add_argument("--train-size", type=positive(int), default=None,
                   help="train on the first N training samples only (quick looks, tests); default: all")
    # system
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when present")
    p.add_argument("--results", default=None, help="results JSON path; default: results/<script>.json")
    p.add_argument("--save-model", default=None, metavar="PATH", help="save the final weights, one vector in parameter order (torch.save)")
    p.add_argument("--max-steps", type=positive(int), default=None, help=max_steps_help)
    # checkpoints
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="after every epoch (round), save the training state here, atomically; "
                        "every rank must be able to read it (one machine, or a shared disk)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint when it exists; the flags must match the run that wrote it")
    return p


def check_args(args):
    """Invariants argparse cannot express; every rank runs this, so all exit together."""
    if not 0 <= args.momentum < 1:
        fail(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.weight_decay < 0:
        fail(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.warmup < 1:
        fail(f"--warmup must be in [0, 1), got {args.warmup}")
    if args.resume and not args.checkpoint:
        fail("--resume needs --checkpoint PATH, the file to resume from")


# ----------------------------------------------------------------------------- setup

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
    """Wait for queued GPU work, so that a timer or an MPI call sees finished results."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mpi_is_cuda_aware():
    """True if the MPI library can read GPU memory itself (Open MPI's MPIX_Query_cuda_support).

    mpi4py does not wrap that Open MPI extension, so look it up in the loaded library;
    other MPIs lack the symbol, and then we stage through host memory to be safe.
    """
    import ctypes
    from mpi4py import MPI
    try:
        return bool(ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support())
    except (AttributeError, OSError):
        return False


def mpi_staging(flat, cuda_aware):
    """The buffer MPI should read and write for the device tensor `flat`.

    On the CPU that is `flat` itself; on a GPU, a pinned host copy of it unless the MPI
    is CUDA-aware. The caller copies into and out of it around each MPI call.
    """
    if flat.device.type == "cpu" or cuda_aware:
        return flat
    return torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)


def as_mpi_buffer(t):
    """A view of tensor `t` that mpi4py's uppercase calls accept, without copying:
    a numpy array on the CPU, the tensor itself on a GPU (via __cuda_array_interface__)."""
    return t.numpy() if t.device.type == "cpu" else t


# ----------------------------------------------------------------------------- data

def load_data(args, device, comm=None):
    """Return ((x_train, y_train), (x_test, y_test)): uint8 images N x 3 x 32 x 32 and int64
    labels, all on `device`. Uint8 keeps CIFAR-10 at 180 MB per rank instead of 740 MB of float32.

    Under MPI pass `comm`: only rank 0 downloads, and the others learn from it whether it worked.
    """
    if args.dataset == "synthetic":
        train, test = make_synthetic(seed=1234)
    else:
        train, test = load_cifar10(args.data_dir, comm)
    if args.train_size:
        train = tuple(t[:args.train_size] for t in train)
    return tuple((x.to(device), y.to(device)) for x, y in (train, test))


def load_cifar10(data_dir, comm=None):
    """Read cifar-10-batches-py/ directly; download it with torchvision when it is absent.

    Direct reading also accepts copies that torchvision's md5 check would reject
    (such as one rebuilt from JPEGs), and skips torchvision's per-image PIL objects.
    """
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        error = download_cifar10(data_dir) if RANK == 0 else None
        if comm is not None:
            error = comm.bcast(error, root=0)  # a small control message: pickling is fine
        if error:
            fail(f"CIFAR-10 is not in {folder} and downloading it failed ({error}). Put the "
                 f"python-version batches there (see README), or run with --dataset synthetic")

    def read(name):
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            x = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            return x, torch.tensor(batch["labels"], dtype=torch.int64)
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            fail(f"cannot read {path} ({type(e).__name__}: {e}); delete {folder} and fetch it again")

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    return (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])), read("test_batch")


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
    patterns = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=32, mode="bilinear")
    patterns = (patterns + patterns.flip(-1)) / 2

    def sample(n):
        y = torch.randint(num_classes, (n,), generator=g)
        contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
        x = 0.5 + contrast * (patterns[y] - 0.5) + 0.25 * torch.randn(n, 3, 32, 32, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    return sample(n_train), sample(n_test)


def normalize(x_uint8, flip=None):
    """uint8 batch -> normalized float32 batch, channels-last; `flip` is a bool mask of images to mirror."""
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
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g), torch.rand(n, generator=g) < 0.5


def batches(order, flips, global_batch, rank=0, world_size=1):
    """Yield (indices, flip mask) of this rank's share of each full global batch.

    The last partial global batch is dropped: each epoch's order differs, so no sample is
    left out for good, and every step has the same size on every rank.
    """
    for k in range(len(order) // global_batch):
        s = slice(k * global_batch + rank, (k + 1) * global_batch, world_size)
        yield order[s], flips[s]


def count_steps(n_train, global_batch, args):
    """Optimizer steps of the run: full global batches per epoch x epochs, capped by
    --max-steps. A global batch larger than the training set is refused here, on every rank."""
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch == 0:
        fail(f"the global batch of {global_batch} samples is larger than the {n_train} training samples")
    return min(args.epochs * steps_per_epoch, args.max_steps or float("inf"))


def scaled_lr(global_batch):
    """Default peak lr of the distributed scripts: cent_sgd.py's 0.05 at batch 64, scaled by the
    square root of the batch growth. N times fewer steps can each take a larger lr, but the
    linear rule (x N) diverges here without BatchNorm."""
    return 0.05 * math.sqrt(global_batch / 64)


def lr_at(step, total_steps, peak_lr, warmup=0.2):
    """One-cycle schedule: linear ramp from 0 to peak over `warmup` of the steps, then linear to 0."""
    t = step / max(1, total_steps)
    return peak_lr * (t / warmup if t < warmup else (1 - t) / (1 - warmup))


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

def train_step(model, x, y, flip):
    """Forward and backward on one batch (or one rank's share of it); returns its mean loss."""
    loss = F.cross_entropy(model(normalize(x, flip)), y)
    loss.backward()
    return loss.detach()


@torch.no_grad()
def evaluate(model, x, y, batch_size=1000):
    """Summed loss and number correct over (x, y); sums, so that ranks can add them up."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for i in range(0, len(x), batch_size):
        logits = model(normalize(x[i:i + batch_size]))
        loss_sum += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum")
        correct += (logits.argmax(1) == y[i:i + batch_size]).sum()
    model.train()
    return loss_sum.item(), correct.item()


# ----------------------------------------------------------------------------- results

def results_path(args, script):
    return args.results or os.path.join("results", f"{os.path.splitext(os.path.basename(script))[0]}.json")


def save_results(path, results):
    """Write the run's record (config, metrics, timings, hardware) as JSON, atomically."""
    results = dict(results, hardware=hardware(), torch=torch.__version__,
                   finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_atomically(path, lambda f: json.dump(results, f, indent=1))


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

# Flags that name files or pick hardware: a run may resume with other values of these, but
# any other flag changes what is computed (even --epochs: it stretches the lr schedule).
NOT_CONFIG = ("results", "save_model", "checkpoint", "resume", "data_dir", "device", "figures_dir")
CHECKPOINT_FORMAT = "ee599-hw5-checkpoint-1"  # a tag, so that any other file is refused by name


def run_config(args):
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_CONFIG}


def rng_state():
    """Python's, numpy's and torch's global RNG states, as types torch.load(weights_only=True) accepts.

    The scripts draw their data order from seeded generators of their own (epoch_order,
    client_seed), so these matter only to code that would use the global RNGs.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(path, state):
    """torch.save `state` to `path` atomically: a crash while saving keeps the previous checkpoint."""
    write_atomically(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(args, script, world_size):
    """The state that `script` saved in --checkpoint, or None when not resuming or when the
    file does not exist yet (so one command both starts a run and resumes it).

    torch.load(weights_only=True) builds only tensors and plain containers: a checkpoint
    from elsewhere cannot run code. A file that is corrupt, or was written by another
    script, process count or configuration, ends the run with one line.
    """
    path = args.checkpoint
    if not args.resume:
        return None
    if not os.path.exists(path):
        print0(f"no checkpoint at {path} yet: starting from scratch")
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle with code in it, ...
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); delete it to start from scratch")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        fail(f"{path} is not a checkpoint of these scripts")
    if state["script"] != script:
        fail(f"{path} was written by {state['script']}.py, not {script}.py")
    if state["world_size"] != world_size:
        fail(f"{path} was written by a run of {state['world_size']} ranks; this one has {world_size}")
    config = run_config(args)
    changed = [k for k in sorted(set(config) | set(state["config"])) if config.get(k) != state["config"].get(k)]
    if changed:
        k, more = changed[0], f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        fail(f"{path} was written with another configuration: --{k.replace('_', '-')} was "
             f"{state['config'].get(k)}, now {config.get(k)}{more}")
    return state


def checkpoint(script, args, world_size, model, optimizer, history, **progress):
    """A run's full state: the model, the optimizer (momentum), the RNGs, the metrics so far
    and the script's progress (epoch or round, step, ...). load_checkpoint checks the rest."""
    history = json.loads(json.dumps(history))  # numpy floats -> floats, which weights_only=True accepts
    return dict(format=CHECKPOINT_FORMAT, script=script, world_size=world_size, config=run_config(args),
                model=model.state_dict(), optimizer=optimizer.state_dict() if optimizer else None,
                rng=rng_state(), history=history, **progress)


def restore(state, model, optimizer):
    """Load a checkpoint's model, optimizer and RNG states in place. load_state_dict copies
    into the existing parameters, so they stay views of the flat buffers."""
    model.load_state_dict(state["model"])
    if optimizer:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])


# ----------------------------------------------------------------------------- client splits (FedAvg)

SPLIT_METHODS = ("iid", "non-iid")


def split_indices(labels, num_clients, method, seed, alpha=None):
    """Deal the training indices out to clients: a list of `num_clients` sorted int64 tensors.

    Every index goes to exactly one client, every client gets at least one, and the same
    (labels, num_clients, method, seed, alpha) always gives the same split.
      iid                a seeded shuffle cut into near-equal parts (sizes differ by at most 1).
      non-iid            label skew, the "pathological" split of McMahan et al. 2017: sort by
                         label, cut into 2 x num_clients equal shards, deal each client 2 random
                         shards. A client sees 2 classes when shards align with classes (10
                         classes, 5 clients), up to 4 when a shard straddles two (4 clients).
      non-iid, alpha=a   Dirichlet label skew (Hsu et al. 2019): each class is divided among the
                         clients in proportions drawn from Dirichlet(a, ..., a). Small a (0.1):
                         few classes per client and unequal sizes; large a (1000): nearly iid.
    Raises ValueError, with a message for the user, when the request cannot be met.
    """
    if method not in SPLIT_METHODS:
        raise ValueError(f"unknown split method {method!r}; choose from {', '.join(SPLIT_METHODS)}")
    if alpha is not None and method != "non-iid":
        raise ValueError(f"alpha (a Dirichlet split) applies only to the non-iid split, not {method}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    y = torch.as_tensor(labels).cpu().numpy()
    needed = 2 * num_clients if method == "non-iid" and alpha is None else num_clients
    if not 1 <= needed <= len(y):
        raise ValueError(f"cannot split {len(y)} samples into {needed} non-empty "
                         f"{'shards' if needed > num_clients else 'parts'} for {num_clients} clients")
    rng = np.random.default_rng(seed)

    if method == "iid":
        parts = np.array_split(rng.permutation(len(y)), num_clients)
    elif alpha is None:
        order = rng.permutation(len(y))
        order = order[np.argsort(y[order], kind="stable")]  # sorted by label, random within a label
        shards = np.array_split(order, 2 * num_clients)
        deal = rng.permutation(2 * num_clients)
        parts = [np.concatenate([shards[deal[2 * i]], shards[deal[2 * i + 1]]]) for i in range(num_clients)]
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
    counts = torch.stack([torch.bincount(labels[p.cpu()], minlength=len(CLASSES)) for p in parts]).numpy()
    clients = np.arange(len(parts))
    fig = Figure(figsize=(min(16, 4 + 0.4 * len(parts)), 4.5))
    ax = fig.subplots()
    bottom = np.zeros(len(parts))
    for c, name in enumerate(CLASSES):
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


def client_seed(seed, round_, client):
    """The seed of one client's data order in one round, a stream of its own.

    numpy's SeedSequence mixes the three numbers, so that nearby keys, such as
    (0, 1, 2) and (0, 2, 1), give unrelated streams. All three must be >= 0.
    """
    return int(np.random.SeedSequence([seed, round_, client]).generate_state(1)[0])


def client_batches(shard, batch_size, epochs, seed):
    """Yield (indices, flip mask) for `epochs` passes over a client's `shard` of indices.

    Each pass is a fresh seeded permutation of the shard, cut into full batches the way
    `batches` cuts the global order (fed_avg.py refuses shards smaller than a batch).
    """
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = shard[torch.randperm(len(shard), generator=g).to(shard.device)]
        flips = (torch.rand(len(shard), generator=g) < 0.5).to(shard.device)
        yield from batches(order, flips, batch_size)
