"""Sampling with a KV cache: ``python -m train.generate --run RUN_DIR --prompt TEXT``.

The whole generation (prefill + ``max_new_tokens`` decode steps in a ``fori_loop``) is one
compiled function per (prompt bucket, length, top_k): no recompilation per token or per prompt
of a similar length. Prompts of different lengths in one batch are left-padded; pad positions
are negative and masked out of attention.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from train import model as M
from train.config import ModelConfig

PROMPT_BUCKET = 32


def sample_logits(logits_BV: jax.Array, rng: jax.Array, temperature, top_k: int, top_p) -> jax.Array:
    """Next tokens [B] from fp32 logits: greedy when temperature == 0, else temperature,
    top-k (static; 0 = off) and nucleus top-p (1.0 = off) sampling."""
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BV, axis=-1)
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    neg = jnp.finfo(jnp.float32).min
    if top_k:
        kth_B1 = jax.lax.top_k(scaled_BV, top_k)[0][:, -1:]
        scaled_BV = jnp.where(scaled_BV < kth_B1, neg, scaled_BV)
    sorted_BV = jnp.sort(scaled_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass strictly before each token
    keep_BV = before_BV < top_p  # always keeps the most likely token
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    scaled_BV = jnp.where(scaled_BV < cutoff_B1, neg, scaled_BV)
    sampled_B = jax.random.categorical(rng, scaled_BV, axis=-1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k"))
def _generate(params, ids_BT, pos_BT, rng, temperature, top_p, *, cfg: ModelConfig, max_new_tokens: int,
              top_k: int):
    B, T = ids_BT.shape
    cache = M.init_cache(cfg, params, B, T + max_new_tokens)
    logits_BTV, cache = M.decode_step(cfg, params, cache, ids_BT, pos_BT)
    next_pos_B = pos_BT[:, -1] + 1
    out_BN = jnp.zeros((B, max_new_tokens), jnp.int32)

    def body(i, carry):
        logits_BV, cache, out_BN, pos_B = carry
        token_B = sample_logits(logits_BV, jax.random.fold_in(rng, i), temperature, top_k, top_p)
        out_BN = out_BN.at[:, i].set(token_B)
        logits_B1V, cache = M.decode_step(cfg, params, cache, token_B[:, None], pos_B[:, None])
        return logits_B1V[:, 0], cache, out_BN, pos_B + 1

    _, _, out_BN, _ = jax.lax.fori_loop(0, max_new_tokens, body, (logits_BTV[:, -1], cache, out_BN, next_pos_B))
    return out_BN


def generate_ids(cfg: ModelConfig, params, prompts: list[list[int]], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_id: int | None = None) -> list[list[int]]:
    """Generated token ids for each prompt (prompt excluded, cut after the first EOS)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompt: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    limit = cfg.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens: prompt ({longest} tokens) + {max_new_tokens} new tokens exceed the "
                         f"model's {limit} positions")
    T = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.zeros((len(prompts), T), np.int32)
    pos = np.full((len(prompts), T), -1, np.int32)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        pos[b, T - len(p):] = np.arange(len(p))
    out = _generate(params, jnp.asarray(ids), jnp.asarray(pos), jax.random.PRNGKey(seed),
                    jnp.float32(temperature), jnp.float32(top_p), cfg=cfg, max_new_tokens=max_new_tokens,
                    top_k=int(top_k))
    result = []
    for row in np.asarray(out).tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        result.append(row)
    return result


def load_model(run_dir: str | None = None, hf_dir: str | None = None, step: int | None = None):
    """(ModelConfig, params, tokenizer) from a run directory or a Hugging Face folder."""
    from transformers import AutoTokenizer

    if (run_dir is None) == (hf_dir is None):
        raise ValueError("give exactly one of --run and --hf")
    if run_dir is not None:
        from train.trainer import restore_params

        cfg, params, _ = restore_params(run_dir, step)
        tok_path = cfg.tokenizer.path
        mcfg = cfg.model
    else:
        from train.hf_io import load_hf_folder

        mcfg, params = load_hf_folder(hf_dir)
        tok_path = hf_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    return mcfg, params, tokenizer


def make_completion_fn(run_dir=None, hf_dir=None, *, temperature: float = 0.0, top_p: float = 1.0,
                       top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, batch_size: int = 16):
    """A function ``(prompts, n) -> completions`` (n per prompt, generated text only), used by the
    HumanEval harness and the completion server."""
    mcfg, params, tok = load_model(run_dir, hf_dir)
    return completion_fn_from_params(mcfg, params, tok, temperature=temperature, top_p=top_p, top_k=top_k,
                                     max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)


def completion_fn_from_params(mcfg: ModelConfig, params, tok, *, temperature: float = 0.0, top_p: float = 1.0,
                              top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, batch_size: int = 16):
    """Like ``make_completion_fn`` over parameters already in memory (used during training).
    Prompts longer than the model's positions allow are cut from the left."""
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    max_new_tokens = min(max_new_tokens, mcfg.max_position_embeddings // 2)
    keep = mcfg.max_position_embeddings - max_new_tokens

    def complete(prompts: list[str], n: int = 1) -> list[str]:
        jobs = [p for p in prompts for _ in range(n)]
        out: list[str] = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            ids = [tok.encode(p)[-keep:] for p in chunk]
            gen = generate_ids(mcfg, params, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed + start, eos_id=eos)
            out.extend(tok.decode([t for t in g if t != eos]) for g in gen)
        return out

    return complete


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (latest checkpoint unless --step)")
    src.add_argument("--hf", help="Hugging Face GPT-Neo / GPT-2 folder")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        mcfg, params, tok = load_model(args.run, args.hf, args.step)
        eos = tok.convert_tokens_to_ids("<|endoftext|>")
        ids = tok.encode(args.prompt)
        gen = generate_ids(mcfg, params, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=eos)[0]
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = tok.decode([t for t in gen if t != eos])
    print(args.prompt + text)
    if Path("/dev/stderr").exists():
        print(f"[generate] {len(gen)} new tokens: {gen}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
