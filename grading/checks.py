"""The graded checks of HW5: one source for grading/grade.py and the tests (tests/test_grading.py
runs them on the solution, tests/test_fed_avg.py uses the FedAvg reference below).

Each check runs a submission's scripts (a folder laid out like the handout) under mpirun on the
synthetic set, with a deadline: a hang or a crash fails that check, and grading goes on. A check
is a list of cases; its score is its points times the fraction of cases that pass. The references
(centralized SGD, FedAvg computed in one process, the client split's properties) come from the
code the students are given, in ROOT: cent_sgd.py, utils.py, and the given parts of fed_avg.py.

    python grading/checks.py split     # in a submission's folder: its non-iid split's properties
"""
import dataclasses
import functools
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the reference code: the solution's repo, or the autograder's copy
# Open MPI's launcher now and then fails before any rank runs (bench/cluster.py's LAUNCHER_FLAKE):
# that launch ran nothing, so it is run once more
LAUNCHER_FLAKE = "The PMIx server's listener thread failed to start"
ENV = {"PYTHONUNBUFFERED": "1", "OMPI_MCA_btl": os.environ.get("OMPI_MCA_btl", "^ofi")}
# 4 plain SGD steps on the synthetic set: what the equivalence checks train
QUICK = ["--dataset", "synthetic", "--momentum", "0", "--lr", "0.05", "--max-steps", "4"]
B = 16  # per-rank (per-worker) batch of the equivalence checks
# float32 sums in another order differ by ~1e-7 relative; a wrong sample or scale by far more
ATOL = 2e-5
TODO = re.compile(r"not implemented yet: (Q\d+: .*)")


class Timeout(Exception):
    pass


@dataclasses.dataclass
class Check:
    name: str
    question: str
    what: str      # one line, for the table and docs/grading.md
    timeout: int   # seconds, for all of the check's runs together
    run: object    # run(ctx) -> [(passed, line)], one per case


CHECKS = []


def check(name, question, timeout, what):
    def register(run):
        CHECKS.append(Check(name, question, what, timeout, run))
        return run
    return register


# ----- running a submission -----

def launch(cmd, cwd, timeout):
    """Run cmd in its own process group and return the CompletedProcess; on a timeout kill the
    group (mpirun and every rank) and raise Timeout."""
    cmd = list(map(str, cmd))
    for attempt in range(2):
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise Timeout(f"`{' '.join(map(str, cmd[-8:]))}` timed out after {timeout:.0f} s")
        if not (attempt == 0 and proc.returncode and LAUNCHER_FLAKE in err and not out):
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def mpirun_cmd(n, *args):
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(n), sys.executable,
            *map(str, args)]


def failure(proc):
    """One line on why a run failed: the TODO it stopped at, else the last lines it wrote."""
    text = proc.stderr + proc.stdout
    todo = TODO.search(text)
    if todo:
        return f"stopped at the TODO {todo.group(1)}"
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("--")]
    return f"exit {proc.returncode}: " + " | ".join(lines[-6:])[-600:]


class Context:
    """One grading: the submission's folder, a scratch folder, and the runs the checks share
    (cached: a run two checks need, or a reference, is made once)."""

    def __init__(self, folder, scratch):
        self.folder, self.scratch, self.deadline = folder, scratch, None
        self.cache = {}

    def remaining(self):
        return self.deadline - time.monotonic()

    def run(self, key, cmd, cwd):
        """The cached CompletedProcess of `cmd` (or the Timeout it raised), under the deadline."""
        if key not in self.cache:
            try:
                if self.remaining() <= 0:
                    raise Timeout("no time left for this check")
                self.cache[key] = launch(cmd, cwd, self.remaining())
            except Timeout as e:
                self.cache[key] = e
        if isinstance(self.cache[key], Timeout):
            raise self.cache[key]
        return self.cache[key]

    def script(self, n, script, *flags):
        """Run a submission's script on n ranks with `flags`; its outputs go to the scratch folder.
        Returns (CompletedProcess, folder of its results.json and model.pt)."""
        key = (n, script, *map(str, flags))
        out = os.path.join(self.scratch, re.sub(r"[^\w.-]+", "_", "-".join(map(str, key))))
        os.makedirs(out, exist_ok=True)
        extra = ["--results", f"{out}/results.json", "--save-model", f"{out}/model.pt"]
        if script == "fed_avg.py":
            extra += ["--figures-dir", out]
        proc = self.run(key, mpirun_cmd(n, script, *flags, *extra), self.folder)
        return proc, out

    def centralized(self, batch, *flags):
        """The reference: ROOT's cent_sgd.py on the global batch; its final weights."""
        import torch
        key = ("cent", batch, *map(str, flags))
        out = os.path.join(self.scratch, f"cent-{batch}-{'-'.join(map(str, flags))}")
        os.makedirs(out, exist_ok=True)
        proc = self.run(key, [sys.executable, "cent_sgd.py", *QUICK, "--batch-size", batch, *flags,
                              "--results", f"{out}/r.json", "--save-model", f"{out}/model.pt"],
                        ROOT)
        if proc.returncode:
            raise RuntimeError(f"the reference cent_sgd.py failed: {failure(proc)}")
        return torch.load(f"{out}/model.pt")


