"""The ring and tree all-reduce check, which the grader runs too, lives in
grading/allreduce_check.py; this path keeps working for the tests and tests/compression_check.py.

    mpirun -n 5 python -m mpi4py tests/allreduce_check.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grading.allreduce_check import expected_ring, expected_tree, main  # noqa: E402,F401

if __name__ == "__main__":
    main()
