"""FedAvg variants for fed_avg.py's --algorithm: FedProx, FedAvgM, SCAFFOLD, FedRS and FedLC.

    mpirun -n 5 python fed_avg.py --split-method non-iid --algorithm fedprox --prox-mu 0.01
    mpirun -n 5 python fed_avg.py --split-method non-iid --algorithm fedavgm --server-momentum 0.5
    mpirun -n 5 python fed_avg.py --split-method non-iid --algorithm scaffold
    mpirun -n 5 python fed_avg.py --split-method non-iid --algorithm fedrs --rs-alpha 0.5
    mpirun -n 5 python fed_avg.py --split-method non-iid --algorithm fedlc --lc-tau 1

fed_avg.py's own class FedAvg holds the hooks of a round, which the script calls where each acts,
as the assignment computes them. A variant (Variant, below) is built around that FedAvg once,
before the loop (extensions.configure), and replaces some hooks; --algorithm fedavg replaces none
(tests check it bit for bit). The hooks:
  downloads, uploads   tensors sent beside the global weights (down) and beside [sum n_k w_k,
                       sum n_k] (up), each by the script's own send_global_model_ and
                       reduce_weighted_sums_, so that utils.Traffic counts their bytes;
  local_loss(k, labels)   client k's loss, (logits, targets) -> loss, given its training labels;
  local_step(k, w)     the function that takes client k's optimizer step, (optimizer, lr) -> None;
  client_done_(k, n_k, w)   after client k's local steps, with its weights in the model;
  server_update_(flat_params, average)   the new global weights, from the old ones (still in
                       flat_params) and the FedAvg average sum n_k w_k / sum n_k;
and state()/load_state_() put what persists across rounds into the checkpoint.

Only SCAFFOLD keeps state on the clients (the control variates c_k), and only the server writes
the checkpoint: with --checkpoint, after each round the client ranks send the server the c_k of
the clients they ran (P floats each, tag CONTROL_TAG), and the server keeps a copy of all of them
for the checkpoint. These bytes (4P per client per round, only with --checkpoint) are checkpoint
I/O, not the algorithm's, and are not added to bytes_per_rank. On resume every rank reads the
checkpoint and takes back its own clients' c_k. (The server cannot rebuild c_k itself: a client
rank uploads the sum over the clients it ran, not each y_k.)
"""
import torch
import torch.nn.functional as F

import utils

NUM_CLASSES = 10  # CIFAR-10's, and the synthetic set's
CONTROL_TAG = 7  # SCAFFOLD's c_k on their way to the server's checkpoint copy


class Variant:
    """A FedAvg variant starts from the script's own hooks, `base` (fed_avg.FedAvg: McMahan et al.
    2017), and replaces some of them; every hook it does not replace is FedAvg's."""

    def __init__(self, base):
        self.base = base
        self.args, self.params, self.grads, self.sizes = base.args, base.params, base.grads, base.sizes
        self.downloads, self.uploads = base.downloads, base.uploads

    def __getattr__(self, name):  # a hook this variant does not replace
        return getattr(self.base, name)


class FedProx(Variant):
    """Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (FedProx): each client
    minimises its loss + (mu/2) ||w - w_global||^2, so its gradient gains mu (w - w_global), which
    then goes through the optimizer (momentum, weight decay) like the rest. mu = 0 is FedAvg."""

    def local_step(self, k, global_weights):
        mu, w = self.args.prox_mu, self.params

        def proximal_step(optimizer, lr):
            self.grads.add_(w - global_weights, alpha=mu)
            optimizer.step()
        return proximal_step


class FedAvgM(Variant):
    """Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification" (FedAvgM): server momentum on the averaged update,
        v = beta v + (old - average),   new = old - server_lr v.
    Written as new = average - (server_lr v - (old - average)), the same number in exact
    arithmetic, so that beta = 0 and server_lr = 1 give the average bit for bit (FedAvg)."""

    def __init__(self, base):
        super().__init__(base)
        self.velocity = torch.zeros_like(self.params)

    def server_update_(self, flat_params, average):
        update = flat_params - average
        self.velocity.mul_(self.args.server_momentum).add_(update)
        flat_params.copy_(average - (self.args.server_lr * self.velocity - update))

    def state(self, comm, clients, host):
        return {"velocity": self.velocity}

    def load_state_(self, state):
        if state:
            self.velocity.copy_(state["velocity"])


