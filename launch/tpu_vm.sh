#!/usr/bin/env bash
# Run glide-jax on a Cloud TPU VM slice (one or many hosts) with gcloud.
#
#   launch/tpu_vm.sh all    --tpu glide-v5p --zone us-east5-a --type v5p-128 \
#       -- glide-jax train --config configs/base.py:variant=full --workdir gs://BUCKET/base
#
# Steps (each is also a subcommand):
#   create   create the TPU VM, or reuse it if it already exists
#   setup    copy this checkout to every worker and `pip install -e .[tpu]` there
#            (or, with --package SPEC, pip install SPEC, e.g. 'glide-jax[tpu]==0.1.0')
#   run      run the command after `--` on every worker at once (--worker=all), its output
#            teed to ~/glide_logs/<run-name>.log on each worker; --detach returns at once
#   logs     copy ~/glide_logs/<run-name>.log from every worker to ./logs/<run-name>/worker<i>.log
#   delete   delete the TPU VM
#   all      create, setup, run, logs
#
# Options: --tpu NAME (or $TPU_NAME), --zone ZONE ($ZONE), --project P ($PROJECT),
#   --type ACCELERATOR_TYPE (v5p-128 = 64 chips, 4x4x4), --version RUNTIME (default by type),
#   --spot, --run-name NAME, --package SPEC, --detach, --dry-run (print the gcloud commands).
# jax.distributed finds the other hosts from the TPU metadata, so the same command runs on all.
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

step="${1:-}"; [[ -z "$step" || "$step" == -h || "$step" == --help ]] && usage 0
shift
TPU_NAME="${TPU_NAME:-}"; ZONE="${ZONE:-}"; PROJECT="${PROJECT:-}"; TYPE="${TYPE:-v5p-8}"
VERSION="${VERSION:-}"; SPOT=0; RUN_NAME="${RUN_NAME:-run-$(date +%Y%m%d-%H%M%S)}"
PACKAGE=""; DETACH=0; DRY_RUN="${DRY_RUN:-0}"; WORKERS="${WORKERS:-}"
CMD=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU_NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --run-name) RUN_NAME="$2"; shift 2 ;;
    --package) PACKAGE="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; CMD=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown option $1" >&2; usage 2 ;;
  esac
done
[[ -n "$TPU_NAME" ]] || { echo "tpu_vm.sh: --tpu NAME is required" >&2; exit 2; }
[[ -n "$ZONE" ]] || { echo "tpu_vm.sh: --zone ZONE is required" >&2; exit 2; }

if [[ -z "$VERSION" ]]; then
  case "$TYPE" in  # TPU VM runtime images (cloud.google.com/tpu/docs/runtimes)
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) echo "tpu_vm.sh: no default runtime for --type $TYPE; pass --version" >&2; exit 2 ;;
  esac
fi

GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone "$ZONE"); [[ -n "$PROJECT" ]] && LOC+=(--project "$PROJECT")

run() {  # print, then execute unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ "$DRY_RUN" == 1 ]] || "$@"
}

quote_cmd() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "${out# }"; }

do_create() {
  if [[ "$DRY_RUN" != 1 ]] && "${GCLOUD[@]}" describe "$TPU_NAME" "${LOC[@]}" >/dev/null 2>&1; then
    echo "tpu_vm.sh: reusing existing TPU VM $TPU_NAME"
    return
  fi
  local extra=(); [[ "$SPOT" == 1 ]] && extra+=(--spot)
  run "${GCLOUD[@]}" create "$TPU_NAME" "${LOC[@]}" --accelerator-type "$TYPE" --version "$VERSION" "${extra[@]}"
}

do_setup() {
  local install
  if [[ -n "$PACKAGE" ]]; then
    install="pip install --upgrade $(printf '%q' "$PACKAGE")"
  else
    local repo; repo="$(cd "$(dirname "$0")/.." && pwd)"
    local tarball=/tmp/glide-jax-src.tgz
    # The working tree as it is (uncommitted edits included), without git data or caches.
    run tar -C "$repo" --exclude=.git --exclude='__pycache__' --exclude='*.egg-info' -czf "$tarball" .
    run "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME:~/glide-jax-src.tgz" --worker=all "${LOC[@]}"
    install="rm -rf ~/glide-jax && mkdir -p ~/glide-jax && tar -xzf ~/glide-jax-src.tgz -C ~/glide-jax && cd ~/glide-jax && pip install -e '.[tpu]'"
  fi
  run "${GCLOUD[@]}" ssh "$TPU_NAME" --worker=all "${LOC[@]}" --command "$install"
}

do_run() {
  [[ ${#CMD[@]} -gt 0 ]] || { echo "tpu_vm.sh: give the command after --" >&2; exit 2; }
  local cmd; cmd="$(quote_cmd "${CMD[@]}")"
  local log="~/glide_logs/$RUN_NAME.log"
  local remote="mkdir -p ~/glide_logs && cd ~/glide-jax 2>/dev/null || true; "
  if [[ "$DETACH" == 1 ]]; then
    remote+="nohup bash -c $(printf '%q' "$cmd") > $log 2>&1 < /dev/null &"
  else
    remote+="set -o pipefail; bash -c $(printf '%q' "$cmd") 2>&1 | tee $log"
  fi
  run "${GCLOUD[@]}" ssh "$TPU_NAME" --worker=all "${LOC[@]}" --command "$remote"
}

worker_count() {
  if [[ -n "$WORKERS" ]]; then echo "$WORKERS"; return; fi
  if [[ "$DRY_RUN" == 1 ]]; then echo 1; return; fi
  "${GCLOUD[@]}" describe "$TPU_NAME" "${LOC[@]}" --format=json \
    | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("networkEndpoints", [])) or 1)'
}

do_logs() {
  local n; n="$(worker_count)"
  [[ "$DRY_RUN" == 1 ]] || mkdir -p "logs/$RUN_NAME"
  local i
  for ((i = 0; i < n; i++)); do
    run "${GCLOUD[@]}" scp "$TPU_NAME:~/glide_logs/$RUN_NAME.log" "logs/$RUN_NAME/worker$i.log" --worker="$i" "${LOC[@]}" || true
  done
  echo "tpu_vm.sh: logs in logs/$RUN_NAME/"
}

do_delete() { run "${GCLOUD[@]}" delete "$TPU_NAME" "${LOC[@]}" --quiet; }

case "$step" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  logs) do_logs ;;
  delete) do_delete ;;
  all) do_create; do_setup; status=0; do_run || status=$?; [[ "$DETACH" == 1 ]] || do_logs; exit "$status" ;;
  *) echo "tpu_vm.sh: unknown step $step" >&2; usage 2 ;;
esac
