"""Q6 and Q7 in code: the messages and bytes each rank moves, by paradigm. Written once: the
grader checks a submission's measured bytes against them (grading/checks.py,
grading/allreduce_check.py), and so do the tests (tests/).

Each returns what one rank, or every rank (server or rank 0 first), sends and receives; a
float32 value is 4 bytes.
"""
import math

import numpy as np


def ring(rank, n, p, itemsize):
    """(steps, bytes sent, bytes received) of `rank` in a ring all-reduce of p values on n ranks:
    N-1 reduce-scatter steps then N-1 all-gather steps, each moving one of the N chunks
    (np.array_split's, so chunks differ by one value when N does not divide p)."""
    c = [len(chunk) for chunk in np.array_split(np.empty(p), n)]
    sent = 2 * p - c[(rank + 1) % n] - c[(rank + 2) % n]
    recv = 2 * p - c[rank] - c[(rank + 1) % n]
    return 2 * (n - 1), sent * itemsize, recv * itemsize


def tree(rank, n, p, itemsize):
    """(steps, bytes sent, bytes received) of `rank` in a binomial-tree reduce to rank 0 and
    broadcast back: ceil(log2 N) rounds each way, one whole buffer each way per tree edge."""
    rounds = math.ceil(math.log2(n)) if n > 1 else 0
    lowbit = rank & -rank if rank else n  # rank 0 is the root: every 2^k < n is a child
    children = sum(1 for k in range(rounds) if 2**k < lowbit and rank + 2**k < n)
    edges = children + (rank > 0)
    return 2 * rounds, edges * p * itemsize, edges * p * itemsize


def param_server(p, steps, workers):
    """[{bytes_sent, bytes_recv}] of the server, then each worker, after `steps` steps: every
    step each worker sends its P-value gradient and receives the P weights."""
    worker = {"bytes_sent": 4 * p * steps, "bytes_recv": 4 * p * steps}
    return [{k: workers * v for k, v in worker.items()}] + [worker] * workers


def fed_avg(p, rounds, client_ranks):
    """[{bytes_sent, bytes_recv}] of the server, then each client rank, after `rounds` rounds with
    every client sampled: each round a client rank receives the P global weights and sends P + 1
    values back (the sum of its clients' n_k w_k, and of their n_k)."""
    client = {"bytes_sent": rounds * (p + 1) * 4, "bytes_recv": rounds * p * 4}
    server = {"bytes_sent": client_ranks * client["bytes_recv"],
              "bytes_recv": client_ranks * client["bytes_sent"]}
    return [server] + [client] * client_ranks
