"""Tests for tokenizer.add_tokens: the numpy core, the tokenizer folder and the HF-folder targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tests.tokenizer_sample import sample_texts, small_tokenizer, stdlib_files, write_sample_shards
from tokenizer.add_tokens import (
    DEFAULT_WHITESPACE_TOKENS,
    AddTokensError,
    add_to_tokenizer,
    extend_embedding,
    main,
    plan_added_tokens,
    tab_token_id,
)
from tokenizer.train_tokenizer import EOS_TOKEN, load_tokenizer, wrap_fast

FOUR = "    "


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of a float array, so comparisons are exact (NaN and -0.0 included)."""
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


@pytest.mark.parametrize(
    ("old_vocab", "rows", "new_vocab", "expected_rows"),
    [(300, 384, 304, 384), (255, 256, 259, 384), (256, 256, 256, 256), (50257, 50304, 50261, 50304)],
)
def test_extend_embedding_keeps_old_rows_and_copies_tab(old_vocab, rows, new_vocab, expected_rows):
    rng = np.random.default_rng(0)
    wte = rng.standard_normal((rows, 8)).astype(np.float16)
    wte[old_vocab - 1, 0] = -0.0  # an awkward value that a "close enough" check would miss
    tab = 9
    out = extend_embedding(wte, old_vocab, new_vocab, tab, pad_multiple=128)
    assert out.shape == (expected_rows, 8) and out.dtype == np.float16
    np.testing.assert_array_equal(bits(out[:old_vocab]), bits(wte[:old_vocab]))
    for r in range(old_vocab, new_vocab):
        np.testing.assert_array_equal(bits(out[r]), bits(wte[tab]))
    assert not out[new_vocab:].any()


def test_extend_embedding_rejects_bad_arguments():
    wte = np.ones((10, 4), np.float32)
    with pytest.raises(AddTokensError, match="tab id 10 is not an existing token"):
        extend_embedding(wte, 10, 12, 10)
    with pytest.raises(AddTokensError, match="10 rows, fewer than the 11 tokens"):
        extend_embedding(wte, 11, 12, 0)
    with pytest.raises(AddTokensError, match="smaller than the old one"):
        extend_embedding(wte, 10, 9, 0)


def test_plan_add_and_rerun():
    tok = small_tokenizer(400)
    assert plan_added_tokens(tok, DEFAULT_WHITESPACE_TOKENS) == DEFAULT_WHITESPACE_TOKENS
    old = len(tok)
    ids = add_to_tokenizer(tok, DEFAULT_WHITESPACE_TOKENS)
    assert ids == list(range(old, old + 4))
    assert tok.convert_ids_to_tokens(old - 1) == EOS_TOKEN  # <|endoftext|> keeps its id
    assert plan_added_tokens(tok, DEFAULT_WHITESPACE_TOKENS) == []
    assert plan_added_tokens(tok, [FOUR, "\t\t\t"]) == ["\t\t\t"]
    base_token = tok.convert_ids_to_tokens(300)
    with pytest.raises(AddTokensError, match="already exists in the base vocabulary as id 300"):
        plan_added_tokens(tok, [base_token])
    # Byte-level spellings count as existing: ' xyz' is the vocabulary's 'Ġxyz' ...
    # (ASCII letters only: byte-level symbols such as 'Ã' are letters too but stand for other bytes.)
    spaced = min(
        t for t in tok.get_vocab() if t[0] == "Ġ" and len(t) > 2 and t[1:].isascii() and t[1:].isalpha()
    )
    with pytest.raises(
        AddTokensError, match=f"already exists in the base vocabulary as id \\d+ \\('{spaced}'\\)"
    ):
        plan_added_tokens(tok, [" " + spaced[1:]])
    # ... except runs of whitespace, whose byte-level entries never match indentation.
    assert "ĠĠ" in tok.get_vocab() and plan_added_tokens(small_tokenizer(400), ["  "]) == ["  "]
    with pytest.raises(AddTokensError, match="already exists as a special added token, id 399"):
        plan_added_tokens(tok, [EOS_TOKEN])
    # Markers (control codes, FIM sentinels) are special: skipped when present as special,
    # refused when present as ordinary text tokens, and dropped by skip_special_tokens.
    assert plan_added_tokens(tok, [EOS_TOKEN, "<|python|>"], special=True) == ["<|python|>"]
    with pytest.raises(AddTokensError, match="already exists as an ordinary added token"):
        plan_added_tokens(tok, [FOUR], special=True)
    (marker,) = add_to_tokenizer(tok, ["<|python|>"], special=True)
    assert marker == old + 4 and "<|python|>" in tok.all_special_tokens
    ids = tok.encode("<|python|>" + FOUR + "x")
    assert ids[:2] == [marker, tok.convert_tokens_to_ids(FOUR)]
    assert tok.decode(ids, skip_special_tokens=True) == FOUR + "x"
    with pytest.raises(AddTokensError, match="listed twice"):
        plan_added_tokens(tok, ["\t\t\t", "\t\t\t"])


