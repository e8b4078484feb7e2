# Shared by dedup_spark_submit.sh and dedup_dataproc.sh (sourced): the --config file, required
# settings, and --dry-run.
DRY_RUN=0
EXTRA=()

load_config() {  # $1 script name, then the script's arguments: source the file after --config
  local name="$1"; shift
  while [[ $# -gt 0 ]]; do
    if [[ "$1" == "--config" ]]; then
      [[ -f "${2:-}" ]] || { echo "$name: --config ${2:-}: no such file" >&2; exit 2; }
      set -a; # shellcheck disable=SC1090
      source "$2"; set +a
      return
    fi
    [[ "$1" == "--" ]] && return
    shift
  done
}

require() {  # $1 script name, then variable names that must be set
  local name="$1" v; shift
  for v in "$@"; do
    [[ -n "${!v}" ]] || { echo "$name: --${v//_/-} is required (flag or config file)" >&2; exit 2; }
  done
}

run() {  # print (dry run) or run one command
  if [[ $DRY_RUN == 1 ]]; then local line; line=$(printf '%q ' "$@"); echo "${line% }"; else "$@"; fi
}
