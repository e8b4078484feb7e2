"""Starting from a Hugging Face checkpoint (model.init_from): the contract scripts rely on.

``python -m train ... --set model.init_from=HF_DIR --set train.max_steps=0`` then
``train.generate --temperature 0`` equals transformers' greedy generate, and ``train.export``
gives back the same family with bit-identical weights."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import hf_folder, stdlib_texts, tiny_hf_gpt2, tiny_hf_gpt_neo

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "HF_HUB_OFFLINE": "1",
       "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu"}


def _run(*args):
    # The bound is against a hang only: a fine-tuning run on a loaded CI box takes minutes.
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("make_hf", [tiny_hf_gpt2, tiny_hf_gpt_neo], ids=["gpt2", "gpt_neo"])
def test_init_from_generate_and_export_contract(tiny_corpus, tmp_path, make_hf):
    _, tok_dir = tiny_corpus
    hf = make_hf(vocab_size=512)
    hf_dir = hf_folder(hf, tok_dir, tmp_path / "hf")
    run = tmp_path / "run"
    _run("-m", "train", "--config", "configs/tiny.yaml", "--set", f"model.init_from={hf_dir}",
         "--set", "train.max_steps=0", "--set", f"run.output_dir={run}", "--set", "logging.wandb_mode=disabled",
         "--set", "tokenizer.path=", "--set", "data.block_size=32")
    saved = (run / "config.yaml").read_text()
    assert f"init_from: {hf_dir}" in saved
    assert (run / "checkpoints" / "0").is_dir()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompt = "def main(argv):\n    return"
    out = _run("-m", "train.generate", "--run", str(run), "--prompt", prompt, "--max-new-tokens", "16",
               "--temperature", "0")
    ids = tok.encode(prompt)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                      pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    assert out.stdout.rstrip("\n") == prompt + tok.decode(ref)

    _run("-m", "train.export", "--run", str(run), "--out", str(tmp_path / "out"))
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["model_type"] == hf.config.model_type
    again = type(hf).from_pretrained(tmp_path / "out")
    ref_sd, got_sd = hf.state_dict(), again.state_dict()
    for k, v in ref_sd.items():
        if k.endswith(("attn.bias", "masked_bias")):
            continue
        assert torch.equal(v, got_sd[k]), k


@pytest.mark.slow
def test_control_codes_and_fim_grow_the_vocabulary_from_a_checkpoint(tiny_corpus, tmp_path):
    """data.control_codes + data.fim_rate on a GPT-2 start: the run's tokenizer gains the marker
    tokens as special tokens, the embedding grows with mean-initialised rows (old rows exact),
    training with sliding windows runs and resumes, and export carries the grown vocabulary."""
    import numpy as np
    from transformers import AutoTokenizer

    from data_processing.tokens import FIM_TOKENS
    from train.config import DataConfig
    from train.core.run_dir import restore_params
    from train.interop.vocab import special_tokens_for

    _, tok_dir = tiny_corpus
    hf = tiny_hf_gpt2(vocab_size=512)
    hf_dir = hf_folder(hf, tok_dir, tmp_path / "hf")
    run = tmp_path / "run"
    args = ["-m", "train", "--config", "configs/tiny.yaml", "--set", f"model.init_from={hf_dir}",
            "--set", f"run.output_dir={run}", "--set", "logging.wandb_mode=disabled", "--set", "tokenizer.path=",
            "--set", "data.block_size=32", "--set", f"data.train_dir={tiny_corpus[0] / 'train'}",
            "--set", f"data.validation_dir={tiny_corpus[0] / 'validation'}", "--set", "data.control_codes=true",
            "--set", "data.fim_rate=0.5", "--set", "data.packing=windows", "--set", "data.window_stride=16",
            "--set", "train.eval_every=0", "--set", "train.batch_size=4", "--set", "train.save_every=2"]
    _run(*args, "--set", "train.max_steps=0")
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    wanted = special_tokens_for(DataConfig(control_codes=True, fim_rate=0.5))
    assert len(tok) == 512 + len(wanted) and "<|python|>" in wanted and FIM_TOKENS[0] in wanted
    assert tok.convert_tokens_to_ids(wanted) == list(range(512, 512 + len(wanted)))
    assert all(t in tok.all_special_tokens for t in wanted)
    assert tok.decode(tok.encode("<|python|>x = 1"), skip_special_tokens=True) == "x = 1"

    cfg, params, _ = restore_params(run)
    assert cfg.model.vocab_size == 512 + len(wanted) and cfg.tokenizer.path == str(run / "tokenizer")
    wte = np.asarray(params["wte"])
    ref = hf.transformer.wte.weight.detach().numpy()
    np.testing.assert_array_equal(wte[:512], ref)
    np.testing.assert_allclose(wte[512 : 512 + len(wanted)], np.broadcast_to(ref.mean(0), (len(wanted), 64)),
                               rtol=1e-6, atol=1e-7)
    files = {f.name: f.read_bytes() for f in (run / "tokenizer").iterdir()}

    out = _run(*args, "--set", "train.max_steps=4")
    assert "resumed from step 0" in out.stdout
    assert {f.name: f.read_bytes() for f in (run / "tokenizer").iterdir()} == files  # same ids after resume
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(np.isfinite(losses))

    _run("-m", "train.export", "--run", str(run), "--out", str(tmp_path / "out"))
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["vocab_size"] == 512 + len(wanted)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 512 + len(wanted)


def test_init_from_brings_its_own_tokenizer_and_a_foreign_one_is_refused(tiny_corpus, tmp_path):
    """``--set model.init_from=FOLDER`` on configs/tiny.yaml (which names its own tokenizer) uses the
    folder's tokenizer; a tokenizer given with it whose ids do not fit the model is refused in one
    line naming both."""
    from tokenizer.train_tokenizer import save_tokenizer, train_bpe, wrap_fast
    from train import config as C
    from train.run import resolve

    _, tok_dir = tiny_corpus
    hf_dir = hf_folder(tiny_hf_gpt_neo(vocab_size=512), tok_dir, tmp_path / "hf")
    cfg = C.load("configs/tiny.yaml", [f"model.init_from={hf_dir}", "data.block_size=32"])
    assert cfg.tokenizer.path == ""  # tiny.yaml's artifacts/tokenizer was written for tiny.yaml's model
    assert resolve(cfg, 8).tokenizer.path == str(hf_dir)
    big = tmp_path / "big_tok"
    save_tokenizer(wrap_fast(train_bpe(stdlib_texts(300_000), vocab_size=600, progress=False)), big)
    foreign = C.load("configs/tiny.yaml", [f"model.init_from={hf_dir}", f"tokenizer.path={big}", "data.block_size=32"])
    assert foreign.tokenizer.path == str(big)  # given on the command line: kept
    with pytest.raises(C.ConfigError, match=r"^tokenizer\.path: ") as err:
        resolve(foreign, 8)
    message = str(err.value)
    assert "\n" not in message and str(big) in message and str(hf_dir) in message
