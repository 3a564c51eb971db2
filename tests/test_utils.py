"""Unit tests of utils.py: data, batching, schedule, model, flat buffers, evaluation."""
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

import utils


# ----------------------------------------------------------------------------- data

def test_synthetic_is_cifar_shaped_and_seeded():
    (x, y), (xt, yt) = utils.make_synthetic(seed=1)
    assert x.shape == (5000, 3, 32, 32) and x.dtype == torch.uint8
    assert xt.shape == (1000, 3, 32, 32) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    (x2, y2), _ = utils.make_synthetic(seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    (x3, _), _ = utils.make_synthetic(seed=2)
    assert not torch.equal(x, x3)


def write_fake_cifar(folder, n_per_batch=7):
    """The standard cifar-10-batches-py layout, with a few images per batch."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
    return rng


def test_cifar10_is_read_from_the_batches_folder(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    (x, y), (xt, yt) = utils.load_cifar10(str(tmp_path))
    assert x.shape == (35, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (35,)
    assert xt.shape == (7, 3, 32, 32)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    # row layout: the R, then G, then B 32x32 planes
    assert torch.equal(x[7, 1].flatten(), torch.from_numpy(batch["data"][0, 1024:2048]))
    assert y[7:14].tolist() == batch["labels"]


def test_truncated_batch_file_fails_with_one_line(tmp_path, capsys):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SystemExit) as e:
        utils.load_cifar10(str(tmp_path))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read") and "data_batch_3" in err and "\n" not in err


def test_missing_data_offline_names_the_way_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(utils, "download_cifar10", lambda data_dir: "URLError: no network")
    with pytest.raises(SystemExit) as e:
        utils.load_cifar10(str(tmp_path / "nowhere"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--dataset synthetic" in err and "no network" in err and "\n" not in err


def test_normalize_flips_only_the_masked_images():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    flip = torch.tensor([True, False, True, False])
    out = utils.normalize(x, flip)
    plain = utils.normalize(x)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[1], plain[1]) and torch.equal(out[3], plain[3])
    assert torch.equal(out[0], plain[0].flip(-1)) and torch.equal(out[2], plain[2].flip(-1))
    # per channel: (x/255 - mean) / std
    expected = (x[0, 2].float() / 255 - utils.CIFAR10_MEAN[2]) / utils.CIFAR10_STD[2]
    assert torch.allclose(plain[0, 2], expected, atol=1e-6)


# ----------------------------------------------------------------------------- batching

def test_epoch_order_is_a_seeded_permutation_that_changes_each_epoch():
    order, flips = utils.epoch_order(1000, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(1000))
    assert 400 < int(flips.sum()) < 600
    again, flips_again = utils.epoch_order(1000, seed=3, epoch=0)
    assert torch.equal(order, again) and torch.equal(flips, flips_again)
    assert not torch.equal(order, utils.epoch_order(1000, seed=3, epoch=1)[0])
    assert not torch.equal(order, utils.epoch_order(1000, seed=4, epoch=0)[0])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_rank_shares_make_up_exactly_the_centralized_batch(world_size):
    n, b = 1003, 8
    order, flips = utils.epoch_order(n, seed=0, epoch=2)
    central = list(utils.batches(order, flips, world_size * b))
    shares = [list(utils.batches(order, flips, world_size * b, r, world_size)) for r in range(world_size)]
    assert len(central) == n // (world_size * b)
    for k, (idx, flip) in enumerate(central):
        got = [shares[r][k] for r in range(world_size)]
        assert all(len(i) == b for i, _ in got)
        # the same samples, each with the same flip decision as in the centralized batch
        pairs = {(int(i), bool(f)) for share_idx, share_flip in got for i, f in zip(share_idx, share_flip)}
        assert pairs == {(int(i), bool(f)) for i, f in zip(idx, flip)}
    used = torch.cat([idx for idx, _ in central])
    assert len(set(used.tolist())) == len(used) == (n // (world_size * b)) * world_size * b


def test_one_cycle_schedule():
    lrs = [utils.lr_at(s, 100, 0.1, warmup=0.2) for s in range(101)]
    assert lrs[0] == 0 and lrs[20] == pytest.approx(0.1) and lrs[100] == pytest.approx(0)
    assert max(lrs) == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(lrs[:20], lrs[1:21])) and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))


# ----------------------------------------------------------------------------- model

def test_model_is_small_has_no_batchnorm_and_is_seeded():
    model = utils.make_model(torch.device("cpu"), seed=0)
    assert 50_000 < utils.num_params(model) <= 200_000
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    same = utils.make_model(torch.device("cpu"), seed=0)
    other = utils.make_model(torch.device("cpu"), seed=1)
    v = utils.parameters_vector
    assert torch.equal(v(model), v(same)) and not torch.equal(v(model), v(other))


def test_flat_buffers_are_views_that_backward_fills():
    device = torch.device("cpu")
    reference = utils.make_model(device, seed=0)
    model = utils.make_model(device, seed=0)
    flat_params, flat_grads = utils.flatten_parameters(model)
    assert flat_params.is_contiguous() and len(flat_params) == utils.num_params(model)
    (x, y), _ = utils.make_synthetic(seed=0)
    x, y = x[:16], y[:16]
    assert torch.equal(model(utils.normalize(x)), reference(utils.normalize(x)))
    for m in (reference, model):
        for _ in range(2):  # twice: the second backward must accumulate into the same views
            utils.train_step(m, x, y, flip=None)
    ptr = flat_grads.data_ptr()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert ptr <= p.grad.data_ptr() < ptr + flat_grads.numel() * 4
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    assert torch.allclose(flat_grads.sum(), sum(q.grad.sum() for q in reference.parameters()), atol=1e-4)
    # writing the flat buffer writes the weights: what a received model update relies on
    flat_params.zero_()
    assert all(not p.detach().any() for p in model.parameters())


def test_evaluate_sums_loss_and_counts_correct_over_all_batches():
    logits = torch.tensor([0.0, 0, 0, 2.0, 0, 0, 0, 1.0, 0, 0])  # always predicts class 3

    class Constant(nn.Module):
        def forward(self, x):
            return logits.expand(len(x), 10)

    y = torch.arange(2503) % 10   # not a multiple of the eval batch: the tail must count too
    x = torch.zeros(2503, 3, 32, 32, dtype=torch.uint8)
    loss_sum, correct = utils.evaluate(Constant(), x, y, batch_size=1000)
    assert correct == int((y == 3).sum())
    expected = nn.functional.cross_entropy(logits.expand(2503, 10), y, reduction="sum")
    assert loss_sum == pytest.approx(float(expected), rel=1e-5)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    utils.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # a disconnect, a Ctrl-C, a full disk
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    utils.seed_everything(5)
    state = utils.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    torch.save(state, tmp_path / "rng.pt")
    utils.seed_everything(6)
    utils.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
