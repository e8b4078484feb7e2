"""Sampling with a KV cache: ``python -m train.generate --run RUN_DIR --prompt TEXT [--suffix TEXT]``.

Decoding runs in compiled *segments* of ``SEGMENT_TOKENS`` tokens (``SegmentDecoder``): one
compiled prefill per (batch, prompt bucket, cache length) and one compiled segment per (batch,
cache length, top_k), with the KV cache, last logits and positions carried between segments.
Between segments the caller sees the new tokens (the server streams them) and may finish rows
(stop strings, a client gone); a batch stops as soon as every row has hit EOS, its own token
limit or been finished, so short completions cost a few segments, not ``max_new_tokens`` steps.
The sample at step ``i`` uses ``fold_in(PRNGKey(seed), i)`` whatever the segment boundaries, so
seeded samples and greedy results do not depend on where a batch stops. Prompts of different
lengths in one batch are left-padded; pad positions are negative and masked out of attention.

``--suffix`` asks a model trained with fill-in-the-middle (its tokenizer has the sentinels of
``data_processing/fim.py``) for the text between ``--prompt`` and ``--suffix``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from data_processing.fim import infill_prompt
from data_processing.tokens import EOS_TOKEN, FIM_TOKENS, control_token, sentinel_ids
from train.config import ModelConfig
from train.core import model as M

PROMPT_BUCKET = 32
SEGMENT_TOKENS = 16  # decode steps per compiled segment: the streaming granularity


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


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def prefill(params, ids_BT, pos_BT, *, cfg: ModelConfig, max_len: int):
    """A KV cache of ``max_len`` slots holding the prompts, the logits after their last token and
    the next position of each row."""
    cache = M.init_cache(cfg, params, ids_BT.shape[0], max_len)
    logits_BTV, cache = M.decode_step(cfg, params, cache, ids_BT, pos_BT)
    return logits_BTV[:, -1], cache, pos_BT[:, -1] + 1


# The cache and logits are donated: each segment updates them in place instead of copying the
# whole cache once per segment.
@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "n_tokens"), donate_argnames=("logits_BV", "cache"))
def _segment(params, logits_BV, cache, pos_B, done_B, limit_B, step, rng, temperature, top_p, eos_id, *,
             cfg: ModelConfig, top_k: int, n_tokens: int):
    """Up to ``n_tokens`` decode steps, the first being global step ``step``. A row is done after
    sampling ``eos_id`` or its ``limit_B``-th token; the loop ends early when every row is done.
    Returns (logits, cache, tokens [B, n_tokens], positions, number of steps run)."""
    out_BN = jnp.zeros((logits_BV.shape[0], n_tokens), jnp.int32)

    def cond(carry):
        j, _, _, _, _, done_B = carry
        return (j < n_tokens) & ~jnp.all(done_B)

    def body(carry):
        j, logits_BV, cache, out_BN, pos_B, done_B = carry
        i = step + j
        # The key depends only on the global step, not on the segment: same samples whatever
        # the segment size or where a batch stopped.
        token_B = sample_logits(logits_BV, jax.random.fold_in(rng, i), temperature, top_k, top_p)
        out_BN = out_BN.at[:, j].set(token_B)
        done_B = done_B | (token_B == eos_id) | (i + 1 >= limit_B)
        # Rows already done keep stepping with the batch (their tokens are dropped); clamping keeps
        # those discarded steps inside the position table. Live rows never reach the clamp.
        in_pos_B = jnp.minimum(pos_B, cfg.max_position_embeddings - 1)
        logits_B1V, cache = M.decode_step(cfg, params, cache, token_B[:, None], in_pos_B[:, None])
        return j + 1, logits_B1V[:, 0], cache, out_BN, pos_B + 1, done_B

    j, logits_BV, cache, out_BN, pos_B, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(0), logits_BV, cache, out_BN, pos_B, done_B))
    return logits_BV, cache, out_BN, pos_B, j


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a sampling seed, 0 <= seed < 2**63. ``PRNGKey`` keeps only the low 32
    bits without x64; the high bits are folded in, so seeds that differ only there still give
    different samples (seeds below 2**32 keep the key they always had)."""
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed: must be in [0, 2**63), got {seed}")
    key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
    return key if seed < 2**32 else jax.random.fold_in(key, seed >> 32)


