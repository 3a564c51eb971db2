"""Every measured number in README.md, HW5.ipynb and bench/RESULTS.md equals the committed records.

    pytest -q tests/test_records.py

The records are the reference run's JSON in results/reference/ (`python bench/reference.py`: the
seed runs, the bench and a full run of HW5.ipynb); `python bench/report.py` writes the numbers from
them. Fast: nothing runs.
"""
import json
import os
import re

import nbformat
import pytest

from mpi import ROOT, bench_module

RECORDS = os.path.join(ROOT, "results", "reference")


report = bench_module("report")


def record(name):  # a record of the notebook's run
    with open(os.path.join(RECORDS, "notebook", f"{name}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("path", [*report.markdown_pages(), report.NOTEBOOK],
                         ids=[os.path.relpath(p, ROOT) for p in [*report.markdown_pages(), report.NOTEBOOK]])
def test_generated_numbers_equal_the_records(path):
    current, text = report.generated(RECORDS)[path]
    assert current == text, f"{os.path.basename(path)} differs from the records: run `python bench/report.py`"


def test_bench_results_md_is_rendered_from_its_records():
    with open(report.RESULTS_MD) as f:
        committed = f.read()
    rendered = report.render_results(os.path.join(RECORDS, "bench"), os.path.dirname(report.RESULTS_MD))
    assert committed == rendered, "bench/RESULTS.md differs from its records: run `python bench/run.py --render-only`"


def test_check_fails_with_a_diff_on_a_changed_number(tmp_path, monkeypatch):
    # the same check on a copy whose README carries one number the records do not hold
    with open(report.README) as f:
        readme = f.read()
    name = "results-table"
    changed = re.sub(rf"(<!-- begin: {name} -->.*?\*\*)\d+\.\d\d%", r"\g<1>12.34%", readme, count=1, flags=re.S)
    assert changed != readme
    (tmp_path / "README.md").write_text(changed)
    monkeypatch.setattr(report, "README", str(tmp_path / "README.md"))
    current, text = report.generated(RECORDS)[str(tmp_path / "README.md")]
    assert current != text and "12.34%" in current and "12.34%" not in text


def test_notebook_result_cells_print_the_records_accuracy():
    nb = nbformat.read(report.NOTEBOOK, as_version=4)
    names = {1: "cent_sgd", 2: "dist_sgd_serverless", 3: "dist_sgd_param_server", 4: "fed_avg_iid",
             5: "fed_avg_non-iid"}
    for q, name in names.items():
        (cell,) = [c for c in nb.cells if f"result-q{q}" in c.metadata.get("tags", [])]
        printed = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")
        found = re.search(rf"Q{q} final test accuracy: (\d+\.\d\d)% \((\w+)", printed)
        assert found, f"Q{q}: the committed notebook has no output for its result cell"
        r = record(name)
        assert found[1] == f"{r['final_test_acc']:.2f}", f"Q{q}: printed {found[1]}%, the record holds " \
                                                           f"{r['final_test_acc']:.2f}%"
        assert found[2] == r["config"]["dataset"], f"Q{q}: printed {found[2]}, the record says {r['config']['dataset']}"


def test_records_are_small():
    sizes = {os.path.relpath(os.path.join(d, f), RECORDS): os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(RECORDS) for f in files}
    # JSON, and bench/timeline.py's traces, which --trace writes gzip-compressed
    assert sizes and all(f.endswith(".json") or f.startswith("timeline/") and f.endswith(".json.gz")
                         for f in sizes), sorted(sizes)
    assert max(sizes.values()) < 64_000, max(sizes.items(), key=lambda kv: kv[1])


def test_no_reference_record_is_a_smoke_test():
    assert report.smoke_test_records(RECORDS) == [], "rerun them: python bench/reference.py"


def test_the_report_refuses_smoke_test_records(tmp_path):
    import shutil
    shutil.copytree(RECORDS, tmp_path / "records")
    run = tmp_path / "records" / "bench" / "run.json"
    run.write_text(json.dumps(dict(json.loads(run.read_text()), tiny=True)))
    with pytest.raises(SystemExit, match="smoke-test"):
        report.generated(str(tmp_path / "records"))


def test_a_smoke_test_cannot_write_into_the_reference():
    from mpi import python
    proc = python("bench/run.py", "--tiny", "--out", os.path.join(RECORDS, "bench"))
    assert proc.returncode == 2 and "never go into results/reference" in proc.stderr, proc.stderr
