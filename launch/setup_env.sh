#!/usr/bin/env bash
# Creates ./.venv (Python 3.11+) and installs glide-jax with the given extras (default: test,torch).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1-test,torch}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch is all the `torch` extra needs (reading and writing .pt files).
if [[ "$extras" == *torch* ]]; then
  .venv/bin/python -m pip install -q -c launch/constraints-cpu.txt torch
fi
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -c launch/constraints-cpu.txt -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -c launch/constraints-cpu.txt -e .
fi
