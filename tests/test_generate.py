"""KV-cache sampling: greedy equals transformers' greedy generate; sampling filters behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.helpers import tiny_hf_gpt2, tiny_hf_gpt_neo
from train.inference.decoding import generate_ids, sample_logits
from train.interop.hf_io import load_hf_folder, save_hf_folder


@pytest.mark.parametrize("make_hf", [tiny_hf_gpt_neo, tiny_hf_gpt2], ids=["gpt_neo", "gpt2"])
def test_greedy_equals_transformers_generate(tmp_path, make_hf):
    hf = make_hf()
    hf.save_pretrained(tmp_path / "hf")
    cfg, params = load_hf_folder(tmp_path / "hf")
    cfg = cfg.__class__(**{**cfg.__dict__, "compute_dtype": "float32"})
    rs = np.random.RandomState(0)
    prompts = [rs.randint(0, 299, 11).tolist(), rs.randint(0, 299, 5).tolist()]  # different lengths: left padding
    ours = generate_ids(cfg, params, prompts, max_new_tokens=20, temperature=0.0)
    for prompt, got in zip(prompts, ours, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=299,
                          eos_token_id=None)
        assert got == ref[0, len(prompt):].tolist()


def test_export_folder_round_trip_is_bit_identical(tmp_path):
    hf = tiny_hf_gpt_neo()
    hf.save_pretrained(tmp_path / "a")
    cfg, params = load_hf_folder(tmp_path / "a")
    save_hf_folder(tmp_path / "b", cfg, params)
    from transformers import GPTNeoForCausalLM

    again = GPTNeoForCausalLM.from_pretrained(tmp_path / "b")
    ref, got = hf.state_dict(), again.state_dict()
    for k in ref:
        if k.endswith("attn.bias") or k.endswith("masked_bias"):
            continue
        assert torch.equal(ref[k], got[k]), k
    assert not list(tmp_path.glob(".b.*"))  # no temporary folder left behind


def test_sampling_filters():
    logits = jnp.array([[0.0, 1.0, 3.0, 2.0]] * 512)
    rng = jax.random.PRNGKey(0)
    greedy = np.asarray(sample_logits(logits, rng, 0.0, 0, 1.0))
    assert (greedy == 2).all()
    top1 = np.asarray(sample_logits(logits, rng, 1.0, 1, 1.0))
    assert (top1 == 2).all()
    tiny_p = np.asarray(sample_logits(logits, rng, 1.0, 0, 0.01))
    assert (tiny_p == 2).all()
    top2 = np.asarray(sample_logits(logits, rng, 1.0, 2, 1.0))
    assert set(top2.tolist()) == {2, 3}
    free = np.asarray(sample_logits(logits, rng, 1.0, 0, 1.0))
    freq = np.bincount(free, minlength=4) / free.size
    want = np.exp([0.0, 1.0, 3.0, 2.0]) / np.exp([0.0, 1.0, 3.0, 2.0]).sum()
    assert np.abs(freq - want).max() < 0.06
