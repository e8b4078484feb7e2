#!/usr/bin/env bash
# A short fine-tuning run on the CPU, recorded in docs/finetuning.md: a tiny GPT-2 Hugging Face
# folder (random weights, the quickstart's code tokenizer) is fine-tuned with
# configs/finetune_gpt2.yaml plus language control codes, fill-in-the-middle and sliding-window
# packing, and the validation loss is printed at every evaluation. A few minutes on 2 cores.
# Needs the quickstart's corpus and tokenizer (DATA, TOK); builds them if they are missing.
# Environment: DATA (default data), TOK (artifacts/tokenizer), OUT (runs/finetune_tiny_gpt2),
# STEPS (200), EXTRA_SET (extra "--set k=v" arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
source run_scripts/setup_env.sh

DATA="${DATA:-data}"
TOK="${TOK:-artifacts/tokenizer}"
OUT="${OUT:-runs/finetune_tiny_gpt2}"
STEPS="${STEPS:-200}"
if [ ! -d "$DATA/train" ]; then python -m data_processing.prepare --out "$DATA"; fi
if [ ! -f "$TOK/tokenizer.json" ]; then
  CODENEO_ADD_TOKENS=0 bash run_scripts/tokenizer.sh "$DATA" "$TOK" 4096 20000000
fi

HF="$OUT/start"
python - "$TOK" "$HF" <<'PY'
import shutil, sys
from pathlib import Path
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
import torch

tok_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(tok_dir)
torch.manual_seed(0)
eos = tok.convert_tokens_to_ids("<|endoftext|>")
cfg = GPT2Config(vocab_size=len(tok), n_embd=128, n_layer=4, n_head=4, n_positions=256,
                 bos_token_id=eos, eos_token_id=eos)
GPT2LMHeadModel(cfg).save_pretrained(out)
for f in tok_dir.iterdir():
    if f.is_file():
        shutil.copy(f, out / f.name)
print(f"[finetune] tiny GPT-2 folder: {out} ({sum(p.numel() for p in GPT2LMHeadModel(cfg).parameters()):,} params)")
PY

warmup=$((STEPS / 5))  # Autocoder: warmup 20% of the steps
# shellcheck disable=SC2086
python -m train --config configs/finetune_gpt2.yaml --set "model.init_from=$HF" --set "run.output_dir=$OUT/run" \
  --set "data.train_dir=$DATA/train" --set "data.validation_dir=$DATA/validation" \
  --set model.compute_dtype=float32 --set data.block_size=128 --set train.per_device_batch_size=8 \
  --set "train.max_steps=$STEPS" --set "schedule.warmup_steps=$warmup" --set "schedule.decay_steps=$((STEPS - warmup))" \
  --set train.eval_every=50 --set data.eval_tokens=16384 --set train.save_every=100 --set train.log_every=25 \
  --set optimizer.learning_rate=1e-3 --set data.control_codes=true --set data.fim_rate=0.5 \
  --set data.fim_spm_rate=0.5 --set data.packing=windows --set data.window_stride=96 \
  --set logging.wandb_mode=disabled ${EXTRA_SET:-}

python -m train.metrics --run "$OUT/run" --require-falling
python -m train.export --run "$OUT/run" --best --out "$OUT/hf"
