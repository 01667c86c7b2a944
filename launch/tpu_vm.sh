#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice), with gcloud.
#
#   launch/tpu_vm.sh [options] create
#   launch/tpu_vm.sh [options] setup
#   launch/tpu_vm.sh [options] train --config=configs/vitvqgan.py:base --workdir=gs://BUCKET/vq_b [--config.KEY=VALUE ...]
#   launch/tpu_vm.sh [options] logs
#   launch/tpu_vm.sh [options] stop
#   launch/tpu_vm.sh [options] delete
#
# Steps:
#   create  creates the slice (gcloud compute tpus tpu-vm create).
#   setup   copies this checkout (without .git/.venv) to ~/vimjax on every worker
#           and installs it with the [tpu] extra into ~/vimjax_venv.
#   train   starts `python -m vimjax.train --distributed ARGS` on every worker
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
# Options (before the step):
#   --project=ID            GCP project (default: gcloud's configured one)
#   --zone=ZONE             e.g. us-central2-b (required)
#   --accelerator_type=T    e.g. v4-8, v4-32, v5litepod-16, v6e-8 (default v4-8)
#   --version=V             TPU VM runtime (default tpu-ubuntu2204-base, for v4;
#                           v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
#   --name=NAME             slice name (default vimjax)
#   --spot                  create a Spot (preemptible) slice
#   --worker=N              worker whose log `logs` streams (default 0)
#   --module=M              python module `train` runs (default vimjax.train;
#                           vimjax.sweep runs several sweep trials on the slice)
#   --no_follow             `train` starts the job and does not stream its log
#   --dry_run               print the commands, run nothing
set -euo pipefail

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
    -h|--help) usage ;;
    --*) echo "Unknown option $1 (options come before the step)." >&2; usage ;;
    *) break ;;
  esac
  shift
done
[[ $# -ge 1 ]] || { echo "Missing the step (create, setup, train, logs, stop or delete)." >&2; usage; }
step="$1"
shift
[[ -n "$zone" ]] || { echo "--zone is required (e.g. --zone=us-central2-b)." >&2; usage; }
[[ "$worker" =~ ^[0-9]+$ ]] || { echo "--worker=$worker must be a worker index (0, 1, ...)." >&2; usage; }

where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Expanded by the workers' shell.
remote_dir='$HOME/vimjax'
venv='$HOME/vimjax_venv'
log='$HOME/vimjax_train.log'

quote() {  # One shell word, single-quoted unless it is plain.
  if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s' "$1"; else
    printf "'%s'" "${1//\'/\'\\\'\'}"; fi
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
  train)
    [[ $module != vimjax.train || " $* " == *" --config="* ]] || {
      echo "train needs --config=FILE[:variant]." >&2; usage; }
    [[ " $* " == *" --workdir="* ]] || { echo "train needs --workdir=gs://..." >&2; usage; }
    [[ " $* " == *" --workdir=gs://"* ]] || echo "Warning: --workdir is not gs://; every worker" \
      "must see the same directory for checkpoints and resume." >&2
    args=""
    for arg in "$@"; do args+=" $(printf '%q' "$arg")"; done
    # Detached, so a dropped ssh connection does not stop training; the pid file lets `stop` find it.
    ssh_all "cd $remote_dir && (setsid nohup $venv/bin/python -m $module --distributed$args \
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
    echo "Unknown step '$step'; valid: create, setup, train, logs, stop, delete." >&2
    usage
    ;;
esac
