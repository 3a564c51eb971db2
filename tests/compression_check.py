"""Check the compressors of extensions/compression.py on N ranks, against exact sums and their byte formulas.

    mpirun -n 4 python -m mpi4py tests/compression_check.py

For each method and each --allreduce, two steps on the model's flat gradient (rank-dependent
random data): the result must be bitwise the same on every rank, the bytes must equal the
method's formula, and the mean must be right (exactly where it can be, else to the method's
tolerance). Every rank prints its failures; rank 0 prints "compression OK ..." when there are
none. Exits non-zero on any failure.
"""
import os
import sys
from types import SimpleNamespace

import torch
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
from dist_sgd_serverless import ALLREDUCE  # noqa: E402
from extensions.compression import METHODS  # noqa: E402
from grading import formulas  # noqa: E402

FORMULA = {"ring": formulas.ring, "tree": formulas.tree}


def expected_bytes(name, method, allreduce, rank, n, p):
    """(sent, received) of one step, from each method's formula (extensions/compression.py)."""
    if name == "topk":  # an all-gather of 2k int32 words, whatever --allreduce is
        b = (n - 1) * 8 * method.k
        return b, b
    if allreduce == "mpi":
        return None, None
    if name == "fp16":
        return FORMULA[allreduce](rank, n, p, 2)[1:]
    p_len, q_len = method.p_buf.numel(), method.q_buf.numel()
    one, two = FORMULA[allreduce](rank, n, p_len, 4), FORMULA[allreduce](rank, n, q_len, 4)
    return one[1] + two[1], one[2] + two[2]


def exact_mean(x, comm):
    total = x.double().numpy().copy()
    comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
    return torch.from_numpy(total / comm.Get_size())


def check_method(name, options, allreduce, comm, failures):
    rank, n = comm.Get_rank(), comm.Get_size()
    model = utils.make_model(torch.device("cpu"), seed=0)  # channels-last convs, as in the script
    _, flat_grads = utils.flatten_parameters(model)
    p = flat_grads.numel()
    args = SimpleNamespace(**{"seed": 0, "topk_ratio": 0.01, "powersgd_rank": 2, **options})
    method = METHODS[name](model, args)
    label = f"{name} {options} --allreduce {allreduce}"
    if method.payload != payload_formula(name, model, args):
        failures.append(f"{label}: payload {method.payload} B, formula {payload_formula(name, model, args)} B")
    g = torch.Generator().manual_seed(utils.stream_seed(0, rank))
    for step in range(2):  # the second step uses the residuals and the warm-started Q
        flat_grads.copy_(torch.randn(p, generator=g))
        grad = flat_grads.clone()
        before = method.residual.clone() if hasattr(method, "residual") else torch.zeros(p)
        moved = method(flat_grads, comm, ALLREDUCE[allreduce])
        # the same result on every rank, bit for bit, or the replicas drift apart
        root = flat_grads.clone()
        comm.Bcast(root.numpy(), root=0)
        if not torch.equal(root, flat_grads):
            failures.append(f"{label} step {step}: the result differs from rank 0's")
        got, want = (moved["bytes_sent"], moved["bytes_recv"]), expected_bytes(name, method, allreduce, rank, n, p)
        if got != want:
            failures.append(f"{label} step {step}: (sent, received) = {got}, formula {want}")
        check_mean(name, args, method, grad, before, flat_grads, comm, f"{label} step {step}", failures)


def check_mean(name, args, method, grad, before, result, comm, label, failures):
    """The mean is exact where the method is lossless, else within its own error; PowerSGD
    below full rank is lossy by design (tests/test_compression.py checks its algebra)."""
    if name == "powersgd" and args.powersgd_rank < 1000:
        return
    if name == "topk":  # the mean of what the ranks sent: gradient + old residual - new residual
        sent = (grad + before) - method.residual
        want, tol = exact_mean(sent, comm), 1e-6
    else:
        want = exact_mean(grad + before, comm)  # powersgd at full rank: lossless, but float32 QR
        tol = {"fp16": 4e-3, "powersgd": 1e-4}[name] * want.abs().max().item()
    err = (result.double() - want).abs().max().item()
    if err > tol:
        failures.append(f"{label}: max error {err:.3g} against the exact mean (tolerance {tol:.3g})")


def payload_formula(name, model, args):
    """S of extensions/compression.py's table: the bytes a rank hands to the collectives."""
    p = utils.num_params(model)
    if name == "fp16":
        return 2 * p
    if name == "topk":
        return 8 * max(1, int(args.topk_ratio * p))
    mats = [(w.shape[0], w.numel() // w.shape[0]) for w in model.parameters() if w.dim() >= 2]
    p_1d = sum(w.numel() for w in model.parameters() if w.dim() < 2)
    return 4 * (sum(min(args.powersgd_rank, m, n) * (m + n) for m, n in mats) + p_1d)


def main():
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    cases = [("fp16", {}), ("topk", {}), ("topk", {"topk_ratio": 1.0}),
             ("powersgd", {}), ("powersgd", {"powersgd_rank": 1000})]
    failures = []
    for name, options in cases:
        for allreduce in ("mpi", "ring", "tree"):
            check_method(name, options, allreduce, comm, failures)
    for f in failures:
        print(f"rank {rank}: FAIL {f}")
    n_failed = comm.allreduce(len(failures))
    if rank == 0 and n_failed == 0:
        print(f"compression OK: N={n} cases={len(cases)} x 3 all-reduces")
    sys.exit(1 if n_failed else 0)


if __name__ == "__main__":
    main()
