"""Write the students' version of HW5: the solution with each solution region replaced by a TODO.

    python grading/handout.py OUT_DIR          # OUT_DIR must not exist, or be empty

A solution region is nbgrader's: the lines between `### BEGIN SOLUTION` and `### END SOLUTION`,
whose first line is a comment `# Qk: what to write`. In the handout the region becomes

    # TODO (Qk): what to write
    raise NotImplementedError("Qk: what to write")

indented as the region was, so every function still parses, and a run stops at the first TODO it
reaches with that one line (utils.abort_on_exception) on every rank, and a non-zero exit.

The handout holds the four scripts and utils.py, requirements.txt, HW5.ipynb without its outputs
and answers, a short README.md, and a generated extensions/ stub (see stub_files). It leaves out
extensions/ (the real one), bench/, docs/, tests/, grading/ and results/.
"""
import argparse
import os
import pprint
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("cent_sgd.py", "dist_sgd_serverless.py", "dist_sgd_param_server.py", "fed_avg.py")
CODE = (*SCRIPTS, "utils.py")
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
LABEL = re.compile(r"# (Q\d+): (.+)$")
TODO = re.compile(r"# TODO \((Q\d+)\): (.+)$")


def regions(text):
    """[(question, what to write, first line, last line)] of each solution region in `text`
    (1-based lines, the markers included). Raises ValueError on a malformed region."""
    found, lines, start = [], text.splitlines(), None
    for i, line in enumerate(lines, 1):
        if line.strip() == BEGIN:
            if start is not None:
                raise ValueError(f"line {i}: {BEGIN} inside a region")
            label = LABEL.match(lines[i].strip()) if i < len(lines) else None
            if not label:
                raise ValueError(f"line {i + 1}: a region must open with `# Qk: what to write`")
            start = i
        elif line.strip() == END:
            if start is None:
                raise ValueError(f"line {i}: {END} outside a region")
            found.append((label.group(1), label.group(2), start, i))
            start = None
    if start is not None:
        raise ValueError(f"line {start}: {BEGIN} never ends")
    return found


def strip_solutions(text):
    """`text` with each solution region replaced by its TODO comment and NotImplementedError."""
    lines = text.splitlines()
    out, last = [], 0
    for question, what, start, end in regions(text):
        indent = re.match(r"\s*", lines[start - 1]).group(0)
        out += lines[last:start - 1]
        message = f"{question}: {what}".replace("\\", "\\\\").replace('"', '\\"')
        raise_ = f'{indent}raise NotImplementedError("{message}")'
        if len(raise_) > 100:  # the scripts' line limit
            raise_ = f'{indent}raise NotImplementedError(\n{indent}    "{message}")'
        out += [f"{indent}# TODO ({question}): {what}", raise_]
        last = end
    out += lines[last:]
    return "\n".join(out) + "\n"


def extension_defaults():
    """{script: {dest: default}} of the flags extensions.add_flags adds to each script, read from
    the real parser: what the stub sets, so that the scripts see the defaults they test."""
    sys.path.insert(0, ROOT)
    import extensions
    defaults = {}
    for script in extensions.FEATURES:
        parser = argparse.ArgumentParser()
        before = {a.dest for a in parser._actions}
        extensions.add_flags(parser, script)
        defaults[script] = {a.dest: a.default for a in parser._actions if a.dest not in before}
    return defaults


STUB_INIT = '''"""A stand-in for extensions/, which holds what goes beyond the assignment (gradient
compression, asynchronous parameter servers, stragglers, elastic recovery, FedAvg variants,
--trace) and is not part of the handout.

The scripts meet those features in three calls: extensions.add_flags, extensions.check and
extensions.configure, and read the features' flags (args.compress, args.mode, args.elastic, ...).
This stub, written by grading/handout.py, keeps the three calls and gives each of those flags its
default (DEFAULTS, read from the real parser), without showing or accepting the flags: at the
defaults the features change nothing, so the scripts compute exactly the assignment's code.

One more thing: when the grader runs a script it sets HW5_WIRE, and configure then hands the
script a communicator that counts the bytes each rank sends (extensions/wire.py), to compare
with Q6's formulas. Nothing else changes, and without HW5_WIRE nothing at all.
"""
import os

HANDOUT_STUB = True  # grading/grade.py grades with this stub, not with the real extensions/
DEFAULTS = {defaults}


def add_flags(parser, script):
    parser.set_defaults(**DEFAULTS[script])


def check(args, world_size, script):
    pass


def configure(args, script, parts, replica, plan, data=None):
    if os.environ.get("HW5_WIRE"):
        from extensions import wire
        parts.comm = wire.meter_script(parts.comm, os.environ["HW5_WIRE"])
    return parts
'''

STUB_COMPRESSION = '''"""A stand-in for extensions/compression.py (see extensions/__init__.py): the results
JSON's `compression` entry as it reads with no compression."""


def record(average_, flat_grads, per_rank_bytes, steps):
    return dict(payload_bytes_per_step=flat_grads.nbytes, ratio_vs_none=1.0,
                bytes_sent_per_step=[None if b["bytes_sent"] is None
                                     else b["bytes_sent"] / max(1, steps) for b in per_rank_bytes])
'''

