#!/usr/bin/env bash
# Deduplicate on a Spark standalone or YARN cluster with spark-submit: zip data_processing/ as
# --py-files, submit run_scripts/dedup_spark_job.py (= python -m data_processing.dedup --engine spark).
#   bash run_scripts/dedup_spark_submit.sh --config configs/dedup_spark.env [--dry-run]
#   bash run_scripts/dedup_spark_submit.sh --master spark://HOST:7077 --input hdfs:///corpus \
#       --output hdfs:///corpus-dedup [--threshold 0.85] [-- --skip-bad --num-perm 128]
# Settings (flag, or KEY in the --config file / environment):
#   --config FILE (shell KEY=VALUE file)   --master (SPARK_MASTER)   --deploy-mode (SPARK_DEPLOY_MODE, client)
#   --input (DEDUP_INPUT)  --output (DEDUP_OUTPUT)  --threshold (DEDUP_THRESHOLD, 0.85)
#   --driver-memory (SPARK_DRIVER_MEMORY, 2g)  --executor-memory (SPARK_EXECUTOR_MEMORY)
#   --executor-cores (SPARK_EXECUTOR_CORES)  --num-executors (SPARK_NUM_EXECUTORS)
#   --python (SPARK_PYTHON, python3: the executors' interpreter; needs numpy, zstandard, pyarrow, tqdm)
#   --conf KEY=VALUE (repeatable; SPARK_CONF="K=V K=V")  --spark-submit (SPARK_SUBMIT, spark-submit)
#   --dry-run (print every command, run nothing)   -- ARGS (passed on to data_processing.dedup)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/run_scripts/spark_common.sh"
load_config "dedup_spark_submit.sh" "$@"
master="${SPARK_MASTER:-}"; deploy="${SPARK_DEPLOY_MODE:-client}"; input="${DEDUP_INPUT:-}"
output="${DEDUP_OUTPUT:-}"; threshold="${DEDUP_THRESHOLD:-0.85}"; driver_mem="${SPARK_DRIVER_MEMORY:-2g}"
exec_mem="${SPARK_EXECUTOR_MEMORY:-}"; exec_cores="${SPARK_EXECUTOR_CORES:-}"; n_exec="${SPARK_NUM_EXECUTORS:-}"
python="${SPARK_PYTHON:-python3}"; submit="${SPARK_SUBMIT:-spark-submit}"; confs=()
read -r -a confs <<< "${SPARK_CONF:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) shift 2 ;;
    --master) master="$2"; shift 2 ;;
    --deploy-mode) deploy="$2"; shift 2 ;;
    --input) input="$2"; shift 2 ;;
    --output) output="$2"; shift 2 ;;
    --threshold) threshold="$2"; shift 2 ;;
    --driver-memory) driver_mem="$2"; shift 2 ;;
    --executor-memory) exec_mem="$2"; shift 2 ;;
    --executor-cores) exec_cores="$2"; shift 2 ;;
    --num-executors) n_exec="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --conf) confs+=("$2"); shift 2 ;;
    --spark-submit) submit="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "dedup_spark_submit.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
require dedup_spark_submit.sh master input output

zip="${TMPDIR:-/tmp}/codeneo-dedup-$$.zip"
run python3 "$ROOT/run_scripts/pack_py_files.py" "$zip"
cmd=("$submit" --master "$master" --deploy-mode "$deploy" --name codeneo-dedup --py-files "$zip"
     --driver-memory "$driver_mem" --conf "spark.pyspark.python=$python")
[[ -n "$exec_mem" ]] && cmd+=(--executor-memory "$exec_mem")
[[ -n "$exec_cores" ]] && cmd+=(--executor-cores "$exec_cores")
[[ -n "$n_exec" ]] && cmd+=(--num-executors "$n_exec")
for c in "${confs[@]+"${confs[@]}"}"; do cmd+=(--conf "$c"); done
cmd+=("$ROOT/run_scripts/dedup_spark_job.py" --input "$input" --output "$output" --threshold "$threshold")
run "${cmd[@]}" "${EXTRA[@]+"${EXTRA[@]}"}"
run rm -f "$zip"
