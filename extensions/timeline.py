"""--trace PATH: one timeline of every rank, on one clock, as a Chrome trace-event file.

Each rank records its own spans (time.perf_counter_ns) while it trains:
    compute    forward and backward (utils.train_step; a straggler's slowdown too)
    optimizer  optimizer.step(), through torch's global step hooks
    comm       each communication pattern (utils.traced), with what it moved in `args`; inside
               one, each MPI call is listed in args["calls"] (a ring's 2(N-1) Sendrecvs); an MPI
               call made outside any pattern is a span of its own
    wait       the part of a pattern spent before the rank it needs arrives (found when the
               tracks are merged), or a server idling for workers
    eval, io   evaluation; checkpoints and the data
At the end, rank 0 gathers every rank's spans, moves them onto its own clock (the offsets were
measured at start-up by a ping-pong of clock readings, Cristian's algorithm), splits each
pattern's span into its wait and its communication, and writes one file: one track per rank,
named by its role. It opens offline in https://ui.perfetto.dev or chrome://tracing.

Who was late: a pattern meets "all" ranks (an all-reduce: no rank leaves before the last one
enters) or is a "star" round the server (rank 0 waits for each other rank, each of them for
rank 0). At each step's exchange (a call of a pattern traced with late=True: the gradient's
all-reduce or its gather at the server, FedAvg's upload) the rank whose arrival ended the wait
is that exchange's late rank. A step has one exchange, except under --compress powersgd (two
all-reduces) and a FedAvg round of SCAFFOLD (two uploads). The summary, in the file's otherData
and in the results JSON under "timeline", gives each rank's seconds and share of compute, comm
and wait, the late rank of each exchange, and how often each rank was the late one.

Off (the default), nothing here is imported and the scripts compute exactly what they compute
without it; on, it only reads clocks, so the parameters are the same bit for bit.
"""
import bisect
import contextlib
import gzip
import json
import time

import numpy as np
import torch
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)
from mpi4py import MPI

import utils

CATEGORIES = ("compute", "optimizer", "comm", "wait", "eval", "io", "other")
COLLECTIVES = {"Allreduce", "Reduce", "Bcast", "Gather", "Gatherv", "Allgather", "Allgatherv",
               "Scatter", "Barrier", "allreduce", "reduce", "bcast", "gather", "allgather",
               "scatter", "barrier"}
POINT_TO_POINT = {"Send", "Recv", "Sendrecv", "Isend", "Irecv", "send", "recv"}
CLOCK_ROUNDS = 8  # ping-pongs per rank; the one with the shortest round trip is kept
SYNCED = ("compute", "optimizer")  # on a GPU, these spans end when their kernels do


# ----- recording, on every rank -----

class Tracer:
    """This rank's spans, each [cat, name, t0, t1, depth, args, meets, late], in start order."""

    def __init__(self, track, role, device):
        self.track, self.role = track, role
        self.spans, self.open, self.hooks = [], [], ()
        self.offset_ns = self.uncertainty_ns = 0
        self.sync = torch.cuda.synchronize if device.type == "cuda" else None
        self.t_start = time.perf_counter_ns()

    def begin(self, cat, name, meets=None, late=False):
        if self.sync and cat in SYNCED:  # kernels run after their launch
            self.sync()
        self.open.append(len(self.spans))
        self.spans.append([cat, name, time.perf_counter_ns(), None, len(self.open) - 1, {},
                           meets, late])
        return self.spans[-1][5]

    def end(self):
        span = self.spans[self.open.pop()]
        if self.sync and span[0] in SYNCED:
            self.sync()
        span[3] = time.perf_counter_ns()

    @contextlib.contextmanager
    def span(self, cat, name, meets=None, late=False):
        details = self.begin(cat, name, meets, late)
        try:
            yield details
        finally:
            self.end()

    def in_comm(self):
        """The args of the innermost open span, when it is a comm span (calls are listed there)."""
        if self.open and self.spans[self.open[-1]][0] == "comm":
            return self.spans[self.open[-1]][5]
        return None

    def open_since(self):
        return self.spans[self.open[-1]][2]

    def within(self, name):
        """Inside an open comm span: name it after the pattern called in it too, and hand back
        its args (a context manager). Elsewhere: None."""
        if self.in_comm() is None:
            return None
        span = self.spans[self.open[-1]]
        span[1] = f"{span[1]} ({name})"
        return contextlib.nullcontext(span[5])

    def close_all(self):
        while self.open:  # a step that raised before its optimizer's post-hook
            self.end()


