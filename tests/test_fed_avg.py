"""FedAvg: client splits, the sample-weighted average, FedSGD = data-parallel SGD.

    pytest -q tests/test_fed_avg.py

The split tests use CIFAR-sized fake labels (50,000, 5,000 per class) and need no dataset.
The end-to-end tests run fed_avg.py on the synthetic set and compare the server's final
model with a plain single-process computation of what it should be.
"""
import json

import pytest
import torch

import fed_avg
import utils
from grading import formulas
from grading.checks import fedavg_reference, round_batches, synthetic_train
from mpi import check, mpirun

CIFAR_LABELS = torch.arange(50_000) % 10
TOL = 1e-5  # float32 noise after a few steps; the weights are ~0.01-0.2


def class_counts(labels, parts):
    """clients x classes matrix of sample counts."""
    return torch.stack([torch.bincount(labels[p], minlength=10) for p in parts])


# ----------------------------------------------------------------------------- splits

SPLITS = [("iid", None), ("non-iid", None), ("non-iid", 0.5)]


@pytest.mark.parametrize("method, alpha", SPLITS)
@pytest.mark.parametrize("n, num_clients", [(50_000, 4), (1003, 7)])
def test_split_covers_every_index_exactly_once(method, alpha, n, num_clients):
    labels = CIFAR_LABELS[:n]
    parts = fed_avg.split_indices(labels, num_clients, method, seed=0, alpha=alpha)
    assert len(parts) == num_clients and all(p.dtype == torch.int64 for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))  # no overlap, nothing left out


@pytest.mark.parametrize("method, alpha", SPLITS)
def test_split_is_seeded(method, alpha):
    split = lambda seed: fed_avg.split_indices(CIFAR_LABELS, 4, method, seed, alpha)
    a, b, c = split(0), split(0), split(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(len(p) == len(q) and torch.equal(p, q) for p, q in zip(a, c))


def test_iid_clients_see_every_class_in_proportion():
    parts = fed_avg.split_indices(CIFAR_LABELS, 4, "iid", seed=0)
    assert [len(p) for p in parts] == [12_500] * 4
    fractions = class_counts(CIFAR_LABELS, parts) / 12_500
    assert (fractions - 0.1).abs().max() < 0.01  # each class 10% +- 1 point on every client


def test_shards_give_each_client_about_two_classes():
    # 10 classes, 5 clients: 10 shards of exactly one class each, so at most 2 per client
    parts = fed_avg.split_indices(CIFAR_LABELS, 5, "non-iid", seed=0)
    assert [len(p) for p in parts] == [10_000] * 5
    assert ((class_counts(CIFAR_LABELS, parts) > 0).sum(1) <= 2).all()
    # 4 clients: 8 shards of 6,250 cannot align with classes of 5,000; each straddles at most
    # 2 classes, so a client sees at most 4 of 10, and 2 classes cannot cover 12,500 samples
    parts = fed_avg.split_indices(CIFAR_LABELS, 4, "non-iid", seed=0)
    classes = (class_counts(CIFAR_LABELS, parts) > 0).sum(1)
    assert [len(p) for p in parts] == [12_500] * 4 and (classes <= 4).all()


def test_dirichlet_alpha_sets_the_skew():
    near_iid = fed_avg.split_indices(CIFAR_LABELS, 4, "non-iid", seed=0, alpha=1000)
    fractions = class_counts(CIFAR_LABELS, near_iid) / torch.tensor([[len(p)] for p in near_iid])
    assert (fractions - 0.1).abs().max() < 0.02
    skewed = fed_avg.split_indices(CIFAR_LABELS, 4, "non-iid", seed=0, alpha=0.05)
    counts = class_counts(CIFAR_LABELS, skewed)
    # classes that make up at least 5% of a client's samples: all 10 when iid, few here
    major = (counts >= 0.05 * counts.sum(1, keepdim=True)).sum(1)
    assert major.float().mean() <= 4, major


def test_every_client_gets_a_sample_even_when_alpha_is_tiny():
    labels = CIFAR_LABELS[:1000]
    parts = fed_avg.split_indices(labels, 100, "non-iid", seed=0, alpha=0.01)
    assert min(len(p) for p in parts) >= 1
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(1000))


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="dirichlet"), "unknown split method"),
    (dict(method="iid", alpha=0.5), "only to the non-iid"),
    (dict(method="non-iid", alpha=0.0), "alpha must be > 0"),
    (dict(method="iid", num_clients=11), "cannot split 10 samples"),
    (dict(method="non-iid", num_clients=6), "cannot split 10 samples into 12 non-empty shards"),
])
def test_impossible_splits_raise_a_clear_error(kwargs, message):
    kwargs = dict(dict(labels=CIFAR_LABELS[:10], num_clients=4, seed=0), **kwargs)
    with pytest.raises(ValueError, match=message):
        fed_avg.split_indices(**kwargs)


def test_client_batches_are_seeded_slices_of_the_shard():
    shard = torch.arange(100, 150)
    batches = list(fed_avg.client_batches(shard, 16, epochs=2, seed=3))
    assert [len(idx) for idx, _ in batches] == [16] * 6  # 3 full batches per pass, 2 passes
    one_pass = torch.cat([idx for idx, _ in batches[:3]]).tolist()
    assert len(set(one_pass)) == 48 and set(one_pass) <= set(shard.tolist())
    assert not torch.equal(batches[0][0], batches[3][0])  # a fresh order each pass
    again = list(fed_avg.client_batches(shard, 16, epochs=2, seed=3))
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(batches, again))


