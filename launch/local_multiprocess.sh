#!/usr/bin/env bash
# A stand-in pod on one machine: N CPU processes on loopback, gloo collectives.
#
#   launch/local_multiprocess.sh [options] N [train args...]
#   launch/local_multiprocess.sh 2 --config=configs/vitvqgan.py:tiny --workdir=/tmp/vq_2proc
#
# Runs `python -m vimjax.train --coordinator_address=localhost:PORT
# --num_processes=N --process_id=I [train args...]` for I = 0..N-1, each process
# with --devices_per_process fake CPU devices. Process 0's output goes to the
# terminal, the others' to LOG_DIR/process_I.log. If one process fails the
# others are stopped (SIGTERM, then SIGKILL after 60 s). Ctrl-C / SIGTERM is
# forwarded to all of them: they save a checkpoint at one step and exit;
# re-running the same command resumes.
#
# Options:
#   --devices_per_process=K  fake CPU devices per process (default 1)
#   --port=P                 coordinator port (default 12355)
#   --log_dir=DIR            logs of processes 1..N-1 (default: a new temp dir)
#   --module=M               python module to run (default vimjax.train)
#   --python=PY              interpreter (default: $PYTHON or python)
#   --dry_run                print the commands, run nothing
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

devices=1
port=12355
log_dir=""
module=vimjax.train
python_bin="${PYTHON:-python}"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices_per_process=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --python=*) python_bin="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage ;;
    --*) echo "Unknown option $1 (options come before N)." >&2; usage ;;
    *) break ;;
  esac
  shift
done
[[ $# -ge 1 ]] || { echo "Missing N, the number of processes." >&2; usage; }
num="$1"
shift
for value in "$num" "$devices" "$port"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "Expected a positive integer, got '$value'." >&2; usage; }
done

train_args=("$@")
# This script owns the device count: drop any inherited one.
xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/^ +//; s/ +$//' <<< "${XLA_FLAGS:-}")"
xla_flags="${xla_flags:+${xla_flags} }--xla_force_host_platform_device_count=${devices}"
command_for() {  # Sets `cmd` to process $1's command line.
  cmd=(env JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
       "XLA_FLAGS=${xla_flags}"
       "$python_bin" -m "$module" "--coordinator_address=localhost:${port}"
       "--num_processes=${num}" "--process_id=$1" ${train_args[@]+"${train_args[@]}"})
}

quote() {  # One shell word, single-quoted unless it is plain.
  if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s' "$1"; else
    printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < num; i++)); do
    command_for "$i"
    for word in "${cmd[@]}"; do printf '%s ' "$(quote "$word")"; done
    if ((i > 0)); then echo "> ${log_dir:-LOG_DIR}/process_${i}.log 2>&1 &"; else echo "&"; fi
  done
  echo "wait"
  exit 0
fi

[[ -n "$log_dir" ]] || log_dir="$(mktemp -d -t vimjax_local_XXXXXX)"
mkdir -p "$log_dir"
pids=()
set -m  # Children in their own process groups: a terminal Ctrl-C reaches only this script.
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'echo "Forwarding the signal to all processes." >&2; stop_all' INT TERM
for ((i = 0; i < num; i++)); do
  command_for "$i"
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" > "${log_dir}/process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done
echo "Started ${num} processes (pids ${pids[*]}); logs of processes 1..$((num - 1)) in ${log_dir}." >&2

# Poll rather than `wait -n` so a forwarded signal does not end the wait early.
status=0
kill_at=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  if ((kill_at > 0 && SECONDS >= kill_at)); then
    # Survivors of a failed peer can block in a collective forever.
    echo "Killing the remaining processes (${running[*]})." >&2
    for pid in "${running[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    kill_at=0
  fi
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    set +e; wait "$pid"; rc=$?; set -e
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "Process pid ${pid} exited with status ${rc}; stopping the others (logs in ${log_dir})." >&2
      stop_all
      kill_at=$((SECONDS + 60))
    fi
  done
  running=(${still[@]+"${still[@]}"})
  ((${#running[@]} == 0)) || sleep 0.5
done
exit "$status"