def call_record(name, args, kwargs):
    """What one MPI call moved: its buffer's bytes and its peer, for a comm span's args."""
    record = {"call": name}
    buf = args[0] if args else kwargs.get("buf")
    if isinstance(buf, np.ndarray):
        record["bytes"] = int(buf.nbytes)
    for key in ("dest", "source", "tag", "root"):
        if isinstance(kwargs.get(key), int):
            record[key] = kwargs[key]
    if isinstance(kwargs.get("recvbuf"), np.ndarray):
        record["bytes_recv"] = int(kwargs["recvbuf"].nbytes)
    return record


class TracedComm:
    """The communicator, with every MPI call timed: listed in the open comm span, or a span of its
    own. Everything else passes through, so the scripts cannot tell it from the communicator."""

    def __init__(self, comm, tracer):
        self.comm, self.tracer = comm, tracer

    def __getattr__(self, name):
        method = getattr(self.comm, name)
        if name not in COLLECTIVES and name not in POINT_TO_POINT:
            return method

        def call(*args, **kwargs):
            if utils.TRACER is not self.tracer:  # finished: the merge's own calls go untraced
                return method(*args, **kwargs)
            details, record = self.tracer.in_comm(), call_record(name, args, kwargs)
            if details is None:  # a call outside any pattern is a pattern of its own
                with self.tracer.span("comm", name, "all" if name in COLLECTIVES else None) as own:
                    own.update(record)
                    return method(*args, **kwargs)
            t0 = time.perf_counter_ns()
            try:
                return method(*args, **kwargs)
            finally:  # when in the span it began, and how long it took
                record.update(at_us=round((t0 - self.tracer.open_since()) / 1e3, 1),
                              us=round((time.perf_counter_ns() - t0) / 1e3, 1))
                details.setdefault("calls", []).append(record)
        return call


def quietly(request, interval=1e-3):
    """Wait on `request`, sleeping between checks, so that a waiting rank leaves the cores to the
    ranks being measured (the ranks often outnumber a laptop's cores)."""
    while not request.Test():
        time.sleep(interval)


def clock_offset(comm):
    """This rank's clock against rank 0's, by Cristian's algorithm: send, get rank 0's reading,
    take it as read half-way through the round trip. Returns (offset, uncertainty) in ns: rank
    0's time = this rank's + offset, to within +- half the shortest round trip."""
    now, go = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    if comm.Get_rank() == 0:
        for other in range(1, comm.Get_size()):  # one rank at a time: the others sleep
            comm.Send(go, dest=other)
            for _ in range(CLOCK_ROUNDS):
                comm.Recv(now, source=other)
                now[0] = time.perf_counter_ns()
                comm.Send(now, dest=other)
        return 0, 0
    quietly(comm.Irecv(go, source=0))
    best = None
    for _ in range(CLOCK_ROUNDS):
        t_a = time.perf_counter_ns()
        comm.Send(now, dest=0)
        comm.Recv(now, source=0)
        t_b = time.perf_counter_ns()
        if best is None or t_b - t_a < best[1] - best[0]:
            best = (t_a, t_b, int(now[0]))
    t_a, t_b, t_0 = best
    return t_0 - (t_a + t_b) // 2, (t_b - t_a) // 2


def start(comm, role, device):
    """This rank's tracer, its clock measured against rank 0's (utils.start_trace calls it)."""
    tracer = Tracer(MPI.COMM_WORLD.Get_rank() if comm is not None else 0, role, device)
    if comm is not None and comm.Get_size() > 1:
        tracer.offset_ns, tracer.uncertainty_ns = clock_offset(comm)

    def step_begins(*_):  # a pre-hook's return value would replace the step's arguments
        tracer.begin("optimizer", "optimizer.step")
    tracer.hooks = (register_optimizer_step_pre_hook(step_begins),
                    register_optimizer_step_post_hook(lambda *_: tracer.end()))
    return tracer


def role(script, comm):
    """The name of this rank's track. fed_avg.py's clients are named later (name_clients)."""
    rank = comm.Get_rank() if comm is not None else 0
    if script == "cent_sgd":
        return "rank 0 (centralized)"
    if rank == 0 and script in ("dist_sgd_param_server", "fed_avg"):
        return "server"
    return f"client rank {rank}" if script == "fed_avg" else f"rank {rank} (worker)"


def name_clients(tracer, rank, host):
    """A FedAvg client rank's track, named with the clients it runs (`host[k]`: client k's rank)."""
    if tracer is not None and rank != 0:
        clients = [k for k, r in enumerate(host) if r == rank]
        tracer.role = f"client rank {rank} (clients {', '.join(map(str, clients))})"


