"""The autograder (grading/, docs/grading.md): the handout is the solution with TODOs, the
solution scores full marks, the handout zero with each failure naming its TODO, each seeded bug
loses points on its own question and no other, and a hang costs one check's timeout.

    pytest -q tests/test_grading.py             # every check on the solution; the regions, the handout, the zip
    pytest -q -m slow tests/test_grading.py -s  # the zip as Gradescope runs it, the handout, the mutants, a hang
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from grading import checks, grade, handout, mutants, package
from mpi import ROOT, mpirun

POINTS = grade.load_points(os.path.join(ROOT, "grading", "points.toml"))
QUESTIONS = {c.name: c.question for c in checks.CHECKS}
GRADED = {q for name, q in QUESTIONS.items() if POINTS[name]}  # Q2, Q3, Q4, Q5, Q7


def sources():
    return {name: open(os.path.join(ROOT, name)).read() for name in handout.CODE}


# ----------------------------------------------------------------------------- the regions

def test_every_graded_question_has_regions_and_every_region_a_graded_question():
    found = {q for text in sources().values() for q, *_ in handout.regions(text)}
    assert found == GRADED, (found, GRADED)


def test_the_regions_are_comments_only():
    """Without its marker lines and each region's `# Qk:` line, a script is what it was: the
    markers change no code (the AST without comments is the same)."""
    for name, text in sources().items():
        lines = text.splitlines()
        drop = {i for _, _, start, end in handout.regions(text) for i in (start, start + 1, end)}
        bare = "\n".join(line for i, line in enumerate(lines, 1) if i not in drop)
        assert ast.dump(ast.parse(bare)) == ast.dump(ast.parse(text)), name


# ----------------------------------------------------------------------------- the handout

@pytest.fixture(scope="module")
def handout_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("handout") / "hw5"
    handout.write_handout(str(out))
    return out


def test_the_handout_has_a_todo_for_each_region_and_no_solution(handout_dir):
    for name, text in sources().items():
        written = (handout_dir / name).read_text()
        ast.parse(written)  # every function still parses
        assert "BEGIN SOLUTION" not in written and "END SOLUTION" not in written, name
        todos = re.findall(r"# TODO \((Q\d+)\): ", written)
        assert todos == [q for q, *_ in handout.regions(text)], name
        assert written.count("raise NotImplementedError(") == len(todos), name
        assert max(len(line) for line in written.splitlines()) <= 100, name
    names = {p.name for p in handout_dir.iterdir()}
    assert names == {*handout.CODE, "extensions", "requirements.txt", "HW5.ipynb", "README.md"}


def test_the_stub_gives_each_feature_flag_its_real_default(handout_dir):
    namespace = {}
    exec((handout_dir / "extensions" / "__init__.py").read_text(), namespace)
    assert namespace["DEFAULTS"] == handout.extension_defaults()


def test_the_handout_notebook_keeps_the_questions_and_drops_answers_and_outputs(handout_dir):
    import nbformat
    nb = nbformat.read(handout_dir / "HW5.ipynb", as_version=4)
    text = "\n".join(cell.source for cell in nb.cells)
    for q in range(1, 8):
        assert f"## Q{q}" in text
    assert "Answer (" not in text and "begin: answer" not in text and "bench/" not in [
        c.source for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs for c in nb.cells if c.cell_type == "code")
    assert not any(t.startswith("answer-") for c in nb.cells for t in c.metadata.get("tags", []))


def test_the_handout_stops_at_its_first_todo_with_one_line(handout_dir):
    proc = mpirun(2, handout_dir / "dist_sgd_serverless.py", "--dataset", "synthetic",
                  "--max-steps", 2, "--results", handout_dir / "r.json", timeout=60)
    todo = [line for line in proc.stderr.splitlines() if "not implemented yet" in line]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert todo == ["error: not implemented yet: Q2: sum flat_grads over the ranks with "
                    "allreduce_, divide by N; return its counts"], proc.stderr


def test_the_handout_refuses_trace_with_one_line(handout_dir):
    proc = mpirun(2, handout_dir / "dist_sgd_serverless.py", "--dataset", "synthetic",
                  "--max-steps", 2, "--trace", handout_dir / "t.json", timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: --trace needs extensions/timeline.py" in proc.stderr


def test_the_points_table_totals_100_and_reads_without_tomllib(monkeypatch):
    assert sum(POINTS.values()) == 100
    path = os.path.join(ROOT, "grading", "points.toml")
    with_tomllib = grade.read_table(path)
    monkeypatch.setitem(__import__("sys").modules, "tomllib", None)  # Python < 3.11
    assert grade.read_table(path) == with_tomllib


def test_the_package_holds_the_grader_and_the_handouts_code(tmp_path):
    out = tmp_path / "autograder.zip"
    package.package(str(out))
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        grader = {f"grading/{name}" for name in package.GRADER}
        assert {"setup.sh", "run_autograder", *grader, "extensions/__init__.py",
                "requirements.txt", *handout.CODE} <= names
        assert "raise NotImplementedError(" in z.read("fed_avg.py").decode()
        assert "results/results.json" in z.read("run_autograder").decode()
        assert z.getinfo("run_autograder").external_attr >> 16 & 0o111
        # every module of grading/ that the grader imports is in the zip
        imported = set()
        for node in (n for path in grader if path.endswith(".py")
                     for n in ast.walk(ast.parse(z.read(path).decode()))):
            if isinstance(node, ast.ImportFrom) and node.module == "grading":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grading."):
                imported.add(node.module.split(".")[1])
        assert {f"grading/{name}.py" for name in imported} <= names, imported


def test_a_submission_without_the_files_gets_one_line_and_no_checks(tmp_path):
    (tmp_path / "submission").mkdir()
    (tmp_path / "submission" / "hw5.zip").write_bytes(b"")
    result = grade.grade(str(tmp_path / "submission"), str(tmp_path / "results.json"), POINTS)
    assert result["score"] == 0 and result["tests"] == []
    assert result["output"].startswith("found none of cent_sgd.py") and "upload" in result["output"]


# ----------------------------------------------------------------------------- grading

def graded(folder, results, only=None, timeout=600):
    """Grade `folder` into the file `results`; return {check name: (score, max_score, output)}
    and the results."""
    result = grade.grade(str(folder), str(results), POINTS, only, timeout)
    assert json.loads(results.read_text()) == result
    return by_check(result), result


def by_check(result):
    return {grade.heading(t)[1]: (t["score"], t["max_score"], t["output"])
            for t in result["tests"]}


def recorded(name):
    """bench/autograder.py's record of grading `name` (solution, handout, mutant_...): grade.py's
    results.json with its provenance."""
    with open(os.path.join(ROOT, "results", "reference", "grading", f"{name}.json")) as f:
        return json.load(f)


def scores_of(result):
    return {name: score for name, (score, _, _) in by_check(result).items()}


@pytest.mark.parametrize("check", checks.CHECKS, ids=lambda c: c.name)
def test_the_solution_passes_every_case_of(check, solution_runs):
    """Full marks, check by check, on the runs the other tests share (tests/conftest.py):
    grade.py's own scoring of the solution in this repo."""
    test = grade.score(check, solution_runs, POINTS[check.name])
    assert test["score"] == test["max_score"] and "FAIL" not in test["output"], test["output"]


