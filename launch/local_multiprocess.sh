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
# Options may come anywhere on the line; any other argument must be a train
# flag (--config=, --config.KEY=, --workdir=, --debug) or come after `--` (with
# --module other than vimjax.train, unknown --flags go to that module). Before
# starting anything the config is checked for N x K devices (python -m
# vimjax.check_config), in the current directory.
#
# Options:
#   --devices_per_process=K  fake CPU devices per process (default 1)
#   --port=P                 coordinator port (default 12355)
#   --log_dir=DIR            logs of processes 1..N-1 (default: a new temp dir)
#   --module=M               python module to run (default vimjax.train)
#   --python=PY              interpreter (default: $PYTHON, else this checkout's
#                            .venv/bin/python, else python3)
#   --novalidate             skip the config check
#   --dry_run                check the config, print the commands, run nothing
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/launch/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

devices=1
port=12355
log_dir=""
module=vimjax.train
python_bin="${PYTHON:-$(local_python)}"
dry_run=0
validate=1
num=""
train_args=()
for arg in "$@"; do  # --module decides which unknown --flags are the module's.
  [[ $arg != -- ]] || break
  [[ $arg != --module=* ]] || module="${arg#*=}"
done
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices_per_process=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --python=*) python_bin="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --novalidate) validate=0 ;;
    -h|--help) usage ;;
    --) shift; train_args+=("$@"); break ;;
    --*) if is_train_flag "$1" || [[ $module != vimjax.train ]]; then train_args+=("$1")
         else unknown_argument "$1"; fi ;;
    *) if [[ -z "$num" ]]; then num="$1"; else
         echo "Unexpected argument $1 (N is $num; train flags are --name=value)." >&2; usage; fi ;;
  esac
  shift
done
[[ -n "$num" ]] || { echo "Missing N, the number of processes." >&2; usage; }
for value in "$num" "$devices" "$port"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "Expected a positive integer, got '$value'." >&2; usage; }
done

if [[ $validate == 1 && $module == vimjax.train ]]; then
  check_config "$python_bin" "$PWD" $((num * devices)) "$num" -- ${train_args[@]+"${train_args[@]}"}
fi

# This script owns the device count: drop any inherited one.
xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/^ +//; s/ +$//' <<< "${XLA_FLAGS:-}")"
xla_flags="${xla_flags:+${xla_flags} }--xla_force_host_platform_device_count=${devices}"
command_for() {  # Sets `cmd` to process $1's command line.
  cmd=(env JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
       "XLA_FLAGS=${xla_flags}"
       "$python_bin" -m "$module" "--coordinator_address=localhost:${port}"
       "--num_processes=${num}" "--process_id=$1" ${train_args[@]+"${train_args[@]}"})
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