def test_tokenizer_without_tab_token_is_refused():
    vocab = {c: i for i, c in enumerate("abcĠ")}
    vocab[EOS_TOKEN] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    with pytest.raises(AddTokensError, match="no single '\\\\t' token"):
        tab_token_id(wrap_fast(raw))


def test_tokenizer_folder_indentation_roundtrip_report_and_rerun(tmp_path, capsys):
    from transformers import AutoTokenizer

    src, out = tmp_path / "tok", tmp_path / "tok_ws"
    small_tokenizer(1000).save_pretrained(str(src))
    val = write_sample_shards(tmp_path / "validation", [p.read_text() for p in stdlib_files()[:10]])
    argv = ["--tokenizer", str(src), "--out", str(out), "--report-data", str(val), "--no-progress"]
    assert main(argv) == 0
    assert 'added "    " as id 1002' in capsys.readouterr().out
    assert not list(tmp_path.glob(".tok_ws*")), "temporary folder left behind"

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 1004
    new_ids = {t: tok.convert_tokens_to_ids(t) for t in DEFAULT_WHITESPACE_TOKENS}
    assert list(new_ids.values()) == [1000, 1001, 1002, 1003]
    assert tok.convert_ids_to_tokens(999) == EOS_TOKEN
    # Four spaces of indentation are one token; the longest match wins for eight and two tabs.
    assert tok.encode("    return x")[0] == new_ids[FOUR]
    assert tok.encode("        pass")[0] == new_ids["        "]
    assert tok.encode("\t\tpass")[0] == new_ids["\t\t"]
    assert tok.encode("            x")[:2] == [new_ids["        "], new_ids[FOUR]]
    # Not special: skipping special tokens must keep indentation; round-trip still exact.
    for name, text in sample_texts().items():
        ids = tok.encode(text)
        assert tok.decode(ids) == text, name
        if EOS_TOKEN not in text:
            assert tok.decode(ids, skip_special_tokens=True) == text, name
    saved = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    assert [t["special"] for t in saved if t["content"] in new_ids] == [False] * 4

    report = json.loads((out / "report.json").read_text())
    assert report["tokens_before"] > 0 and report["tokens_after"] > 0
    assert report["bytes_per_token_before"] == pytest.approx(report["bytes"] / report["tokens_before"])
    assert report["vocab_before"] == 1000 and report["vocab_after"] == 1004

    # Re-running adds nothing and says so, leaving the folder untouched.
    before = (out / "tokenizer.json").read_bytes()
    assert main(["--tokenizer", str(out)]) == 0
    assert "nothing to add" in capsys.readouterr().out
    assert (out / "tokenizer.json").read_bytes() == before


