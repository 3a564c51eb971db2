"""The four paradigms on one GPU with 4-5 ranks (the Colab shape), CUDA MPS off and on, and
the cost of staging through host memory; in <= 8 min on one H100. Run it through bench/gpu.sh:

    bash bench/gpu.sh                # results/reference/gpu/: gpu.json, gpu.md, one JSON per run
    bash bench/gpu.sh --dry-run      # print the commands it would run; runs nothing, needs no GPU
    bash bench/gpu.sh --out /tmp/g   # somewhere else

On synthetic CIFAR-shaped data (--dataset synthetic: 3x32x32 images), with MPS off, then on:
    python cent_sgd.py                          the baseline, one process
    mpirun -n 4 python dist_sgd_serverless.py   all-reduce SGD
    mpirun -n 5 python dist_sgd_param_server.py 1 server, 4 workers
    mpirun -n 5 python fed_avg.py               1 server, 4 clients
    mpirun -n 4 python -m mpi4py bench/gpu_staging.py   Allreduce, alone and staged through pinned host memory
Every rank uses the one GPU (CUDA_VISIBLE_DEVICES is set to the first one unless set already).
MPS: `nvidia-cuda-mps-control -d` starts it, `echo quit | nvidia-cuda-mps-control` stops it,
with its pipe and log folders in a temporary folder; if it cannot start, or a CUDA client
cannot use it, that is recorded and the MPS-on runs are skipped: not a failure.
The epoch time compared is the last epoch's training part (history[-1]['train_time'];
fed_avg: the last round's 'round_time'), against cent_sgd.py's in the same MPS mode.
Each command has a hard timeout, and all of them together --budget seconds; a command the
budget does not reach is recorded as "out of time". Each run's output goes to logs/ beside the JSON.

Exit status: 0 all measured (MPS-on runs not run because MPS cannot start count as measured:
the reason is recorded); 1 a run failed or timed out, or the budget ran out; 2 a usage error;
77 no CUDA GPU visible: nothing measured, one line printed (77: "skipped", as automake's tests).
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun") or "mpirun"
MPS_CONTROL = "nvidia-cuda-mps-control"
NO_GPU_EXIT = 77
COMMAND_TIMEOUT = 120  # s for one command, startup included; the budget caps the sum
SETUP_TIMEOUT = 30  # s for nvidia-smi, the MPS daemon, its probe

# (name, script, ranks): the Colab shape, one GPU for every rank
PARADIGMS = (("centralized", "cent_sgd.py", 1),
             ("serverless", "dist_sgd_serverless.py", 4),
             ("param_server", "dist_sgd_param_server.py", 5),
             ("fed_avg", "fed_avg.py", 5))
STAGING_RANKS = 4


# ----------------------------------------------------------------------------- the plan

def plan(args):
    """The commands, in order: for each MPS mode, the four paradigms and the staging timing."""
    steps = []
    for mps in ("off", "on"):
        for name, script, ranks in PARADIGMS:
            results = os.path.join(args.out, f"{name}_mps-{mps}.json")
            cmd = [sys.executable, script, "--dataset", "synthetic", "--device", "cuda", "--results", results]
            cmd += ["--rounds" if script == "fed_avg.py" else "--epochs", str(args.epochs)]
            if args.train_size:
                cmd += ["--train-size", str(args.train_size)]
            if script == "fed_avg.py":
                cmd += ["--figures-dir", os.path.join(args.out, "figures")]
            if ranks > 1:
                cmd = mpirun(ranks) + cmd
            steps.append({"name": name, "script": script, "ranks": ranks, "mps": mps, "cmd": cmd, "results": results})
        results = os.path.join(args.out, f"staging_mps-{mps}.json")
        cmd = mpirun(STAGING_RANKS) + [sys.executable, "-m", "mpi4py", "bench/gpu_staging.py",
                                       "--device", "cuda", "--out", results]
        steps.append({"name": "staging", "script": "bench/gpu_staging.py", "ranks": STAGING_RANKS, "mps": mps,
                      "cmd": cmd, "results": results})
    return steps


def mpirun(n):
    return [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(n)]


def shown(cmd):
    """A command as a reader would type it: `mpirun`, `python`, paths from the repo root."""
    short = {MPIRUN: "mpirun", sys.executable: "python"}
    return " ".join(shlex.quote(short.get(c, os.path.relpath(c, ROOT) if c.startswith(ROOT + os.sep) else c))
                    for c in cmd)


def print_plan(steps):
    for mps in ("off", "on"):
        if mps == "on":
            print(f"$ {MPS_CONTROL} -d")
        for step in (s for s in steps if s["mps"] == mps):
            print(f"$ {shown(step['cmd'])}  # MPS {mps}")
        if mps == "on":
            print(f"$ echo quit | {MPS_CONTROL}")


# ----------------------------------------------------------------------------- the GPU and MPS

# torch is asked in a child process, so that this one holds no CUDA context on the GPU when MPS starts
TORCH_PROBE = """import json, torch
ok = torch.cuda.is_available()
print(json.dumps({"available": ok, "torch_name": torch.cuda.get_device_name(0) if ok else None,
                  "torch": torch.__version__, "torch_cuda": torch.version.cuda}))"""


def find_gpu():
    """(why no CUDA GPU can be used here or None, what torch says about it)."""
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi not found", None
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=SETUP_TIMEOUT)
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return "nvidia-smi lists no GPU", None
    probe = subprocess.run([sys.executable, "-c", TORCH_PROBE], capture_output=True, text=True,
                           timeout=2 * SETUP_TIMEOUT)
    if probe.returncode != 0:
        return f"torch failed: {(probe.stderr.strip().splitlines() or ['no output'])[-1]}", None
    info = json.loads(probe.stdout)
    return (None if info["available"] else "torch.cuda.is_available() is False"), info


def card(torch_info):
    """The card, named by nvidia-smi (the first visible one) and by torch."""
    query = "name,memory.total,driver_version,compute_mode"
    smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=SETUP_TIMEOUT).stdout.strip().splitlines()
    first = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]
    line = smi[int(first)] if first.isdigit() and int(first) < len(smi) else (smi or [""])[0]
    fields = dict(zip(query.split(","), (f.strip() for f in line.split(","))))
    return {"nvidia_smi": line, **fields, "gpus_listed": len(smi), **torch_info}


def start_mps(env):
    """Start the MPS control daemon and check that a CUDA client gets through it.
    Returns (started, note); on failure nothing is left running."""
    if not shutil.which(MPS_CONTROL):
        return False, f"{MPS_CONTROL} not found"
    try:
        # output to a file, not a pipe: a daemon that keeps its parent's pipe open would stall us
        said = os.path.join(env["CUDA_MPS_LOG_DIRECTORY"], "start.txt")
        with open(said, "w") as f:
            daemon = subprocess.run([MPS_CONTROL, "-d"], env=env, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, timeout=SETUP_TIMEOUT)
        if daemon.returncode != 0:
            with open(said) as f:
                return False, f"`{MPS_CONTROL} -d` exited {daemon.returncode}: {f.read().strip()}"
        probe = subprocess.run([sys.executable, "-c", "import torch; torch.ones(1, device='cuda').sum().item()"],
                               env=env, capture_output=True, text=True, timeout=2 * SETUP_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        stop_mps(env)
        return False, f"`{shown(e.cmd)}` did not finish in {e.timeout} s"
    if probe.returncode != 0:
        stop_mps(env)
        tail = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"the daemon started, but a CUDA client failed through it: {tail}"
    return True, f"`{MPS_CONTROL} -d`; a CUDA client ran through it"


def mps_query(command, env):
    try:
        return subprocess.run([MPS_CONTROL], input=f"{command}\n", env=env, capture_output=True, text=True,
                              timeout=SETUP_TIMEOUT).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"


def stop_mps(env):
    return mps_query("quit", env)


# ----------------------------------------------------------------------------- running

def run(step, env, deadline, out):
    """Run one step with a hard timeout, its output into out/logs/; record how it went in `step`."""
    timeout = min(COMMAND_TIMEOUT, deadline - time.monotonic())
    if timeout < 10:
        step.update(status="out of time", note="the time budget ran out")
        print(f"- {step['name']} (MPS {step['mps']}): not run, the time budget ran out", flush=True)
        return
    log = os.path.join(out, "logs", f"{step['name']}_mps-{step['mps']}.log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        # its own process group, so that a timeout ends the ranks too, not only mpirun
        proc = subprocess.Popen(step["cmd"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.perf_counter() - t0
    ok = rc == 0 and os.path.exists(step["results"])
    status = "ok" if ok else ("timed out" if rc is None else f"failed (exit {rc})")
    step.update(status="ok" if ok else "failed", note=None if ok else f"{status} after {wall:.0f} s",
                wall_s=round(wall, 2), log=os.path.relpath(log, out))
    print(f"- {step['name']} (MPS {step['mps']}): {status}, {wall:.1f} s", flush=True)
    if not ok:
        with open(log) as f:
            print("  " + "\n  ".join(f.read().splitlines()[-15:]), flush=True)


def epoch_times(step):
    """From a training run's results JSON: the training part of each epoch (fed_avg: round)."""
    with open(step["results"]) as f:
        r = json.load(f)
    key = "round_time" if step["script"] == "fed_avg.py" else "train_time"
    whole = "epoch_time" if key == "train_time" else None
    return {"train_s": [h[key] for h in r["history"]],
            "epoch_s": [h[whole] if whole else h["round_time"] + h["eval_time"] for h in r["history"]],
            "final_test_acc": r.get("final_test_acc"), "world_size": r.get("world_size")}


