#!/usr/bin/env bash
# Sets up ./.venv and runs the whole test suite on an 8-device CPU platform.
set -euo pipefail
cd "$(dirname "$0")/.."
# tpu: libtpu, so the ahead-of-time TPU compile of `glide-jax plan` is tested too (on the CPU).
bash launch/setup_env.sh test,torch,tpu
# The app's browser tests (tests/test_app_browser.py) drive Debian's chromium; as root, install it
# when missing (they skip, saying why, where it cannot be installed).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium) \
    >/dev/null || echo "launch/test.sh: could not install chromium; the browser tests will skip" >&2
fi
# jax's CUDA plugin alone (no CUDA libraries, no driver), in a folder of its own: tests/test_plan.py
# compiles the train step for GPU topologies with it. Off the venv's path, so no other test loads it.
if [ ! -d .venv/cuda-plan ]; then
  jaxv=$(.venv/bin/python -c "import jax; print(jax.__version__)")
  rm -rf .venv/cuda-plan.tmp
  if .venv/bin/python -m pip install -q --no-deps --target .venv/cuda-plan.tmp \
       "jax-cuda13-plugin==$jaxv" "jax-cuda13-pjrt==$jaxv"; then
    mv .venv/cuda-plan.tmp .venv/cuda-plan
  else
    echo "launch/test.sh: could not install jax's CUDA plugin; the GPU plan tests will skip" >&2
  fi
fi
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q --durations=25 tests "$@"
