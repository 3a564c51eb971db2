"""HW5.ipynb runs top to bottom, its Q6 formulas match measured bytes, its answers match its outputs.

    pytest -q -m slow tests/test_notebook.py   # executes the notebook: slow tier
    pytest -q tests/test_notebook.py           # the committed answers against the committed outputs

The notebook runs in quick mode (HW5_QUICK=1): every script trains one epoch (or round) on
synthetic data and writes to a scratch folder, so results/ and figures/ are left alone. The
kernel is `python3`, which jupyter_client starts with this interpreter (sys.executable), so the
notebook sees this environment.
"""
import os
import re
from unittest import mock

import nbformat
import pytest
from nbclient import NotebookClient

from mpi import ROOT, TEST_ENV

NOTEBOOK = os.path.join(ROOT, "HW5.ipynb")


def tagged(nb, tag):
    cells = [cell for cell in nb.cells if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def stdout(cell):
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.output_type == "stream")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The notebook, executed in quick mode; a cell that raises fails every test that uses it."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": ROOT}})
    # TMPDIR: the notebook's scratch folders go under pytest's, which cleans them up
    env = dict(TEST_ENV, HW5_QUICK="1", TMPDIR=str(tmp_path_factory.mktemp("notebook")))
    with mock.patch.dict(os.environ, env):
        client.execute()  # raises CellExecutionError, with the cell and its traceback
    return nb


@pytest.mark.slow
def test_notebook_runs_in_quick_mode(quick_run):
    code_cells = [cell for cell in quick_run.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)
    for q in range(1, 6):
        assert re.search(rf"Q{q} final test accuracy: \d+\.\d\d% \(synthetic",
                         stdout(tagged(quick_run, f"result-q{q}"))), f"Q{q}"


@pytest.mark.slow
def test_q6_formulas_match_measured_bytes(quick_run):
    # The cell asserts this itself; here the table it printed is checked row by row too.
    rows = [line for line in stdout(tagged(quick_run, "q6-check")).splitlines()[1:] if line.strip()]
    assert len(rows) == 5, rows
    assert all(row.endswith("✓") for row in rows), rows


def test_committed_answers_match_committed_outputs():
    """Each answer's accuracy is the one its result cell printed from the JSON of a full CIFAR-10 run."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for q in range(1, 6):
        printed = stdout(tagged(nb, f"result-q{q}"))
        found = re.search(rf"Q{q} final test accuracy: (\d+\.\d\d%) \((\w+)", printed)
        assert found, f"Q{q}: the committed notebook has no output for its result cell"
        accuracy, dataset = found.groups()
        assert dataset == "cifar10", f"Q{q}: committed outputs come from a {dataset} run, not CIFAR-10"
        answer = tagged(nb, f"answer-q{q}").source
        assert f"**{accuracy}**" in answer, f"Q{q}: the answer does not state {accuracy}:\n{answer}"