# ----------------------------------------------------------------------------- the report

def summarize(steps):
    """Per MPS mode: each paradigm's last-epoch training time, and its ratio to cent_sgd.py's."""
    for mode in ("off", "on"):
        runs = {s["name"]: s for s in steps if s["mps"] == mode and s.get("status") == "ok" and "train_s" in s}
        cent = runs.get("centralized")
        for s in runs.values():
            s["last_train_s"] = s["train_s"][-1]
            s["vs_centralized"] = s["last_train_s"] / cent["train_s"][-1] if cent else None


def markdown(record):
    c, steps = record["card"], record["runs"]
    lines = [f"## One GPU: {c['torch_name']} ({c.get('memory.total', '?')}, driver {c.get('driver_version', '?')}, "
             f"compute mode {c.get('compute_mode', '?')})",
             "",
             f"torch {c['torch']} (CUDA {c['torch_cuda']}); {record['mpi']}, CUDA-aware: {record['cuda_aware_mpi']}. "
             f"Synthetic CIFAR-shaped data, {record['epochs']} epochs (rounds); the last one's training part "
             f"(fed_avg: its round time), and its ratio to cent_sgd.py's in the same MPS mode (< 1: faster).",
             f"MPS on: {record['mps']['note']}.",
             "",
             "| paradigm | ranks | MPS off (s) | x cent | MPS on (s) | x cent |",
             "|---|---:|---:|---:|---:|---:|"]

    def cell(step):
        if step is None or step.get("status") != "ok":
            return ["–", "–"] if step is None else [step.get("status", "–"), "–"]
        ratio = step.get("vs_centralized")
        return [f"{step['last_train_s']:.3f}", "–" if ratio is None else f"{ratio:.2f}"]

    for name, script, ranks in PARADIGMS:
        by_mode = {s["mps"]: s for s in steps if s["name"] == name}
        lines.append(f"| {script} | {ranks} | " + " | ".join(cell(by_mode.get("off")) + cell(by_mode.get("on"))) + " |")

    lines += ["", f"Staging through pinned host memory around MPI_Allreduce, {STAGING_RANKS} ranks on the GPU "
                  "(median, slowest rank):", "",
              "| buffer | MPS | Allreduce alone (ms) | staged (ms) | d2h (ms) | h2d (ms) | staging cost (ms) "
              "| on device (ms) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]

    def ms(row, key):
        return f"{row[key]:.3f}" if key in row else "–"

    for mode, st in record["staging"].items():
        for row in st.get("rows", []):
            device = ms(row, "device_ms") if record["cuda_aware_mpi"] else "– (MPI not CUDA-aware)"
            lines.append(f"| {row['buffer']} | {mode} | " + " | ".join(ms(row, k) for k in (
                "allreduce_ms", "staged_ms", "staged_d2h_ms", "staged_h2d_ms", "staging_cost_ms")) + f" | {device} |")
    lines += ["", f"Commands ({record['elapsed_s']:.0f} s in all):", ""]
    lines += [f"    {command}" for command in record["commands"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=os.path.join("results", "reference", "gpu"),
                        help="folder for gpu.json, gpu.md, the per-run JSON and logs/")
    parser.add_argument("--epochs", type=int, default=2, help="epochs (fed_avg: rounds) of each training run")
    parser.add_argument("--train-size", type=int, default=None,
                        help="train on the first N synthetic images; default: all 5000")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all commands together")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit 0; needs no GPU")
    args = parser.parse_args()
    if args.epochs < 1 or (args.train_size is not None and args.train_size < 1) or args.budget <= 0:
        parser.error("--epochs, --train-size and --budget must be positive")
    args.out = os.path.abspath(args.out)
    steps = plan(args)

    if args.dry_run:
        print_plan(steps)
        return 0
    reason, torch_info = find_gpu()
    if reason:
        print(f"no CUDA GPU visible: nothing to measure ({reason}); exit {NO_GPU_EXIT}", flush=True)
        return NO_GPU_EXIT

    t_start = time.monotonic()
    # one GPU for every rank; a SIGTERM (gpu.sh's outer timeout) still stops MPS, in `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    record = {"card": card(torch_info), "epochs": args.epochs, "train_size": args.train_size or 5000,
              "budget_s": args.budget}
    print(f"# {record['card']['torch_name']}: {len(steps)} commands, budget {args.budget:.0f} s", flush=True)
    record["mps"] = measure(steps, args.out, deadline=t_start + args.budget)
    record["elapsed_s"] = round(time.monotonic() - t_start, 1)
    return report(record, steps, args.out)