class Scaffold(Variant):
    """Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", Algorithm 1 with option II. The server sends its control variate c beside the
    weights x; client k takes its steps and then moves by -lr (c - c_k) (after the optimizer
    step, as NIID-Bench does, so that momentum does not amplify the correction twice), and sets
        c_k+ = c_k - c + (x - y_k) / (sum of its step lrs),
    sending sum n_k (c_k+ - c_k) beside sum n_k y_k. The server sets x = the FedAvg average
    (server_lr 1; otherwise x - server_lr (x - average)) and c += sum n_k (c_k+ - c_k) / n, n the
    samples of all clients: c stays the n_k-weighted mean of all c_k, as FedAvg weights y_k.
    Every round each client rank receives 2P floats and sends 2P + 1: twice FedAvg's bytes.
    """

    def __init__(self, base):
        super().__init__(base)
        self.control = torch.zeros_like(self.params)          # c: the server's, or its copy on a client
        self.delta_sum = torch.zeros_like(self.params)        # sum n_k (c_k+ - c_k)
        self.downloads, self.uploads = [self.control], [self.delta_sum]
        self.client_controls = {}                              # c_k of the clients hosted here
        self.all_controls = None                               # the server's copy, for checkpoints
        self.lr_sum = 0.0

    def c_k(self, k):
        if k not in self.client_controls:
            self.client_controls[k] = torch.zeros_like(self.params)
        return self.client_controls[k]

    def local_step(self, k, global_weights):
        correction = self.control - self.c_k(k)
        self.lr_sum = 0.0

        def controlled_step(optimizer, lr):
            optimizer.step()
            self.params.sub_(correction, alpha=lr)
            self.lr_sum += lr
        return controlled_step

    def client_done_(self, k, n_k, global_weights):
        c_k = self.c_k(k)
        new = c_k - self.control + (global_weights - self.params) / self.lr_sum
        self.delta_sum.add_(new - c_k, alpha=n_k)
        c_k.copy_(new)

    def server_update_(self, flat_params, average):
        if self.args.server_lr == 1:
            flat_params.copy_(average)
        else:
            flat_params.sub_(flat_params - average, alpha=self.args.server_lr)
        self.control.add_(self.delta_sum, alpha=1 / sum(self.sizes))

    def state(self, comm, clients, host):
        """All ranks, after each round: with --checkpoint, the c_k of this round's clients go to
        the server's copy; the server returns c and all c_k for the checkpoint."""
        if not self.args.checkpoint:
            return {}
        rank = comm.Get_rank()
        if rank == 0:
            if self.all_controls is None:
                self.all_controls = torch.zeros(len(self.sizes), len(self.params))
            for k in clients:
                comm.Recv(self.all_controls[k].numpy(), source=host[k], tag=CONTROL_TAG)
            return {"control": self.control.cpu(), "client_controls": self.all_controls}
        for k in clients:
            if host[k] == rank:
                comm.Send(self.c_k(k).cpu().numpy(), dest=0, tag=CONTROL_TAG)
        return {}

    def load_state_(self, state):
        if not state:
            return
        self.control.copy_(state["control"])
        self.all_controls = state["client_controls"].clone()
        self.client_controls = {k: row.to(self.params.device) for k, row in enumerate(self.all_controls)}


class FedRS(FedAvgM):
    """Li and Zhan 2021, "FedRS: Federated Learning with Restricted Softmax for Label
    Distribution Non-IID Data": client k multiplies the logits of the classes it has no samples
    of by alpha in [0, 1] before the softmax. Its steps then push those classes' outputs down
    less, which FedAvg's clients do until they score 0% on them (--measure-drift's "other
    classes"). alpha = 1 is FedAvg. A fix of the client's loss, it combines with FedAvgM's
    server step (--server-momentum, default 0: FedAvg's)."""

    def local_loss(self, k, labels):
        present = torch.bincount(labels, minlength=NUM_CLASSES) > 0
        scale = torch.where(present, 1.0, self.args.rs_alpha).to(torch.float32)

        def restricted_softmax_loss(logits, y):
            return F.cross_entropy(logits * scale, y)
        return restricted_softmax_loss