def finished(proc, out=None):
    """(passed, line) for a run that must end with `Final test accuracy`."""
    if proc.returncode == 0 and re.search(r"^Final test accuracy: [\d.]+%$", proc.stdout, re.M):
        return True, "ran and printed `Final test accuracy`"
    return False, failure(proc)


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


# ----- the checks -----

@check("cent_sgd_runs", "Q1", 120, "cent_sgd.py runs and prints `Final test accuracy` (given code)")
def cent_sgd_runs(ctx):
    proc = ctx.run("cent_runs", [sys.executable, "cent_sgd.py", "--dataset", "synthetic",
                                 "--max-steps", 2, "--results", f"{ctx.scratch}/cent.json"],
                   ctx.folder)
    return [finished(proc)]


@check("serverless_runs", "Q2", 120, "mpirun -n 2 dist_sgd_serverless.py runs to the end")
def serverless_runs(ctx):
    return [finished(ctx.script(2, "dist_sgd_serverless.py", "--dataset", "synthetic",
                                "--max-steps", 2)[0])]


def equals_centralized(ctx, n, script, ranks, centralized_batch, flags):
    """(passed, line): the script's final weights equal centralized SGD's on the global batch."""
    import torch
    proc, out = ctx.script(ranks, script, *QUICK, "--batch-size", B, *flags)
    if proc.returncode:
        return False, f"N={n}: {failure(proc)}"
    got, expected = torch.load(f"{out}/model.pt"), ctx.centralized(centralized_batch, *flags)
    diff = (got - expected).abs().max().item()
    return diff < ATOL, f"N={n}: largest difference to centralized SGD {diff:.2g} (< {ATOL:g})"


@check("serverless_equals_centralized", "Q2", 240,
       "N = 2, 4 ranks (MPI_Allreduce): the weights equal cent_sgd.py's on the batch N x 16")
def serverless_equals_centralized(ctx):
    return [equals_centralized(ctx, n, "dist_sgd_serverless.py", n, n * B, []) for n in (2, 4)]


@check("param_server_runs", "Q3", 120, "mpirun -n 3 dist_sgd_param_server.py runs to the end")
def param_server_runs(ctx):
    return [finished(ctx.script(3, "dist_sgd_param_server.py", "--dataset", "synthetic",
                                "--max-steps", 2)[0])]


PS_CASES = [(2, 0.0), (4, 0.9)]  # (workers, momentum): the momentum lives on the server alone


@check("param_server_equals_centralized", "Q3", 240,
       "N = 2, 4 workers (momentum 0, 0.9): the weights equal cent_sgd.py's on the batch N x 16")
def param_server_equals_centralized(ctx):
    return [equals_centralized(ctx, w, "dist_sgd_param_server.py", w + 1, w * B,
                               ["--momentum", m]) for w, m in PS_CASES]


@check("param_server_bytes", "Q3", 120,
       "the bytes of Q6: per step each worker sends and receives 4P, the server 4PW each way")
def param_server_bytes(ctx):
    cases = []
    for w, m in PS_CASES:
        proc, out = ctx.script(w + 1, "dist_sgd_param_server.py", *QUICK, "--batch-size", B,
                               "--momentum", m)
        if proc.returncode:
            cases.append((False, f"N={w}: {failure(proc)}"))
            continue
        r = results(out)
        p, s = r["params"], r["steps"]
        expected = [{"bytes_sent": w * 4 * p * s, "bytes_recv": w * 4 * p * s}] \
            + [{"bytes_sent": 4 * p * s, "bytes_recv": 4 * p * s}] * w
        ok = r["bytes_per_rank"] == expected
        cases.append((ok, f"N={w}: bytes per rank {'match' if ok else 'differ from'} the formula"
                      + ("" if ok else f": {r['bytes_per_rank']} != {expected}")))
    return cases


FED = ["--dataset", "synthetic", "--warmup", 0, "--batch-size", B, "--momentum", 0,
       "--clip-norm", 0]
