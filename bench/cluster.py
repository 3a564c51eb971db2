"""An emulated cluster on one machine: K hosts as network namespaces, their links shaped by tc.

    python bench/cluster.py run --hosts 3 -- dist_sgd_serverless.py --dataset synthetic --max-steps 5
    python bench/cluster.py run --hosts 4 --rate 10mbit -- dist_sgd_param_server.py --dataset synthetic --max-steps 3
    python bench/cluster.py run --hosts 3 --slots 2 -- fed_avg.py --dataset synthetic --rounds 2 --max-steps 5
    python bench/cluster.py up --hosts 3 --rate 100mbit   # prints the mpirun line to use, and the down command
    python bench/cluster.py down --state /tmp/hw5-cluster-XXXX.json
    (as root: it needs ip netns, veth pairs, a bridge, unshare --uts and tc tbf)

Host k (1..K) is a network namespace with its own hostname `node-k` and address
10.99.X.k/24 on a veth pair whose other end sits in a bridge in the root namespace;
the bridge has 10.99.X.254, so the launcher reaches every host. X (the subnet) and the
names are picked fresh for each cluster, so two clusters never collide. With --rate,
each link is shaped by a token bucket (tc tbf) in both directions: on the host's side of
the veth (what it uploads) and on the bridge's side (what it downloads), like a full-duplex
switch port. There is no delay emulation (this kernel has no netem): bandwidth only.

`mpirun` reaches the hosts as it would over ssh: `--mca plm_rsh_agent` names a small
generated script that calls this file in `agent` mode, which drops ssh's options, maps the
host address to its namespace and runs the daemon's command there as
`ip netns exec NS unshare --uts sh -c "hostname node-k; CMD"`. Two pitfalls, both seen:
without a hostname per namespace the launcher merges the hosts into one node, and without
`--map-by node` the ranks pile up on the first host. Ranks talk TCP (`--mca btl tcp,self`)
over the cluster's subnet only, yield the core while they wait (all hosts share this
machine's cores, as ranks of an oversubscribed one-host run do), and get OMP_NUM_THREADS=1: a rank alone on its host would
otherwise take 2 threads, and the order of its float sums would differ from a one-host run.

Open MPI may print `plm:ssh: Warning: setpgid(...) failed in parent with errno=Permission
denied(13)`: harmless, its launcher lost a race with the agent's exec.

Everything is torn down on exit, on Ctrl-C, on SIGTERM and on failure: the namespaces (with
their veths), the bridge, and the processes left inside the namespaces. Nothing touches
/etc/hosts or any interface that the cluster did not create.
"""
import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from grading.launch import LAUNCHER_FLAKE  # noqa: E402

MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun") or "mpirun"
LOCK = os.path.join(tempfile.gettempdir(), "hw5-cluster.lock")  # serialises picking a subnet


