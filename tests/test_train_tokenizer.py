"""Tests for tokenizer.train_tokenizer: training, layout, loading, round-trips and bad input."""

from __future__ import annotations

import json
import warnings

import pytest
from tokenizers import pre_tokenizers

from data_processing.shards import write_shard
from tests.tokenizer_sample import (
    edge_case_texts,
    sample_texts,
    small_tokenizer,
    stdlib_files,
    write_sample_shards,
)
from tokenizer.train_tokenizer import EOS_TOKEN, iter_texts, load_tokenizer, main, train_bpe


def test_decode_encode_roundtrip_every_sample_file():
    tok = small_tokenizer()
    texts = sample_texts()
    assert set(edge_case_texts()) <= set(texts)
    bad = []
    for name, text in texts.items():
        ids = tok.encode(text)
        if tok.decode(ids) != text:
            bad.append(name)
        # The end-of-text marker inside a file is the only thing skip_special_tokens may drop.
        if EOS_TOKEN not in text and tok.decode(ids, skip_special_tokens=True) != text:
            bad.append(name + " (skip_special_tokens)")
    assert bad == []


def test_cli_trains_exact_vocab_with_eos_last_and_autotokenizer_loads(tmp_path, capsys):
    from transformers import AutoTokenizer

    data = write_sample_shards(tmp_path / "train", [p.read_text() for p in stdlib_files()[:15]])
    out = tmp_path / "tok"
    assert main(["--data", str(data), "--vocab-size", "700", "--out", str(out), "--no-progress"]) == 0
    assert (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".tok*")), "temporary folder left behind"
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 700
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == 699
    assert tok.convert_ids_to_tokens(699) == EOS_TOKEN
    vocab = tok.get_vocab()
    # Every byte symbol is in the vocabulary, so any byte string is encodable.
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    text = "def f(x):\n\treturn x  # é 😀\r\n"
    assert tok.decode(tok.encode(text)) == text
    assert "700 tokens" in capsys.readouterr().out
    # Loadable by transformers 4.x too: a class name it knows, and the special-tokens map.
    assert (
        json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == EOS_TOKEN


def test_cli_warns_in_one_line_when_corpus_is_too_small(tmp_path, capsys):
    data = write_sample_shards(tmp_path / "train", ["x = 1\n"] * 5)
    assert main(["--data", str(data), "--out", str(tmp_path / "tok"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: corpus too small for --vocab-size 50257: reached " in err
    assert len(load_tokenizer(tmp_path / "tok")) < 300


def test_iter_texts_reads_at_most_max_bytes():
    consumed = []

    def docs():
        for i in range(1000):
            consumed.append(i)
            yield f"doc {i} é" * 10  # non-ASCII so the cut lands on a character boundary

    batches = list(iter_texts(docs(), max_bytes=1000, progress=False, batch_size=4))
    texts = [t for b in batches for t in b]
    total = sum(len(t.encode("utf-8")) for t in texts)
    assert 1000 - 4 < total <= 1000
    assert len(consumed) < 20, "iter_texts kept reading after the byte cap"
    assert all(len(b) <= 4 for b in batches)


def test_tiny_corpus_warns_with_size_reached():
    with pytest.warns(UserWarning, match=r"reached \d+ tokens"):
        tok = train_bpe(["x = 1\ny = 2\n"] * 3, vocab_size=50257, progress=False)
    assert 257 <= tok.get_vocab_size() < 50257
    assert tok.token_to_id(EOS_TOKEN) == tok.get_vocab_size() - 1


def test_enough_text_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = train_bpe([[p.read_text() for p in stdlib_files()[:10]]], vocab_size=400, progress=False)
    assert tok.get_vocab_size() == 400


def test_existing_vocab_merges_folder_is_usable(tmp_path):
    trained = small_tokenizer(1000)
    model = json.loads(trained.backend_tokenizer.to_str())["model"]
    legacy = tmp_path / "gpt2"
    legacy.mkdir()
    vocab = dict(model["vocab"])
    vocab[EOS_TOKEN] = len(vocab)  # GPT-2's vocab.json holds <|endoftext|> as the last entry
    (legacy / "vocab.json").write_text(json.dumps(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (legacy / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")

    tok = load_tokenizer(legacy)
    assert tok.eos_token_id == len(vocab) - 1
    for text in list(sample_texts().values())[:20]:
        assert tok.encode(text) == trained.encode(text)

    out = tmp_path / "tok"
    assert main(["--from-existing", str(legacy), "--out", str(out)]) == 0
    again = load_tokenizer(out)
    assert again.encode("    return x\n") == trained.encode("    return x\n")
    assert again.decode(again.encode("a\tb " + EOS_TOKEN)) == "a\tb " + EOS_TOKEN


def test_bad_inputs_give_one_clear_line(tmp_path, capsys):
    shard = tmp_path / "train" / "bad.jsonl"
    write_shard(shard, [{"content": "no text field"}])
    assert main(["--data", str(tmp_path / "train"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "'text'" in err
    assert not (tmp_path / "o").exists()

    assert main(["--from-existing", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: not a tokenizer folder" in capsys.readouterr().err

    (tmp_path / "notok").mkdir()
    assert main(["--from-existing", str(tmp_path / "notok"), "--out", str(tmp_path / "o")]) == 2
    assert "expected tokenizer.json, or vocab.json and merges.txt" in capsys.readouterr().err

    write_sample_shards(tmp_path / "empty", ["", ""])
    assert main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no training text" in capsys.readouterr().err

    write_sample_shards(tmp_path / "ok", ["x = 1\n"])
    assert main(["--data", str(tmp_path / "ok"), "--vocab-size", "100", "--out", str(tmp_path / "o")]) == 2
    assert "--vocab-size 100: must be at least 257" in capsys.readouterr().err
