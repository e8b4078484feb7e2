#!/usr/bin/env bash
# Tokenizer step of the pipeline (called by quickstart.sh after data preparation):
#   1. train a byte-level BPE on DATA_DIR/train (or adopt an existing GPT-2/GPT-Neo tokenizer
#      folder given in CODENEO_TOKENIZER), written to TOK_DIR;
#   2. add the whitespace tokens to TOK_DIR (unless CODENEO_ADD_TOKENS=0) and write
#      TOK_DIR/report.json with bytes/token on DATA_DIR/validation before and after.
# Usage: bash run_scripts/tokenizer.sh DATA_DIR TOK_DIR [VOCAB_SIZE] [MAX_BYTES]
# Expects the environment from setup_env.sh (python on PATH, HF_HUB_OFFLINE=1).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 DATA_DIR TOK_DIR [VOCAB_SIZE] [MAX_BYTES]" >&2
  exit 2
fi
DATA="$1"
TOK="$2"
VOCAB="${3:-50257}"
MAX_BYTES="${4:-}"
if [ -n "${CODENEO_TOKENIZER:-}" ]; then
  echo "[tokenizer] using existing tokenizer $CODENEO_TOKENIZER"
  python -m tokenizer.train_tokenizer --from-existing "$CODENEO_TOKENIZER" --out "$TOK"
else
  echo "[tokenizer] training byte-level BPE (vocab $VOCAB) on $DATA/train"
  python -m tokenizer.train_tokenizer --data "$DATA/train" --vocab-size "$VOCAB" --out "$TOK" \
    ${MAX_BYTES:+--max-bytes "$MAX_BYTES"}
fi
if [ "${CODENEO_ADD_TOKENS:-1}" != "0" ]; then
  echo "[tokenizer] adding whitespace tokens; bytes/token on $DATA/validation"
  python -m tokenizer.add_tokens --tokenizer "$TOK" --report-data "$DATA/validation"
fi
