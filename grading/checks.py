"""The graded checks of HW5: one source for grading/grade.py and the tests. tests/test_grading.py
runs every check on the solution, on a Context that tests/test_serverless.py (through
distance_to_centralized) and test_param_server.py share (tests/conftest.py);
tests/test_fed_avg.py compares with fedavg_reference.

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
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grading import formulas, wire  # noqa: E402
from grading.handout import CODE  # noqa: E402
from grading.launch import Timeout, in_process, launch, mpirun_cmd  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the reference code: the solution's repo, or the autograder's copy
# 4 plain SGD steps on the synthetic set: what the equivalence checks train
QUICK = ["--dataset", "synthetic", "--momentum", "0", "--lr", "0.05", "--max-steps", "4"]
B = 16  # per-rank (per-worker) batch of the equivalence checks
# float32 sums in another order differ by ~1e-7 relative; a wrong sample or scale by far more
ATOL = 2e-5
TODO = re.compile(r"not implemented yet: (Q\d+: .*)")
RAISED = re.compile(r"^([\w.]*(?:Error|Exception|Interrupt)\b.*)$", re.M)  # a traceback's last line
FRAME = re.compile(r'File "(?:[^"]*/)?([^"/]+)", line (\d+), in (\w+)')  # its frames


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


class Failed(Exception):
    """A run that did not end as it should; the message says why, for the student."""


# ----- running a submission -----

def failure(proc):
    """One line on why a run failed: the TODO it stopped at; else the exception it raised, and
    where in the student's files; else the script's own `error:` line; else its last lines."""
    text = proc.stderr + proc.stdout
    todo = TODO.search(text)
    if todo:
        return f"stopped at the TODO {todo.group(1)}"
    raised = RAISED.search(text)
    if raised:
        frames = [m for m in FRAME.finditer(text, 0, raised.start()) if m[1] in CODE]
        where = f" (in {frames[-1][3]}, {frames[-1][1]} line {frames[-1][2]})" if frames else ""
        return f"exit {proc.returncode}: {raised[1]}{where}"[:600]
    said = re.search(r"^error: .*$", text, re.M)
    if said:
        return f"exit {proc.returncode}: {said[0]}"[:600]
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("--")]
    return f"exit {proc.returncode}: " + " | ".join(lines[-6:])[-600:]


class Context:
    """One grading: the submission's folder, a scratch folder, and the runs the checks share
    (cached: a run two checks need, or a reference, is made once). The tests grade the solution
    with one Context, so that a run a test needs and a check needs is made once too."""

    def __init__(self, folder, scratch):
        self.folder, self.scratch, self.cache = folder, scratch, {}
        self.start(600)

    def start(self, timeout):
        """Give what runs next (a check, or a test) `timeout` seconds for its runs together."""
        self.deadline = time.monotonic() + timeout

    def remaining(self):
        return self.deadline - time.monotonic()

    def run(self, key, cmd, cwd, env=None):
        """The cached CompletedProcess of `cmd` (or the Timeout it raised), under the deadline."""
        if key not in self.cache:
            if self.remaining() <= 0:  # not run: a later check, with time of its own, may run it
                raise Timeout("no time left for this run in the check's deadline")
            try:
                self.cache[key] = launch(cmd, cwd, self.remaining(), env)
            except Timeout as e:
                last = [line for line in (e.stderr + e.stdout).splitlines() if line.strip()][-3:]
                self.cache[key] = Timeout(f"{e}" + (f"; its last lines: {' | '.join(last)}"
                                                    if last else ", having printed nothing"))
        if isinstance(self.cache[key], Timeout):
            raise self.cache[key]
        return self.cache[key]

    def outputs(self, key):
        """A folder of the scratch folder for the outputs of the run `key`."""
        out = os.path.join(self.scratch, re.sub(r"[^\w.-]+", "_", "-".join(map(str, key))))
        os.makedirs(out, exist_ok=True)
        return out

    def script(self, n, script, *flags, mca=None):
        """Run a submission's script on n ranks with `flags` (and `--mca` pairs); its outputs go
        to the scratch folder. Returns (CompletedProcess, folder of its results.json and model.pt)."""
        key = (n, script, *map(str, flags), *sorted((mca or {}).items()))
        out = self.outputs(key)
        extra = ["--results", f"{out}/results.json", "--save-model", f"{out}/model.pt"]
        if script == "fed_avg.py":
            extra += ["--figures-dir", out]
        # the handout's extensions/ stub meters the bytes each rank sends (grading/wire.py)
        proc = self.run(key, mpirun_cmd(n, script, *flags, *extra, mca=mca), self.folder,
                        {"HW5_WIRE": os.path.join(out, "wire")})
        return proc, out

    def wire(self, n, script, *flags):
        """[{bytes_sent, bytes_recv}] per rank that a finished run's messages put on the wire."""
        measured = wire.read_script(os.path.join(self.script(n, script, *flags)[1], "wire"), n)
        if measured is None:
            raise Failed("no rank's byte count: extensions/ is not the handout's stub")
        return measured

    def trained(self, n, script, *flags, mca=None):
        """(final weights, results) of a run of the submission's script; Failed if it failed."""
        import torch
        proc, out = self.script(n, script, *flags, mca=mca)
        if proc.returncode:
            raise Failed(failure(proc))
        return torch.load(f"{out}/model.pt"), results(out)

    def centralized(self, batch, *flags):
        """The reference: ROOT's cent_sgd.py (given code, which cannot hang) on the global batch,
        run in this process; its final weights."""
        import torch
        key = ("cent", batch, *map(str, flags))
        if key not in self.cache:
            out = self.outputs(key)
            proc = in_process("cent_sgd.py", *QUICK, "--batch-size", batch, *flags,
                              "--results", f"{out}/r.json", "--save-model", f"{out}/model.pt",
                              cwd=ROOT)
            if proc.returncode:
                raise RuntimeError(f"the reference cent_sgd.py failed: {failure(proc)}")
            self.cache[key] = torch.load(f"{out}/model.pt")
        return self.cache[key]


