#!/usr/bin/env bash
# Train on GPU nodes under SLURM: writes a batch script and submits it with sbatch.
#
#   launch/slurm_gpu.sh [options] --config=FILE[:variant] --workdir=DIR [--config.KEY=VALUE ...] [-- FLAGS]
#   launch/slurm_gpu.sh --nodes=4 --partition=gpu --config=configs/parti.py:350m --workdir=/shared/parti
#   launch/slurm_gpu.sh [options] --array_file=FILE
#
# srun starts one `python -m vimjax.train --distributed ARGS` per GPU (or per
# node with --per=node); jax.distributed.initialize() finds the coordinator,
# process count and id (0..N-1) in SLURM's environment. DIR must be on a
# filesystem every node sees. The job is requeued on preemption and gets
# SIGTERM 5 minutes before its time limit: all processes save a checkpoint at
# the same step and exit, and the requeued job resumes from it. The job runs in
# the repository root: relative paths in the train arguments start there.
#
# Options may come anywhere on the line; any other argument must be a train
# flag (--config=, --config.KEY=, --workdir=, --debug) or come after `--`.
# Before writing or submitting anything the config is checked on this machine
# for the job's device count (python -m vimjax.check_config, with the
# interpreter below): a bad config fails here, not on the nodes.
#
# --array_file=FILE submits a SLURM array job instead (what `python -m
# vimjax.sweep --launcher=slurm` writes): line I+1 of FILE holds the train
# arguments (shell words, quoted) of array task I, each task a job of the
# shape above.
#
# Options:
#   --nodes=N            nodes (default 1)
#   --gpus_per_node=G    GPUs per node (default 8)
#   --per=gpu|node       one process per GPU (default) or per node (all its GPUs)
#   --partition=P        SLURM partition (default: the cluster's)
#   --account=A          SLURM account (default: yours)
#   --time=T             time limit, e.g. 24:00:00 (default 24:00:00)
#   --job_name=NAME      job name (default vimjax)
#   --log_dir=DIR        batch script and job logs (default ./slurm_logs)
#   --array_file=FILE    one line of train arguments per array task
#   --array_parallel=M   array tasks running at once, at most (default: all)
#   --python=PY          interpreter, here and on the nodes (default: this
#                        checkout's .venv/bin/python, else python3)
#   --novalidate         skip the local config check
#   --dry_run            check the config, print the batch script and the sbatch
#                        command, write and submit nothing
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/launch/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

nodes=1
gpus=8
per=gpu
partition=""
account=""
time_limit="24:00:00"
job_name="vimjax"
log_dir="slurm_logs"
python_bin=""
array_file=""
array_parallel=""
dry_run=0
validate=1
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus="${1#*=}" ;;
    --per=*) per="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --job_name=*) job_name="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --python=*) python_bin="${1#*=}" ;;
    --array_file=*) array_file="${1#*=}" ;;
    --array_parallel=*) array_parallel="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --novalidate) validate=0 ;;
    -h|--help) usage ;;
    --) shift; train_args+=("$@"); break ;;
    *) if is_train_flag "$1"; then train_args+=("$1"); else unknown_argument "$1"; fi ;;
  esac
  shift
done
set -- ${train_args[@]+"${train_args[@]}"}
for value in "$nodes" "$gpus" ${array_parallel:+"$array_parallel"}; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "Expected a positive integer, got '$value'." >&2; usage; }
done
[[ "$per" == gpu || "$per" == node ]] || { echo "--per=$per must be gpu or node." >&2; usage; }
if [[ -n "$array_file" ]]; then
  [[ $# -eq 0 ]] || { echo "--array_file takes the train arguments from FILE, got: $*" >&2; usage; }
  [[ -s "$array_file" ]] || { echo "--array_file=$array_file is missing or empty." >&2; usage; }
  array_file="$(realpath "$array_file")"
  array_size=$(grep -c '' "$array_file")
else
  [[ " $* " == *" --config="* ]] || { echo "Missing --config=FILE[:variant]." >&2; usage; }
  [[ " $* " == *" --workdir="* ]] || { echo "Missing --workdir=DIR (on a shared filesystem)." >&2; usage; }
fi

log_dir="$(realpath -m "$log_dir")"
# The nodes see this filesystem: the same interpreter here and there.
python_bin="${python_bin:-$(local_python)}"
python_bin="$(command -v "$python_bin" || echo "$python_bin")"
train_cmd="$(quote "$python_bin") -m vimjax.train --distributed"
for arg in "$@"; do train_cmd+=" $(quote "$arg")"; done

if [[ $per == gpu ]]; then
  tasks_per_node=$gpus
  # jax picks GPU SLURM_LOCALID for each process; every task sees all the node's GPUs.
  device_env=""
else
  tasks_per_node=1
  device_env="export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))  # All GPUs in the one process."
fi
processes=$((nodes * tasks_per_node))
if [[ $validate == 1 ]]; then
  if [[ -n "$array_file" ]]; then
    check_config "$python_bin" "$repo" $((nodes * gpus)) "$processes" --args_file="$array_file"
  else
    check_config "$python_bin" "$repo" $((nodes * gpus)) "$processes" -- "$@"
  fi
fi
job_id_pattern="%j"
[[ -z "$array_file" ]] || job_id_pattern="%A_%a"  # Array job id _ task index.

script="#!/bin/bash
#SBATCH --job-name=${job_name}
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=${tasks_per_node}
#SBATCH --gpus-per-node=${gpus}
#SBATCH --time=${time_limit}
#SBATCH --output=${log_dir}/%x-${job_id_pattern}.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=TERM@300"
[[ -z "$partition" ]] || script+=$'\n'"#SBATCH --partition=${partition}"
[[ -z "$account" ]] || script+=$'\n'"#SBATCH --account=${account}"
[[ -z "$array_file" ]] ||
  script+=$'\n'"#SBATCH --array=0-$((array_size - 1))${array_parallel:+%${array_parallel}}"
launch_line="srun --kill-on-bad-exit=1 ${train_cmd}"
if [[ -n "$array_file" ]]; then
  launch_line="args=\"\$(sed -n \"\$((SLURM_ARRAY_TASK_ID + 1))p\" $(quote "$array_file"))\"
eval \"${launch_line//\"/\\\"} \$args\""
fi
script+="
# ${processes} processes (ids 0..$((processes - 1)) = SLURM_PROCID), one per ${per}.
set -euo pipefail
cd $(quote "$repo")${device_env:+
${device_env}}
${launch_line}
"

batch_file="${log_dir}/${job_name}.sbatch"
if [[ $dry_run == 1 ]]; then
  echo "# ${batch_file}:"
  printf '%s' "$script"
  echo "# submit:"
  echo "sbatch $(quote "$batch_file")"
  exit 0
fi
mkdir -p "$log_dir"
printf '%s' "$script" > "$batch_file"
sbatch "$batch_file"
echo "Logs: ${log_dir}/${job_name}-<jobid>.out (tail -f it); cancel: scancel --signal=TERM <jobid>." >&2
