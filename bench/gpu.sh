#!/usr/bin/env bash
# The four paradigms on one GPU with 4-5 ranks, CUDA MPS off and on, and the cost of staging
# through host memory, in <= 8 min on one H100 (bench/gpu.py does the work; its docstring has the details).
#
#     bash bench/gpu.sh                # results/reference/gpu/gpu.json (+ gpu.md, per-run JSON); markdown on stdout
#     bash bench/gpu.sh --dry-run      # print the commands; runs nothing, needs no GPU
#     bash bench/gpu.sh --out /tmp/g   # write elsewhere; --help for the rest
#
# Exit status:
#     0    everything measured (MPS-on runs skipped because MPS cannot start count as measured: the reason is recorded)
#     1    a run failed or timed out, or the time budget ran out before the end
#     2    a usage error
#     77   no CUDA GPU visible: nothing measured; one line says so ("skipped", as in automake's tests)
#     124  the hard 8-minute cap on the whole script ran out (the budget inside should prevent it)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# the project's venv when none is active, so that its python and the mpirun beside it are used
if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then
    PATH="$PWD/.venv/bin:$PATH"
fi
# skip Open MPI's slow probe for a libfabric network; one machine needs shared memory only
export OMPI_MCA_btl="${OMPI_MCA_btl:-^ofi}"
export PYTHONUNBUFFERED=1

# SIGTERM at 8 min lets gpu.py stop MPS and its runs; SIGKILL 20 s later if it has not
exec timeout --kill-after=20 480 python bench/gpu.py "$@"
