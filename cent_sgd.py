"""Centralized SGD on CIFAR-10 (Q1): one process, the baseline the distributed scripts must match.

    python cent_sgd.py                         # CIFAR-10 from data/, or downloaded there
    python cent_sgd.py --dataset synthetic     # offline, small, learnable stand-in
    python cent_sgd.py --checkpoint ckpt.pt --resume   # rerun the same line after a crash

Each step takes `--batch-size` samples of a seeded permutation (utils.epoch_order), flips
half of them, and takes one SGD step under a one-cycle lr schedule. Rank 0 of an mpirun
job with N ranks and per-rank batch b sees the same global batches as this script with
batch N*b, which is how tests check that the distributed scripts compute the same thing.
"""
import time

import torch

import utils


def train_epoch(model, optimizer, train, args, epoch, step):
    """Epoch `epoch`, from global step `step`, in batches of --batch-size;
    returns (step, mean loss)."""
    x_train, y_train = train
    total_steps = utils.count_steps(len(x_train), args.batch_size, args)
    order, flips = utils.epoch_order(len(x_train), args.seed, epoch)
    taken = step - epoch * (len(x_train) // args.batch_size)  # a resumed run starts after these
    loss_sum, n_steps = torch.zeros((), device=x_train.device), 0
    for idx, flip in utils.batches(order.to(x_train.device), flips.to(x_train.device),
                                   args.batch_size, start=taken):
        if step == total_steps:
            break
        utils.set_lr(optimizer, utils.lr_at(step, total_steps, args.lr, args.warmup))
        optimizer.zero_grad(set_to_none=True)
        loss_sum += utils.train_step(model, x_train[idx], y_train[idx], flip)
        utils.clip_gradients_(optimizer, args.clip_norm)
        optimizer.step()
        step, n_steps = step + 1, n_steps + 1
    return step, loss_sum.item() / max(1, n_steps)


def main():
    parser = utils.get_parser("cent_sgd", __doc__.splitlines()[0], epochs=8,
                              batch_size=utils.BASE_BATCH, lr=utils.BASE_LR)
    args = parser.parse_args()
    utils.check_args(args)
    device, threads = utils.setup(args)

    # data
    train, (x_test, y_test) = utils.load_data(args, device)
    total_steps = utils.count_steps(len(train[0]), args.batch_size, args)

    # model
    model = utils.make_model(device, args.seed)
    optimizer = utils.make_optimizer(model.parameters(), args)
    utils.print0(f"cent_sgd | {args.dataset}: {len(train[0])} train, {len(x_test)} test | "
                 f"{utils.num_params(model):,} params | batch {args.batch_size} | "
                 f"{total_steps} steps | "
                 f"{device} x {threads} threads")

    # train, or go on from a checkpoint, which holds everything the next epoch depends on
    progress = utils.load_checkpoint(args, 1, model, optimizer,
                                     dict(epoch=0, step=0, history=[], wall_time=0.0))
    t_start = time.perf_counter() - progress["wall_time"]
    for epoch in range(progress["epoch"], args.epochs):
        if progress["step"] == total_steps:
            break
        t0 = time.perf_counter()
        step, train_loss = train_epoch(model, optimizer, train, args, epoch, progress["step"])
        utils.sync(device)
        train_time = time.perf_counter() - t0
        test_loss, correct = utils.evaluate(model, x_test, y_test)
        h = dict(epoch=epoch + 1, steps=step, train_loss=train_loss,
                 test_loss=test_loss / len(x_test), test_acc=100 * correct / len(x_test),
                 train_time=train_time, epoch_time=time.perf_counter() - t0)
        utils.print0(f"epoch {h['epoch']:3d}/{args.epochs} | train loss {h['train_loss']:.4f} | "
                     f"test acc {h['test_acc']:6.2f}% | {h['epoch_time']:6.1f} s")
        utils.stop_if_diverged(train_loss)
        progress.update(epoch=epoch + 1, step=step, history=progress["history"] + [h],
                        wall_time=time.perf_counter() - t_start)
        if args.checkpoint:
            utils.save_checkpoint(args, 1, model, optimizer, progress)

    # report
    utils.finish_trace(args)
    history = progress["history"]
    utils.print0(f"Final test accuracy: {history[-1]['test_acc']:.2f}%")
    utils.save_results(args.results, dict(
        script="cent_sgd", config=vars(args), world_size=1, threads=threads, device=str(device),
        params=utils.num_params(model), steps=progress["step"],
        wall_time=time.perf_counter() - t_start,
        final_test_acc=history[-1]["test_acc"], history=history))
    if args.save_model:
        utils.save_model(args.save_model, model)


if __name__ == "__main__":
    main()
