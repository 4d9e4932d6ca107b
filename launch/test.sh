#!/usr/bin/env bash
# Sets up ./.venv and runs the whole test suite on an 8-device CPU platform.
set -euo pipefail
cd "$(dirname "$0")/.."
# tpu: libtpu, so the ahead-of-time TPU compile of `glide-jax plan` is tested too (on the CPU).
bash launch/setup_env.sh test,torch,tpu
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q tests "$@"
