"""Gradient compression for dist_sgd_serverless.py: fewer bytes per step (--compress).

    mpirun -n 4 python dist_sgd_serverless.py --compress fp16
    mpirun -n 4 python dist_sgd_serverless.py --compress topk --topk-ratio 0.01
    mpirun -n 4 python dist_sgd_serverless.py --compress powersgd --powersgd-rank 2 --allreduce ring

Each entry of METHODS builds, from the model and the flags, a replacement for the script's
average_gradients_ with the same call, the way PyTorch DDP's register_comm_hook swaps the
all-reduce of a bucket:

    average_ = METHODS[name](model, args)
    moved = average_(flat_grads, comm, allreduce_, device_ok)   # {"steps", "bytes_sent", "bytes_recv"}

It leaves in flat_grads the same (compressed) mean gradient on every rank, so that the
replicas stay identical, and returns this rank's bytes. The compressors keep state between
steps (error-feedback residuals, PowerSGD's Q), which is not checkpointed: a resumed run
restarts it (zero residuals, the seeded Q).

fp16 (Micikevicius et al. 2018, "Mixed Precision Training"; PyTorch DDP's fp16_compress_hook):
  the gradient is divided by N and cast to float16, and the float16 buffer goes through the
  chosen --allreduce, so the sum is done in float16: numpy adds float16 chunks in the ring
  and the tree, and Open MPI 5 sums MPI_SHORT_FLOAT itself (its shortfloat extension). We
  sum in fp16 rather than all-gather fp16 and sum in fp32 because an all-gather moves
  (N-1) x 2P bytes per rank, no fewer than the fp32 ring's 2(N-1)/N x 4P already at N = 4;
  dividing by N first, as PyTorch does, keeps the sum of N terms from overflowing.
topk (Stich, Cordonnier and Jaggi 2018, "Sparsified SGD with Memory"; Lin et al. 2018, "Deep
  Gradient Compression"): each rank sends the k = max(1, floor(ratio x P)) entries of largest
  magnitude of its gradient plus its residual, and keeps the rest as the new residual (error
  feedback). Sparse vectors with different supports do not add up in a ring, so k float32
  values and k int32 indices are exchanged with one MPI_Allgather, whatever --allreduce is,
  and every rank adds the N sparse vectors in rank order. Without DGC's momentum correction,
  gradient clipping or sparsity warm-up.
powersgd (Vogels, Karimireddy and Jaggi 2019, "PowerSGD: Practical Low-Rank Gradient
  Compression for Distributed Optimization", Algorithms 1 and 2): each gradient of a weight
  with 2 or more dimensions, viewed as an m x n matrix M (m output channels), plus its
  residual, is approximated at rank r = min(--powersgd-rank, m, n) by one step of power
  iteration from the previous step's Q (warm start): P = M Q, all-reduced and orthonormalized;
  Q = M^T P, all-reduced; the mean gradient is P Q^T / N. Both factors are linear in M, so
  they go through the chosen --allreduce (mpi, ring or tree). Biases and other 1-D tensors go
  uncompressed, in the Q buffer, as in PyTorch's powerSGD_hook. The residual is what this
  rank's own contribution P (M^T P)^T missed, M - P P^T M (the paper's Algorithm 2; PyTorch's
  hook keeps M minus the mean instead: the same residuals in sum).

Bytes (Q6 extended). Per step and rank, with P the number of parameters, N ranks, 4-byte
floats, S the payload (the buffer a rank hands to the collectives):
  method    payload S                          ring all-reduce of S or all-gather, sent per rank
  none      4P                                 2(N-1)/N x 4P
  fp16      2P                                 2(N-1)/N x 2P
  topk      8k, k = floor(ratio x P)           (N-1) x 8k           (grows with N)
  powersgd  4(sum_i r_i (m_i + n_i) + P_1d)    2(N-1)/N x S         (P buffer, then Q buffer)
where layer i's gradient is an m_i x n_i matrix approximated at rank r_i, and P_1d is the
number of parameters in 1-D tensors (biases). A binomial tree moves ceil(log2 N) x S through
rank 0 instead. The ratio against none is 4P / S; topk beats the fp32 ring only while
(N-1) x 8k < 2(N-1)/N x 4P, that is while k < P / N: its advantage over the ring shrinks as 1/N.
For utils.Net (P = 113,738: four weight matrices 32 x 27, 64 x 288, 128 x 576, 10 x 2048 and
234 biases), S is 454,952 B for none, 227,476 B for fp16 (2x), 9,096 B for topk at ratio 0.01
(k = 1,137: 50x) and 26,320 B for powersgd at rank 2 (17.3x); at N = 4 the ring sends 1.5 S per
rank and the all-gather 3 S, so topk's wire advantage over none is 25x, powersgd's 17.3x.

How bytes are counted. As in the script: the hand-written ring and tree return exact counts
(with np.array_split's uneven chunks); MPI_Allreduce returns None, since Open MPI picks among
algorithms that move different amounts (recursive doubling moves log2 N x S, a ring
2(N-1)/N x S), so fp16 and powersgd over --allreduce mpi count None too. An all-gather is
counted: every rank must receive the N-1 other blocks, and the algorithms Open MPI picks
between (ring, recursive doubling, Bruck, neighbour exchange) all send and receive exactly
(N-1) x 8k bytes per rank, so topk's count does not depend on the choice (a linear
gather-then-broadcast would move more through rank 0: the count is then a lower bound).
Every method also exposes `payload` (S, in bytes), from which record() derives the ratio
against none, whatever the all-reduce.
"""
import math

