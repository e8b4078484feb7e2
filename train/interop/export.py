"""``python -m train.export --run RUN_DIR [--step N] --out HF_DIR``: a Hugging Face folder
(config.json, model.safetensors, tokenizer files; exact vocabulary, no padding rows) that
``transformers`` loads as GPTNeoForCausalLM (or GPT2LMHeadModel for a GPT-2 run)."""

from __future__ import annotations

import argparse
import sys

import jax


def export(run_dir: str, out: str, step: int | None = None, best: bool = False):
    """Export checkpoint ``step`` (latest if None; the best-by-eval one with ``best``) of
    ``run_dir`` to ``out``; returns (path, step)."""
    from data_processing.tokens import tokenizer_info
    from train.core.run_dir import restore_params
    from train.interop.hf_io import save_hf_folder

    cfg, params, at = restore_params(run_dir, step, best=best)
    _, eos = tokenizer_info(cfg.tokenizer.path)
    path = save_hf_folder(out, cfg.model, jax.device_get(params), tokenizer_dir=cfg.tokenizer.path,
                          eos_token_id=eos)
    return path, at


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__)
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--best", action="store_true", help="export the best-by-eval checkpoint (checkpoint.keep_best)")
    parser.add_argument("--out", required=True, help="output Hugging Face folder")
    args = parser.parse_args(argv)
    try:
        path, at = export(args.run, args.out, args.step, args.best)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[export] step {at} of {args.run} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
