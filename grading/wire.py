"""What a rank puts on the wire, measured: a communicator that counts the bytes of every message
it sends, by destination, and names the other calls that communicate.

The grader compares these counts with the formulas of Q6 and Q7 (grading/formulas.py) beside the
counts a submission reports, so that counts written by hand, or a "ring" that calls MPI's own
all-reduce, fail. grading/allreduce_check.py wraps the communicator it hands to an all-reduce; in
a script run, the handout's extensions/ stub wraps the script's communicator when HW5_WIRE names a
folder, and each rank writes what it sent there when it exits (see meter_script). Only messages of
buffers are counted: what a rank receives is what the others sent it, so no receive needs counting.
"""
import atexit
import json
import os

# the calls that send a buffer: (buf or sendbuf, dest, ...)
SENDS = {"Send", "Ssend", "Bsend", "Rsend", "Isend", "Issend", "Ibsend", "Irsend", "Sendrecv",
         "Isendrecv", "Sendrecv_replace", "Isendrecv_replace"}
# calls that move no data, or receive it (counted where it was sent)
QUIET = {"Get_rank", "Get_size", "Get_group", "Get_name", "Get_topology", "Barrier", "Ibarrier",
         "Probe", "Iprobe", "Mprobe", "Improbe", "Recv", "Irecv", "Abort", "Free", "Is_inter",
         "Is_intra", "Get_errhandler", "Set_errhandler", "Call_errhandler", "Clone", "Dup",
         "Split", "Create", "Compare", "Get_attr", "Set_attr", "Get_info", "Set_info", "f2py",
         "py2f", "rank", "size", "group", "name", "info", "handle", "is_inter", "is_intra",
         "topology"}


def nbytes(buf):
    """The bytes of an mpi4py buffer argument: an array, or [array, ...] / (array, ...)."""
    buf = buf[0] if isinstance(buf, (list, tuple)) else buf
    try:
        return memoryview(buf).nbytes
    except TypeError:
        return getattr(buf, "nbytes", 0)


class Meter:
    """`comm`, counting the bytes each send call puts on the wire, by destination (`sent_to`),
    and naming every other call that communicates (`other`: a collective, or a lowercase call,
    which pickles). Everything else is `comm`'s own."""

    def __init__(self, comm):
        self.comm, self.sent_to, self.other = comm, {}, set()

    def __getattr__(self, name):
        call = getattr(self.comm, name)
        if name in SENDS:
            return self._counted(call)
        if name not in QUIET and not name.startswith("_"):
            self.other.add(name)
        return call

    def _counted(self, call):
        def send(*args, **kwargs):
            buf = args[0] if args else kwargs.get("sendbuf", kwargs.get("buf"))
            dest = args[1] if len(args) > 1 else kwargs["dest"]
            self.sent_to[dest] = self.sent_to.get(dest, 0) + nbytes(buf)
            return call(*args, **kwargs)
        return send

    @property
    def sent(self):
        return sum(self.sent_to.values())

    def received(self):
        """What the others sent this rank, asked of every rank of `comm` (a collective)."""
        counts = self.comm.alltoall([self.sent_to.get(r, 0) for r in range(self.comm.Get_size())])
        return sum(counts)


def meter_script(comm, folder):
    """`comm`, metered; at exit this rank writes {"rank", "sent_to", "other"} to
    folder/rank<r>.json (a rank that dies writes nothing)."""
    meter, rank = Meter(comm), comm.Get_rank()

    def write():
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "sent_to": meter.sent_to, "other": sorted(meter.other)}, f)
    os.makedirs(folder, exist_ok=True)
    atexit.register(write)
    return meter


def read_script(folder, size):
    """[{"bytes_sent", "bytes_recv"}] of each of `size` ranks, from meter_script's files; None if
    a rank wrote none."""
    ranks = []
    for r in range(size):
        path = os.path.join(folder, f"rank{r}.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            ranks.append({int(k): v for k, v in json.load(f)["sent_to"].items()})
    return [{"bytes_sent": sum(ranks[r].values()),
             "bytes_recv": sum(sent.get(r, 0) for sent in ranks)} for r in range(size)]

