# Shared by launch/demo.sh, demo_upsample.sh and demo_inpaint.sh (sourced, not run).
#
#   demo_setup                 sets $gj and $py: ./.venv (made by launch/setup_env.sh), or with
#                              SKIP_SETUP=1 the glide-jax and python already on PATH
#   train_bounded ARGS...      `glide-jax train ARGS...` stopped after $TRAIN_MINUTES minutes
#                              (compilation included); sets $train_s to the wall-clock seconds
#   export_ema WORKDIR         writes WORKDIR/bundle from the EMA weights of the latest checkpoint

demo_setup() {
  if [[ "${SKIP_SETUP:-0}" == 1 ]]; then
    gj=glide-jax; py=python
  else
    bash launch/setup_env.sh ""
    gj=.venv/bin/glide-jax; py=.venv/bin/python
  fi
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