STUB_TIMELINE = '''"""A stand-in for extensions/timeline.py (see extensions/__init__.py): --trace is not part
of the handout, and refuses with one line."""
import utils


def role(*args):
    return None


def start(*args):
    utils.fail("--trace needs extensions/timeline.py, which the handout leaves out")
'''


def is_stub(folder):
    """Whether folder/extensions is the handout's stub (what the grader grades with)."""
    path = os.path.join(folder, "extensions", "__init__.py")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return "HANDOUT_STUB = True" in f.read()


def stub_files():
    """{relative path: text} of the extensions/ stub."""
    defaults = pprint.pformat(extension_defaults(), width=96, sort_dicts=False)
    with open(os.path.join(ROOT, "grading", "wire.py")) as f:
        wire = f.read()
    return {os.path.join("extensions", "__init__.py"): STUB_INIT.replace("{defaults}", defaults),
            os.path.join("extensions", "wire.py"): wire,
            os.path.join("extensions", "compression.py"): STUB_COMPRESSION,
            os.path.join("extensions", "timeline.py"): STUB_TIMELINE}


def write_code(out):
    """The code of the handout into folder `out`: the scripts and utils.py without their solutions,
    the extensions/ stub and requirements.txt. Returns the regions replaced, {file: regions}."""
    replaced = {}
    os.makedirs(os.path.join(out, "extensions"), exist_ok=True)
    for name in CODE:
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        replaced[name] = regions(text)
        with open(os.path.join(out, name), "w") as f:
            f.write(strip_solutions(text))
    for path, text in stub_files().items():
        with open(os.path.join(out, path), "w") as f:
            f.write(text)
    shutil.copy(os.path.join(ROOT, "requirements.txt"), out)
    return replaced


# ----- the notebook -----

DROP_TAGS = ("answer-", "run-note", "q6-check", "timeline-")  # cells with such a tag: left out
DROP_CODE = ("bench/", "allreduce_n")  # a code cell that runs or shows bench/, left out
ANSWER_BLOCK = re.compile(r"<!-- begin: (answer-[\w-]+) -->.*?<!-- end: \1 -->\n?", re.S)
ANSWER_TAIL = re.compile(r"\n*\*\*Answer \(Q\d+\)\.\*\*.*", re.S)  # an answer in a question's cell


def strip_notebook(nb):
    """The notebook `nb` (nbformat) without outputs, answers, or cells that need bench/."""
    cells = []
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if any(tag.startswith(DROP_TAGS) for tag in tags):
            continue
        if cell.cell_type == "code":
            if any(pattern in cell.source for pattern in DROP_CODE):
                continue
            cell.outputs, cell.execution_count = [], None
        else:
            cell.source = ANSWER_TAIL.sub("\n", ANSWER_BLOCK.sub("", cell.source)).rstrip() + "\n"
        cells.append(cell)
    nb.cells = cells
    return nb


README = """# HW5: distributed training with MPI (handout)

Finish the `TODO`s in the scripts, then run the notebook `HW5.ipynb` (questions Q1 to Q7).
Each TODO names its question and says what to write, and replaces a
`raise NotImplementedError(...)`: until it is written, a run stops there with one line.

| TODO | file | what to write |
|---|---|---|
{table}

Quick checks on synthetic data (no download; as root or in Colab add
`--allow-run-as-root --oversubscribe` after `mpirun`):

    pip install -r requirements.txt
    python cent_sgd.py --dataset synthetic --max-steps 20
    mpirun -n 2 python dist_sgd_serverless.py --dataset synthetic --max-steps 20
    mpirun -n 2 python dist_sgd_serverless.py --dataset synthetic --max-steps 20 --allreduce ring
    mpirun -n 3 python dist_sgd_param_server.py --dataset synthetic --max-steps 20
    mpirun -n 3 python fed_avg.py --dataset synthetic --rounds 2 --max-steps 5
    mpirun -n 3 python fed_avg.py --dataset synthetic --rounds 2 --max-steps 5 --split-method non-iid

Distributed SGD (Q2, Q3) should end on the same weights as `cent_sgd.py` with the same global
batch: compare with `--save-model PATH` on both and `--momentum 0 --lr 0.05`.
`extensions/` is a small stand-in for features beyond the assignment; leave it as it is.
Submit the four scripts and `utils.py`.
"""


def write_handout(out):
    import nbformat
    if os.path.exists(out) and os.listdir(out):
        sys.exit(f"error: {out} exists and is not empty")
    replaced = write_code(out)
    nb = strip_notebook(nbformat.read(os.path.join(ROOT, "HW5.ipynb"), as_version=4))
    nbformat.write(nb, os.path.join(out, "HW5.ipynb"))
    rows = []
    for name in CODE:  # each TODO where the handout has it
        with open(os.path.join(out, name)) as f:
            rows += [f"| {m.group(1)} | `{name}` line {i} | {m.group(2)} |"
                     for i, line in enumerate(f, 1) if (m := TODO.match(line.strip()))]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README.format(table="\n".join(sorted(rows, key=lambda r: r.split("|")[1]))))
    print(f"wrote the handout to {out}: {len(rows)} TODOs in "
          f"{sum(1 for found in replaced.values() if found)} files")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the folder to write (new, or empty)")
    write_handout(parser.parse_args().out_dir)