def sh(*cmd, check=True):
    """Run one ip/tc command; return its stdout. A failure shows the command and its stderr."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(map(str, cmd))}` failed: {proc.stderr.strip()}")
    return proc.stdout


def can_create():
    """None if this process may create network namespaces, else the reason it may not."""
    for tool in ("ip", "tc", "unshare"):
        if not shutil.which(tool):
            return f"`{tool}` not found"
    if os.geteuid() != 0:
        return "not root: ip netns, veth pairs and tc need CAP_NET_ADMIN"
    name = f"hw5probe{secrets.token_hex(3)}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"`ip netns add` is not permitted here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def used_subnets():
    """The third octets X of 10.99.X.0/24 that some interface here already uses."""
    out = sh("ip", "-4", "-o", "addr", "show")
    nets = set()
    for word in out.split():
        if word.startswith("10.99."):
            nets.add(int(word.split(".")[2]))
    return nets


def tbf_args(rate):
    """tc arguments for a token bucket of `rate` (tc syntax: 10mbit, 1gbit, ...).

    The bucket holds 2 ms at the rate (at least 16 KB), so a message larger than that
    goes at the rate; the queue holds 200 ms before dropping, so TCP sees few losses.
    """
    return ["tbf", "rate", rate, "burst", str(burst_bytes(rate)), "latency", "200ms"]


def burst_bytes(rate):
    """The token bucket's size: bytes that pass at the veth's own speed once the bucket is full."""
    return max(16 * 1024, int(parse_rate(rate) / 8 * 2e-3))


def parse_rate(rate):
    """'100mbit' -> 1e8 bits/s (tc's units: kbit, mbit, gbit; decimal)."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return float(rate[:-len(unit)]) * scale
    raise ValueError(f"rate {rate!r}: give it as tc does, e.g. 10mbit, 100mbit, 1gbit")


class Cluster:
    """K emulated hosts. Use as a context manager: `with Cluster(3, "100mbit") as c: c.mpirun(...)`.

    The state (names, addresses, rate) is a plain dict, so `up` can write it to a file and
    `down` and the agent can read it back from another process.
    """

    def __init__(self, hosts, rate=None, state=None):
        if state is None:
            if hosts < 1 or hosts > 250:
                raise ValueError("--hosts must be in 1..250")
            tag = secrets.token_hex(3)  # names: hw5<tag>... , at most 15 characters
            state = {"tag": tag, "hosts": hosts, "rate": rate, "subnet": None,
                     "bridge": f"hw5b{tag}",
                     "ns": [f"hw5-{tag}-{k}" for k in range(1, hosts + 1)],
                     "veth": [f"hw5v{tag}{k}" for k in range(1, hosts + 1)],
                     "names": [f"node-{k}" for k in range(1, hosts + 1)],
                     "dir": None}
        self.state = state
        self.created = state["subnet"] is not None

    # ----- lifecycle -----

    def up(self):
        s = self.state
        with open(LOCK, "w") as lock:  # two clusters must not pick the same subnet at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            free = sorted(set(range(1, 250)) - used_subnets())
            if not free:
                raise RuntimeError("no free 10.99.X.0/24 subnet")
            x = free[secrets.randbelow(len(free))]
            s["subnet"] = f"10.99.{x}.0/24"
            self.created = True  # from here on, down() has something to clean
            s["dir"] = tempfile.mkdtemp(prefix=f"hw5-cluster-{s['tag']}-")
            sh("ip", "link", "add", s["bridge"], "type", "bridge")
            sh("ip", "addr", "add", f"10.99.{x}.254/24", "dev", s["bridge"])
            sh("ip", "link", "set", s["bridge"], "up")
        s["addrs"] = []
        for k, (ns, veth) in enumerate(zip(s["ns"], s["veth"]), start=1):
            addr = f"10.99.{x}.{k}"
            peer = f"hw5p{s['tag']}{k}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", peer, "netns", ns)
            sh("ip", "link", "set", veth, "master", s["bridge"])
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", ns, "link", "set", peer, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            s["addrs"].append(addr)
        self.shape(s["rate"])
        s["agent"] = self._write_agent()
        return self

    def shape(self, rate):
        """Set every link to `rate` in both directions (None: unshaped). Counters restart at 0."""
        s = self.state
        for ns, veth in zip(s["ns"], s["veth"]):
            for prefix, dev in ((["ip", "netns", "exec", ns], "eth0"), ([], veth)):
                sh(*prefix, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                if rate:
                    sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", *tbf_args(rate))
        s["rate"] = rate

    def down(self):
        """Remove all that up() made; safe to call twice, and after a half-done up()."""
        s = self.state
        if not self.created:
            return
        for ns in s["ns"]:
            pids = sh("ip", "netns", "pids", ns, check=False).split()
            for sig in (signal.SIGTERM, signal.SIGKILL):  # daemons or ranks left behind
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), sig)
                if pids and sig == signal.SIGTERM:
                    time.sleep(0.5)
                    pids = sh("ip", "netns", "pids", ns, check=False).split()
            sh("ip", "netns", "del", ns, check=False)  # takes its veth pair with it
        for veth in s["veth"]:  # only there if up() stopped between creating and moving it
            sh("ip", "link", "del", veth, check=False)
        sh("ip", "link", "del", s["bridge"], check=False)
        if s["dir"]:
            shutil.rmtree(s["dir"], ignore_errors=True)
        self.created = False

    def __enter__(self):
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc):
        self.down()

    # ----- launching -----

    def _write_agent(self):
        """The rsh agent: a script that runs this file in agent mode with the state file."""
        s = self.state
        state_path = os.path.join(s["dir"], "state.json")
        with open(state_path, "w") as f:
            json.dump(s, f, indent=1)
        agent = os.path.join(s["dir"], "agent")
        with open(agent, "w") as f:
            f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))} "
                    f"agent {shlex.quote(state_path)} \"$@\"\n")
        os.chmod(agent, os.stat(agent).st_mode | stat.S_IXUSR)
        return agent

    def mpirun_args(self, slots=1, n=None, ft=False):
        """The mpirun command, up to the program: every rank on its own host first (map by node).
        `ft`: with MPI's fault tolerance (ULFM), which --elastic needs."""
        s = self.state
        n = n or s["hosts"] * slots
        return [MPIRUN, "--allow-run-as-root", "--oversubscribe", *["--with-ft", "ulfm"] * ft,
                "--host", ",".join(f"{a}:{slots}" for a in s["addrs"]), "--map-by", "node",
                "--mca", "plm_rsh_agent", s["agent"],
                "--mca", "pml", "ob1", "--mca", "btl", "tcp,self",
                # the hosts share this machine's cores: wait as an oversubscribed rank does, yielding
                "--mca", "mpi_yield_when_idle", "true",
                "--mca", "btl_tcp_if_include", s["subnet"], "--mca", "oob_tcp_if_include", s["subnet"],
                "-x", "PATH", "-x", "PYTHONUNBUFFERED=1", "-x", "OMP_NUM_THREADS=1",
                "-n", str(n)]

    def mpirun(self, *program, slots=1, n=None, timeout=None, capture=True, ft=False):
        """Run `mpirun ... python *program` across the hosts, from the repo root, under this Python.

        Returns the CompletedProcess; a timeout (or Ctrl-C) kills the whole launch and raises.
        """
        for _ in range(2):
            proc = self._launch(slots, n, ft, program, timeout, capture)
            # Open MPI's launcher now and then fails before starting anything (a known PMIx
            # flake): that launch ran nothing, so it is run once more
            if not (capture and proc.returncode and LAUNCHER_FLAKE in proc.stderr and not proc.stdout):
                break
        return proc

    def _launch(self, slots, n, ft, program, timeout, capture):
        cmd = self.mpirun_args(slots, n, ft) + [sys.executable, *map(str, program)]
        env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable),
                                                     os.path.dirname(MPIRUN), os.environ.get("PATH", "")]))
        env.pop("OMPI_MCA_btl", None)  # the command line says tcp,self
        out = subprocess.PIPE if capture else None
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:  # timeout, Ctrl-C, SIGTERM: stop the launcher, then its daemons
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)

    # ----- measuring -----

    def link_bytes(self):
        """Bytes (and packets dropped) through each host's link so far, from the tbf counters
        (`tc -s qdisc`): [{"host", "up", "down", "dropped"}], up = what the host sent, down =
        what it received, dropped = packets the two buckets dropped (TCP sends them again)."""
        s = self.state
        rows = []
        for name, ns, veth in zip(s["names"], s["ns"], s["veth"]):
            up = qdisc_stats(sh("ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", "eth0"))
            down = qdisc_stats(sh("tc", "-s", "qdisc", "show", "dev", veth))
            rows.append({"host": name, "up": up[0], "down": down[0], "dropped": up[1] + down[1]})
        return rows