def measure(steps, out, deadline):
    """Run the steps with MPS off, then start MPS and run them again; returns what MPS did."""
    mps_dir = tempfile.mkdtemp(prefix="mps-")
    base_env = dict(os.environ, PYTHONUNBUFFERED="1", OMPI_MCA_btl=os.environ.get("OMPI_MCA_btl", "^ofi"))
    mps_env = dict(base_env, CUDA_MPS_PIPE_DIRECTORY=os.path.join(mps_dir, "pipe"),
                   CUDA_MPS_LOG_DIRECTORY=os.path.join(mps_dir, "log"))
    for folder in (mps_env["CUDA_MPS_PIPE_DIRECTORY"], mps_env["CUDA_MPS_LOG_DIRECTORY"]):
        os.makedirs(folder)
    # a daemon already running in the default pipe folder would put the MPS-off runs under MPS
    mps = {"started": False, "note": "not reached",
           "default_daemon_found": os.path.exists(os.path.join(os.environ.get(
               "CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"), "control"))}
    try:
        for step in (s for s in steps if s["mps"] == "off"):
            run(step, base_env, deadline, out)
        if deadline - time.monotonic() < 60:
            mps.update(note="not tried: the time budget ran out")
        else:
            started, note = start_mps(mps_env)
            mps.update(started=started, note=note)
        print(f"- MPS: {mps['note']}", flush=True)
        for step in (s for s in steps if s["mps"] == "on"):
            if mps["started"]:
                run(step, mps_env, deadline, out)
            else:
                out_of_time = "budget" in mps["note"]
                step.update(status="out of time" if out_of_time else "no MPS", note=mps["note"])
        if mps["started"]:
            mps["server_list"] = mps_query("get_server_list", mps_env)
    finally:
        if mps["started"]:
            stop_mps(mps_env)
        shutil.rmtree(mps_dir, ignore_errors=True)
    return mps