FEDSGD = [*FED, "--split-method", "non-iid", "--alpha", 0.5, "--num-clients", 4, "--rounds", 2,
          "--max-steps", 1]  # unequal Dirichlet shards, 2 on each of 2 client ranks


@check("fed_avg_runs", "Q4", 120, "mpirun -n 3 fed_avg.py runs to the end (iid)")
def fed_avg_runs(ctx):
    return [finished(ctx.script(3, "fed_avg.py", "--dataset", "synthetic", "--rounds", 1,
                                "--max-steps", 2)[0])]


@check("fedsgd_weighted", "Q4", 180,
       "FedSGD (1 local step, 4 unequal clients, 2 rounds) equals the n_k-weighted gradient step")
def fedsgd_weighted(ctx):
    import torch
    proc, out = ctx.script(3, "fed_avg.py", *FEDSGD)
    if proc.returncode:
        return [(False, failure(proc))]
    r, got = results(out), torch.load(f"{out}/model.pt")
    shards = reference_shards(4, "non-iid", 0.5)
    clients = [h["clients"] for h in r["history"]]
    weighted = fedavg_reference(shards, clients, local_steps=1, clip_norm=0)
    unweighted = fedavg_reference(shards, clients, local_steps=1, clip_norm=0, weighted=False)
    diff, control = (got - weighted).abs().max().item(), (weighted - unweighted).abs().max().item()
    return [(diff < ATOL and control > 10 * ATOL,
             f"largest difference to the weighted step {diff:.2g} (< {ATOL:g}); "
             f"the unweighted mean is {control:.2g} away")]


@check("fed_avg_bytes", "Q4", 120,
       "the bytes of Q6: per round, P floats down to each client rank and P + 1 back")
def fed_avg_bytes(ctx):
    proc, out = ctx.script(3, "fed_avg.py", *FEDSGD)
    if proc.returncode:
        return [(False, failure(proc))]
    r = results(out)
    p, rounds = r["params"], len(r["history"])
    expected = [{"bytes_sent": rounds * 2 * p * 4, "bytes_recv": rounds * 2 * (p + 1) * 4}] \
        + [{"bytes_sent": rounds * (p + 1) * 4, "bytes_recv": rounds * p * 4}] * 2
    ok = r["bytes_per_rank"] == expected
    return [(ok, f"bytes per rank {'match' if ok else 'differ from'} the formula"
             + ("" if ok else f": {r['bytes_per_rank']} != {expected}"))]


@check("fed_avg_noniid_runs", "Q5", 120,
       "mpirun -n 3 fed_avg.py --split-method non-iid runs to the end")
def fed_avg_noniid_runs(ctx):
    return [finished(ctx.script(3, "fed_avg.py", "--dataset", "synthetic", "--rounds", 1,
                                "--max-steps", 2, "--split-method", "non-iid")[0])]


@check("noniid_split", "Q5", 120,
       "split_indices(non-iid) deals every index to one client, and each client few classes")
def noniid_split(ctx):
    proc = ctx.run("split", [sys.executable, os.path.join(HERE, "checks.py"), "split"], ctx.folder)
    cases = [(line.startswith("ok"), line[3:] if line.startswith("ok") else line[5:])
             for line in proc.stdout.splitlines() if line.startswith(("ok ", "FAIL "))]
    return cases or [(False, failure(proc))]


def allreduce(ctx, name):
    proc = ctx.run(("allreduce", name), mpirun_cmd(5, "-m", "mpi4py",
                                                    os.path.join(HERE, "allreduce_check.py"),
                                                    name), ctx.folder)
    fails = [line.split("FAIL ", 1)[1] for line in proc.stdout.splitlines() if "FAIL N=" in line]
    cases = []
    for n in range(1, 6):
        ok = f"allreduce OK: N={n} " in proc.stdout
        detail = next((f for f in fails if f.startswith(f"N={n} ")), None) or failure(proc)
        cases.append((ok, f"N={n}" if ok else detail))
    return cases


@check("ring_allreduce", "Q7", 120,
       "ring_allreduce_ equals MPI_Allreduce, steps and bytes, N = 1..5, P = 1, N-1, N, N+1, 3001")
def ring_allreduce(ctx):
    return allreduce(ctx, "ring")


@check("tree_allreduce", "Q7", 120,
       "tree_allreduce_ equals MPI_Allreduce, steps and bytes, N = 1..5, P = 1, N-1, N, N+1, 3001")
def tree_allreduce(ctx):
    return allreduce(ctx, "tree")


# ----- references: what the scripts should compute, written plainly in one process -----
# They use ROOT's utils.py and fed_avg.py (its given parts: client_batches, the iid and Dirichlet
# splits), which tests/test_fed_avg.py imports as well.

def reference_modules():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import fed_avg
    import utils
    return fed_avg, utils