def qdisc_stats(text):
    """(bytes sent, packets dropped) of the root qdisc in `tc -s qdisc show` output:
    ' Sent 13360083 bytes 9161 pkt (dropped 0, overlimits 0 requeues 0)'."""
    words = text.replace(",", " ").split()
    if "Sent" not in words:
        return 0, 0
    return int(words[words.index("Sent") + 1]), int(words[words.index("(dropped") + 1])


# ----- the rsh agent -----

SSH_OPTIONS_WITH_VALUE = set("bcDEeFIiJLlmOoPpQRSWw")


def agent(state_path, argv):
    """What mpirun runs instead of ssh: `agent [ssh options] HOST COMMAND...`."""
    with open(state_path) as f:
        s = json.load(f)
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # ssh options, e.g. -x or -o Key=value
        i += 2 if argv[i][1:] in SSH_OPTIONS_WITH_VALUE else 1
    host, command = argv[i], " ".join(argv[i + 1:])
    host = host.split("@")[-1]
    if host not in s["addrs"]:
        sys.exit(f"cluster agent: {host} is not a host of this cluster ({', '.join(s['addrs'])})")
    k = s["addrs"].index(host)
    os.execvp("ip", ["ip", "netns", "exec", s["ns"][k], "unshare", "--uts",
                     "sh", "-c", f"hostname {s['names'][k]}; {command}"])


