#!/usr/bin/env bash
# P local processes with D simulated CPU devices each, coordinated on 127.0.0.1, each running
# `python -m train TRAIN_ARGS...`. Logs go to LOG_DIR/process_<i>.log (default runs/local_cpu_logs).
#   bash run_scripts/local_cpu.sh --processes 2 --devices 4 -- --config configs/tiny.yaml --set train.max_steps=20
# Options: --processes P (2), --devices D (4), --port N (free port), --log-dir DIR, --timeout SECONDS (0 = none),
#          --python PY (python), --dry-run (print the commands, run nothing).
set -euo pipefail
processes=2; devices=4; port=""; log_dir="runs/local_cpu_logs"; timeout_s=0; dry_run=0; py="${PYTHON:-python}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --devices) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "local_cpu.sh: unknown option $1 (train arguments go after --)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "local_cpu.sh: give the train arguments after --, e.g. -- --config configs/tiny.yaml" >&2; exit 2; }
if [[ -z "$port" ]]; then
  port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
pids=()
for ((i = 0; i < processes; i++)); do
  env_vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices"
            "CODENEO_COORDINATOR=127.0.0.1:$port" "CODENEO_NUM_PROCESSES=$processes" "CODENEO_PROCESS_ID=$i")
  cmd=(env "${env_vars[@]}")
  [[ "$timeout_s" != 0 ]] && cmd=(timeout "$timeout_s" "${cmd[@]}")
  cmd+=("$py" -m train "$@")
  if [[ $dry_run == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo "> $log_dir/process_$i.log 2>&1 &"
  else
    mkdir -p "$log_dir"
    "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
    pids+=($!)
  fi
done
[[ $dry_run == 1 ]] && exit 0
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "local_cpu.sh: process $i failed; last lines of $log_dir/process_$i.log:" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2; status=1
  fi
done
exit $status