import torch

import utils


def _combined(a, b):
    """The counts of two collectives in a row; None (unknown) if either is unknown."""
    if a["bytes_sent"] is None or b["bytes_sent"] is None:
        return {"steps": None, "bytes_sent": None, "bytes_recv": None}
    return {k: a[k] + b[k] for k in ("steps", "bytes_sent", "bytes_recv")}


def _views(buf, shapes):
    """Consecutive views of the flat buffer `buf`, one per shape."""
    views, i = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(buf[i:i + size].view(shape))
        i += size
    return views


class FP16:
    """fp16 on the wire: divide by N, cast to float16, all-reduce in float16, cast back."""

    def __init__(self, model, args):
        n = utils.num_params(model)
        self.half = torch.empty(n, dtype=torch.float16, device=next(model.parameters()).device)
        self.payload = self.half.nbytes

    def __call__(self, flat_grads, comm, allreduce_, device_ok=False):
        self.half.copy_(flat_grads).div_(comm.Get_size())
        with utils.staged(self.half, device_ok) as buf:
            moved = allreduce_(buf, comm)  # the float16 sum: numpy (ring, tree) or Open MPI (mpi)
        flat_grads.copy_(self.half)
        return moved


class TopK:
    """The k largest entries of gradient + residual, exchanged by all-gather; the rest is carried
    forward in the residual (error feedback)."""

    def __init__(self, model, args):
        n = utils.num_params(model)
        self.device = next(model.parameters()).device
        self.k = max(1, int(args.topk_ratio * n))
        self.residual = torch.zeros(n, device=self.device)
        # one message: row 0 the float32 values (as their int32 bits), row 1 the int32 indices
        self.send = torch.empty(2, self.k, dtype=torch.int32, device=self.device)
        self.payload = self.send.nbytes
        self.gathered = None  # (N, 2, k), made at the first call, when N is known

    def sparsify_(self, flat_grads):
        """Error feedback: add the residual to the gradient and return the k entries of largest
        magnitude (values, indices); the others stay in the residual. What is sent plus the new
        residual equals gradient plus old residual exactly (disjoint entries)."""
        m = self.residual.add_(flat_grads)  # m = residual + gradient, in the residual's memory
        indices = m.abs().topk(self.k, sorted=False).indices
        values = m[indices]
        m[indices] = 0  # the new residual: what was not sent
        return values, indices

    def __call__(self, flat_grads, comm, allreduce_, device_ok=False):
        n = comm.Get_size()
        values, indices = self.sparsify_(flat_grads)
        self.send[0] = values.view(torch.int32)
        self.send[1] = indices
        if self.gathered is None:
            self.gathered = torch.empty(n, 2, self.k, dtype=torch.int32, device=self.device)
        with utils.staged(self.send, device_ok, write=False) as send, \
                utils.staged(self.gathered, device_ok, read=False) as gathered:
            comm.Allgather(send, gathered)
        flat_grads.zero_()
        for r in range(n):  # rank order: the same float additions on every rank
            flat_grads.index_add_(0, self.gathered[r, 1], self.gathered[r, 0].view(torch.float32))
        flat_grads.div_(n)
        b = (n - 1) * self.payload  # every rank receives the N-1 other blocks (see the docstring)
        return {"steps": None, "bytes_sent": b, "bytes_recv": b}


