#!/usr/bin/env bash
# Deduplicate on Google Cloud Dataproc: optionally create the cluster (image 3.0: Spark 4, Java 17),
# zip data_processing/ as --py-files and submit run_scripts/dedup_spark_job.py with
# `gcloud dataproc jobs submit pyspark` (= python -m data_processing.dedup --engine spark).
#   bash run_scripts/dedup_dataproc.sh --config configs/dedup_spark.env [--create-cluster] [--dry-run]
#   bash run_scripts/dedup_dataproc.sh --project P --region us-central1 --cluster C \
#       --input gs://B/corpus --output gs://B/corpus-dedup [-- --skip-bad]
# Settings (flag, or KEY in the --config file / environment):
#   --config FILE  --project (DATAPROC_PROJECT)  --region (DATAPROC_REGION)  --cluster (DATAPROC_CLUSTER)
#   --input (DEDUP_INPUT)  --output (DEDUP_OUTPUT)  --threshold (DEDUP_THRESHOLD, 0.85)
#   --properties K=V (repeatable; DATAPROC_PROPERTIES="K=V K=V": Spark settings of the job)
#   --create-cluster with --image (DATAPROC_IMAGE, 3.0)  --workers (DATAPROC_WORKERS, 2)
#   --worker-type (DATAPROC_WORKER_TYPE, n2-standard-8)  DATAPROC_PIP (packages the executors need)
#   --dry-run (print every command, run nothing)   -- ARGS (passed on to data_processing.dedup)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/run_scripts/spark_common.sh"
load_config "dedup_dataproc.sh" "$@"
project="${DATAPROC_PROJECT:-}"; region="${DATAPROC_REGION:-}"; cluster="${DATAPROC_CLUSTER:-}"
input="${DEDUP_INPUT:-}"; output="${DEDUP_OUTPUT:-}"; threshold="${DEDUP_THRESHOLD:-0.85}"
image="${DATAPROC_IMAGE:-3.0}"; workers="${DATAPROC_WORKERS:-2}"; worker_type="${DATAPROC_WORKER_TYPE:-n2-standard-8}"
pip="${DATAPROC_PIP:-zstandard==0.25.0 tqdm==4.67.1}"; create=0; props=()
read -r -a props <<< "${DATAPROC_PROPERTIES:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --region) region="$2"; shift 2 ;;
    --cluster) cluster="$2"; shift 2 ;;
    --input) input="$2"; shift 2 ;;
    --output) output="$2"; shift 2 ;;
    --threshold) threshold="$2"; shift 2 ;;
    --properties) props+=("$2"); shift 2 ;;
    --create-cluster) create=1; shift ;;
    --image) image="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --worker-type) worker_type="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "dedup_dataproc.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
require dedup_dataproc.sh project region cluster input output
where=(--project="$project" --region="$region")

# 1. (optional) a cluster whose Python has what the executors import beyond the image's numpy/pyarrow
if [[ $create == 1 ]]; then
  run gcloud dataproc clusters create "$cluster" "${where[@]}" --image-version="$image" \
    --num-workers="$workers" --worker-machine-type="$worker_type" \
    --properties="^#^dataproc:pip.packages=${pip// /,}"  # ^#^: the list itself holds commas
fi

# 2. the job: the package as --py-files, the entry script as the main file
zip="${TMPDIR:-/tmp}/codeneo-dedup-$$.zip"
run python3 "$ROOT/run_scripts/pack_py_files.py" "$zip"
cmd=(gcloud dataproc jobs submit pyspark "$ROOT/run_scripts/dedup_spark_job.py" "${where[@]}" --cluster="$cluster"
     --py-files="$zip")
if [[ ${#props[@]} -gt 0 ]]; then
  joined=$(IFS=,; echo "${props[*]}")
  cmd+=(--properties="$joined")
fi
cmd+=(-- --input "$input" --output "$output" --threshold "$threshold")
run "${cmd[@]}" "${EXTRA[@]+"${EXTRA[@]}"}"
run rm -f "$zip"
