#!/usr/bin/env bash
# The GPU runs, ready for the day a GPU is there, in one command that prints one table (bench/gpu.py says what
# runs): the race to 99 % eager and compiled, the default CNN pipeline with runtime.device=cuda, two-process DDP.
#   bench/gpu.sh [--mirror DIR]    on a GPU machine (about 5 minutes on an H200)
#   bench/gpu.sh --dry-run         anywhere: the same code on the CPU, tiny data (checks the script, not a GPU)
# Python: the project's environment where uv is there; else $PYTHON (default python3) with the library on
# PYTHONPATH (a GPU machine with torch, torchvision, numpy, PyYAML, Pillow and matplotlib is enough: tracking
# stays off).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu.py "$@"