def watch(comm, tracer):
    """The communicator whose MPI calls `tracer` times (extensions.configure wraps the script's)."""
    return TracedComm(comm, tracer) if tracer is not None else comm


def finish(tracer, comm, path, script):
    """On every rank: stop recording; rank 0 gathers all tracks, merges them, writes the file and
    prints one line. Returns the summary on rank 0, None elsewhere."""
    for hook in tracer.hooks:
        hook.remove()
    tracer.close_all()
    mine = dict(track=tracer.track, role=tracer.role, offset_ns=tracer.offset_ns,
                uncertainty_ns=tracer.uncertainty_ns, t_start=tracer.t_start,
                t_end=time.perf_counter_ns(), spans=tracer.spans)
    tracks = gather_tracks(mine, comm)
    if tracks is None:
        return None
    events, summary = merge(tracks, script, getattr(comm, "failures", None))
    write_trace(path, events, summary)
    print(summary_line(path, summary), flush=True)
    return summary


def gather_tracks(mine, comm):
    """Every rank's track to rank 0: the sizes pickled (small), the JSON bytes in one Gatherv."""
    if comm is None or comm.Get_size() == 1:
        return [mine]
    data = np.frombuffer(json.dumps(mine).encode(), dtype=np.uint8)
    sizes = comm.gather(len(data), root=0)
    if comm.Get_rank() != 0:
        comm.Gatherv(data, None, root=0)
        return None
    everything = np.empty(sum(sizes), dtype=np.uint8)
    comm.Gatherv(data, (everything, sizes), root=0)
    ends = np.cumsum(sizes)
    return [json.loads(everything[end - n:end].tobytes()) for n, end in zip(sizes, ends)]


# ----- merging, on rank 0 -----

def on_one_clock(tracks):
    """Each track's spans as dicts, with their times moved onto rank 0's clock, and each with the
    time of the spans nested in it (`children`: a span with children is never split)."""
    for t in tracks:
        shift = t["offset_ns"]
        t["t_start"], t["t_end"] = t["t_start"] + shift, t["t_end"] + shift
        spans, stack = [], []
        for cat, name, t0, t1, depth, args, meets, late in t["spans"]:
            s = dict(cat=cat, name=name, t0=t0 + shift, t1=t1 + shift, depth=depth, args=args,
                     meets=meets, late=late, wait_end=t0 + shift, children=0)
            while stack and stack[-1]["depth"] >= depth:
                stack.pop()
            if stack:
                stack[-1]["children"] += s["t1"] - s["t0"]
            stack.append(s)
            spans.append(s)
        t["spans"] = spans


def best_match(spans, starts, a, b):
    """The span among `spans` (one track's spans of one name: sorted, none overlapping another,
    `starts` their starts) that overlaps [a, b] the most, or None."""
    best, overlap, i = None, 0, bisect.bisect_left(starts, b) - 1
    while i >= 0 and spans[i]["t1"] > a:
        o = min(spans[i]["t1"], b) - max(spans[i]["t0"], a)
        if o > overlap:
            best, overlap = spans[i], o
        i -= 1
    return best


def meetings(tracks):
    """Each meeting of a pattern, as rank 0 saw it: (rank 0's span, {track index: span}). Another
    rank's part in it is its span of the same name that overlaps rank 0's the most."""
    named = [{} for _ in tracks]
    for i, t in enumerate(tracks):
        for s in t["spans"]:
            if s["meets"]:
                named[i].setdefault(s["name"], []).append(s)
    starts = [{n: [s["t0"] for s in spans] for n, spans in names.items()} for names in named]
    for spans in named[0].values():
        for s in spans:
            met = {0: s}
            for i in range(1, len(tracks)):
                if s["name"] in named[i]:
                    other = best_match(named[i][s["name"]], starts[i][s["name"]], s["t0"], s["t1"])
                    if other is not None:
                        met[i] = other
            yield s, met


def split_waits(tracks):
    """Set each meeting span's wait_end, when the rank it waited for arrived: for rank 0 in a
    star, and for everyone in an all-meeting, the last arrival; for the others in a star, rank
    0's. Returns the late track of each step's exchange (late=True patterns), in time order."""
    late = []
    for s, met in meetings(tracks):
        arrivals = [i for i in met if i != 0] if s["meets"] == "star" else list(met)
        if not arrivals:
            continue
        last = max(arrivals, key=lambda i: met[i]["t0"])
        for i, m in met.items():
            needed = met[last]["t0"] if i == 0 or s["meets"] == "all" else s["t0"]
            if not m["children"]:  # a span with spans inside keeps its time whole
                m["wait_end"] = min(max(m["t0"], needed), m["t1"])
        if s["late"] and len(met) > 1:
            late.append((s["t0"], tracks[last]["track"]))
    return [track for _, track in sorted(late)]


