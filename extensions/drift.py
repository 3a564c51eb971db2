"""Client drift, measured each round (fed_avg.py --measure-drift), and its figure.

    mpirun -n 5 python fed_avg.py --measure-drift --results results/fed/drift_iid.json
    mpirun -n 5 python fed_avg.py --measure-drift --split-method non-iid --results results/fed/drift_non-iid.json
    python -m extensions.drift results/fed/drift_iid.json results/fed/drift_non-iid.json   # figures/client_drift.png

Zhao et al. 2018 ("Federated Learning with Non-IID Data") and Karimireddy et al. 2020 trace
FedAvg's loss on skewed data to the clients' models drifting apart during their local steps.
The server can measure that without any extra bytes: reduce_weighted_sums_ receives each client
rank's [sum n_k w_k, sum n_k] separately before adding them up, so it holds each rank's model
w_r = (its sum) / (its count) anyway. After the FedAvg step it records, per client rank of the round:
  distance       ||w_r - w|| / ||w||, w the new global model;
  acc_own        test accuracy of w_r on the classes its clients hold (each at least 5% of the
                 client's samples), and acc_other on the rest (None when it holds them all);
  class_acc      its test accuracy per class;
and global_class_acc, the new global model's test accuracy per class. A rank that hosts one
client per round (the default: --num-clients = ranks - 1) gives exactly that client's w_k; a rank
that hosts several gives the n_k-weighted mean of their models, which hides drift among them.
The cost is compute on the server: one test-set pass per client rank, and one more for the
global model, each round (drift["seconds"]).
"""
import copy
import os
import time

import numpy as np
import torch

import utils

OWN_SHARE = 0.05  # a class is a client's own when it is at least this share of its samples
TITLE = "client drift (extensions/drift.py)"


def add_flags(parser):
    parser.add_argument("--measure-drift", action="store_true",
                        help="record each round each client rank's distance from the new global model and "
                             "per-class accuracies (costs the server a test pass per client rank)")


def check(args, world_size, script):
    pass


@torch.no_grad()
def class_accuracy(model, x, y, batch_size=1000):
    """(correct answers, samples) of `model` on (x, y), per class: two int64 CPU tensors."""
    model.eval()
    correct = torch.zeros(len(utils.CLASSES), dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch_size):
        yb = y[i:i + batch_size]
        right = model(utils.normalize(x[i:i + batch_size])).argmax(1) == yb
        correct += torch.bincount(yb[right], minlength=len(utils.CLASSES))
    model.train()
    total = torch.bincount(y, minlength=len(utils.CLASSES))
    return correct.cpu(), total.cpu()


def percent(correct, total):
    return round(100 * correct.sum().item() / total.sum().item(), 2) if total.sum() > 0 else None


class DriftMeter:
    """The server's drift measurement; measure() is called once per round, after the FedAvg step."""

    def __init__(self, model, shards, y_train, host, test):
        self.model, self.host, self.test = model, host, test
        counts = torch.stack([torch.bincount(y_train[s], minlength=len(utils.CLASSES)).cpu() for s in shards])
        self.own = counts >= OWN_SHARE * counts.sum(1, keepdim=True)  # clients x classes
        self.scratch = copy.deepcopy(model)  # holds each client rank's model in turn
        self.scratch_params, _ = utils.flatten_parameters(self.scratch)

    def measure(self, flat_params, uploads, workers, clients):
        """uploads: row i is worker rank workers[i]'s [sum n_k w_k, sum n_k] (numpy)."""
        t0 = time.perf_counter()
        correct, total = class_accuracy(self.model, *self.test)
        record = dict(ranks=workers, clients=[], distance=[], acc_own=[], acc_other=[], class_acc=[],
                      global_class_acc=(100 * correct / total.clamp(min=1)).tolist())
        norm = flat_params.norm().item()
        for rank, row in zip(workers, uploads):
            mine = [k for k in clients if self.host[k] == rank]
            weights = torch.from_numpy(row[:-1] / row[-1]).to(flat_params.device)
            self.scratch_params.copy_(weights)
            correct, total = class_accuracy(self.scratch, *self.test)
            own = self.own[mine].any(0)
            record["clients"].append(mine)
            record["distance"].append((weights - flat_params).norm().item() / norm)
            record["acc_own"].append(percent(correct[own], total[own]))
            record["acc_other"].append(percent(correct[~own], total[~own]))
            record["class_acc"].append((100 * correct / total.clamp(min=1)).tolist())
        record["seconds"] = time.perf_counter() - t0
        return record


def plot(paths, out):
    """figures/client_drift.png: one column per results JSON (iid, non-iid, ...): the client
    ranks' distance from the global model (top), and their accuracy on their own classes and on
    the others, beside the global model's (bottom), against the round."""
    import json

    from matplotlib.figure import Figure

    runs = [json.load(open(p)) for p in paths]
    fig = Figure(figsize=(5 * len(runs), 7))
    axes = fig.subplots(2, len(runs), squeeze=False, sharey="row")
    for col, run in enumerate(runs):
        rounds = [h["round"] for h in run["history"] if "drift" in h]
        drift = [h["drift"] for h in run["history"] if "drift" in h]
        if not drift:
            raise SystemExit(f"{paths[col]} has no drift measurements: run fed_avg.py with --measure-drift")
        top, bottom = axes[0, col], axes[1, col]
        for i, rank in enumerate(drift[0]["ranks"]):
            top.plot(rounds, [d["distance"][i] for d in drift], marker="o", label=f"client rank {rank}")
        mean = lambda key: [np.mean([a for a in d[key] if a is not None]) if any(a is not None for a in d[key])
                            else np.nan for d in drift]
        bottom.plot(rounds, mean("acc_own"), marker="o", label="clients, own classes")
        bottom.plot(rounds, mean("acc_other"), marker="s", label="clients, other classes")
        bottom.plot(rounds, [h["test_acc"] for h in run["history"] if "drift" in h], marker="^", color="k",
                    label="global model")
        top.set_title(f"{run['split']}\n{run['config'].get('algorithm', 'fedavg')}, {run['config']['dataset']}",
                      fontsize=10)
        top.set_ylabel("||w_k - w|| / ||w||")
        bottom.set_ylabel("test accuracy (%)")
        bottom.set_xlabel("round")
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="client drift figure, one column per fed_avg.py results JSON")
    parser.add_argument("results", nargs="+", help="results JSONs of runs with --measure-drift (iid first)")
    parser.add_argument("--out", default=os.path.join("figures", "client_drift.png"), help="the PNG to write")
    args = parser.parse_args()
    print(f"wrote {plot(args.results, args.out)}")
