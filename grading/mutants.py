"""Seeded bugs that prove the grader tells a right solution from a wrong one: each is a text
substitution in one file of a copy of the solution, and must cost points on its own question and
on no other (tests/test_grading.py; bench/autograder.py records what each loses, which
docs/grading.md quotes). Add a bug of your own here to see what the grader makes of it.
"""
import dataclasses
import os
import shutil

from grading.handout import CODE, ROOT


@dataclasses.dataclass
class Mutant:
    label: str
    question: str   # the one question it must lose points on
    file: str
    bug: str        # what it does, in words
    substitutions: list  # [(old text, new text)], each old text found exactly once


MUTANTS = [
    Mutant("average without / N", "Q2", "dist_sgd_serverless.py",
           "`flat_grads.div_(comm.Get_size())` becomes `div_(1)`",
           [("    flat_grads.div_(comm.Get_size())\n", "    flat_grads.div_(1)\n")]),
    Mutant("server sums, not averages", "Q3", "dist_sgd_param_server.py",
           "the inbox's sum without `.div_(len(inbox))`",
           [("flat_grads.copy_(inbox.sum(dim=0)).div_(len(inbox))",
             "flat_grads.copy_(inbox.sum(dim=0))")]),
    Mutant("server sends no weights back", "Q3", "dist_sgd_param_server.py",
           "no Isend to the workers, no Recv on them",
           [("requests = [comm.Isend(buf, dest=w, tag=PARAMETERS) for w in range(1, comm.Get_size())]",
             "requests = []"),
            ("    comm.Recv(buf, source=SERVER, tag=PARAMETERS)\n", "    pass\n")]),
    Mutant("FedAvg's unweighted mean", "Q4", "fed_avg.py",
           "`sums += w_k` and `+= 1` instead of `n_k w_k` and `n_k`",
           [("sums[:-1] += len(fed.shards[k]) * flat_params", "sums[:-1] += flat_params"),
            ("sums[-1] += len(fed.shards[k])", "sums[-1] += 1")]),
    Mutant("a client skips its last step", "Q4", "fed_avg.py",
           "the local loop takes `steps - 1` batches",
           [("enumerate(itertools.islice(batches, steps))",
             "enumerate(itertools.islice(batches, steps - 1))")]),
    Mutant("a sample on two clients", "Q5", "fed_avg.py",
           "client 0 also gets client 1's first index",
           [("                 for i in range(num_clients)]\n",
             "                 for i in range(num_clients)]\n"
             "        parts[0] = np.concatenate([parts[0], parts[1][:1]])\n")]),
    Mutant("ring chunk off by one", "Q7", "dist_sgd_serverless.py",
           "the reduce-scatter sends chunk `rank - s + 1`",
           [("send, recv = chunks[(rank - s) % n], chunks[(rank - s - 1) % n]",
             "send, recv = chunks[(rank - s + 1) % n], chunks[(rank - s - 1) % n]")]),
    Mutant("ring calls MPI's all-reduce", "Q7", "dist_sgd_serverless.py",
           "`ring_allreduce_` sums with `comm.Allreduce` and reports the ring's formula as its counts",
           [('    stats = {"steps": 2 * (n - 1), "bytes_sent": 0, "bytes_recv": 0}\n',
             '    stats = {"steps": 2 * (n - 1), "bytes_sent": 0, "bytes_recv": 0}\n'
             '    c = [len(chunk) for chunk in np.array_split(buf, n)]\n'
             '    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)\n'
             '    stats["bytes_sent"] = (2 * buf.size - c[(rank + 1) % n] - c[(rank + 2) % n]) * 4\n'
             '    stats["bytes_recv"] = (2 * buf.size - c[rank] - c[(rank + 1) % n]) * 4\n'
             '    return stats\n')]),
    Mutant("tree broadcast misses the odd ranks", "Q7", "dist_sgd_serverless.py",
           "the broadcast skips the tree's last round",
           [("    for mask in reversed(masks):\n", "    for mask in reversed(masks[1:]):\n")]),
]

# rank 0 waits for a message that is never sent: the all-reduce hangs
HANG = Mutant("MPI all-reduce hangs", "Q2", "dist_sgd_serverless.py",
              "rank 0 waits in a Recv that no rank sends to",
              [("    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)\n",
                "    if comm.Get_rank() == 0 and comm.Get_size() > 1:\n"
                "        comm.Recv(buf, source=1, tag=99)\n"
                "    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)\n")])


def write(mutant, folder):
    """Copy the solution's code into `folder` (new), with the mutant's substitutions made."""
    os.makedirs(folder)
    for name in CODE:
        shutil.copy(os.path.join(ROOT, name), folder)
    path = os.path.join(folder, mutant.file)
    with open(path) as f:
        text = f.read()
    for old, new in mutant.substitutions:
        if text.count(old) != 1:
            raise ValueError(f"{mutant.label}: {old!r} is not in {mutant.file} exactly once")
        text = text.replace(old, new)
    with open(path, "w") as f:
        f.write(text)
    return folder
