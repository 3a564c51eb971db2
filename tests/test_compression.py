"""Gradient compression (extensions/compression.py, dist_sgd_serverless.py --compress).

    pytest -q tests/test_compression.py

In process, on one rank: error feedback loses nothing, and PowerSGD's algebra (it recovers a
gradient of rank r exactly, and at full rank it is the uncompressed mean). Under mpirun, with
N = 3 (tests/compression_check.py): replicas bitwise identical, bytes equal to each method's
formula, means right. Slow tier (pytest -q -m slow tests/test_compression.py): the same checks
at N = 2 and 4; the script: --compress none is bit-identical to the default, PowerSGD at full
rank trains like no compression, every method's bytes in the results JSON; and
bench/compression.py --tiny.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch

import utils
from extensions.compression import METHODS, record
from mpi import ROOT, assert_committed, check, in_process, mpirun, python

QUICK = ["--dataset", "synthetic", "--train-size", "512", "--max-steps", "3", "--batch-size", "16"]


class OneRank:
    """The part of a communicator the compressors use, for a single rank, without MPI."""

    def Get_size(self):
        return 1

    def Get_rank(self):
        return 0

    def Allgather(self, send, recv):
        recv[...] = send.reshape(recv.shape)


def no_allreduce(buf, comm):
    """The all-reduce of one rank: the sum is the buffer itself."""
    return {"steps": 0, "bytes_sent": 0, "bytes_recv": 0}


def model_and_grads(shape=(12, 20), channels_last=False):
    """A model whose one weight has `shape` (plus a bias), with its flat gradient."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(shape[1] // 4, shape[0], 2) if channels_last else torch.nn.Linear(shape[1], shape[0])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    _, flat_grads = utils.flatten_parameters(model)
    return model, flat_grads


def args(**kw):
    return SimpleNamespace(**{"seed": 0, "topk_ratio": 0.1, "powersgd_rank": 2, **kw})


def test_topk_error_feedback_loses_nothing():
    model, flat_grads = model_and_grads()
    topk = METHODS["topk"](model, args(topk_ratio=0.05))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = torch.randn(flat_grads.shape, generator=g)
        old = topk.residual.clone()
        values, indices = topk.sparsify_(grad.clone())
        sent = torch.zeros_like(grad).index_put_((indices,), values)
        # exact: the sent entries and the residual's entries are disjoint
        assert torch.equal(sent + topk.residual, grad + old)
        assert len(values) == topk.k == int(0.05 * grad.numel())
        assert (topk.residual[indices] == 0).all()
        # the k largest of gradient + old residual are sent
        assert values.abs().min() >= topk.residual.abs().max()


def test_topk_on_one_rank_sends_k_entries_and_keeps_the_rest():
    model, flat_grads = model_and_grads()
    topk = METHODS["topk"](model, args())
    grad = torch.randn(flat_grads.shape)
    flat_grads.copy_(grad)
    moved = topk(flat_grads, OneRank(), no_allreduce)
    assert (flat_grads != 0).sum() == topk.k
    assert torch.equal(flat_grads + topk.residual, grad)
    assert moved == {"steps": None, "bytes_sent": 0, "bytes_recv": 0}  # (N-1) x 8k with N = 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_powersgd_recovers_a_gradient_of_rank_r(channels_last):
    model, flat_grads = model_and_grads((16, 24), channels_last)
    weight, bias = model.weight, model.bias
    r = 3
    powersgd = METHODS["powersgd"](model, args(powersgd_rank=r))
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # a new rank-r gradient each step: the warm-started Q must follow it
        low_rank = torch.randn(16, r, generator=g) @ torch.randn(r, 24, generator=g)
        weight.grad.copy_(low_rank.view(weight.shape))
        bias.grad.copy_(torch.randn(16, generator=g))
        want_bias = bias.grad.clone()
        powersgd(flat_grads, OneRank(), no_allreduce)
        torch.testing.assert_close(weight.grad.reshape(16, 24), low_rank, rtol=1e-4, atol=1e-4)
        assert torch.equal(bias.grad, want_bias)  # 1-D tensors go uncompressed
        assert powersgd.residual.abs().max() < 1e-4


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_powersgd_at_full_rank_is_the_uncompressed_gradient(shape):
    model, flat_grads = model_and_grads(shape)
    powersgd = METHODS["powersgd"](model, args(powersgd_rank=100))  # clipped to min(m, n)
    assert [r for *_, r in powersgd.shapes] == [min(shape)]
    for _ in range(2):
        grad = torch.randn(flat_grads.shape)
        flat_grads.copy_(grad)
        powersgd(flat_grads, OneRank(), no_allreduce)
        torch.testing.assert_close(flat_grads, grad, rtol=1e-5, atol=1e-5)


def test_powersgd_error_feedback_keeps_what_was_not_sent():
    model, flat_grads = model_and_grads((16, 24))
    powersgd = METHODS["powersgd"](model, args(powersgd_rank=1))
    for _ in range(3):
        grad = torch.randn(flat_grads.shape)
        old = powersgd.residual.clone()
        flat_grads.copy_(grad)
        powersgd(flat_grads, OneRank(), no_allreduce)
        # on one rank, sent (P Q^T) + new residual == gradient + old residual, to float rounding
        torch.testing.assert_close(flat_grads + powersgd.residual, grad + old, rtol=1e-5, atol=1e-5)
        assert powersgd.residual.abs().max() > 1e-2  # rank 1 of a random 16 x 24 matrix does lose


