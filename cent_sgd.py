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


def main():
    parser = utils.get_parser(__doc__.splitlines()[0], epochs=8, batch_size=64, lr=0.05)
    args = parser.parse_args()
    utils.check_args(args)

    # setup
    device = utils.get_device(args.device)
    threads = utils.set_threads(device)
    utils.seed_everything(args.seed)

    # data
    (x_train, y_train), (x_test, y_test) = utils.load_data(args, device)
    total_steps = utils.count_steps(len(x_train), args.batch_size, args)

    # model
    model = utils.make_model(device, args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.momentum > 0, weight_decay=args.weight_decay)
    utils.print0(f"cent_sgd | {args.dataset}: {len(x_train)} train, {len(x_test)} test | "
                 f"{utils.num_params(model):,} params | batch {args.batch_size} | {total_steps} steps | "
                 f"{device} x {threads} threads")

    # resume: a checkpoint holds everything the next epoch depends on
    history, step, start = [], 0, 0
    state = utils.load_checkpoint(args, "cent_sgd", world_size=1)
    if state:
        utils.restore(state, model, optimizer)
        history, step, start = state["history"], state["step"], state["epoch"]
        utils.print0(f"resumed from {args.checkpoint}: epoch {start}, step {step}")

    # train
    t_start = time.perf_counter()
    for epoch in range(start, args.epochs):
        if step == total_steps:
            break
        t0 = time.perf_counter()
        order, flips = utils.epoch_order(len(x_train), args.seed, epoch)
        order, flips = order.to(device), flips.to(device)
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        for idx, flip in utils.batches(order, flips, args.batch_size):
            if step == total_steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = utils.lr_at(step, total_steps, args.lr, args.warmup)
            optimizer.zero_grad(set_to_none=True)
            loss_sum += utils.train_step(model, x_train[idx], y_train[idx], flip)
            optimizer.step()
            step += 1
            n_steps += 1
        utils.sync(device)
        train_time = time.perf_counter() - t0
        test_loss, correct = utils.evaluate(model, x_test, y_test)
        history.append(dict(epoch=epoch + 1, steps=step, train_loss=loss_sum.item() / max(1, n_steps),
                            test_loss=test_loss / len(x_test), test_acc=100 * correct / len(x_test),
                            train_time=train_time, epoch_time=time.perf_counter() - t0))
        h = history[-1]
        utils.print0(f"epoch {h['epoch']:3d}/{args.epochs} | train loss {h['train_loss']:.4f} | "
                     f"test acc {h['test_acc']:6.2f}% | {h['epoch_time']:6.1f} s")
        if args.checkpoint:
            utils.save_checkpoint(args.checkpoint, utils.checkpoint(
                "cent_sgd", args, 1, model, optimizer, epoch=epoch + 1, step=step, history=history))

    # report
    wall = time.perf_counter() - t_start
    utils.print0(f"Final test accuracy: {history[-1]['test_acc']:.2f}%")
    utils.save_results(utils.results_path(args, __file__), dict(
        script="cent_sgd", config=vars(args), world_size=1, threads=threads, device=str(device),
        params=utils.num_params(model), steps=step, wall_time=wall,
        final_test_acc=history[-1]["test_acc"], history=history))
    if args.save_model:
        torch.save(utils.parameters_vector(model), args.save_model)


if __name__ == "__main__":
    main()
