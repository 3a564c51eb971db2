"""Unit tests of utils.py: data, batching, schedule, model, flat buffers, MPI buffers,
evaluation, output paths, checkpoints."""
import argparse
import pickle

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


def test_epoch_orders_of_different_seeds_never_coincide():
    """Seeding with seed * 100003 + epoch made (seed 0, epoch 100003) replay (seed 1, epoch 0)."""
    assert not torch.equal(utils.epoch_order(1000, seed=0, epoch=100_003)[0], utils.epoch_order(1000, seed=1, epoch=0)[0])
    keys = {(s, e) for s in range(20) for e in range(50)} | {(0, 100_003), (0, 1, 2), (0, 2, 1)}
    assert len({utils.stream_seed(*k) for k in keys}) == len(keys)


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
    lrs = [utils.lr_at(s, 100, 0.1, warmup=0.2) for s in range(100)]
    top = lrs.index(max(lrs))
    assert 18 <= top <= 21 and max(lrs) == pytest.approx(0.1, rel=0.02)
    assert all(a <= b for a, b in zip(lrs[:top], lrs[1:top + 1])) and all(a >= b for a, b in zip(lrs[top:], lrs[top + 1:]))
    assert lrs[0] < 0.01 and lrs[-1] < 0.01


@pytest.mark.parametrize("total", [1, 2, 3, 5, 10, 100, 6248])
def test_no_step_of_the_schedule_has_lr_zero(total):
    """lr_at(0, ...) was 0, so the first step of every run changed nothing (and FedSGD with one
    round of one step left the model as it was)."""
    lrs = [utils.lr_at(s, total, 0.1, warmup=0.2) for s in range(total)]
    assert all(0 < lr <= 0.1 for lr in lrs), lrs[:3] + lrs[-3:]


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


# ----------------------------------------------------------------------------- MPI buffers

def test_staged_is_the_tensor_itself_on_the_cpu():
    t = torch.arange(5, dtype=torch.float32)
    with utils.staged(t) as buf:
        assert isinstance(buf, np.ndarray) and buf.ctypes.data == t.data_ptr()
        buf[:] = 7  # what MPI writes lands in the tensor, with no copy
    assert torch.equal(t, torch.full((5,), 7.0))


def test_an_mpi_only_buffer_for_a_gpu_without_cuda_aware_mpi_lives_on_the_host():
    """The parameter server's (W, P) inbox used to be allocated on the GPU, then staged
    through a host copy: the GPU tensor was never used."""
    inbox = utils.mpi_empty((3, 5), torch.device("cuda"), device_ok=False)
    assert inbox.device.type == "cpu" and inbox.shape == (3, 5) and inbox.dtype == torch.float32


def test_traffic_adds_up_what_the_calls_moved_and_skips_unknowns():
    traffic = utils.Traffic()
    traffic.add({"bytes_sent": 8, "bytes_recv": 4})
    traffic.add({"bytes_sent": None, "bytes_recv": None})  # MPI_Allreduce: the library's choice
    traffic.add({"bytes_sent": 1, "bytes_recv": 2})
    assert (traffic.sent, traffic.received) == (9, 6)


# ----------------------------------------------------------------------------- outputs and checkpoints

def test_an_unwritable_output_is_refused_before_anything_runs(tmp_path, capsys):
    utils.check_writable([str(tmp_path / "new" / "folder" / "r.json"), None])  # made as needed
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new" / "folder").iterdir())
    with pytest.raises(SystemExit) as e:
        utils.check_writable([str(tmp_path / "ok.json"), "/proc/x/ck.pt"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write /proc/x/ck.pt") and "\n" not in err


def fake_args(tmp_path, **kwargs):
    return argparse.Namespace(script="cent_sgd", checkpoint=str(tmp_path / "ckpt.pt"), resume=True, seed=0,
                              lr=0.05, **kwargs)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    args = fake_args(tmp_path)
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1)
    utils.save_checkpoint(args, 1, model, None, {"epoch": 1})

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # a disconnect, a Ctrl-C, a full disk
    monkeypatch.setattr(torch, "save", dies_halfway)
    with torch.no_grad():
        model.weight.fill_(2)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint(args, 1, model, None, {"epoch": 2})
    monkeypatch.undo()
    with torch.no_grad():
        model.weight.fill_(3)
    progress = utils.load_checkpoint(args, 1, model, None, {"epoch": 0})
    assert progress == {"epoch": 1} and torch.equal(model.weight, torch.ones(1, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left


def test_save_model_is_atomic_too(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    model = utils.make_model(torch.device("cpu"), seed=0)
    utils.save_model(str(path), model)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        utils.save_model(str(path), utils.make_model(torch.device("cpu"), seed=1))
    monkeypatch.undo()
    assert torch.equal(torch.load(path), utils.parameters_vector(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_training_draws_nothing_from_the_global_rngs_so_checkpoints_need_not_save_them(tmp_path):
    """Every random choice comes from a generator seeded by (seed, epoch, ...): with the global
    RNGs in any state, an epoch computes the same bits. So no RNG state is checkpointed."""
    import cent_sgd
    (x, y), _ = utils.make_synthetic(seed=0, n_train=256, n_test=10)
    args = argparse.Namespace(seed=0, batch_size=32, lr=0.05, warmup=0.2, momentum=0.9, weight_decay=5e-4,
                              clip_norm=utils.CLIP_NORM, epochs=2, max_steps=None)
    finals = []
    for global_seed in (1, 2):
        utils.seed_everything(global_seed)
        model = utils.make_model(torch.device("cpu"), seed=0)
        utils.seed_everything(global_seed)
        cent_sgd.train_epoch(model, utils.make_optimizer(model.parameters(), args), (x, y), args, 1, 8)
        finals.append(utils.parameters_vector(model))
    assert torch.equal(*finals)
    utils.save_checkpoint(fake_args(tmp_path), 1, model, None, {"epoch": 1})
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(state) == {"format", "script", "world_size", "config", "model", "optimizer", "progress"}