def test_record_gives_the_ratio_against_none():
    model, flat_grads = model_and_grads()
    p = flat_grads.numel()
    none = record(lambda *a: None, flat_grads, [{"bytes_sent": None}], steps=3)
    assert none == {"payload_bytes_per_step": 4 * p, "ratio_vs_none": 1.0, "bytes_sent_per_step": [None]}
    fp16 = record(METHODS["fp16"](model, args()), flat_grads, [{"bytes_sent": 6 * p}] * 2, steps=3)
    assert fp16 == {"payload_bytes_per_step": 2 * p, "ratio_vs_none": 2.0, "bytes_sent_per_step": [2.0 * p] * 2}


@pytest.mark.parametrize("n", [pytest.param(2, marks=pytest.mark.slow), 3, pytest.param(4, marks=pytest.mark.slow)])
def test_methods_on_n_ranks_keep_replicas_identical_and_bytes_exact(n):
    proc = check(mpirun(n, "-m", "mpi4py", "tests/compression_check.py", timeout=180))
    assert f"compression OK: N={n}" in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """dist_sgd_serverless.py on 2 ranks with default flags: its model and results."""
    folder = tmp_path_factory.mktemp("default")
    check(mpirun(2, "dist_sgd_serverless.py", *QUICK, "--save-model", folder / "m.pt", "--results", folder / "r.json"))
    return torch.load(folder / "m.pt"), json.loads((folder / "r.json").read_text())


@pytest.mark.slow
def test_none_is_bit_identical_to_the_default(default_run, tmp_path):
    check(mpirun(2, "dist_sgd_serverless.py", *QUICK, "--compress", "none",
                 "--save-model", tmp_path / "m.pt", "--results", tmp_path / "r.json"))
    assert torch.equal(torch.load(tmp_path / "m.pt"), default_run[0])
    compression = json.loads((tmp_path / "r.json").read_text())["compression"]
    assert compression["ratio_vs_none"] == 1.0 and compression["bytes_sent_per_step"] == [None, None]


@pytest.mark.slow
def test_powersgd_at_full_rank_trains_like_no_compression(default_run, tmp_path):
    # over the ring, whose bytes are counted: the script fails if the replicas end up different
    proc = check(mpirun(2, "dist_sgd_serverless.py", *QUICK, "--compress", "powersgd", "--powersgd-rank", 1000,
                        "--allreduce", "ring", "--save-model", tmp_path / "m.pt", "--results", tmp_path / "r.json"))
    assert "compress=powersgd" in proc.stdout
    dist, none = torch.load(tmp_path / "m.pt"), default_run[0]
    assert (dist - none).abs().max() < 1e-4  # float32 QR rounding, not a different step
    assert (dist - none).abs().max() > 0  # it did go through PowerSGD
    check_bytes_reported(json.loads((tmp_path / "r.json").read_text()), 0)  # at full rank, P and Q outweigh M


def check_bytes_reported(record_, min_ratio):
    """The results JSON's bytes, for 2 ranks over the ring or topk's all-gather: each moves
    the payload once each way per step (ring: half the buffer, twice; all-gather: 1 block)."""
    p, steps, c = record_["params"], record_["steps"], record_["compression"]
    assert c["ratio_vs_none"] == 4 * p / c["payload_bytes_per_step"] > min_ratio
    assert c["bytes_sent_per_step"] == [c["payload_bytes_per_step"]] * 2
    assert record_["bytes_per_rank"] == [{"bytes_sent": c["payload_bytes_per_step"] * steps,
                                          "bytes_recv": c["payload_bytes_per_step"] * steps}] * 2


@pytest.mark.slow
@pytest.mark.parametrize("method, extra, min_ratio", [
    ("fp16", [], 1.9), ("topk", ["--topk-ratio", "0.01"], 40), ("powersgd", ["--powersgd-rank", "2"], 10)])
def test_script_reports_bytes_per_step_and_ratio(method, extra, min_ratio, tmp_path):
    proc = check(mpirun(2, "dist_sgd_serverless.py", *QUICK, "--allreduce", "ring", "--compress", method, *extra,
                        "--results", tmp_path / "r.json"))
    assert f"compress={method}" in proc.stdout
    check_bytes_reported(json.loads((tmp_path / "r.json").read_text()), min_ratio)


def test_bad_topk_ratio_is_refused():
    proc = in_process("dist_sgd_serverless.py", "--topk-ratio", "1.5", "--dataset", "synthetic")
    assert proc.returncode == 2 and "--topk-ratio must be in (0, 1]" in proc.stderr


@pytest.mark.slow
def test_tiny_bench_writes_records_table_and_plot(tmp_path):
    check(python("bench/compression.py", "--tiny", "--out", tmp_path, timeout=600))
    record = json.loads((tmp_path / "compression.json").read_text())
    assert [r["method"] for r in record["rows"]] == ["none", "fp16", "topk", "powersgd"]
    text = (tmp_path / "COMPRESSION.md").read_text()
    assert text.count("| local |") == 4 and "## Goals" in text
    assert (tmp_path / "compression.png").stat().st_size > 0
    # the table comes from the records alone
    check(python("bench/compression.py", "--render-only", "--out", tmp_path, timeout=120))
    assert (tmp_path / "COMPRESSION.md").read_text() == text


def test_committed_table_is_rendered_from_the_records(tmp_path):
    """bench/COMPRESSION.md holds no number that results/reference/compression does not."""
    from bench import compression as bench_compression
    out = os.path.join(ROOT, "results", "reference", "compression")
    with open(os.path.join(out, "compression.json")) as f:
        record = json.load(f)
    bench_compression.render(record, out, tmp_path / "COMPRESSION.md", tmp_path / "compression.png")
    assert_committed("COMPRESSION.md", tmp_path / "COMPRESSION.md", "python bench/compression.py --render-only")
