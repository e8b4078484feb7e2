"""Data options for fine-tuning (issue: Autocoder recipe): language control codes,
fill-in-the-middle, sliding-window packing, and the padding-aware loss they rely on."""

import json
from pathlib import Path

import numpy as np
import pytest

from data_processing.fim import infill_prompt
from data_processing.loader import TokenLoader, validation_batches
from data_processing.packing import DocumentEncoder, EncodeOptions, cut_windows
from data_processing.shards import write_shard
from data_processing.sources import Document
from data_processing.tokens import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, FIM_TOKENS, control_token
from tests.helpers import byte_level_bpe, stdlib_documents, stdlib_texts

LANGS = ["Python", "Shell"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A 600-token byte-level BPE with the control codes of two languages and the FIM sentinels
    as special tokens (what ``train.vocab.prepare_tokenizer`` adds for a run)."""

    tok = byte_level_bpe(stdlib_texts(200_000), 600, tuple(control_token(x) for x in LANGS) + FIM_TOKENS)
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def _docs(n: int, seed: int = 0) -> list[str]:
    return stdlib_documents(n, source_bytes=150_000, lengths=(10, 900), seed=seed)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    docs = _docs(80)
    for s in range(2):
        write_shard(root / f"s{s}.jsonl.zst", ({"text": t, "meta": {"language": LANGS[i % 2]}}
                                               for i, t in enumerate(docs[s * 40 : (s + 1) * 40])))
    return root


def _ids(tok, name: str) -> int:
    return tok.token_to_id(name)


# -- fill-in-the-middle -------------------------------------------------------------------------


def _split_at(ids: list[int], marker: int) -> tuple[list[int], list[int]]:
    i = ids.index(marker)
    return ids[:i], ids[i + 1 :]


@pytest.mark.parametrize("spm", [False, True], ids=["psm", "spm"])
def test_fim_layout_sentinels_and_decode_restores_the_document(tok_dir, tok, spm):
    enc = DocumentEncoder(tok_dir, EncodeOptions(fim_rate=1.0, fim_spm_rate=1.0 if spm else 0.0, seed=3))
    pre, suf, mid, eos = (_ids(tok, t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, "<|endoftext|>"))
    texts = _docs(40, seed=1)
    for i, text in enumerate(texts):
        ids = enc.encode([Document(text, "Python", (0, 0, i + 1))]).tolist()
        assert ids[-1] == eos and ids.count(eos) == 1
        assert [ids.count(s) for s in (pre, suf, mid)] == [1, 1, 1]
        assert ids[0] == pre
        body = ids[1:-1]
        if spm:  # <pre> <suf> suffix <mid> prefix middle
            assert body[0] == suf
            suffix, prefix_middle = _split_at(body[1:], mid)
            restored = tok.decode(prefix_middle) + tok.decode(suffix)
        else:  # <pre> prefix <suf> suffix <mid> middle
            prefix, rest = _split_at(body, suf)
            suffix, middle = _split_at(rest, mid)
            restored = tok.decode(prefix) + tok.decode(middle) + tok.decode(suffix)
        assert restored == text


def test_fim_rates_within_tolerance_and_deterministic_per_document(tok_dir, tok):
    enc = DocumentEncoder(tok_dir, EncodeOptions(fim_rate=0.5, fim_spm_rate=0.3, seed=11))
    pre, suf = _ids(tok, FIM_PREFIX), _ids(tok, FIM_SUFFIX)
    # Long enough that an empty prefix (a PSM row that looks like SPM) is rare.
    docs = [Document(f"x = {i}\n" * 200, None, (0, 1, i + 1)) for i in range(3000)]
    encoded = [enc.encode([d]).tolist() for d in docs]
    fim = [ids for ids in encoded if ids[0] == pre]
    spm = [ids for ids in fim if ids[1] == suf]
    assert abs(len(fim) / len(docs) - 0.5) < 0.04
    assert abs(len(spm) / len(fim) - 0.3) < 0.05
    # The draw depends on the document's key and the seed, not on how documents are batched.
    np.testing.assert_array_equal(enc.encode(docs[:50]), np.concatenate([np.asarray(e) for e in encoded[:50]]))
    other = DocumentEncoder(tok_dir, EncodeOptions(fim_rate=0.5, fim_spm_rate=0.3, seed=12))
    assert [other.encode([d]).tolist() for d in docs[:200]] != encoded[:200]


def test_fim_needs_the_sentinel_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.add_special_tokens(["<|endoftext|>"])
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="fim_rate.*<\\|fim_prefix\\|>"):
        DocumentEncoder(tmp_path, EncodeOptions(fim_rate=0.5))


def test_infill_prompt_tokenizes_like_the_training_layout(tok_dir, tok):
    """The inference prompt is the PSM training layout cut before the middle."""
    enc = DocumentEncoder(tok_dir, EncodeOptions(fim_rate=1.0, seed=0))
    text = "def add(a, b):\n    return a + b\n"
    ids = enc.encode([Document(text, None, (0, 0, 1))]).tolist()
    mid = _ids(tok, FIM_MIDDLE)
    head, middle = _split_at(ids, mid)
    prefix, suffix = _split_at(head[1:], _ids(tok, FIM_SUFFIX))
    prompt = infill_prompt(tok.decode(prefix), tok.decode(suffix))
    assert tok.encode(prompt, add_special_tokens=False).ids == head + [mid]


# -- control codes -------------------------------------------------------------------------------


def test_control_code_at_every_document_start(corpus, tok_dir, tok):
    eos = _ids(tok, "<|endoftext|>")
    codes = {_ids(tok, control_token(x)) for x in LANGS}
    with TokenLoader(corpus, tok_dir, block_size=64, batch_size_per_host=4, num_workers=0, shuffle_buffer=8,
                     encode=EncodeOptions(control_codes=True)) as loader:
        stream = np.concatenate([next(loader).ravel() for _ in range(100)])
    starts = np.concatenate([[0], np.flatnonzero(stream == eos)[:-1] + 1])
    assert len(starts) > 100  # more than one epoch of 80 documents
    assert all(int(stream[s]) in codes for s in starts)
    # The code says the document's language: shard rows alternate Python / Shell by index.
    first = tok.decode(stream[starts[0] + 1 : starts[1] - 1].tolist())
    lang = LANGS[int(first.split()[2]) % 2]
    assert int(stream[starts[0]]) == _ids(tok, control_token(lang))


def test_control_codes_name_a_missing_token(tmp_path, tok_dir):
    write_shard(tmp_path / "d" / "s.jsonl.zst", [{"text": "x = 1\n", "meta": {"language": "Rust"}}] * 50)
    with pytest.raises(ValueError, match=r"no token '<\|rust\|>' for language 'Rust'"):
        validation_batches(tmp_path / "d", tok_dir, block_size=8, batch_size_per_host=1, num_batches=1,
                           encode=EncodeOptions(control_codes=True))


# -- sliding windows ----------------------------------------------------------------------------


@pytest.mark.parametrize("n,window,stride", [(5, 8, 7), (8, 8, 7), (9, 8, 7), (50, 8, 7), (50, 8, 3), (23, 8, 1)])
def test_windows_cover_every_token(n, window, stride):
    ids = np.arange(100, 100 + n, dtype=np.int32)
    w = cut_windows(ids, window, stride)
    assert w.shape[1] == window and w.dtype == np.int32
    real = w[w >= 0]
    assert set(real.tolist()) == set(ids.tolist())  # coverage
    if n <= window:
        assert w.shape[0] == 1 and (w[0, n:] == -1).all()
    else:
        assert (w >= 0).all()
        starts = [int(row[0]) - 100 for row in w]
        assert starts[:-1] == list(range(0, n - window, stride)) and starts[-1] == n - window
    if stride == window - 1 and n > window:
        # Every label token (all but each row's first) is predicted at least once.
        labels = set(w[:, 1:].ravel().tolist())
        assert labels == set(ids[1:].tolist())


def test_windows_packing_rows_hold_one_document_each(corpus, tok_dir, tok):
    eos = _ids(tok, "<|endoftext|>")
    block = 48
    with TokenLoader(corpus, tok_dir, block_size=block, batch_size_per_host=4, num_workers=0, shuffle_buffer=1,
                     encode=EncodeOptions(window=block + 1, stride=block)) as loader:
        rows = np.concatenate([next(loader) for _ in range(60)])
    assert rows.shape[1] == block + 1
    padded = 0
    for row in rows:
        pad = np.flatnonzero(row < 0)
        if len(pad):
            padded += 1
            assert (row[pad[0]:] == -1).all() and row[pad[0] - 1] == eos  # padding only after EOS
        assert (row == eos).sum() <= 1
    assert padded > 0  # short documents are padded...
    assert (rows[:, -1] == eos).sum() > 20  # ...and a long document's last window ends at its EOS


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_with_fim_control_codes_and_windows(corpus, tok_dir, workers):
    opts = EncodeOptions(control_codes=True, fim_rate=0.5, fim_spm_rate=0.5, window=33, stride=20, seed=5)

    def make():
        return TokenLoader(corpus, tok_dir, block_size=32, batch_size_per_host=3, num_workers=workers,
                           shuffle_buffer=8, tokenize_batch=4, seed=2, encode=opts)

    k = 37  # crosses an epoch boundary
    with make() as straight:
        reference = [next(straight) for _ in range(k + 21)]
    with make() as first:
        for _ in range(k):
            next(first)
        saved = json.loads(json.dumps(first.state()))
    with make() as second:
        second.restore(saved)
        resumed = [next(second) for _ in range(21)]
    for i, (a, b) in enumerate(zip(reference[k:], resumed, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"batch {k + i} differs after restore")
    # A state saved with other encode options is refused instead of silently drifting.
    plain = TokenLoader(corpus, tok_dir, block_size=32, batch_size_per_host=3, num_workers=0, seed=2)
    with plain, pytest.raises(ValueError, match="encode"):
        plain.restore(saved)


# -- the loss ignores padding ---------------------------------------------------------------------


def test_loss_ignores_padding_and_accumulation_weights_real_tokens():
    import jax
    import jax.numpy as jnp

    from tests.helpers import tiny_config
    from train.core import step

    cfg = tiny_config("model.vocab_size=64", "model.compute_dtype=float32")
    params = step.Transformer(cfg.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    full = rng.integers(0, 64, (2, 17)).astype(np.int32)
    padded = full.copy()
    padded[0, 9:] = -1  # row 0 keeps 9 tokens: 8 labels
    loss_fn = jax.jit(step.loss_fn, static_argnums=2)  # compiled: eager flax is slow on CPU
    loss_sum_fn = jax.jit(step.loss_sum_fn, static_argnums=2)
    real = loss_fn(params, jnp.asarray(padded), cfg.model)
    trimmed_sum, _ = loss_sum_fn(params, jnp.asarray(full[:1, :9]), cfg.model)
    other_sum, _ = loss_sum_fn(params, jnp.asarray(full[1:]), cfg.model)
    assert float(real) == pytest.approx(float((trimmed_sum + other_sum) / (8 + 16)), rel=1e-5)
    assert float(real) != pytest.approx(float(loss_fn(params, jnp.asarray(full), cfg.model)), rel=1e-3)
    chunked = tiny_config("model.vocab_size=64", "model.compute_dtype=float32", "model.loss_chunk_size=5")
    assert float(loss_fn(params, jnp.asarray(padded), chunked.model)) == pytest.approx(float(real), rel=1e-5)
