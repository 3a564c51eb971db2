"""Every training command that a script's docstring, README.md or a page of docs/ shows trains at
its defaults: on synthetic data, for one epoch (FedAvg: one round), it ends above chance, with no NaN.

    python -m pytest -q -m slow tests/test_commands.py

A command is taken as documented, with its own flags and process count; the test adds only
--dataset synthetic, one epoch or round, and scratch paths for what it writes.
"""
import os
import re
import shlex

import pytest

from mpi import ROOT, check, mpirun, python

SCRIPTS = ("cent_sgd.py", "dist_sgd_serverless.py", "dist_sgd_param_server.py", "fed_avg.py")
COMMAND = re.compile(r"^\s*((?:mpirun .*?)?python (?:%s)(?: [^#\n]*)?)" % "|".join(map(re.escape, SCRIPTS)), re.M)


def documented():
    texts = []
    for script in SCRIPTS:
        with open(os.path.join(ROOT, script)) as f:
            texts.append(f.read().split('"""')[1])  # the docstring
    docs = os.path.join(ROOT, "docs")
    for page in ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(docs)) if f.endswith(".md")]:
        with open(os.path.join(ROOT, page)) as f:
            texts.append(f.read())
    commands = {" ".join(m.split()) for text in texts for m in COMMAND.findall(text)}
    return sorted(commands)


def launch(command, tmp_path):
    words = shlex.split(command)
    i = words.index("python")
    launcher, (script, *flags) = words[:i], words[i + 1:]
    flags = [str(tmp_path / "ckpt.pt") if w.endswith(".pt") else w for w in flags]
    if "--dataset" not in flags:
        flags += ["--dataset", "synthetic"]
    flags += ["--rounds", "1"] if script == "fed_avg.py" and "--rounds" not in flags else []
    flags += ["--epochs", "1"] if script != "fed_avg.py" else []
    flags += ["--results", tmp_path / "r.json"] + (["--figures-dir", f"{tmp_path}{os.sep}"] if script == "fed_avg.py"
                                                  else [])
    if not launcher:
        return python(script, *flags, timeout=300)
    n = int(launcher[launcher.index("-n") + 1])
    mca = {launcher[k + 1]: launcher[k + 2] for k, w in enumerate(launcher) if w == "--mca"}
    return mpirun(n, script, *flags, mca=mca, ft="--with-ft" in launcher, timeout=300)


def test_the_docs_show_the_commands():
    commands = documented()
    assert len(commands) >= 15 and "mpirun -n 5 python fed_avg.py --split-method non-iid" in commands, commands


@pytest.mark.slow
@pytest.mark.parametrize("command", documented())
def test_a_documented_command_trains_at_its_defaults(command, tmp_path):
    proc = check(launch(command, tmp_path))
    final = re.search(r"^Final test accuracy: (\d+\.\d\d)%$", proc.stdout, re.M)
    assert final and float(final[1]) > 20, f"10 classes: chance is 10%\n{proc.stdout}"
