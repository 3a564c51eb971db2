"""FedAvg variants (extensions/fed_algorithms.py) and the drift measurement (extensions/drift.py).

    pytest -q tests/test_fed_algorithms.py            # default tier: in one process
    pytest -q -m slow tests/test_fed_algorithms.py    # under mpirun: neutral settings, bytes, drift,
                                                      # SCAFFOLD = FedSGD, resume, the sweep

FedProx with mu 0, FedAvgM with momentum 0 and server lr 1, and FedRS with alpha 1 must give FedAvg's bits;
SCAFFOLD with one plain SGD step per round must give FedSGD (its corrections then cancel in the
weighted average); every algorithm's bytes must match its formula; resume must be exact.
"""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import fed_avg
import utils
from extensions import drift, fed_algorithms
from mpi import ROOT, assert_committed, assert_resume_is_exact, check, mpirun
from test_fed_avg import TOL, data_parallel_reference, synthetic_train

# 5 unequal Dirichlet clients on 2 client ranks, 3 per round, Nesterov momentum 0.9
SKEWED = ["--split-method", "non-iid", "--alpha", 0.5, "--num-clients", 5, "--client-fraction", 0.6,
          "--rounds", 2, "--max-steps", 2, "--momentum", 0.9]


def run(tmp_path, name, *args, ranks=3):
    """mpirun fed_avg.py on the synthetic set; return (results dict, final weights, results path)."""
    folder = tmp_path / name
    check(mpirun(ranks, "fed_avg.py", "--dataset", "synthetic", "--warmup", 0, "--batch-size", 16,
                 "--results", folder / "r.json", "--save-model", folder / "model.pt", "--figures-dir", folder,
                 *args, timeout=180))
    return json.loads((folder / "r.json").read_text()), torch.load(folder / "model.pt"), folder / "r.json"


def expected_bytes(result, down, up):
    """bytes_per_rank when each round the server sends `down` floats to each client rank of the
    round and receives `up` floats from each."""
    P, host = result["params"], result["client_ranks"]
    sent = [0] * result["world_size"]
    recv = [0] * result["world_size"]
    for h in result["history"]:
        for rank in {host[k] for k in h["clients"]}:
            sent[0], recv[0] = sent[0] + 4 * down(P), recv[0] + 4 * up(P)
            sent[rank], recv[rank] = sent[rank] + 4 * up(P), recv[rank] + 4 * down(P)
    return [{"bytes_sent": s, "bytes_recv": r} for s, r in zip(sent, recv)]


FEDAVG_BYTES = (lambda P: P, lambda P: P + 1)
SCAFFOLD_BYTES = (lambda P: 2 * P, lambda P: 2 * P + 1)


# ----------------------------------------------------------------------------- in one process

def unset(algorithm, **flags):
    """Parsed flags as fed_avg.py hands them over: every algorithm flag None unless given."""
    return SimpleNamespace(**dict(dict.fromkeys(fed_algorithms.FLAGS), algorithm=algorithm, checkpoint=None, **flags))


def args_for(algorithm, **flags):
    args = unset(algorithm, **flags)
    assert fed_algorithms.check_args(args) is None
    return args


@pytest.mark.parametrize("algorithm, flags, message", [
    ("fedavg", dict(prox_mu=0.1), "--prox-mu applies to --algorithm fedprox, not fedavg"),
    ("scaffold", dict(server_momentum=0.5), "--server-momentum applies to --algorithm fedavgm or fedrs or fedlc"),
    ("fedprox", dict(prox_mu=-1), "--prox-mu must be >= 0"),
    ("fedavgm", dict(server_momentum=1.0), "--server-momentum must be in"),
    ("fedavgm", dict(server_lr=0.0), "--server-lr must be > 0"),
    ("fedlc", dict(rs_alpha=0.5), "--rs-alpha applies to --algorithm fedrs, not fedlc"),
    ("fedrs", dict(rs_alpha=1.5), "--rs-alpha must be in [0, 1]"),
    ("fedlc", dict(lc_tau=0.0), "--lc-tau must be > 0"),
])
def test_flags_an_algorithm_ignores_or_cannot_use_are_refused(algorithm, flags, message):
    assert message in fed_algorithms.check_args(unset(algorithm, **flags))


def test_defaults_are_filled_in_for_the_chosen_algorithm_only():
    assert vars(args_for("fedavgm"))["server_momentum"] == 0.9 and args_for("fedavgm").prox_mu is None
    assert args_for("fedprox").prox_mu == 0.01 and args_for("scaffold").server_lr == 1.0
    assert args_for("fedrs").rs_alpha == 0.5 and args_for("fedlc").lc_tau == 1.0 and args_for("fedlc").rs_alpha is None
    # the label-skew fixes take FedAvg's server step unless given a server momentum
    assert args_for("fedrs").server_momentum == 0.0 and args_for("fedlc").server_lr == 1.0


