#!/usr/bin/env bash
# One command for a GPU (issue 10): environment, build, smoke, GPU tests, sanitizers,
# benchmark and a summary, every log under one folder. The steps live in gpu_check.py;
# `bash benchmarks/gpu_check.sh --help` lists the options, benchmarks/README.md ("GPU
# check") says what each step runs and its time budget.
#
#   bash benchmarks/gpu_check.sh --out DIR                 # everything
#   bash benchmarks/gpu_check.sh --out DIR --steps bench   # one step again (then the summary)
#   bash benchmarks/gpu_check.sh --dry-run                 # no GPU: print the steps, check the scripts parse
#
# PYTHON picks the interpreter (default: python3, else python).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHON
exec "$PYTHON" "$HERE/gpu_check.py" "$@"