# ----- command line -----

@contextlib.contextmanager
def signals_raise():
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so `finally` tears down."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "agent":  # mpirun's rsh agent: no argparse, ssh's syntax
        agent(sys.argv[2], sys.argv[3:])
        return
    parser = make_parser()
    args = parser.parse_args()

    reason = None if args.action == "down" else can_create()
    if reason:
        sys.exit(f"cannot emulate a cluster here: {reason}")

    if args.action == "down":
        tear_down(args.state)
        return

    cluster = Cluster(args.hosts, args.rate)
    with signals_raise():
        if args.action == "up":
            bring_up(cluster, args.state)
            return

        program = args.program[1:] if args.program[:1] == ["--"] else args.program
        if not program:
            parser.error("run: give the program after --, e.g. -- dist_sgd_serverless.py --dataset synthetic")
        sys.exit(run_program(cluster, program, args.slots, args.timeout))


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    for name, help_ in (("up", "create the hosts and leave them up; prints the mpirun line"),
                        ("run", "create the hosts, run one program across them, tear down")):
        p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--hosts", type=int, default=3, help="emulated hosts")
        p.add_argument("--rate", default=None, help="link rate in tc syntax (10mbit, 1gbit); none: unshaped")
        if name == "up":
            p.add_argument("--state", default=None, help="where to write the state; default: a new /tmp file")
        else:
            p.add_argument("--slots", type=int, default=1, help="ranks per host")
            p.add_argument("--timeout", type=float, default=None, help="seconds before the run is killed")
            p.add_argument("program", nargs=argparse.REMAINDER,
                           help="after --: a script (run under this Python) and its flags")
    p = sub.add_parser("down", help="tear down a cluster made by `up`")
    p.add_argument("--state", required=True, help="the state file that `up` wrote")
    return parser


def bring_up(cluster, state_path):
    """`up`: create the hosts, write their state to `state_path` (default: a new /tmp file), and
    print how to run across them and how to tear them down."""
    try:
        cluster.up()
        path = state_path or os.path.join(tempfile.gettempdir(), f"hw5-cluster-{cluster.state['tag']}.json")
        with open(path, "w") as f:
            json.dump(cluster.state, f, indent=1)
    except BaseException:
        cluster.down()
        raise
    s = cluster.state
    print(f"{s['hosts']} hosts on {s['subnet']} ({', '.join(s['addrs'])}), "
          f"links {s['rate'] or 'unshaped'}; state in {path}")
    print("run across them (from the repo root):")
    print("  " + shlex.join(cluster.mpirun_args()[:-2] + ["-n", str(s["hosts"]), "python", "SCRIPT.py"]))
    print(f"tear down:\n  python bench/cluster.py down --state {path}")


def run_program(cluster, program, slots, timeout):
    """`run`: create the hosts, run `program` across them, tear down; returns mpirun's exit status."""
    with cluster:
        s = cluster.state
        print(f"cluster: {s['hosts']} hosts on {s['subnet']} ({s['ns'][0][:-1]}1..{s['hosts']}), "
              f"links {s['rate'] or 'unshaped'}", flush=True)
        t0 = time.perf_counter()
        proc = cluster.mpirun(*program, slots=slots, timeout=timeout, capture=False)
        for row in cluster.link_bytes() if s["rate"] else []:
            print(f"{row['host']}: sent {row['up']:,} B, received {row['down']:,} B (tc)")
        print(f"cluster: mpirun exited {proc.returncode} after {time.perf_counter() - t0:.1f} s", flush=True)
    return proc.returncode


def tear_down(state_path):
    """`down`: tear down the cluster whose state `up` wrote to `state_path`, and remove that file."""
    with open(state_path) as f:
        Cluster(0, state=json.load(f)).down()
    os.remove(state_path)
    print(f"removed the cluster of {state_path}")


if __name__ == "__main__":
    main()