# a client that holds classes 2 (three samples) and 7 (one), and a batch of it
LABELS = torch.tensor([2, 7, 2, 2])
def build(variant, args, flat_params, flat_grads, sizes):
    """A variant as extensions.configure builds it: around the script's own FedAvg hooks."""
    return variant(fed_avg.FedAvg(args, flat_params, flat_grads, sizes))


LOGITS = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))


def test_fedrs_scales_only_the_missing_classes_logits():
    loss = build(fed_algorithms.FedRS, args_for("fedrs", rs_alpha=0.3), torch.zeros(1), None, [4]).local_loss(0, LABELS)
    scaled = LOGITS * 0.3
    scaled[:, [2, 7]] = LOGITS[:, [2, 7]]
    assert torch.allclose(loss(LOGITS, LABELS), torch.nn.functional.cross_entropy(scaled, LABELS))
    plain = build(fed_algorithms.FedRS, args_for("fedrs", rs_alpha=1.0), torch.zeros(1), None, [4]).local_loss(0, LABELS)
    assert torch.equal(plain(LOGITS, LABELS), torch.nn.functional.cross_entropy(LOGITS, LABELS))


def test_fedlc_is_a_softmax_over_the_clients_classes_of_calibrated_logits():
    loss = build(fed_algorithms.FedLC, args_for("fedlc", lc_tau=2.0), torch.zeros(1), None, [4]).local_loss(0, LABELS)
    # by hand: only classes 2 and 7 compete, logit_c lowered by 2 n_c^(-1/4) with n = (3, 1)
    calibrated = LOGITS[:, [2, 7]] - 2.0 * torch.tensor([3.0, 1.0]) ** -0.25
    expected = torch.nn.functional.cross_entropy(calibrated, (LABELS == 7).long())
    logits = LOGITS.clone().requires_grad_()
    got = loss(logits, LABELS)
    assert torch.allclose(got, expected)
    got.backward()
    missing = [c for c in range(10) if c not in (2, 7)]
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad[:, missing], torch.zeros(4, 8))


def test_fedavgm_is_server_momentum_on_the_averaged_update():
    torch.manual_seed(0)
    w = torch.randn(1000)
    averages = [w + 0.01 * torch.randn(1000) for _ in range(3)]
    plain = build(fed_algorithms.FedAvgM, args_for("fedavgm", server_momentum=0.0, server_lr=1.0), w.clone(), None, [1])
    beta = build(fed_algorithms.FedAvgM, args_for("fedavgm", server_momentum=0.5, server_lr=0.7), w.clone(), None, [1])
    old, v = w.clone(), torch.zeros(1000)
    for avg in averages:
        plain.server_update_(plain.params, avg)
        assert torch.equal(plain.params, avg)  # bit for bit, though old - (old - avg) would round
        v = 0.5 * v + (old - avg)  # the recurrence as Hsu et al. write it
        old = old - 0.7 * v
        beta.server_update_(beta.params, avg)
        assert (beta.params - old).abs().max() < 1e-5 and not torch.equal(beta.params, avg)


def test_label_skew_fixes_take_fedavgms_server_step():
    torch.manual_seed(0)
    w, average = torch.randn(100), torch.randn(100)
    m = build(fed_algorithms.FedAvgM, args_for("fedavgm", server_momentum=0.3), w.clone(), None, [1])
    m.server_update_(m.params, average)
    for name, variant in (("fedrs", fed_algorithms.FedRS), ("fedlc", fed_algorithms.FedLC)):
        fix = build(variant, args_for(name, server_momentum=0.3), w.clone(), None, [1])
        fix.server_update_(fix.params, average)
        assert torch.equal(fix.params, m.params)
        plain = build(variant, args_for(name), w.clone(), None, [1])  # default: FedAvg's step, the average
        plain.server_update_(plain.params, average)
        assert torch.equal(plain.params, average)


def test_scaffold_server_keeps_c_the_weighted_mean_of_the_client_controls():
    torch.manual_seed(0)
    sizes = [10, 30, 60]
    server = build(fed_algorithms.Scaffold, args_for("scaffold"), torch.zeros(50), None, sizes)
    controls = torch.zeros(3, 50)
    for clients in ([0, 1, 2], [1, 2], [0]):  # partial participation
        new = controls.clone()
        new[clients] = torch.randn(len(clients), 50)
        server.delta_sum.copy_(sum(sizes[k] * (new[k] - controls[k]) for k in clients))
        server.server_update_(server.params, torch.ones(50))
        controls = new
        mean = sum(n * c for n, c in zip(sizes, controls)) / sum(sizes)
        assert (server.control - mean).abs().max() < 1e-6
    assert torch.equal(server.params, torch.ones(50))  # server lr 1: the FedAvg average


