"""The documents that bench/report.py writes from the committed records, one module each:

    results_md.py        bench/RESULTS.md, whole (bench/run.py renders it too)
    readme.py            README.md's fragments
    docs_performance.py  docs/performance.md's fragments
    docs_fedavg.py       docs/fedavg.md's fragment
    notebook.py          HW5.ipynb's fragments, in its markdown cells

and what they share: records.py (loading the records), wording.py (phrases more than one document
says) and fragments.py (the <!-- begin: NAME --> ... <!-- end: NAME --> markers). It needs neither
torch nor MPI.
"""