def report(record, steps, out):
    """Write gpu.json and gpu.md into `out`, print the markdown; 1 if any step failed or ran out of time."""
    for s in steps:
        if s.get("status") == "ok" and s["name"] != "staging":
            s.update(epoch_times(s))
    summarize(steps)
    record["staging"] = {}
    for s in steps:
        if s["name"] == "staging" and s.get("status") == "ok":
            with open(s["results"]) as f:
                record["staging"][s["mps"]] = json.load(f)
    first = next(iter(record["staging"].values()), {})
    record.update(mpi=first.get("mpi", "MPI: not measured"), cuda_aware_mpi=first.get("cuda_aware_mpi"))
    for s in steps:
        s["command"] = shown(s.pop("cmd"))
        s["results"] = os.path.relpath(s["results"], out)
    record["commands"] = [f"{s['command']}  # MPS {s['mps']}: {s.get('status')}"
                          + (f", {s['wall_s']:.1f} s" if "wall_s" in s else "") for s in steps]
    record["runs"] = [s for s in steps if s["name"] != "staging"]
    record["staging_runs"] = [s for s in steps if s["name"] == "staging"]
    record["failed"] = [f"{s['name']} (MPS {s['mps']}): {s['status']}" for s in steps
                        if s.get("status") in ("failed", "out of time")]

    text = markdown(record)
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out, "gpu.md"), "w") as f:
        f.write(text)
    print()
    print(text, end="")
    print(f"\nwrote {shown([os.path.join(out, 'gpu.json')])} and gpu.md"
          + (f"; FAILED: {', '.join(record['failed'])}" if record["failed"] else ""))
    return 1 if record["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
