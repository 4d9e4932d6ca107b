#!/usr/bin/env bash
# Sets up ./.venv and runs the whole test suite on an 8-device CPU platform.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test,torch
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q tests "$@"