# ----------------------------------------------------------------------------- end to end

NEUTRAL = {"fedavg": [], "fedprox": ["--algorithm", "fedprox", "--prox-mu", 0, "--measure-drift"],
           "fedavgm": ["--algorithm", "fedavgm", "--server-momentum", 0, "--server-lr", 1],
           "fedrs": ["--algorithm", "fedrs", "--rs-alpha", 1]}
RUNS = {**NEUTRAL, "fedlc": ["--algorithm", "fedlc"]}  # FedLC has no neutral setting: its default


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """skewed[name]: FedAvg, FedProx with mu 0 (measuring drift), FedAvgM with momentum 0 and
    server lr 1, FedRS with alpha 1, FedLC at its default, each run once, when a test first asks for it."""
    tmp = tmp_path_factory.mktemp("skewed")

    class Runs(dict):
        def __missing__(self, name):
            self[name] = run(tmp, name, *SKEWED, *RUNS[name])
            return self[name]
    return Runs()


# FedAvgM's server step with momentum 0 and server lr 1 is checked bit for bit above, in one
# process; its end-to-end run goes in the slow tier, to keep the default one short.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedprox", "fedavgm", "fedrs"])
def test_neutral_settings_give_fedavg_bit_for_bit(skewed, name):
    """With them the hooks run but change nothing; so does --measure-drift (on the FedProx run)."""
    result, got, _ = skewed[name]
    assert result["config"]["algorithm"] == name
    assert torch.equal(got, skewed["fedavg"][1])
    assert result["history"] and [h["test_acc"] for h in result["history"]] == \
        [h["test_acc"] for h in skewed["fedavg"][0]["history"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedrs", "fedlc"])
def test_weights_only_algorithms_move_fedavgs_bytes(skewed, name):
    result, _, _ = skewed[name]
    assert result["bytes_per_rank"] == expected_bytes(result, *FEDAVG_BYTES)


@pytest.mark.slow
def test_drift_is_recorded_each_round(skewed, tmp_path):
    result, _, path = skewed["fedprox"]
    classes = len(utils.CLASSES)
    for h in result["history"]:
        d = h["drift"]
        hosted = sorted({result["client_ranks"][k] for k in h["clients"]})
        assert d["ranks"] == hosted and sorted(sum(d["clients"], [])) == h["clients"]
        assert all(0 < x < 1 for x in d["distance"]), d["distance"]
        assert all(len(a) == classes for a in d["class_acc"]) and len(d["global_class_acc"]) == classes
        assert all(0 <= a <= 100 for a in d["acc_own"])
        # the global model's per-class accuracy averages to its test accuracy (classes weighted by size)
        _, y_test = utils.make_synthetic(seed=1234)[1]
        sizes = torch.bincount(y_test, minlength=classes).double()
        assert abs((torch.tensor(d["global_class_acc"]).double() * sizes).sum() / sizes.sum() - h["test_acc"]) < 0.01
    assert "drift" not in skewed["fedavg"][0]["history"][0]
    figure = drift.plot([path, path], str(tmp_path / "client_drift.png"))
    assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_scaffold_with_one_plain_step_is_fedsgd(tmp_path):
    """4 equal iid clients, all in every round, one step of plain SGD: round 1 starts with all
    control variates zero; later rounds correct client k's step by c - c_k, whose n_k-weighted
    mean is zero, so the average is still the data-parallel SGD step. The checkpoint shows the
    control variates are not zero after all, and that c is the weighted mean of the c_k."""
    result, got, _ = run(tmp_path, "scaffold", "--algorithm", "scaffold", "--num-clients", 4, "--rounds", 3,
                      "--max-steps", 1, "--momentum", 0, "--checkpoint", tmp_path / "ckpt.pt")
    _, y = synthetic_train()
    shards = fed_avg.split_indices(y, 4, "iid", seed=0)
    assert (got - data_parallel_reference(shards, 3, steps_per_round=1)).abs().max() < TOL
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["progress"]["algorithm"]
    c, c_k = state["control"], state["client_controls"]
    assert c_k.shape == (4, result["params"]) and (c_k.abs().amax(1) > 1e-3).all()
    assert (c - c_k.mean(0)).abs().max() < 1e-5  # equal shards: the weighted mean is the mean
    assert result["bytes_per_rank"] == expected_bytes(result, *SCAFFOLD_BYTES)


# ----------------------------------------------------------------------------- resume

RESUMABLE = ["--dataset", "synthetic", "--train-size", 1000, "--batch-size", 25, "--num-clients", 4,
             "--client-fraction", 0.75, "--rounds", 2, "--max-steps", 3]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [["--algorithm", "scaffold"], ["--algorithm", "fedavgm", "--server-momentum", 0.5]])
def test_resume_after_a_crash_is_exact_with_the_algorithms_state(algorithm, tmp_path):
    """As test_reliability: rank 0 dies in its 2nd evaluation, after round 1's checkpoint. The
    resumed run must end on the uninterrupted run's bits, which needs FedAvgM's momentum, or
    SCAFFOLD's c and every client's c_k (clients rerun in round 2: 3 of 4 per round)."""
    def launch(name, *extra, script=("fed_avg.py",), **kwargs):
        folder = tmp_path / name
        return mpirun(3, *script, *RESUMABLE, *algorithm, "--results", folder / "r.json", "--figures-dir", folder,
                      "--checkpoint", folder / "ckpt.pt", *extra, timeout=180, **kwargs)
    assert_resume_is_exact(launch, "fed_avg.py", "round", tmp_path)


@pytest.mark.slow
def test_sweep_tiny_writes_records_table_and_figures(tmp_path):
    proc = subprocess.run([sys.executable, "bench/fed_sweep.py", "--tiny", "--out", tmp_path], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "FED.md").read_text()
    for name in ("FedAvg", "FedProx (mu 0.001)", "FedAvgM (momentum 0.3", "SCAFFOLD", "(SCAFFOLD's bytes)",
                 "FedRS (alpha 0.5)", "FedLC (tau 1)", "FedRS (alpha 0.5 + server momentum 0.3)"):
        assert name in table, table
    assert table.split("Over seeds")[0].count("\n| non-iid |") == 9, table  # the spread's rows come after
    assert re.search(r"^\| FedRS \(alpha 0.5\) \| [\d.]+ \| [\d.]+ \|", table, re.M), table  # its drift row
    for png in ("fed_sweep_non-iid.png", "client_drift.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # the spread: FedAvg and the best variant again with seed 1, from their seed-0 flags
    seeded = sorted(p.name for p in (tmp_path / "seeds").iterdir())
    assert len(seeded) == 2 and "non-iid_fedavg_seed1.json" in seeded, seeded
    assert "| non-iid | FedAvg | " in table and "Over seeds 0, 1:" in table, table
    # at the same bytes: the 2x-rounds FedAvg moved what SCAFFOLD moved
    rec = lambda name: json.loads((tmp_path / f"non-iid_{name}.json").read_text())["bytes_per_rank"]
    assert rec("fedavg_2x")[0]["bytes_sent"] == rec("scaffold")[0]["bytes_sent"]


def test_the_spread_says_which_differences_exceed_the_seeds(tmp_path):
    """bench/fed_sweep.py's seed table: a difference counts only when the ranges over the seeds
    do not overlap, and a diverged seed is shown as such and left out of the mean."""
    from bench import fed_sweep

    def record(path, acc, **config):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"config": {"algorithm": "fedavg", "seed": 0, **config}, "final_test_acc": acc,
                                    "history": [{"round": 1}] * 10, **({"diverged": "error: nan"} if acc is None else {})}))
    for split, fedavg, best in (("non-iid", (45.0, 63.0, 64.0), (65.0, 63.5, 66.0)),
                                ("iid", (75.0, 76.0, 75.5), (78.0, 78.5, None))):
        for label, accs, algo in (("fedavg", fedavg, "fedavg"), ("fedavgm_b0.3", best, "fedavgm")):
            extra = {"server_momentum": 0.3, "server_lr": 1.0} if algo == "fedavgm" else {}
            for seed, acc in enumerate(accs):
                name = f"{split}_{label}" + (f"_seed{seed}" if seed else "")
                record(tmp_path / ("seeds" if seed else ".") / f"{name}.json", acc, algorithm=algo, seed=seed, **extra)
    text = "\n".join(fed_sweep.spread_lines(str(tmp_path)))
    assert "| non-iid | FedAvg | 45.00 | 63.00 | 64.00 | 57.33 (45.00–64.00) |" in text, text
    assert "- non-iid: FedAvgM (momentum 0.3, server lr 1) against FedAvg, +7.50 points on the means; the " \
           "ranges overlap" in text, text
    assert "| iid | FedAvgM (momentum 0.3, server lr 1) | 78.00 | 78.50 | diverged | 78.25 (78.00–78.50) of the " \
           "seeds that trained |" in text, text
    assert "- iid: FedAvgM (momentum 0.3, server lr 1) against FedAvg, +2.75 points on the means; the ranges do " \
           "not overlap" in text, text


def test_committed_table_is_rendered_from_the_records(tmp_path):
    """bench/FED.md holds no number that results/reference/fed does not."""
    from bench import fed_sweep
    fed_sweep.render(os.path.join(ROOT, "results", "reference", "fed"), False, tmp_path / "FED.md", tmp_path)
    assert_committed("FED.md", tmp_path / "FED.md", "python bench/fed_sweep.py --render-only")
