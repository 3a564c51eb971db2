"""The scripts keep the shape a reader learns from: main() is wiring (setup, loop, report) and
each role is a function of one screen; what goes beyond the assignment lives in extensions/."""
import ast
import glob
import os
import re

import pytest

from mpi import ROOT

SCRIPTS = ("cent_sgd.py", "dist_sgd_serverless.py", "dist_sgd_param_server.py", "fed_avg.py")
# the roles each script must name (McMahan et al.'s Algorithm 1 for FedAvg)
ROLES = {
    "cent_sgd.py": {"train_epoch"},
    "dist_sgd_serverless.py": {"train_epoch", "average_gradients_", "broadcast_parameters_",
                               "mpi_allreduce_", "ring_allreduce_", "tree_allreduce_"},
    "dist_sgd_param_server.py": {"train_epoch", "server_step", "worker_step", "gather_gradients_",
                                 "send_parameters_"},
    "fed_avg.py": {"server_round", "client_update", "send_global_model_", "reduce_weighted_sums_"},
}


def functions(path):
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    return {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_is_wiring_and_every_function_fits_a_screen(script):
    nodes = functions(script)
    lengths = {name: node.end_lineno - node.lineno + 1 for name, node in nodes.items()}
    assert lengths["main"] <= 60, f"{script}: main() has {lengths['main']} lines"
    too_long = {name: n for name, n in lengths.items() if n > 60 and name != "main"}
    assert not too_long, f"{script}: functions over 60 lines: {too_long}"
    missing = ROLES[script] - set(lengths)
    assert not missing, f"{script} lacks the role functions {missing}"
    many = {name: len(node.args.args) + len(node.args.kwonlyargs) for name, node in nodes.items()}
    many = {name: n for name, n in many.items() if n > 6}
    assert not many, f"{script}: functions of more than 6 parameters (put what goes together in a record): {many}"


def function_lengths(path):
    """[(name, first line, lines)] of every function in `path`, nested ones and methods too; a list,
    not a dict, so that two functions of one name (each variant's `step`) are both counted."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    return [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


BENCH_AND_EXTENSIONS = sorted(os.path.relpath(p, ROOT) for folder in ("bench", "bench/reports", "extensions")
                              for p in glob.glob(os.path.join(ROOT, folder, "*.py")))


@pytest.mark.parametrize("path", BENCH_AND_EXTENSIONS)
def test_every_function_in_bench_and_extensions_fits_a_screen(path):
    too_long = {f"{name} (line {line})": n for name, line, n in function_lengths(path) if n > 60}
    assert not too_long, f"{path}: functions over 60 lines: {too_long}"


@pytest.mark.parametrize("path", [*SCRIPTS, "utils.py"])
def test_no_line_runs_past_100_characters(path):
    with open(os.path.join(ROOT, path)) as f:
        long = [i for i, line in enumerate(f.read().splitlines(), 1) if len(line) > 100]
    assert not long, f"{path}: lines over 100 characters: {long}"


# one idiom kept together: how a tensor meets MPI (staged, and the buffers only MPI touches)
ONE_USER_ALLOWED = {"mpi_empty"}


def test_utils_holds_only_what_two_scripts_use():
    """A utils function that only one script calls belongs in that script."""
    defined = {name for name in functions("utils.py")}
    sources = {s: open(os.path.join(ROOT, s)).read() for s in SCRIPTS}
    used_by = {name: [s for s, text in sources.items() if f"utils.{name}(" in text] for name in defined}
    internal = open(os.path.join(ROOT, "utils.py")).read()
    single = {name: users for name, users in used_by.items()
              if len(users) == 1 and internal.count(f"{name}(") <= 1 and name not in ONE_USER_ALLOWED}  # only its definition in utils
    assert not single, f"used by one script only: {single}"


def test_extensions_folder_exists_and_imports_nothing_from_the_scripts():
    folder = os.path.join(ROOT, "extensions")
    assert os.path.isfile(os.path.join(folder, "README.md"))
    for name in os.listdir(folder):
        if name.endswith(".py"):
            text = open(os.path.join(folder, name)).read()
            for script in SCRIPTS:
                assert f"import {script[:-3]}" not in text, f"extensions/{name} imports {script}"


@pytest.mark.parametrize("path", [*SCRIPTS, "utils.py"])
def test_no_check_is_an_assert_that_python_O_would_strip(path):
    """The replica checks and every refusal must run under `python -O` too; test_reliability.py
    runs one under -O, and this covers the rest."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert not asserts, f"{path}: assert on lines {asserts}"


# ----------------------------------------------------------------------------- the documents

def markdown_pages():
    docs = os.path.join(ROOT, "docs")
    return ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(docs) if f.endswith(".md"))


def test_the_readme_reads_in_one_sitting():
    """At most 250 lines, and the Q6 table within the first 150: the rest lives in docs/."""
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move a topic to docs/"
    q6 = next(i for i, line in enumerate(lines, 1) if line.startswith("| paradigm | each non-server rank sends"))
    assert q6 <= 150, f"README.md: the Q6 table starts on line {q6}"


def anchor(heading):
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", markdown_pages())
def test_every_relative_link_reaches_a_file_and_heading(page):
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            broken.append(target)
        elif fragment and full.endswith(".md"):
            with open(full) as f:
                headings = {anchor(line.lstrip("#")) for line in f if line.startswith("#")}
            if fragment not in headings:
                broken.append(target)
    assert not broken, f"{page}: links that reach nothing: {broken}"


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_help_shows_the_assignments_flags_before_each_features_group(script):
    """Each feature's flags sit in a --help group of their own, after the assignment's."""
    import extensions
    from mpi import python
    text = python(script, "--help", timeout=60).stdout
    groups = [m.start() for m in re.finditer(r"^beyond the assignment: ", text, re.M)]
    name = script[:-len(".py")]
    assert len(groups) == len(extensions.FEATURES[name]), text
    assert text.index("--batch-size") < groups[0] and text.index("--seed") < groups[0], text
    for feature, start in zip(extensions.FEATURES[name], groups):
        assert text[start:].startswith(f"beyond the assignment: {feature.TITLE}"), text[start:start + 120]
