# Shared by launch/demo.sh, demo_upsample.sh and demo_inpaint.sh (sourced from the repository root).
#
#   DATA_DIR (default runs/tensorflow_datasets), TRAIN_MINUTES (default 20): shared settings
#   demo_setup                 sets $gj and $py: ./.venv (made by launch/setup_env.sh), or with
#                              SKIP_SETUP=1 the glide-jax and python already on PATH
#   demo_config CONFIG         sets $config and $prepare (extra `data prepare` flags); with QUICK=1
#                              uses CONFIG:runlocal, WORKDIR_quick and a small dataset, and returns
#                              0 so the caller can shrink its own sample counts (1 otherwise)
#   train_bounded ARGS...      `glide-jax train ARGS...` stopped after $TRAIN_MINUTES minutes
#                              (compilation included); sets $train_s to the wall-clock seconds
#   export_ema WORKDIR         writes WORKDIR/bundle from the EMA weights of the latest checkpoint
#   require_base BASE          exits with a message unless BASE is a bundle or a training workdir

DATA_DIR="${DATA_DIR:-$PWD/runs/tensorflow_datasets}"
TRAIN_MINUTES="${TRAIN_MINUTES:-20}"
export TF_CPP_MIN_LOG_LEVEL=2

demo_setup() {
  if [[ "${SKIP_SETUP:-0}" == 1 ]]; then
    gj=glide-jax; py=python
  else
    bash launch/setup_env.sh ""
    gj=.venv/bin/glide-jax; py=.venv/bin/python
  fi
}

demo_config() {
  config="$1"; prepare=()
  [[ "${QUICK:-0}" == 1 ]] || return 1
  config="$1:runlocal"
  WORKDIR="${WORKDIR%/}_quick"
  DATA_DIR="$PWD/runs/tensorflow_datasets_quick"
  prepare=(--train-examples 512 --validation-examples 64)
}

train_bounded() {
  local start rc
  start=$(date +%s)
  # On SIGTERM the trainer saves a checkpoint and exits cleanly; timeout then returns 124.
  timeout -s TERM "$((TRAIN_MINUTES * 60))" $gj train "$@" || {
    rc=$?; [[ $rc == 124 ]] || return $rc
    echo "training stopped after $TRAIN_MINUTES minutes (checkpoint saved)"; }
  train_s=$(( $(date +%s) - start ))
}

export_ema() {
  $gj export --workdir "$1" --out "$1/bundle"
}

require_base() {
  if [[ ! -f "$1/meta.json" && ! -d "$1/checkpoints" ]]; then
    echo "no base model at $1: run launch/demo.sh first (QUICK=1 for the quick one), or set BASE" >&2
    exit 1
  fi
}