class FedLC(FedAvgM):
    """Zhang et al. 2022, "Federated Learning with Label Distribution Skew via Logits
    Calibration" (FedLC): client k's loss is the cross-entropy of logit_c - tau n_kc^(-1/4) for
    each class c, where n_kc is its number of samples of c. A rare class's logit is lowered
    more, so the client must raise it more to fit that class: its steps lean less towards its
    frequent classes. A class it has no samples of gets -inf (the formula at n_kc = 0), which
    leaves that class out of its softmax altogether. Like FedRS, it combines with FedAvgM's
    server step (--server-momentum, default 0: FedAvg's)."""

    def local_loss(self, k, labels):
        counts = torch.bincount(labels, minlength=NUM_CLASSES).to(torch.float32)
        shift = self.args.lc_tau * counts.pow(-0.25)  # 0 ** -0.25 = inf: the missing classes

        def calibrated_loss(logits, y):
            return F.cross_entropy(logits - shift, y)
        return calibrated_loss


VARIANTS = {"fedprox": FedProx, "fedavgm": FedAvgM, "scaffold": Scaffold, "fedrs": FedRS, "fedlc": FedLC}

# flag -> {an algorithm that reads it: its default there}
FLAGS = {"prox_mu": {"fedprox": 0.01},
         "server_momentum": {"fedavgm": 0.9, "fedrs": 0.0, "fedlc": 0.0},
         "server_lr": {"fedavgm": 1.0, "scaffold": 1.0, "fedrs": 1.0, "fedlc": 1.0},
         "rs_alpha": {"fedrs": 0.5}, "lc_tau": {"fedlc": 1.0}}


TITLE = "FedAvg variants (extensions/fed_algorithms.py)"


def add_flags(parser):
    """--algorithm and the knobs of the variants; each knob's default depends on the algorithm
    (check fills it in), so that a knob the algorithm would ignore can be refused."""
    parser.add_argument("--algorithm", choices=("fedavg", *VARIANTS), default="fedavg",
                        help="fedavg (McMahan et al. 2017), fedprox (Li et al. 2020), fedavgm (Hsu et al. "
                             "2019), scaffold (Karimireddy et al. 2020), fedrs (Li and Zhan 2021) or fedlc "
                             "(Zhang et al. 2022)")
    parser.add_argument("--prox-mu", type=float, default=None,
                        help="fedprox: mu of (mu/2)||w - w_global||^2; default 0.01")
    parser.add_argument("--server-momentum", type=float, default=None,
                        help="fedavgm: server momentum, default 0.9; fedrs, fedlc: default 0")
    parser.add_argument("--server-lr", type=float, default=None,
                        help="fedavgm, scaffold, fedrs, fedlc: server lr; default 1")
    parser.add_argument("--rs-alpha", type=float, default=None,
                        help="fedrs: scale of the logits of a client's missing classes; default 0.5")
    parser.add_argument("--lc-tau", type=float, default=None,
                        help="fedlc: tau of the calibration logit_c - tau n_c^(-1/4); default 1")


def check(args, world_size, script):
    error = check_args(args)
    if error:
        utils.fail(error)


def check_args(args):
    """Fill in the defaults of the flags the chosen algorithm reads; return an error message for
    a flag it would ignore, or a value out of range, else None."""
    for flag, users in FLAGS.items():
        name = "--" + flag.replace("_", "-")
        if getattr(args, flag) is not None and args.algorithm not in users:
            return f"{name} applies to --algorithm {' or '.join(users)}, not {args.algorithm}"
        if args.algorithm in users and getattr(args, flag) is None:
            setattr(args, flag, users[args.algorithm])
    if args.prox_mu is not None and args.prox_mu < 0:
        return f"--prox-mu must be >= 0, got {args.prox_mu}"
    if args.server_momentum is not None and not 0 <= args.server_momentum < 1:
        return f"--server-momentum must be in [0, 1), got {args.server_momentum}"
    if args.server_lr is not None and not args.server_lr > 0:
        return f"--server-lr must be > 0, got {args.server_lr}"
    if args.rs_alpha is not None and not 0 <= args.rs_alpha <= 1:
        return f"--rs-alpha must be in [0, 1], got {args.rs_alpha}"
    if args.lc_tau is not None and not args.lc_tau > 0:
        return f"--lc-tau must be > 0, got {args.lc_tau}"
    return None