@pytest.mark.parametrize("alpha", [None, 0.1])
def test_plot_split_writes_a_png(tmp_path, alpha):
    parts = fed_avg.split_indices(CIFAR_LABELS, 4, "non-iid", seed=0, alpha=alpha)
    path = tmp_path / "sub" / "split.png"
    fed_avg.plot_split(CIFAR_LABELS, parts, "non-iid", str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- references
# What fed_avg.py should compute, written plainly in one process, one client after another.
# FedAvg's own (fedavg_reference) is grading/checks.py's, which the grader uses too.
# The lr follows the script's schedule with --warmup 0: one cycle over each client's steps.

def data_parallel_reference(shards, rounds, *, steps_per_round, batch_size=16, lr=0.05,
                            weight_decay=5e-4, seed=0):
    """Plain SGD (momentum 0) on one model: step j of round r takes every client's j-th batch
    of that round, the same batches as above, as one batch, which averages their gradients."""
    x, y = synthetic_train()
    model = utils.make_model(torch.device("cpu"), seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = rounds * steps_per_round
    for r in range(rounds):
        per_client = [round_batches(shards, k, r, steps_per_round, batch_size, seed)
                      for k in range(len(shards))]
        for j in range(steps_per_round):
            idx = torch.cat([batches[j][0] for batches in per_client])
            flip = torch.cat([batches[j][1] for batches in per_client])
            optimizer.param_groups[0]["lr"] = utils.lr_at(r * steps_per_round + j, total_steps, lr, 0)
            optimizer.zero_grad()
            utils.train_step(model, x[idx], y[idx], flip)
            optimizer.step()
    return utils.parameters_vector(model)


# ----------------------------------------------------------------------------- end to end

def run_fed_avg(n, tmp_path, *args):
    """mpirun fed_avg.py on the synthetic set; return (stdout, results dict, final weights)."""
    proc = check(mpirun(n, "fed_avg.py", "--dataset", "synthetic", "--warmup", 0, "--batch-size", 16,
                        "--results", tmp_path / "result.json", "--save-model", tmp_path / "model.pt",
                        "--figures-dir", tmp_path, *args, timeout=120))
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    return proc.stdout, result, torch.load(tmp_path / "model.pt")


def test_server_weights_clients_by_sample_count(tmp_path):
    # Unequal Dirichlet shards; 5 clients on 2 client ranks, 3 of them sampled per round;
    # 2 local steps with (Nesterov) momentum, which must restart every round.
    out, result, got = run_fed_avg(3, tmp_path, "--split-method", "non-iid", "--alpha", 0.5,
                                   "--num-clients", 5, "--client-fraction", 0.6,
                                   "--rounds", 2, "--max-steps", 2, "--momentum", 0.9)
    _, y = synthetic_train()
    shards = fed_avg.split_indices(y, 5, "non-iid", seed=0, alpha=0.5)
    sizes = [len(s) for s in shards]
    assert result["client_sizes"] == sizes and len(set(sizes)) == 5, sizes  # all different
    clients = [h["clients"] for h in result["history"]]
    assert [len(c) for c in clients] == [3, 3] and clients[0] != clients[1], clients
    expected = fedavg_reference(shards, clients, local_steps=2, momentum=0.9)
    assert (got - expected).abs().max() < TOL
    # negative control: the plain mean of the clients' weights is measurably different
    unweighted = fedavg_reference(shards, clients, local_steps=2, momentum=0.9, weighted=False)
    assert (got - unweighted).abs().max() > 100 * TOL
    assert (tmp_path / "data_distribution_non-iid_alpha0.5.png").stat().st_size > 0


def test_fedsgd_equals_data_parallel_sgd(tmp_path):
    # 4 equal iid clients on 2 client ranks, all in every round, one local step each, no
    # momentum: averaging the one-step weights w - lr g_k averages the gradients, so k rounds
    # are k SGD steps. (Each client clips its own gradient at --clip-norm; here none is that long,
    # and the reference, which does not clip, shows it.)
    out, result, got = run_fed_avg(3, tmp_path, "--num-clients", 4, "--rounds", 3, "--max-steps", 1, "--momentum", 0)
    _, y = synthetic_train()
    shards = fed_avg.split_indices(y, 4, "iid", seed=0)
    assert result["client_sizes"] == [1250] * 4 and "Final test accuracy" in out
    expected = data_parallel_reference(shards, 3, steps_per_round=1)
    assert (got - expected).abs().max() < TOL
    # negative control: with 2 local steps the clients drift apart, and averaging their
    # weights is no longer averaging gradients
    fedavg = fedavg_reference(shards, [[0, 1, 2, 3]] * 3, local_steps=2)
    sgd = data_parallel_reference(shards, 3, steps_per_round=2)
    assert (fedavg - sgd).abs().max() > 10 * TOL
    # the bytes of Q6: per round, P floats down to each client rank and P + 1 back
    assert result["bytes_per_rank"] == formulas.fed_avg(result["params"], rounds=3, client_ranks=2)
    assert (tmp_path / "data_distribution_iid.png").stat().st_size > 0


@pytest.mark.slow  # test_utils.py's test_no_step_of_the_schedule_has_lr_zero checks the schedule itself
def test_one_round_of_one_step_changes_the_model(tmp_path):
    """The schedule used to give the first step lr 0: one FedSGD round then left the global
    model exactly as it started."""
    _, _, got = run_fed_avg(2, tmp_path, "--rounds", 1, "--max-steps", 1, "--momentum", 0, "--warmup", 0.2)
    start = utils.parameters_vector(utils.make_model(torch.device("cpu"), seed=0))
    assert (got - start).abs().max() > 1e-4