@pytest.mark.slow
def test_the_zip_gives_the_solution_full_marks_where_gradescope_runs_it(tmp_path):
    """Gradescope's layout: the zip unpacked into autograder/source, its run_autograder copied to
    autograder/ and run from there, the student's files in autograder/submission, the results
    expected in autograder/results/results.json. The references come from the handout's code in
    source/. (setup.sh's environment is this one: setup.sh needs the network.)"""
    root = tmp_path / "autograder"
    package.package(str(tmp_path / "autograder.zip"))
    with zipfile.ZipFile(tmp_path / "autograder.zip") as z:
        z.extractall(root / "source")
        for info in z.infolist():  # extractall drops the modes that Gradescope keeps
            os.chmod(root / "source" / info.filename, info.external_attr >> 16 or 0o644)
    shutil.copy(root / "source" / "run_autograder", root)
    (root / "submission").mkdir()
    for name in handout.CODE:
        shutil.copy(os.path.join(ROOT, name), root / "submission")
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    proc = subprocess.run([str(root / "run_autograder")], env={**os.environ, "PATH": path},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((root / "results" / "results.json").read_text())
    assert result["score"] == 100, proc.stdout
    assert {grade.heading(t)[1] for t in result["tests"]} == set(QUESTIONS)
    assert scores_of(result) == scores_of(recorded("solution")), "stale: python bench/autograder.py"


@pytest.mark.slow
def test_the_handout_scores_zero_and_each_failure_names_its_todo(handout_dir, tmp_path):
    scores, result = graded(handout_dir, tmp_path / "results.json")
    assert scores_of(result) == scores_of(recorded("handout")), "stale: python bench/autograder.py"
    for name, (score, max_score, output) in scores.items():
        if not max_score:
            continue
        assert score == 0, (name, output)
        named = set(re.findall(r"(Q\d+): ", output))
        assert named == {QUESTIONS[name]}, (name, output)


def lost_by_question(scores):
    """{question: points lost} of one grading, over the graded questions."""
    lost = {q: 0.0 for q in sorted(GRADED)}
    for check, (score, max_score, _) in scores.items():
        if max_score:
            lost[QUESTIONS[check]] += max_score - score
    return lost


@pytest.mark.slow
def test_each_mutant_loses_points_on_its_own_question_and_no_other(tmp_path):
    """grading/mutants.py's seeded bugs; and bench/autograder.py's records of them (which
    docs/grading.md quotes) say what this code scores."""
    lost = {}
    for i, m in enumerate(mutants.MUTANTS):
        scores, _ = graded(mutants.write(m, str(tmp_path / str(i))), tmp_path / f"{i}.json")
        lost[m.label] = lost_by_question(scores)
    print("\npoints lost   " + "  ".join(f"{q:>5}" for q in sorted(GRADED)))
    for label, by_question in lost.items():
        print(f"{label:<36}" + "  ".join(f"{v:5.1f}" for v in by_question.values()))
    for m in mutants.MUTANTS:
        assert lost[m.label][m.question] > 0, (m.label, lost[m.label])
        assert all(v == 0 for q, v in lost[m.label].items() if q != m.question), (m.label, lost[m.label])
    with open(os.path.join(ROOT, "results", "reference", "grading", "run.json")) as f:
        names = [name for name in json.load(f)["gradings"] if name.startswith("mutant_")]
    records = [recorded(name) for name in names]
    assert {r["mutant"]["label"]: lost_by_question(by_check(r)) for r in records} == lost, \
        "stale: python bench/autograder.py (after removing results/reference/grading/)"


@pytest.mark.slow
def test_a_hang_costs_only_the_checks_timeout(tmp_path):
    import time
    folder = mutants.write(mutants.HANG, str(tmp_path / "hang"))
    only = {"serverless_runs", "serverless_equals_centralized", "param_server_runs"}
    t0 = time.monotonic()
    scores, _ = graded(folder, tmp_path / "results.json", only, 20)
    wall = time.monotonic() - t0
    assert scores["serverless_runs"][0] == 0 and "timed out" in scores["serverless_runs"][2]
    assert scores["serverless_equals_centralized"][0] == 0
    assert scores["param_server_runs"][0] == scores["param_server_runs"][1]  # grading went on
    assert wall < 2 * 20 + 40, wall  # two checks' timeouts, and the one run that did not hang