def finished(proc):
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


SERVERS = {"dist_sgd_serverless.py": 0, "dist_sgd_param_server.py": 1}  # ranks that train no share


def distance_to_centralized(ctx, script, shares, common=(), own=(), mca=None):
    """(largest difference, final weights, results) of `script` with `shares` training ranks,
    each on a batch of B, against centralized SGD (cent_sgd.py) on the global batch shares x B.
    `common` flags go to both, `own` to the script alone, `mca` to its mpirun. Failed if the
    script failed."""
    got, record = ctx.trained(shares + SERVERS[script], script, *QUICK, "--batch-size", B,
                              *common, *own, mca=mca)
    return (got - ctx.centralized(shares * B, *common)).abs().max().item(), got, record


def equals_centralized(ctx, script, shares, common=()):
    """(passed, line): the script's final weights equal centralized SGD's on the global batch."""
    try:
        diff, _, _ = distance_to_centralized(ctx, script, shares, common)
    except (Failed, Timeout) as e:
        return False, f"N={shares}: {e}"
    return diff < ATOL, f"N={shares}: largest difference to centralized SGD {diff:.2g} (< {ATOL:g})"


@check("serverless_equals_centralized", "Q2", 240,
       "N = 2, 4 ranks (MPI_Allreduce): the weights equal cent_sgd.py's on the batch N x 16")
def serverless_equals_centralized(ctx):
    return [equals_centralized(ctx, "dist_sgd_serverless.py", n) for n in (2, 4)]


@check("param_server_runs", "Q3", 120, "mpirun -n 3 dist_sgd_param_server.py runs to the end")
def param_server_runs(ctx):
    return [finished(ctx.script(3, "dist_sgd_param_server.py", "--dataset", "synthetic",
                                "--max-steps", 2)[0])]


# (workers, flags): plain SGD with 2 workers (QUICK's momentum 0), then Nesterov momentum 0.9
# with 4, which the server alone keeps and centralized SGD still equals
PS_CASES = [(2, ()), (4, ("--momentum", 0.9))]


@check("param_server_equals_centralized", "Q3", 240,
       "N = 2, 4 workers (momentum 0, 0.9): the weights equal cent_sgd.py's on the batch N x 16")
def param_server_equals_centralized(ctx):
    return [equals_centralized(ctx, "dist_sgd_param_server.py", w, flags) for w, flags in PS_CASES]


def bytes_cases(label, ctx, run, formula, on_wire=True):
    """The bytes per rank that the run reports in its results against Q6's formula(results),
    and with `on_wire` those its messages put on the wire too: two cases, or one."""
    try:
        _, r = ctx.trained(*run)
        measured = [("on the wire", ctx.wire(*run))] if on_wire else []
    except (Failed, Timeout) as e:
        return [(False, f"{label}{e}")] * (1 + on_wire)
    expected = formula(r)
    return [(got == expected, f"{label}bytes per rank {what} "
             + ("match the formula" if got == expected else f"{got}, the formula says {expected}"))
            for what, got in [*measured, ("as it reports them", r["bytes_per_rank"])]]


@check("param_server_bytes", "Q3", 120,
       "the bytes of Q6, on the wire and as reported: per step each worker sends and receives "
       "4P, the server 4PW each way")
def param_server_bytes(ctx):
    return [case for w, flags in PS_CASES for case in bytes_cases(
        f"N={w}: ", ctx, (w + 1, "dist_sgd_param_server.py", *QUICK, "--batch-size", B, *flags),
        lambda r, w=w: formulas.param_server(r["params"], r["steps"], w))]


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
    try:
        got, r = ctx.trained(3, "fed_avg.py", *FEDSGD)
    except Failed as e:
        return [(False, str(e))]
    shards = reference_shards(4, "non-iid", 0.5)
    clients = [h["clients"] for h in r["history"]]
    weighted = fedavg_reference(shards, clients, local_steps=1, clip_norm=0)
    unweighted = fedavg_reference(shards, clients, local_steps=1, clip_norm=0, weighted=False)
    diff, control = (got - weighted).abs().max().item(), (weighted - unweighted).abs().max().item()
    return [(diff < ATOL and control > 10 * ATOL,
             f"largest difference to the weighted step {diff:.2g} (< {ATOL:g}); "
             f"the unweighted mean is {control:.2g} away")]


@check("fed_avg_bytes", "Q4", 120,
       "the bytes of Q6, as reported: per round, P floats down to each client rank and P + 1 back")
def fed_avg_bytes(ctx):
    # as reported: the messages are the given code's (send_global_model_, reduce_weighted_sums_),
    # beside which round_table sends each round's statistics, which Q6 leaves out
    return bytes_cases("", ctx, (3, "fed_avg.py", *FEDSGD),
                       lambda r: formulas.fed_avg(r["params"], len(r["history"]), 2), on_wire=False)


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
