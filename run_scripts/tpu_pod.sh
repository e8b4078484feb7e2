#!/usr/bin/env bash
# Train on a multi-host TPU VM slice: create (or reuse) the slice, install the project with jax[tpu] on
# every worker, copy the data, launch the same `python -m train` on all workers, collect the logs.
#   bash run_scripts/tpu_pod.sh --project P --zone us-central2-b --accelerator v4-32 --name codeneo-v4 \
#       --repo https://github.com/OWNER/codeneo.git --data gs://BUCKET/codeneo-data \
#       --config configs/gpt_neo_125m.yaml --set train.max_steps=10000 [--dry-run]
# Options (flag, or environment variable):
#   --project (TPU_PROJECT)  --zone (TPU_ZONE)  --accelerator (TPU_ACCELERATOR, v4-32)  --name (TPU_NAME, codeneo)
#   --version (TPU_VERSION, tpu-ubuntu2204-base)  --repo (CODENEO_REPO: git URL or local folder to copy)
#   --ref (CODENEO_REF, main)  --data (CODENEO_DATA: gs:// bucket or local folder; copied to ~/codeneo/data)
#   --tokenizer (CODENEO_TOKENIZER: gs:// or local folder; copied to ~/codeneo/artifacts/tokenizer)
#   --config (configs/gpt_neo_125m.yaml)  --set KEY=VALUE (repeatable)  --logs DIR (runs/tpu_logs)
#   --spot (preemptible slice)  --skip-create  --skip-install  --dry-run (print every command, run nothing)
# JAX finds the other workers itself on a TPU VM (train/distributed.py auto-detects TPU_WORKER_HOSTNAMES).
set -euo pipefail
project="${TPU_PROJECT:-}"; zone="${TPU_ZONE:-}"; accel="${TPU_ACCELERATOR:-v4-32}"; name="${TPU_NAME:-codeneo}"
version="${TPU_VERSION:-tpu-ubuntu2204-base}"; repo="${CODENEO_REPO:-}"; ref="${CODENEO_REF:-main}"
data="${CODENEO_DATA:-}"; tokenizer="${CODENEO_TOKENIZER:-}"; config="configs/gpt_neo_125m.yaml"
logs="runs/tpu_logs"; spot=0; skip_create=0; skip_install=0; dry_run=0; sets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accel="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --tokenizer) tokenizer="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --set) sets+=("$2"); shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --skip-create) skip_create=1; shift ;;
    --skip-install) skip_install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
for v in project zone repo; do
  [[ -n "${!v}" ]] || { echo "tpu_pod.sh: --$v is required" >&2; exit 2; }
done

run() {  # print (dry run) or run one command
  if [[ $dry_run == 1 ]]; then local line; line=$(printf '%q ' "$@"); echo "${line% }"; else "$@"; fi
}
tpu=(gcloud compute tpus tpu-vm)
where=(--project="$project" --zone="$zone")
ssh_all() { run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$1"; }

# 1. create or reuse the slice
if [[ $skip_create == 0 ]]; then
  if [[ $dry_run == 0 ]] && "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
    echo "tpu_pod.sh: reusing TPU VM $name"
  else
    create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accel" --version="$version")
    [[ $spot == 1 ]] && create+=(--spot)
    run "${create[@]}"
  fi
fi

# 2. the code and jax[tpu] on every worker
if [[ $skip_install == 0 ]]; then
  if [[ -d "$repo" ]]; then
    run tar -C "$repo" --exclude=.git --exclude=runs --exclude=data -czf /tmp/codeneo-src.tar.gz .
    run "${tpu[@]}" scp /tmp/codeneo-src.tar.gz "$name":/tmp/codeneo-src.tar.gz "${where[@]}" --worker=all
    ssh_all "mkdir -p ~/codeneo && tar -C ~/codeneo -xzf /tmp/codeneo-src.tar.gz"
  else
    ssh_all "rm -rf ~/codeneo && git clone --depth 1 --branch $ref $repo ~/codeneo"
  fi
  ssh_all "cd ~/codeneo && python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip && ~/venv/bin/pip install -q 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html && ~/venv/bin/pip install -q ."
fi

# 3. the data (and tokenizer) on every worker
copy_to_workers() {  # $1 source (gs:// or local folder), $2 destination under ~/codeneo
  if [[ "$1" == gs://* ]]; then
    ssh_all "mkdir -p ~/codeneo/$2 && gcloud storage cp -r '$1/*' ~/codeneo/$2/"
  else
    run "${tpu[@]}" scp --recurse "$1" "$name":codeneo/"$2" "${where[@]}" --worker=all
  fi
}
[[ -n "$data" ]] && copy_to_workers "$data" data
[[ -n "$tokenizer" ]] && copy_to_workers "$tokenizer" artifacts/tokenizer

# 4. the same command on all workers; each worker logs to ~/codeneo/train.log, streamed here
train_cmd="cd ~/codeneo && ~/venv/bin/python -m train --config $config"
for s in "${sets[@]+"${sets[@]}"}"; do train_cmd+=" --set $s"; done
run mkdir -p "$logs"
ssh_all "$train_cmd 2>&1 | tee ~/codeneo/train.log"

# 5. collect every worker's log
run "${tpu[@]}" scp "$name":codeneo/train.log "$logs/" "${where[@]}" --worker=all
