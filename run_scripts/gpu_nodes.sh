#!/usr/bin/env bash
# Multi-node GPU training under SLURM: writes an sbatch script that runs `python -m train` with srun,
# one process per node (all its GPUs) or one per GPU, then submits it with sbatch.
#   bash run_scripts/gpu_nodes.sh --nodes 2 --gpus-per-node 8 --per gpu --partition gpu \
#       --config configs/gpt_neo_125m.yaml --set train.max_steps=10000 [--dry-run]
# Options (flag, or environment variable):
#   --nodes (2)  --gpus-per-node (8)  --per node|gpu (node)  --partition (SLURM_PARTITION)  --account (SLURM_ACCOUNT)
#   --time (24:00:00)  --job-name (codeneo)  --venv (CODENEO_VENV, .venv: a venv with `pip install 'jax[cuda12]' .`)
#   --workdir (this checkout)  --config  --set KEY=VALUE (repeatable)  --logs DIR (runs/slurm_logs)
#   --script FILE (where to write the sbatch script, LOGS/codeneo.sbatch)
#   --dry-run (print the sbatch script and the sbatch command, submit nothing)
# Inside the job JAX reads the SLURM environment itself (train/distributed.py auto-detects SLURM_NTASKS > 1).
set -euo pipefail
nodes=2; gpus=8; per=node; partition="${SLURM_PARTITION:-}"; account="${SLURM_ACCOUNT:-}"; time_limit="24:00:00"
job="codeneo"; venv="${CODENEO_VENV:-.venv}"; workdir="$(cd "$(dirname "$0")/.." && pwd)"
config="configs/gpt_neo_125m.yaml"; logs="runs/slurm_logs"; script=""; dry_run=0; sets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --per) per="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --job-name) job="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --set) sets+=("$2"); shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --script) script="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "gpu_nodes.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
case "$per" in
  node) tasks_per_node=1; gpus_per_task=$gpus ;;
  gpu) tasks_per_node=$gpus; gpus_per_task=1 ;;
  *) echo "gpu_nodes.sh: --per must be node or gpu, got $per" >&2; exit 2 ;;
esac
script="${script:-$logs/$job.sbatch}"
train_args="--config $config"
for s in "${sets[@]+"${sets[@]}"}"; do train_args+=" --set $s"; done

sbatch_text="#!/usr/bin/env bash
#SBATCH --job-name=$job
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks_per_node
#SBATCH --gpus-per-node=$gpus
#SBATCH --gpus-per-task=$gpus_per_task
#SBATCH --time=$time_limit
#SBATCH --output=$logs/%x-%j.out"
[[ -n "$partition" ]] && sbatch_text+=$'\n'"#SBATCH --partition=$partition"
[[ -n "$account" ]] && sbatch_text+=$'\n'"#SBATCH --account=$account"
sbatch_text+="
set -euo pipefail
cd $workdir
# one JAX process per task; jax.distributed.initialize reads SLURM_* (coordinator = first node)
srun --kill-on-bad-exit=1 --output=$logs/%x-%j-task%t.log $venv/bin/python -m train $train_args
"
if [[ $dry_run == 1 ]]; then
  echo "# $script"
  printf '%s' "$sbatch_text"
  echo "mkdir -p $logs"
  echo "sbatch $script"
  exit 0
fi
mkdir -p "$logs" "$(dirname "$script")"
printf '%s' "$sbatch_text" > "$script"
sbatch "$script"
