"""The autograder (grading/, docs/grading.md): the handout is the solution with TODOs, the
solution scores full marks, the handout zero with each failure naming its TODO, each seeded bug
loses points on its own question and no other, and a hang costs one check's timeout.

    pytest -q tests/test_grading.py             # the regions, the handout, its one-line stop, the zip
    pytest -q -m slow tests/test_grading.py -s  # grading the solution, the handout, the mutants
"""
import ast
import json
import os
import re
import shutil
import zipfile

import pytest

from grading import checks, grade, handout, package
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
        assert {"setup.sh", "run_autograder", "grading/grade.py", "grading/points.toml",
                "extensions/__init__.py", "requirements.txt", *handout.CODE} <= names
        assert "raise NotImplementedError(" in z.read("fed_avg.py").decode()
        assert "/autograder/results/results.json" in z.read("run_autograder").decode()
        assert z.getinfo("run_autograder").external_attr >> 16 & 0o111


# ----------------------------------------------------------------------------- grading

def graded(folder, tmp_path, *flags):
    """Grade `folder`; return {check name: (score, max_score, output)} and the results."""
    results = tmp_path / "results.json"
    only, timeout = (flags + (None, 600))[:2]
    result = grade.grade(str(folder), str(results), POINTS, only, timeout)
    assert json.loads(results.read_text()) == result
    return {t["name"].split(":")[0].split()[1]: (t["score"], t["max_score"], t["output"])
            for t in result["tests"]}, result


@pytest.mark.slow
def test_the_solution_scores_full_marks(tmp_path):
    scores, result = graded(ROOT, tmp_path)
    assert set(scores) == set(QUESTIONS)
    assert {name: s for name, (s, m, _) in scores.items() if s != m} == {}, result
    assert result["score"] == 100


@pytest.mark.slow
def test_the_handout_scores_zero_and_each_failure_names_its_todo(handout_dir, tmp_path):
    scores, result = graded(handout_dir, tmp_path)
    for name, (score, max_score, output) in scores.items():
        if not max_score:
            continue
        assert score == 0, (name, output)
        named = set(re.findall(r"(Q\d+): ", output))
        assert named == {QUESTIONS[name]}, (name, output)


# Seeded bugs, each a text substitution in one file of a copy of the solution, and the one
# question it must cost points on.
MUTANTS = {
    "average without / N": ("Q2", "dist_sgd_serverless.py", [
        ("    flat_grads.div_(comm.Get_size())\n", "    flat_grads.div_(1)\n")]),
    "server sums, not averages": ("Q3", "dist_sgd_param_server.py", [
        ("flat_grads.copy_(inbox.sum(dim=0)).div_(len(inbox))", "flat_grads.copy_(inbox.sum(dim=0))")]),
    "server sends no weights back": ("Q3", "dist_sgd_param_server.py", [
        ("requests = [comm.Isend(buf, dest=w, tag=PARAMETERS) for w in range(1, comm.Get_size())]",
         "requests = []"),
        ("    comm.Recv(buf, source=SERVER, tag=PARAMETERS)\n", "    pass\n")]),
    "FedAvg's unweighted mean": ("Q4", "fed_avg.py", [
        ("sums[:-1] += len(fed.shards[k]) * flat_params", "sums[:-1] += flat_params"),
        ("sums[-1] += len(fed.shards[k])", "sums[-1] += 1")]),
    "a sample on two clients": ("Q5", "fed_avg.py", [
        ("                 for i in range(num_clients)]\n",
         "                 for i in range(num_clients)]\n"
         "        parts[0] = np.concatenate([parts[0], parts[1][:1]])\n")]),
    "ring chunk off by one": ("Q7", "dist_sgd_serverless.py", [
        ("send, recv = chunks[(rank - s) % n], chunks[(rank - s - 1) % n]",
         "send, recv = chunks[(rank - s + 1) % n], chunks[(rank - s - 1) % n]")]),
}
HANG = ("    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)\n",
        "    if comm.Get_rank() == 0 and comm.Get_size() > 1:  # waits for a message never sent\n"
        "        comm.Recv(buf, source=1, tag=99)\n"
        "    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)\n")


def mutant(tmp_path, name, substitutions):
    """A copy of the solution's code with `substitutions` made in file `name`."""
    folder = tmp_path / "mutant"
    folder.mkdir()
    for f in handout.CODE:
        shutil.copy(os.path.join(ROOT, f), folder)
    text = (folder / name).read_text()
    for old, new in substitutions:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (folder / name).write_text(text)
    return folder


@pytest.mark.slow
def test_each_mutant_loses_points_on_its_own_question_and_no_other(tmp_path):
    lost = {}
    for i, (label, (question, name, substitutions)) in enumerate(MUTANTS.items()):
        (tmp_path / str(i)).mkdir()
        scores, _ = graded(mutant(tmp_path / str(i), name, substitutions), tmp_path / str(i))
        lost[label] = {q: 0.0 for q in sorted(GRADED)}
        for check, (score, max_score, _) in scores.items():
            if max_score:
                lost[label][QUESTIONS[check]] += max_score - score
    print("\npoints lost   " + "  ".join(f"{q:>5}" for q in sorted(GRADED)))
    for label, by_question in lost.items():
        print(f"{label:<30}" + "  ".join(f"{v:5.1f}" for v in by_question.values()))
    for label, (question, _, _) in MUTANTS.items():
        assert lost[label][question] > 0, (label, lost[label])
        assert all(v == 0 for q, v in lost[label].items() if q != question), (label, lost[label])


@pytest.mark.slow
def test_a_hang_costs_only_the_checks_timeout(tmp_path):
    import time
    folder = mutant(tmp_path, "dist_sgd_serverless.py", [HANG])
    only = {"serverless_runs", "serverless_equals_centralized", "param_server_runs"}
    t0 = time.monotonic()
    scores, _ = graded(folder, tmp_path, only, 20)
    wall = time.monotonic() - t0
    assert scores["serverless_runs"][0] == 0 and "timed out" in scores["serverless_runs"][2]
    assert scores["serverless_equals_centralized"][0] == 0
    assert scores["param_server_runs"][0] == scores["param_server_runs"][1]  # grading went on
    assert wall < 2 * 20 + 40, wall  # two checks' timeouts, and the one run that did not hang