class PowerSGD:
    """Rank-r power iteration per gradient matrix, warm-started, with error feedback; 1-D
    tensors uncompressed. Two all-reduces per step: all P factors, then all Q factors."""

    def __init__(self, model, args):
        device = next(model.parameters()).device
        shapes, vectors, offset = [], [], 0  # (offset, m, n, r) of matrices; (offset, size) of 1-D
        for p in model.parameters():
            size = p.numel()
            if p.dim() >= 2:
                m = p.shape[0]
                # the flat gradient holds each tensor in its memory order (channels-last convs);
                # its output channel is still the outermost index, so row i of the m x n view is
                # output channel i's gradient, its columns permuted, which PowerSGD does not mind
                assert p.stride(0) == size // m, f"output channels not outermost in {tuple(p.shape)}"
                shapes.append((offset, m, size // m, min(args.powersgd_rank, m, size // m)))
            else:
                vectors.append((offset, size))
            offset += size
        self.shapes, self.vectors = shapes, vectors
        self.p_buf = torch.empty(sum(m * r for _, m, _, r in shapes), device=device)
        self.q_buf = torch.empty(sum(n * r for _, _, n, r in shapes) + sum(s for _, s in vectors), device=device)
        self.payload = self.p_buf.nbytes + self.q_buf.nbytes
        self.residual = torch.zeros(offset, device=device)  # stays 0 on the 1-D tensors
        # every factor is a view of its buffer, so that one all-reduce moves them all; the 1-D
        # tensors follow the Q factors in the Q buffer
        self.ps = _views(self.p_buf, [(m, r) for _, m, _, r in shapes])
        views = _views(self.q_buf, [(n, r) for _, _, n, r in shapes] + [(s,) for _, s in vectors])
        self.qs, self.tails = views[:len(shapes)], views[len(shapes):]
        g = torch.Generator().manual_seed(args.seed)  # the same Q on every rank: seeded by --seed, not the rank
        for q in self.qs:
            q.copy_(torch.randn(q.shape, generator=g))

    def matrices(self, flat):
        return [flat[o:o + m * n].view(m, n) for o, m, n, _ in self.shapes]

    def __call__(self, flat_grads, comm, allreduce_, device_ok=False):
        flat_grads.add_(self.residual)  # error feedback: M = gradient + residual
        ms, es = self.matrices(flat_grads), self.matrices(self.residual)
        for m, p, q in zip(ms, self.ps, self.qs):
            torch.matmul(m, q, out=p)  # P = M Q, Q from the previous step
        with utils.staged(self.p_buf, device_ok) as buf:
            moved = allreduce_(buf, comm)  # the sum of P; orthonormalizing ignores the 1/N
        for m, p, q, e in zip(ms, self.ps, self.qs, es):
            p.copy_(torch.linalg.qr(p).Q)  # the same input on every rank, so the same P
            torch.matmul(m.T, p, out=q)  # this rank's Q = M^T P
            torch.addmm(m, p, q.T, alpha=-1, out=e)  # residual: M - P Q^T, what this rank's Q misses
        for (o, s), t in zip(self.vectors, self.tails):
            t.copy_(flat_grads[o:o + s])
        with utils.staged(self.q_buf, device_ok) as buf:
            moved = _combined(moved, allreduce_(buf, comm))
        self.q_buf.div_(comm.Get_size())  # the mean Q, also next step's warm start
        for m, p, q in zip(ms, self.ps, self.qs):
            torch.matmul(p, q.T, out=m)  # the mean gradient's rank-r approximation, P Q^T
        for (o, s), t in zip(self.vectors, self.tails):
            flat_grads[o:o + s].copy_(t)  # the mean of the 1-D tensors, uncompressed
        return moved


METHODS = {"fp16": FP16, "topk": TopK, "powersgd": PowerSGD}
TITLE = "gradient compression (extensions/compression.py)"


def add_flags(parser):
    """--compress and the knobs of its methods; none, the default, is the script's own average."""
    parser.add_argument("--compress", choices=("none", *METHODS), default="none",
                        help="fewer bytes per step: fp16, topk or powersgd; none: the float32 gradient")
    parser.add_argument("--topk-ratio", type=utils.positive(float), default=0.01,
                        help="topk: the fraction of gradient entries each rank sends")
    parser.add_argument("--powersgd-rank", type=utils.positive(int), default=2,
                        help="powersgd: the rank of each gradient matrix's approximation")


def check(args, world_size, script):
    if args.topk_ratio > 1:
        utils.fail(f"--topk-ratio must be in (0, 1], got {args.topk_ratio}")


def record(average_, flat_grads, per_rank_bytes, steps):
    """The results JSON's `compression` entry: the payload per step (bytes a rank hands to the
    collectives), its ratio against the full float32 gradient (none), and the bytes each rank
    sent per step (None where MPI_Allreduce chose the algorithm)."""
    payload = getattr(average_, "payload", flat_grads.nbytes)  # none: the whole gradient
    return dict(payload_bytes_per_step=payload, ratio_vs_none=flat_grads.nbytes / payload,
                bytes_sent_per_step=[None if b["bytes_sent"] is None else b["bytes_sent"] / max(1, steps)
                                     for b in per_rank_bytes])
