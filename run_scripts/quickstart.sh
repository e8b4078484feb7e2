#!/usr/bin/env bash
# The whole pipeline on a fresh machine, on the embedded default corpus (this Python
# installation's own standard library): set up -> prepare (ingest, filter, dedup, split) ->
# train a BPE tokenizer -> train configs/tiny.yaml on the CPU -> evaluate -> export to a
# Hugging Face folder -> sample a completion -> run and data reports. A few minutes on 2 cores.
# Environment: DATA (default data), TOK (artifacts/tokenizer), RUN (runs/tiny), EXTRA_SET
# (extra "--set k=v" arguments for the trainer).
set -euo pipefail
cd "$(dirname "$0")/.."
source run_scripts/setup_env.sh

DATA="${DATA:-data}"
TOK="${TOK:-artifacts/tokenizer}"
RUN="${RUN:-runs/tiny}"
say() { printf '\n=== %s\n' "$*"; }

say "1/5 prepare: ingest -> filter -> dedup -> split (source: the Python standard library)"
python -m data_processing.prepare --out "$DATA"

say "2/5 tokenizer: byte-level BPE, 4096 tokens"
# The whitespace tokens of Code Clippy help GPT-2's tokenizer but cost a tokenizer trained on
# code ~10% more tokens (docs/tokenizer.md), so the quickstart does not add them.
CODENEO_ADD_TOKENS="${CODENEO_ADD_TOKENS:-0}" bash run_scripts/tokenizer.sh "$DATA" "$TOK" 4096 20000000

say "3/5 train configs/tiny.yaml (resumes if $RUN already has checkpoints)"
# shellcheck disable=SC2086
python -m train --config configs/tiny.yaml --set "run.output_dir=$RUN" --set "data.train_dir=$DATA/train" \
  --set "data.validation_dir=$DATA/validation" --set "tokenizer.path=$TOK" --set train.eval_at_start=true \
  ${EXTRA_SET:-}

say "4/5 evaluation: held-out loss before training (step 0) and after"
python -m train.metrics --run "$RUN" --require-falling

say "5/5 export to a Hugging Face folder, and sample"
python -m train.export --run "$RUN" --out "$RUN/hf"
# Sampled (temperature 0.7, top-p 0.95): greedy decoding of a model this small repeats one line.
python -m train.generate --run "$RUN" --prompt "def fibonacci(n):" --max-new-tokens 64 --temperature 0.7 --top-p 0.95

say "report"
python -m train.report --run "$RUN" --out "$RUN/report"
python -m data_processing.report --data "$DATA" --out "$DATA/report"

say "done"
cat <<TXT
data:        $DATA/train, $DATA/validation, $DATA/report.json
tokenizer:   $TOK
run:         $RUN/config.yaml, $RUN/metrics.jsonl, $RUN/checkpoints/
wandb:       $RUN/wandb (offline; 'wandb sync' to upload)
HF export:   $RUN/hf  (transformers.pipeline("text-generation", model="$RUN/hf"))
reports:     $RUN/report/index.html, $DATA/report/index.html
TXT