@functools.lru_cache(maxsize=1)
def synthetic_train():
    _, utils = reference_modules()
    (x, y), _ = utils.make_synthetic(seed=1234)  # what load_data gives for --dataset synthetic
    return x, y


def reference_shards(num_clients, method, alpha=None, seed=0):
    fed_avg, _ = reference_modules()
    return fed_avg.split_indices(synthetic_train()[1], num_clients, method, seed=seed, alpha=alpha)


def model_with(weights):
    """A fresh utils.Net holding the flat `weights` (in the order parameters_vector gives)."""
    import torch
    _, utils = reference_modules()
    model = utils.make_model(torch.device("cpu"), seed=0)
    offset = 0
    for p in model.parameters():
        p.data.copy_(weights[offset:offset + p.numel()].view_as(p))  # copy_ keeps channels-last
        offset += p.numel()
    return model


def round_batches(shards, k, r, steps, batch_size, seed):
    """Client k's first `steps` (indices, flips) batches in round r, drawn as fed_avg.py does."""
    fed_avg, utils = reference_modules()
    batches = fed_avg.client_batches(shards[k], batch_size, 1, utils.stream_seed(seed, r, k))
    return list(itertools.islice(batches, steps))


def fedavg_reference(shards, clients_per_round, *, local_steps, batch_size=16, lr=0.05,
                     momentum=0.0, weight_decay=5e-4, weighted=True, seed=0, clip_norm=None):
    """McMahan et al.'s FedAvg: each round, every sampled client k starts from the global
    weights w, takes `local_steps` SGD steps on its shard, and w = sum n_k w_k / sum n_k.
    Each step clips its gradient's norm as the script's clients do (--clip-norm; None: the
    default, 0: never). The lr follows the script's schedule with --warmup 0."""
    import torch
    _, utils = reference_modules()
    clip_norm = utils.CLIP_NORM if clip_norm is None else clip_norm
    x, y = synthetic_train()
    w = utils.parameters_vector(utils.make_model(torch.device("cpu"), seed))
    total_steps = len(clients_per_round) * local_steps
    for r, clients in enumerate(clients_per_round):
        weighted_sum, count = torch.zeros_like(w), 0
        for k in clients:
            model = model_with(w)
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                        nesterov=momentum > 0, weight_decay=weight_decay)
            for s, (idx, flip) in enumerate(round_batches(shards, k, r, local_steps, batch_size,
                                                          seed)):
                optimizer.param_groups[0]["lr"] = utils.lr_at(r * local_steps + s, total_steps,
                                                              lr, 0)
                optimizer.zero_grad()
                utils.train_step(model, x[idx], y[idx], flip)
                if clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                optimizer.step()
            n_k = len(shards[k]) if weighted else 1
            weighted_sum += n_k * utils.parameters_vector(model)
            count += n_k
        w = weighted_sum / count
    return w


# ----- the split check, run in a submission's folder: python grading/checks.py split -----

def split_cases():
    """[(passed, line)] of the submission's non-iid split (fed_avg.split_indices)."""
    import torch
    sys.path.insert(0, os.getcwd())
    import fed_avg
    labels = torch.arange(50_000) % 10  # CIFAR-sized: 5,000 of each class
    cases = []
    # (labels, clients, most classes a client may see): 10 shards of one class each for 5
    # clients; 8 shards of 6,250 for 4, each straddling at most 2 classes
    for y, clients, most in [(labels, 5, 2), (labels, 4, 4), (labels[:1003], 7, None)]:
        name = f"{len(y)} samples, {clients} clients"
        try:
            parts = fed_avg.split_indices(y, clients, "non-iid", seed=0)
            again = fed_avg.split_indices(y, clients, "non-iid", seed=0)
        except NotImplementedError as e:
            return [(False, f"stopped at the TODO {e}")]
        dealt = torch.sort(torch.cat([torch.as_tensor(p) for p in parts])).values
        once = len(parts) == clients and torch.equal(dealt, torch.arange(len(y)))
        cases.append((once, f"{name}: every index dealt to exactly one client"))
        cases.append((all(torch.equal(torch.as_tensor(a), torch.as_tensor(b))
                          for a, b in zip(parts, again)), f"{name}: seeded (the same twice)"))
        if most and once:
            classes = [len(torch.unique(y[torch.as_tensor(p)])) for p in parts]
            cases.append((max(classes) <= most,
                          f"{name}: classes per client {classes} (at most {most})"))
    return cases


if __name__ == "__main__" and sys.argv[1:] == ["split"]:
    for passed, line in split_cases():
        print(("ok " if passed else "FAIL ") + line, flush=True)