def test_cli_errors_are_one_clear_line(tmp_path, capfd):
    src = tmp_path / "tok"
    small_tokenizer(400).save_pretrained(str(src))
    assert main(["--checkpoint", str(tmp_path / "run")]) == 2  # handed to train.interop.vocab's process
    err = capfd.readouterr().err.strip()
    assert err == (f"error: --checkpoint {tmp_path / 'run'}: no config.yaml "
                   "(expected a run directory of python -m train)")
    assert main(["--tokenizer", str(src), "--tokens", '["  ", "\\t"]']) == 2
    err = capfd.readouterr().err.strip()
    assert (
        err.startswith("error: token '\\t' already exists in the base vocabulary as id 197 ('ĉ')")
        and "\n" not in err
    )
    assert main(["--tokenizer", str(src), "--tokens", "not json"]) == 2
    assert "--tokens: expected a JSON list of strings" in capfd.readouterr().err
    assert main(["--hf-model", str(src), "--out", str(tmp_path / "m")]) == 2
    err = capfd.readouterr().err.strip()
    assert f"{src}: not a loadable Hugging Face causal LM folder" in err and "\n" not in err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
    assert len(load_tokenizer(src)) == 400, "a failed run changed the tokenizer"


def _tiny_gpt_neo(vocab_size: int, dtype, tied: bool = True):
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return GPTNeoForCausalLM(config).to(dtype).eval()


def _write_legacy_tokenizer(tok, folder):
    """Save ``tok`` as GPT-2's vocab.json + merges.txt, as EleutherAI/gpt-neo-125M ships it."""
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab[EOS_TOKEN] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