class SegmentDecoder:
    """Incremental KV-cache decoding of one batch of prompts, ``segment_tokens`` tokens per call.

    ``tokens[b]`` holds what row ``b`` generated so far, cut after EOS and at its limit
    (``row_limits[b]``, at most ``max_new_tokens``; 0 makes a dummy row that is done from the
    start). ``step()`` runs one compiled segment and returns what each row gained;
    ``finish(b)`` ends a row early (a stop string was seen, nobody waits for it). Once every row
    is done (``finished``) nothing more runs. Shapes depend on the batch size, the prompt bucket
    and ``max_new_tokens`` only, so no per-request recompilation.
    """

    def __init__(self, cfg: ModelConfig, params, prompts: list[list[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_id: int | None = None, row_limits: list[int] | None = None,
                 segment_tokens: int = SEGMENT_TOKENS):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt: every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens: must be at least 1")
        if row_limits is None:
            row_limits = [max_new_tokens] * len(prompts)
        if len(row_limits) != len(prompts):
            raise ValueError(f"row_limits: {len(row_limits)} limits for {len(prompts)} prompts")
        self.limits = [max(0, min(int(n), max_new_tokens)) for n in row_limits]
        positions = cfg.max_position_embeddings
        # Each row needs its own prompt + limit positions; the cache only needs slots (a short
        # prompt may take more new tokens than the batch's longest one).
        worst = max(range(len(prompts)), key=lambda b: len(prompts[b]) + self.limits[b])
        if len(prompts[worst]) + self.limits[worst] > positions:
            raise ValueError(f"max_new_tokens: prompt ({len(prompts[worst])} tokens) + {self.limits[worst]} new "
                             f"tokens exceed the model's {positions} positions")
        longest = max(len(p) for p in prompts)
        T = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
        ids = np.zeros((len(prompts), T), np.int32)
        pos = np.full((len(prompts), T), -1, np.int32)
        for b, p in enumerate(prompts):
            ids[b, T - len(p):] = p
            pos[b, T - len(p):] = np.arange(len(p))
        self.cfg, self.params = cfg, params
        self.eos_id = eos_id
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.done = [n == 0 for n in self.limits]
        self.segments = 0  # compiled segments run so far
        self.steps = 0  # decode steps run so far (the global step index of the next one)
        self._segment_tokens = int(segment_tokens)
        self._top_k = int(top_k)
        self._rng = seed_key(seed)
        # numpy, not jnp, scalars and arrays: they travel with the jitted call instead of costing
        # a device dispatch each (which adds up to ~1 ms per single-row request on CPU).
        self._temperature, self._top_p = np.float32(temperature), np.float32(top_p)
        self._eos = np.int32(-1 if eos_id is None else eos_id)  # -1: no token ends a row
        self._limit_B = np.asarray(self.limits, np.int32)
        # The cache has exactly prompt bucket + max_new_tokens slots, as the one-call decoder had:
        # the same shapes give the same greedy results bit for bit.
        self._logits_BV, self._cache, self._pos_B = prefill(params, ids, pos, cfg=cfg, max_len=T + max_new_tokens)

    @property
    def finished(self) -> bool:
        """True once every row is done (EOS, its limit, or ``finish``)."""
        return all(self.done)

    def finish(self, row: int, keep: int | None = None) -> None:
        """End ``row`` now; with ``keep``, also drop its tokens after the first ``keep``."""
        self.done[row] = True
        if keep is not None:
            del self.tokens[row][keep:]

    def step(self) -> list[list[int]]:
        """Run one segment; the ids each row gained (empty for rows already done)."""
        if self.finished:
            return [[] for _ in self.tokens]
        self._logits_BV, self._cache, out_BN, self._pos_B, n = _segment(
            self.params, self._logits_BV, self._cache, self._pos_B, np.asarray(self.done), self._limit_B,
            np.int32(self.steps), self._rng, self._temperature, self._top_p, self._eos, cfg=self.cfg,
            top_k=self._top_k, n_tokens=self._segment_tokens)
        n = int(n)
        gained = []
        for b, row in enumerate(np.asarray(out_BN)[:, :n].tolist()):
            if self.done[b]:
                gained.append([])
                continue
            row = row[: self.limits[b] - len(self.tokens[b])]
            if self.eos_id is not None and self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
                self.done[b] = True
            self.tokens[b].extend(row)
            if len(self.tokens[b]) >= self.limits[b]:
                self.done[b] = True
            gained.append(row)
        self.steps += n
        self.segments += 1
        return gained


def generate_ids(cfg: ModelConfig, params, prompts: list[list[int]], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_id: int | None = None) -> list[list[int]]:
    """Generated token ids for each prompt (prompt excluded, cut after the first EOS). Stops as
    soon as every row has produced EOS."""
    dec = SegmentDecoder(cfg, params, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id)
    while not dec.finished:
        dec.step()
    return dec.tokens


NOT_FIM = ("this model was not trained with fill-in-the-middle (its tokenizer lacks the sentinel tokens "
           + ", ".join(FIM_TOKENS) + ")")


def fim_sentinels(tok, cfg: ModelConfig | None = None) -> tuple[int, int, int] | None:
    """Ids of the fill-in-the-middle sentinels when the tokenizer has all three (and, given
    ``cfg``, the model's vocabulary covers them): a model trained with FIM. Else None."""
    ids = sentinel_ids(getattr(tok, "backend_tokenizer", tok))
    if ids is None or (cfg is not None and max(ids) >= cfg.vocab_size):
        return None
    return ids


def encode_prompt(tok, prompt: str, suffix: str | None = None, cfg: ModelConfig | None = None,
                  language: str | None = None) -> list[int]:
    """Token ids to feed the model: the prompt's, or with ``suffix`` the fill-in-the-middle
    prompt ``<|fim_prefix|>prompt<|fim_suffix|>suffix<|fim_middle|>`` (the model then writes the
    middle); with ``language``, that language's control code first, as in training with
    ``data.control_codes``. Raises ValueError starting with ``suffix:`` when the model has no
    FIM sentinels, ``language:`` when it has no control code for the language."""
    head = ""
    if language is not None:
        head = control_token(language)
        code = tok.convert_tokens_to_ids(head)
        if code is None or code == tok.unk_token_id or head not in tok.get_vocab():
            raise ValueError(f"language: this model has no control code {head} (train with data.control_codes)")
    if suffix is None:
        return tok.encode(head + prompt)
    if fim_sentinels(tok, cfg) is None:
        raise ValueError(f"suffix: {NOT_FIM}")
    return tok.encode(head + infill_prompt(prompt, suffix))


def decode_text(tok, ids: list[int], eos_id: int | None = None) -> str:
    """Text of generated ids, EOS dropped. Never "cleans up" spaces before punctuation (which
    would change code, and would make a streamed prefix differ from the final text)."""
    return tok.decode([t for t in ids if t != eos_id], clean_up_tokenization_spaces=False)


def load_model(run_dir: str | None = None, hf_dir: str | None = None, step: int | None = None):
    """(ModelConfig, params, tokenizer) from a run directory or a Hugging Face folder."""
    from transformers import AutoTokenizer

    if (run_dir is None) == (hf_dir is None):
        raise ValueError("give exactly one of --run and --hf")
    if run_dir is not None:
        from train.core.run_dir import restore_params

        cfg, params, _ = restore_params(run_dir, step)
        tok_path = cfg.tokenizer.path
        mcfg = cfg.model
    else:
        from train.interop.hf_io import load_hf_folder

        mcfg, params = load_hf_folder(hf_dir)
        tok_path = hf_dir
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    return mcfg, params, tokenizer


def completion_fn_from_params(mcfg: ModelConfig, params, tok, *, temperature: float = 0.0, top_p: float = 1.0,
                              top_k: int = 0, max_new_tokens: int = 128, seed: int = 0, batch_size: int = 16):
    """A function ``(prompts, n) -> completions`` (n per prompt, generated text only) over
    parameters in memory (``load_model``'s, or the trainer's): the HumanEval harness and hook.
    Each prompt is fed after ``<|endoftext|>``, as every training document starts (the Codex
    protocol); prompts longer than the model's positions allow are cut from the left."""
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    max_new_tokens = min(max_new_tokens, mcfg.max_position_embeddings // 2)
    keep = mcfg.max_position_embeddings - max_new_tokens - 1

    def complete(prompts: list[str], n: int = 1) -> list[str]:
        jobs = [p for p in prompts for _ in range(n)]
        out: list[str] = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            ids = [[eos, *tok.encode(p)[-keep:]] for p in chunk]
            gen = generate_ids(mcfg, params, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed + start, eos_id=eos)
            out.extend(decode_text(tok, g, eos) for g in gen)
        return out

    return complete


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (latest checkpoint unless --step)")
    src.add_argument("--hf", help="Hugging Face GPT-Neo / GPT-2 folder")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--prompt", required=True, help="text to complete (with --suffix: the text before the gap)")
    parser.add_argument("--suffix", default=None,
                        help="text after the gap: fill in the middle (models trained with FIM only)")
    parser.add_argument("--language", default=None,
                        help="prepend this language's control code (models trained with data.control_codes)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        mcfg, params, tok = load_model(args.run, args.hf, args.step)
        eos = tok.convert_tokens_to_ids(EOS_TOKEN)
        if args.suffix is not None and fim_sentinels(tok, mcfg) is None:
            raise ValueError(f"--suffix: {NOT_FIM}")
        ids = encode_prompt(tok, args.prompt, args.suffix, mcfg, language=args.language)
        gen = generate_ids(mcfg, params, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=eos)[0]
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # With --suffix the model wrote the middle: print the whole filled-in text.
    print(args.prompt + decode_text(tok, gen, eos) + (args.suffix or ""))
    if Path("/dev/stderr").exists():
        print(f"[generate] {len(gen)} new tokens: {gen}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
