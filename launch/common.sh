# Shared by the launch scripts (sourced, after they set `repo`): quoting, the
# local interpreter, which arguments are vimjax.train's, and the local config check.

quote() {  # One shell word, single-quoted unless it is plain.
  if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s' "$1"; else
    printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

local_python() {  # This checkout's virtualenv (what `make` creates), else python3.
  if [[ -x "$repo/.venv/bin/python" ]]; then
    printf '%s' "$repo/.venv/bin/python"
  else
    command -v python3 || printf 'python3'
  fi
}

is_train_flag() {  # Whether $1 is one of vimjax.train's flags (passed on to every process).
  case "$1" in
    --config=*|--config.*|--workdir=*|--debug|--nodebug|--debug=*) return 0 ;;
  esac
  return 1
}

# check_config PYTHON DIR DEVICES PROCESSES ARGS...: runs `PYTHON -m
# vimjax.check_config` on this machine, in DIR (where relative --config paths
# start), for a job of DEVICES devices (0: unknown) in PROCESSES processes;
# ARGS are `-- TRAIN_ARGS` or `--args_file=FILE`. Exits 1 on an invalid config.
check_config() {
  local python=$1 dir=$2 devices=$3 processes=$4
  shift 4
  echo "Checking the config on this machine ($python -m vimjax.check_config;" \
    "--novalidate skips it)." >&2
  if ! (cd "$dir" && env -u XLA_FLAGS JAX_PLATFORMS=cpu PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" \
        "$python" -m vimjax.check_config --slice_devices="$devices" \
        --slice_processes="$processes" "$@" > /dev/null); then
    echo "The config check failed (see the error line above); nothing was started." >&2
    exit 1
  fi
  if [[ $devices == 0 ]]; then devices="an unknown number of"; fi
  echo "Config OK for ${devices} devices in ${processes} process(es)." >&2
}

unknown_argument() {  # Refuses $1 with a one-line error and the usage.
  echo "Unknown argument $1: not an option of $(basename "$0") nor a train flag" \
    "(--config=..., --config.KEY=VALUE, --workdir=...); put other flags for the module after --." >&2
  usage
}
