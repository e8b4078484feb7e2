"""Token log probabilities for the completion server: the model's own next-token distribution
(fp32 log-softmax of the logits, before temperature or top-p), as OpenAI's and vLLM's
``logprobs`` field gives it.

A row of ids is scored in one teacher-forced forward pass (the same ``decode_step`` a prefill
runs): for each token after the first, its log probability given the tokens before it and the
``top_n`` most likely tokens there. Echoed prompts and generated tokens are scored alike, so
``logprobs`` over ``prompt + completion`` is one call. Rows are left-padded to a power-of-two
length bucket (pad positions are negative and masked out of attention, as in the decoder) and
scored a few at a time, so that the [rows, length, vocabulary] logits stay within
``TOKEN_BUDGET`` positions per call and the set of compiled shapes stays small.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from train.config import ModelConfig
from train.core import model as M

MAX_TOP = 20  # most alternatives per position a request may ask for (vLLM's default max_logprobs)
TOKEN_BUDGET = 4096  # positions scored per compiled call: bounds the fp32 logits' memory
ROW_BUCKETS = (1, 4, 16)


@functools.partial(jax.jit, static_argnames=("cfg", "top_n"))
def _score(params, ids_BT, pos_BT, *, cfg: ModelConfig, top_n: int):
    """For every position t >= 1: log p(ids[t] | ids[:t]) [B, T-1] and the ``top_n`` best
    (log prob, id) pairs of the distribution at t-1 [B, T-1, top_n]."""
    cache = M.init_cache(cfg, params, ids_BT.shape[0], ids_BT.shape[1])
    logits_BTV, _ = M.decode_step(cfg, params, cache, ids_BT, pos_BT)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    target_BT = jnp.take_along_axis(logp_BTV, ids_BT[:, 1:, None], axis=-1)[..., 0]
    top_lp_BTK, top_id_BTK = jax.lax.top_k(logp_BTV, top_n)
    return target_BT, top_lp_BTK, top_id_BTK


@dataclass
class RowScores:
    """Scores of one row of ``n`` ids: ``token_logprobs[0]`` and ``top[0]`` are None (nothing
    precedes the first token); ``top[i]`` lists (id, log prob) pairs, most likely first."""

    token_logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


def _length_bucket(n: int, positions: int) -> int:
    T = 32
    while n > T:
        T *= 2
    return max(n, min(T, positions))


def score_rows(cfg: ModelConfig, params, rows: list[list[int]], top_n: int) -> list[RowScores]:
    """Scores of each row (each at most the model's positions long, at least one id) with the
    ``top_n`` (0..``MAX_TOP``) alternatives per position."""
    if not 0 <= top_n <= MAX_TOP:
        raise ValueError(f"logprobs: must be between 0 and {MAX_TOP}")
    k = max(1, min(MAX_TOP, cfg.vocab_size))  # one compiled top-k width, sliced per request
    out: list[RowScores | None] = [None] * len(rows)
    # Longest first: rows of similar length share a call and a length bucket.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    start = 0
    while start < len(order):
        T = _length_bucket(len(rows[order[start]]), cfg.max_position_embeddings)
        fit = max(1, TOKEN_BUDGET // T)
        take = order[start:start + fit]
        B = next((b for b in ROW_BUCKETS if b >= len(take)), len(take))
        ids_BT = np.zeros((B, T), np.int32)
        pos_BT = np.full((B, T), -1, np.int32)
        for b, i in enumerate(take):
            n = len(rows[i])
            ids_BT[b, T - n:] = rows[i]
            pos_BT[b, T - n:] = np.arange(n)
        target_BT, top_lp_BTK, top_id_BTK = (np.asarray(a) for a in _score(params, ids_BT, pos_BT, cfg=cfg,
                                                                            top_n=k))
        for b, i in enumerate(take):
            n = len(rows[i])
            cols = slice(T - n, T - 1)  # column c scores token c + 1: this row's tokens 1..n-1
            lps = target_BT[b, cols].tolist()
            ids, vals = top_id_BTK[b, cols, :top_n].tolist(), top_lp_BTK[b, cols, :top_n].tolist()
            out[i] = RowScores([None, *lps], [None, *(list(zip(a, v, strict=True)) for a, v in zip(ids, vals,
                                                                                                  strict=True))])
        start += len(take)
    return out  # type: ignore[return-value]


def token_strings(tok, ids: list[int], memo: dict[int, str] | None = None) -> list[str]:
    """Each id decoded on its own (what OpenAI's ``tokens`` lists), each distinct id once (``memo``
    carries them across calls). A character that byte-level BPE split across tokens shows as
    U+FFFD in each piece, as in vLLM."""
    memo = {} if memo is None else memo
    for t in set(ids) - memo.keys():
        memo[t] = tok.decode([t], clean_up_tokenization_spaces=False)
    return [memo[t] for t in ids]


def logprobs_field(tok, ids: list[int], scores: RowScores, first: int, top_n: int) -> dict:
    """OpenAI's ``logprobs`` object for ``ids[first:]`` (the echoed prompt and/or the completion):
    ``tokens``, ``token_logprobs``, ``top_logprobs`` (token string -> log prob, ``top_n`` of
    them) and ``text_offset`` (where each token's text starts in the choice's text, counting the
    decoded pieces as vLLM does)."""
    memo: dict[int, str] = {}
    pieces = token_strings(tok, ids[first:], memo)
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p)
    tops = []
    for alts in scores.top[first:]:
        if alts is None:
            tops.append(None)
            continue
        names = token_strings(tok, [a for a, _ in alts], memo)
        entry: dict[str, float] = {}
        for name, (_, lp) in zip(names, alts, strict=True):
            entry.setdefault(name, lp)  # two ids that decode alike: keep the likelier
        tops.append(entry)
    return {"tokens": pieces, "token_logprobs": scores.token_logprobs[first:], "top_logprobs": tops,
            "text_offset": offsets}
