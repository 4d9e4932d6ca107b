#!/usr/bin/env bash
# The device check (benchmarks/device_check.py): parity tests on the accelerator, the released
# base's forward and train step in bf16 and float32 (TFLOP/s, MFU), a DPM++ 15 guided sample and
# the shapes demo's step rate, written to $OUT/device_check.json within 8 minutes.
#
#   bash benchmarks/device_check.sh --prepare   # here, with a package index: fill .wheels/
#   bash benchmarks/device_check.sh             # on the accelerator machine (OUT=folder)
#   bash benchmarks/device_check.sh --cpu       # tiny sizes on the CPU, as CI runs it
#
# The accelerator machine reaches no package index and has jax, flax, optax, orbax-checkpoint, chex,
# numpy, scipy, absl-py, PyYAML and pytest but not ml_collections (the configs need it): --prepare
# downloads its pure-Python wheel into .wheels/ (git-ignored; carry it with the working tree), and
# this script installs it from there (pip --no-index) when the interpreter cannot import it.
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
WHEELS=.wheels
# project name = import name: the small pure-Python packages the check may have to bring along.
CARRIED=(ml_collections)

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$WHEELS"
  for name in "${CARRIED[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "$name==$version"
  done
  ls -l "$WHEELS"
  exit 0
fi

missing=()
for name in "${CARRIED[@]}"; do
  "$PY" -c "import $name" 2>/dev/null || missing+=("$name")
done
if (( ${#missing[@]} )); then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "device_check: ${missing[*]} not importable and no wheels in $WHEELS (run --prepare where pip works)" >&2
    exit 2
  fi
  site=${TMPDIR:-/tmp}/glide_jax_device_check_site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" --target "$site" "${missing[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The driver keeps to its own budget (450 s; --cpu 900 s); this is the backstop.
limit=480
[[ " $* " == *" --cpu "* ]] && limit=960
exec timeout --kill-after=10 "${DEVICE_CHECK_TIMEOUT:-$limit}" "$PY" -m benchmarks.device_check "$@"
