"""Segmented KV-cache decoding: the same tokens as one compiled call over all steps (greedy and
seeded sampling), early stop equals running to the end and cutting, fill-in-the-middle prompts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import tiny_hf_gpt_neo
from train.core import model as M
from train.inference.decoding import PROMPT_BUCKET, SegmentDecoder, generate_ids, sample_logits
from train.interop.hf_io import load_hf_folder


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _one_call(params, ids_BT, pos_BT, rng, temperature, *, cfg, max_new_tokens):
    # The decoder as it was before segments: prefill and every step in one fori_loop. The oracle
    # for "same results as before".
    B, T = ids_BT.shape
    cache = M.init_cache(cfg, params, B, T + max_new_tokens)
    logits_BTV, cache = M.decode_step(cfg, params, cache, ids_BT, pos_BT)

    def body(i, carry):
        logits_BV, cache, out_BN, pos_B = carry
        token_B = sample_logits(logits_BV, jax.random.fold_in(rng, i), temperature, 0, 1.0)
        logits_B1V, cache = M.decode_step(cfg, params, cache, token_B[:, None], pos_B[:, None])
        return logits_B1V[:, 0], cache, out_BN.at[:, i].set(token_B), pos_B + 1

    init = (logits_BTV[:, -1], cache, jnp.zeros((B, max_new_tokens), jnp.int32), pos_BT[:, -1] + 1)
    return jax.lax.fori_loop(0, max_new_tokens, body, init)[2]


def _reference(cfg, params, prompts, n, temperature, seed):
    T = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.zeros((len(prompts), T), np.int32)
    pos = np.full((len(prompts), T), -1, np.int32)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        pos[b, T - len(p):] = np.arange(len(p))
    out = _one_call(params, jnp.asarray(ids), jnp.asarray(pos), jax.random.PRNGKey(seed), jnp.float32(temperature),
                    cfg=cfg, max_new_tokens=n)
    return np.asarray(out).tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("neo")
    tiny_hf_gpt_neo().save_pretrained(d)
    cfg, params = load_hf_folder(d)
    return cfg.__class__(**{**cfg.__dict__, "compute_dtype": "float32"}), params


PROMPTS = [[5, 17, 42, 9, 100, 3, 77, 12, 250, 8, 61], [33, 2, 199, 45, 7]]  # different lengths: left padding


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (0.9, 3)], ids=["greedy", "sampled"])
def test_segments_equal_one_call(tiny, temperature, seed):
    cfg, params = tiny
    want = _reference(cfg, params, PROMPTS, 37, temperature, seed)
    for segment in (1, 8, 16, 64):
        dec = SegmentDecoder(cfg, params, PROMPTS, max_new_tokens=37, temperature=temperature, seed=seed,
                             segment_tokens=segment)
        while not dec.finished:
            dec.step()
        assert dec.tokens == want, segment
        assert dec.segments == -(-37 // segment) and dec.steps == 37
    if temperature > 0:  # a different seed gives a different sample (so the comparison above means something)
        assert generate_ids(cfg, params, PROMPTS, max_new_tokens=37, temperature=temperature, seed=seed + 1) != want


def test_early_stop_equals_cut_full_run(tiny):
    cfg, params = tiny
    full = generate_ids(cfg, params, PROMPTS, max_new_tokens=40, temperature=0.9, seed=1)
    # Call a token that first appears late in both rows "EOS": both rows then stop early.
    eos = next(t for t in range(cfg.vocab_size)
               if all(t in row and 17 < row.index(t) < 30 for row in full))
    cut = [row[: row.index(eos) + 1] for row in full]
    dec = SegmentDecoder(cfg, params, PROMPTS, max_new_tokens=40, temperature=0.9, seed=1, eos_id=eos)
    gained = [[], []]
    while not dec.finished:
        for row, new in zip(gained, dec.step(), strict=True):
            row.extend(new)
    assert dec.tokens == cut and gained == cut
    assert dec.steps == max(len(r) for r in cut) < 40 and dec.segments == -(-dec.steps // 16)
    assert generate_ids(cfg, params, PROMPTS, max_new_tokens=40, temperature=0.9, seed=1, eos_id=eos) == cut


def test_row_limits_and_finish(tiny):
    cfg, params = tiny
    full = generate_ids(cfg, params, PROMPTS, max_new_tokens=40)
    dec = SegmentDecoder(cfg, params, PROMPTS + [PROMPTS[0]], max_new_tokens=40, row_limits=[20, 40, 0])
    assert dec.done == [False, False, True]  # a limit of 0 is a dummy row, done before it starts
    dec.step()
    dec.step()
    assert dec.tokens[0] == full[0][:20] and dec.done[0] and dec.tokens[2] == []
    dec.finish(1, keep=25)  # e.g. a stop string seen at token 25
    assert dec.finished and dec.tokens[1] == full[1][:25] and dec.steps == 32
    assert dec.step() == [[], [], []] and dec.steps == 32  # nothing runs once every row is done
