#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice), with gcloud.
#
#   launch/tpu_vm.sh [options] check --config=configs/vitvqgan.py:base --workdir=gs://BUCKET/vq_b [--config.KEY=VALUE ...]
#   launch/tpu_vm.sh [options] create
#   launch/tpu_vm.sh [options] setup
#   launch/tpu_vm.sh [options] train --config=configs/vitvqgan.py:base --workdir=gs://BUCKET/vq_b [--config.KEY=VALUE ...]
#   launch/tpu_vm.sh [options] logs
#   launch/tpu_vm.sh [options] stop
#   launch/tpu_vm.sh [options] delete
#
# Steps:
#   check   checks the train arguments' config on this machine for the slice's
#           device count (python -m vimjax.check_config; `train` does it too):
#           run it before `create`, so a bad config costs no slice time.
#   create  creates the slice (gcloud compute tpus tpu-vm create).
#   setup   copies this checkout (without .git/.venv) to ~/vimjax on every worker
#           and installs it with the [tpu] extra into ~/vimjax_venv.
#   train   checks the config locally (as `check`), then starts
#           `python -m vimjax.train --distributed ARGS` on every worker
#           (detached; log in ~/vimjax_train.log on each), then streams worker
#           0's log (Ctrl-C stops streaming, not training; --no_follow returns
#           at once, as a sweep starting many slices wants). Re-running the same
#           command resumes from the latest checkpoint in --workdir, which must
#           be shared by all workers: use gs://.
#   logs    streams the log of --worker (default 0).
#   stop    sends SIGTERM to training on every worker: they save a checkpoint
#           at the same step and exit.
#   delete  deletes the slice.
#
# Options (anywhere on the line; any other argument must be a train flag
# --config=, --config.KEY=, --workdir=, --debug, or come after `--`; with
# --module other than vimjax.train, unknown --flags go to that module):
#   --project=ID            GCP project (default: gcloud's configured one)
#   --zone=ZONE             e.g. us-central2-b (required, except by `check`)
#   --accelerator_type=T    e.g. v4-8, v4-32, v5litepod-16, v6e-8 (default v4-8)
#   --version=V             TPU VM runtime (default tpu-ubuntu2204-base, for v4;
#                           v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
#   --name=NAME             slice name (default vimjax)
#   --spot                  create a Spot (preemptible) slice
#   --worker=N              worker whose log `logs` streams (default 0)
#   --module=M              python module `train` runs (default vimjax.train;
#                           vimjax.sweep runs several sweep trials on the slice)
#   --no_follow             `train` starts the job and does not stream its log
#   --env=NAME=VALUE        environment variable for `train` on every worker
#                           (repeatable), e.g. --env=TFDS_DATA_DIR=gs://BUCKET/tfds
#   --novalidate            skip the local config check of `train`
#   --dry_run               check the config, print the commands, run nothing
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/launch/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

project=""
zone=""
accelerator_type="v4-8"
version="tpu-ubuntu2204-base"
name="vimjax"
spot=0
worker=0
module=vimjax.train
follow=1
dry_run=0
validate=1
step=""
args=()
remote_env=""
for arg in "$@"; do  # --module decides which unknown --flags are the module's.
  [[ $arg != -- ]] || break
  [[ $arg != --module=* ]] || module="${arg#*=}"
done
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project=*) project="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --name=*) name="${1#*=}" ;;
    --spot) spot=1 ;;
    --worker=*) worker="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --no_follow) follow=0 ;;
    --dry_run) dry_run=1 ;;
    --novalidate) validate=0 ;;
    --env=*=*) remote_env+=" $(printf '%q' "${1#*=}")" ;;
    -h|--help) usage ;;
    --) shift; args+=("$@"); break ;;
    --*) if is_train_flag "$1" || [[ $module != vimjax.train ]]; then args+=("$1")
         else unknown_argument "$1"; fi ;;
    *) if [[ -z "$step" ]]; then step="$1"; else
         echo "Unexpected argument $1 after the step '$step'." >&2; usage; fi ;;
  esac
  shift
done
set -- ${args[@]+"${args[@]}"}
[[ -n "$step" ]] || {
  echo "Missing the step (check, create, setup, train, logs, stop or delete)." >&2; usage; }
[[ -n "$zone" || $step == check ]] || { echo "--zone is required (e.g. --zone=us-central2-b)." >&2; usage; }
[[ "$worker" =~ ^[0-9]+$ ]] || { echo "--worker=$worker must be a worker index (0, 1, ...)." >&2; usage; }