@pytest.mark.parametrize(
    ("dtype_name", "legacy", "tied"),
    [("float32", False, True), ("bfloat16", True, True), ("float32", False, False)],
)
def test_hf_gpt_neo_folder_roundtrip(tmp_path, capsys, dtype_name, legacy, tied):
    import torch
    from transformers import AutoTokenizer, GPTNeoForCausalLM

    dtype = getattr(torch, dtype_name)
    src, out = tmp_path / "hf", tmp_path / "hf_ws"
    tok = small_tokenizer(400)
    model = _tiny_gpt_neo(len(tok), dtype, tied)
    if not tied:  # make the output layer differ from the input embedding
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(-2.0)
    old_head = model.get_output_embeddings().weight.detach().clone()
    model.save_pretrained(str(src))
    if legacy:
        _write_legacy_tokenizer(tok, src)
        assert load_tokenizer(src).encode("x = 1\n") == tok.encode("x = 1\n")
    else:
        tok.save_pretrained(str(src))
    (src / "README.md").write_text("model card\n")
    text = "def f(x):\n\treturn x + 1\n"  # no run of 2+ spaces or 2 tabs: no new token
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        logits_before = model(ids).logits
    old_wte = model.get_input_embeddings().weight.detach().clone()
    tab = tok.encode("\t")[0]

    assert main(["--hf-model", str(src), "--out", str(out), "--no-progress"]) == 0
    new_model = GPTNeoForCausalLM.from_pretrained(str(out)).eval()
    new_tok = AutoTokenizer.from_pretrained(str(out))
    assert (out / "README.md").read_text() == "model card\n"
    assert not (out / "vocab.json").exists(), "stale tokenizer file copied"
    assert (
        json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == EOS_TOKEN
    assert new_model.config.vocab_size == len(new_tok) == 404
    wte = new_model.get_input_embeddings().weight.detach()
    assert wte.dtype == dtype and wte.shape == (404, 32)
    head = new_model.get_output_embeddings().weight.detach()
    if tied:
        assert head.data_ptr() == wte.data_ptr(), "lm_head no longer tied"
    else:
        assert head.shape == (404, 32) and torch.equal(head[:400], old_head)
        assert all(torch.equal(head[r], old_head[tab]) for r in range(400, 404))
    assert torch.equal(
        wte[:400].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        old_wte.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    for r in range(400, 404):
        assert torch.equal(wte[r], old_wte[tab])
    assert new_tok.encode(text) == ids[0].tolist()
    with torch.no_grad():
        logits_after = new_model(ids).logits
    assert logits_after.shape[-1] == 404
    torch.testing.assert_close(logits_after[..., :400], logits_before, rtol=0, atol=1e-6)
    assert new_tok.encode("    x")[0] == 402

    # Re-running on the result adds nothing; a tokenizer bigger than the model is refused.
    capsys.readouterr()
    assert main(["--hf-model", str(out)]) == 0
    assert "nothing to add" in capsys.readouterr().out
    assert main(["--hf-model", str(src), "--tokenizer", str(out), "--out", str(tmp_path / "bad")]) == 2
    assert "vocab_size 400 < 404 tokens" in capsys.readouterr().err


@pytest.mark.slow
def test_checkpoint_grows_embedding_and_optimizer_and_training_continues(tiny_corpus, tmp_path, capfd):
    """--checkpoint RUN: tokenizer + config + latest checkpoint grow together (512 -> 516 tokens,
    512 -> 640 padded rows); old rows exact, new rows = tab row, new optimizer moments zero,
    logits of text without the new tokens unchanged; training continues from the new run."""
    import os
    import subprocess
    import sys

    import jax
    import jax.numpy as jnp

    from train.core import step
    from train.core.run_dir import restore_state

    data, tok_dir = tiny_corpus
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "WANDB_MODE": "disabled"}
    common = ["--set", f"data.train_dir={data / 'train'}", "--set", f"data.validation_dir={data / 'validation'}",
              "--set", "train.eval_every=0", "--set", "train.batch_size=4", "--set", "data.block_size=32",
              "--set", "train.save_every=2", "--set", "logging.wandb_mode=disabled"]
    run, grown = tmp_path / "run", tmp_path / "grown"

    def train(config, *extra):
        proc = subprocess.run([sys.executable, "-m", "train", "--config", str(config), *common, *extra],
                              capture_output=True, text=True, env=env, timeout=1200)  # against a hang only
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    train("configs/tiny.yaml", "--set", f"tokenizer.path={tok_dir}", "--set", f"run.output_dir={run}",
          "--set", "train.max_steps=2")
    assert main(["--checkpoint", str(run), "--out", str(grown)]) == 0
    printed = capfd.readouterr().out
    assert printed.count("added ") == 4 and "continue with: python -m train" in printed

    cfg0, s0, _, _ = restore_state(run)
    cfg1, s1, loaders1, meta1 = restore_state(grown)
    assert (cfg0.model.vocab_size, cfg1.model.vocab_size) == (512, 516) and int(meta1["step"]) == 2
    assert cfg1.tokenizer.path == str(grown / "tokenizer") and cfg1.run.output_dir == str(grown)
    assert loaders1 == restore_state(run)[2]
    tok = load_tokenizer(grown / "tokenizer")
    assert tok.encode(FOUR + "x", add_special_tokens=False)[0] == tok.convert_tokens_to_ids(FOUR)
    tab = tab_token_id(tok)
    w0, w1 = np.asarray(s0.params["wte"]), np.asarray(s1.params["wte"])
    assert w0.shape[0] == 512 and w1.shape[0] == 640
    np.testing.assert_array_equal(bits(w1[:512]), bits(w0[:512]))
    np.testing.assert_array_equal(w1[512:516], np.broadcast_to(w0[tab], (4, w0.shape[1])))
    assert not w1[516:].any()
    moments = [np.asarray(x) for x in jax.tree_util.tree_leaves(s1.opt_state) if np.shape(x)[:1] == (640,)]
    assert len(moments) == 2, "expected Adam's two moments of the embedding"
    for moment in moments:
        assert not moment[512:].any()

    text = "def f(x):\n\treturn x + 1\n"
    ids = jnp.asarray([tok.encode(text, add_special_tokens=False)])
    before = step.next_token_logits(s0.params, ids, cfg=cfg0.model)
    after = step.next_token_logits(s1.params, ids, cfg=cfg1.model)
    np.testing.assert_allclose(np.asarray(after)[..., :512], np.asarray(before), rtol=1e-5, atol=1e-5)

    assert main(["--checkpoint", str(grown)]) == 0
    assert "nothing to add" in capfd.readouterr().out
    out = train(grown / "config.yaml", "--set", "train.max_steps=4")
    assert "resumed from step 2" in out
    assert restore_state(grown)[3]["step"] == 4