def pieces(s):
    """A span as drawn: its wait, when it waited, then the rest (the span's own category)."""
    if s["wait_end"] > s["t0"]:
        return [("wait", f"wait ({s['name']})", s["t0"], s["wait_end"], {}),
                (s["cat"], s["name"], s["wait_end"], s["t1"], s["args"])]
    return [(s["cat"], s["name"], s["t0"], s["t1"], s["args"])]


def merge(tracks, script, failures=None):
    """The trace's events (Chrome's "X" complete events, in microseconds from the first track's
    start) and its summary."""
    on_one_clock(tracks)
    late = split_waits(tracks)
    origin = min(t["t_start"] for t in tracks)

    def us(ns):
        return round((ns - origin) / 1e3, 3)
    events = [dict(ph="M", name="process_name", pid=0, tid=0, ts=0, cat="__metadata",
                   args=dict(name=f"{script} ({len(tracks)} ranks)"))]
    for t in tracks:
        tid = t["track"]
        events += [dict(ph="M", name="thread_name", pid=0, tid=tid, ts=0, cat="__metadata",
                        args=dict(name=t["role"])),
                   dict(ph="M", name="thread_sort_index", pid=0, tid=tid, ts=0,
                        cat="__metadata", args=dict(sort_index=tid))]
        for s in t["spans"]:
            for cat, name, t0, t1, args in pieces(s):
                events.append(dict(ph="X", cat=cat, name=name, pid=0, tid=tid, ts=us(t0),
                                   dur=round(us(t1) - us(t0), 3), args=args))
    return events, summarize(tracks, late, failures)


def seconds_by_category(track):
    """Seconds of the track's self time (a span's time less its children's) per category; the
    time in no span is "other"."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for s in track["spans"]:
        wait = s["wait_end"] - s["t0"]
        seconds["wait"] += wait / 1e9
        seconds[s["cat"]] += (s["t1"] - s["t0"] - s["children"] - wait) / 1e9
    top = sum(s["t1"] - s["t0"] for s in track["spans"] if s["depth"] == 0)
    seconds["other"] += (track["t_end"] - track["t_start"] - top) / 1e9
    return seconds


def summarize(tracks, late, failures=None):
    """Per rank: its role, its seconds and share of its traced time per category, how often it
    was the late one; per step, the late rank; the clocks' offsets and uncertainty."""
    ranks = {}
    for t in tracks:
        seconds, traced = seconds_by_category(t), (t["t_end"] - t["t_start"]) / 1e9
        ranks[str(t["track"])] = dict(
            role=t["role"], traced_s=round(traced, 6),
            seconds={c: round(v, 6) for c, v in seconds.items()},
            share={c: round(v / traced, 4) if traced else 0.0 for c, v in seconds.items()},
            late_count=late.count(t["track"]),
            clock_offset_us=round(t["offset_ns"] / 1e3, 3),
            clock_uncertainty_us=round(t["uncertainty_ns"] / 1e3, 3))
    summary = dict(ranks=ranks, exchanges=len(late), late_rank_per_exchange=late,
                   clock_uncertainty_us=max(r["clock_uncertainty_us"] for r in ranks.values()))
    if failures:
        summary["failures"] = failures
    return summary


def summary_line(path, summary):
    """Rank 0's one line at the end: the file, who was late, and each rank's shares."""
    ranks, exchanges = summary["ranks"], summary["exchanges"]
    count, role = max((r["late_count"], r["role"]) for r in ranks.values())
    late = f"last to arrive: {role}, at {count} of {exchanges} exchanges" if exchanges else \
        "no step exchanges"
    shares = "; ".join(f"{r['role']} " + " ".join(f"{c} {100 * r['share'][c]:.0f}%"
                                                  for c in ("compute", "comm", "wait"))
                       for r in ranks.values())
    return f"timeline: {path} | {late} | {shares}"


def write_trace(path, events, summary):
    """The Chrome trace-event JSON (gzip-compressed when `path` ends in .gz), atomically."""
    trace = dict(traceEvents=events, displayTimeUnit="ms", otherData=summary)
    text = json.dumps(trace, separators=(",", ":")).encode()
    if path.endswith(".gz"):
        text = gzip.compress(text, mtime=0)
    utils.write_atomically(path, lambda f: f.write(text), binary=True)


def load(path):
    """A trace that write_trace wrote, parsed."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        return json.load(f)