where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")
# Expanded by the workers' shell.
remote_dir='$HOME/vimjax'
venv='$HOME/vimjax_venv'
log='$HOME/vimjax_train.log'

slice_devices() {  # JAX devices of --accelerator_type (0: unknown). v4 and v5p
  # names count TensorCores, 2 per chip, one device per chip; v5e / v6e count chips.
  local kind=${accelerator_type%-*} n=${accelerator_type##*-}
  [[ $n =~ ^[0-9]+$ ]] || { echo 0; return; }
  case "$kind" in
    v4|v5p) echo $((n / 2)) ;;
    v2|v3|v5litepod|v5e|v6e) echo "$n" ;;
    *) echo 0 ;;
  esac
}

check_train_args() {  # The train step's argument checks, then the local config check.
  [[ $module != vimjax.train || " $* " == *" --config="* ]] || {
    echo "$step needs --config=FILE[:variant]." >&2; usage; }
  [[ " $* " == *" --workdir="* ]] || { echo "$step needs --workdir=gs://..." >&2; usage; }
  [[ " $* " == *" --workdir=gs://"* ]] || echo "Warning: --workdir is not gs://; every worker" \
    "must see the same directory for checkpoints and resume." >&2
  # One process per host; the batch must divide the devices, hence the hosts too.
  if [[ $validate == 1 && $module == vimjax.train ]]; then
    check_config "$(local_python)" "$repo" "$(slice_devices)" 1 -- "$@"
  fi
}

run() {  # Prints (dry run) or runs one command.
  if [[ $dry_run == 1 ]]; then
    local sep=""
    for word in "$@"; do printf '%s%s' "$sep" "$(quote "$word")"; sep=" "; done
    echo
  else
    "$@"
  fi
}

ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"; }

case "$step" in
  create)
    [[ $# -eq 0 ]] || { echo "create takes no arguments, got: $*" >&2; usage; }
    extra=()
    [[ $spot == 0 ]] || extra+=(--spot)
    run gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
      --accelerator-type="$accelerator_type" --version="$version" ${extra[@]+"${extra[@]}"}
    ;;
  setup)
    [[ $# -eq 0 ]] || { echo "setup takes no arguments, got: $*" >&2; usage; }
    tarball="${TMPDIR:-/tmp}/vimjax-src.tar.gz"
    run tar czf "$tarball" -C "$repo" --exclude=.git --exclude=.venv --exclude='__pycache__' \
      --exclude='*.egg-info' .
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:~/vimjax-src.tar.gz" "${where[@]}" --worker=all
    ssh_all "set -e; rm -rf $remote_dir; mkdir -p $remote_dir; tar xzf ~/vimjax-src.tar.gz -C $remote_dir; \
(python3 -m venv $venv || (sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv $venv)); \
$venv/bin/pip install -q -U pip; $venv/bin/pip install -q -e \"$remote_dir[tpu]\"; \
$venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
    ;;
  check)
    [[ $module == vimjax.train ]] || { echo "check needs --module=vimjax.train." >&2; usage; }
    validate=1
    check_train_args "$@"
    ;;
  train)
    check_train_args "$@"
    args=""
    for arg in "$@"; do args+=" $(printf '%q' "$arg")"; done
    # Detached, so a dropped ssh connection does not stop training; the pid file lets `stop` find it.
    ssh_all "cd $remote_dir && (${remote_env:+env$remote_env }setsid nohup $venv/bin/python -m $module --distributed$args \
> $log 2>&1 < /dev/null & echo \$! > \$HOME/vimjax_train.pid)"
    [[ $follow == 1 ]] || exit 0
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=0 --command="tail -n +1 -F $log"
    ;;
  logs)
    [[ $# -eq 0 ]] || { echo "logs takes no arguments, got: $*" >&2; usage; }
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$worker" --command="tail -n +1 -F $log"
    ;;
  stop)
    [[ $# -eq 0 ]] || { echo "stop takes no arguments, got: $*" >&2; usage; }
    ssh_all "kill -TERM \$(cat \$HOME/vimjax_train.pid) && echo stopping"
    ;;
  delete)
    [[ $# -eq 0 ]] || { echo "delete takes no arguments, got: $*" >&2; usage; }
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
    ;;
  *)
    echo "Unknown step '$step'; valid: check, create, setup, train, logs, stop, delete." >&2
    usage
    ;;
esac
