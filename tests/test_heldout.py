"""The held-out evaluation set (``data_processing.heldout``): a seeded draw across all
validation shards, one language per row (checked against documents tokenized here), exactly
``eval_tokens`` tokens, the same however it is computed, and a too-large request refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_processing import heldout as H
from data_processing.shards import list_shards, write_shard
from data_processing.tokens import control_token
from tests.helpers import byte_level_bpe, stdlib_documents, stdlib_texts

LANGS = ["Python", "Shell", "Go"]
SHARDS, REPOS_PER_SHARD, FILES = 8, 5, 4
BLOCK = 63


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A 600-token byte-level BPE with control codes (which the held-out rows must not hold)."""
    tok = byte_level_bpe(stdlib_texts(150_000), 600, tuple(control_token(x) for x in LANGS))
    out = tmp_path_factory.mktemp("ho_tok")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def validation(tmp_path_factory) -> tuple[Path, list[dict]]:
    """8 shards of 5 repositories x 4 files, stored repository after repository; each repository
    one language (every 7th file has none: ``unknown``); headers ``# shard S repo R file F``."""
    root = tmp_path_factory.mktemp("ho_val")
    n = SHARDS * REPOS_PER_SHARD * FILES
    texts = stdlib_documents(n, source_bytes=150_000, lengths=(50, 900), header="", seed=9)
    records = []
    for s in range(SHARDS):
        shard = []
        for r in range(REPOS_PER_SHARD):
            repo = s * REPOS_PER_SHARD + r
            for f in range(FILES):
                i = len(records) + len(shard)
                meta = {"repo_name": f"repo{repo}"} | ({} if i % 7 == 3 else {"language": LANGS[repo % 3]})
                shard.append({"text": f"# shard {s} repo {repo} file {f}\n" + texts[i], "meta": meta})
        write_shard(root / f"validation-{s:05d}.jsonl.zst", shard)
        records += shard
    return root, records


def _doc_tokens(records: list[dict], tok_dir: Path) -> list[np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    return [np.asarray(tok.encode(r["text"], add_special_tokens=False).ids, np.int32) for r in records]


def _language(record: dict) -> str:
    return record["meta"].get("language", H.UNKNOWN)


def _available(records, docs, window: int) -> int:
    """The most eval_tokens the set can give, recomputed: full one-language rows plus the largest remainder."""
    per_language: dict[str, int] = {}
    for r, d in zip(records, docs, strict=True):
        per_language[_language(r)] = per_language.get(_language(r), 0) + len(d) + 1
    full = sum(n // window for n in per_language.values())
    return full * window + max(n % window for n in per_language.values())


def _owners(held: H.HeldOut, records, docs, eos: int) -> list[set[int]]:
    """For each row, the documents its tokens come from, checked piece by piece: a piece between
    two EOS is a whole document, the first piece a document's tail, the last one a head, and all
    of the row's language."""
    out = []
    for row, language in zip(held.rows, held.language, strict=True):
        real = row[row >= 0]
        cuts = np.flatnonzero(real == eos)
        pieces = np.split(real, cuts + 1)
        candidates = [i for i, r in enumerate(records) if _language(r) == language]
        owners = set()
        for k, piece in enumerate(pieces):
            body = piece[:-1] if len(piece) and piece[-1] == eos else piece
            if not len(piece):
                continue
            whole = k > 0 and piece[-1] == eos  # starts after an EOS and ends with one

            def fits(d, body=body, k=k, whole=whole, piece=piece):
                if whole:
                    return np.array_equal(d, body)
                if k == 0 and piece[-1] == eos:
                    return len(body) <= len(d) and np.array_equal(d[len(d) - len(body):], body)
                if k == 0:  # no EOS in the row at all: a slice of one document
                    return any(np.array_equal(d[s : s + len(body)], body) for s in range(len(d) - len(body) + 1))
                return np.array_equal(d[: len(body)], body)

            match = [i for i in candidates if fits(docs[i])]
            assert match, f"a piece of a {language} row is not from a {language} document"
            owners.add(match[0])
        out.append(owners)
    return out


def test_rows_one_language_each_drawn_across_shards(validation, tok_dir):
    """Exactly eval_tokens tokens, -1 only at the end of the last row, no control codes; every
    row's pieces come from documents of its language; a fifth of the set spans nearly every shard."""
    root, records = validation
    docs = _doc_tokens(records, tok_dir)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    total = sum(len(d) + 1 for d in docs)
    eval_tokens = total // 5 + 17  # a fifth of the set, not a whole number of rows
    held = H.heldout_rows(root, tok_dir, block_size=BLOCK, eval_tokens=eval_tokens, seed=1)
    w = BLOCK + 1
    assert held.rows.dtype == np.int32 and held.rows.shape == (eval_tokens // w + 1, w)
    assert held.tokens == eval_tokens == int((held.rows >= 0).sum())
    assert (held.rows[:-1] >= 0).all() and (held.rows[-1, (eval_tokens % w):] == -1).all()
    assert len(held.language) == len(held.rows) and set(held.language) == set(LANGS) | {H.UNKNOWN}
    assert sum(held.token_counts().values()) == eval_tokens
    controls = [tok.token_to_id(control_token(x)) for x in LANGS]
    assert not np.isin(held.rows, controls).any()
    owners = set().union(*_owners(held, records, docs, eos))
    shards = {records[i]["text"].split()[2] for i in owners}
    repos = {records[i]["meta"]["repo_name"] for i in owners}
    # A fifth of the tokens, from nearly every shard and most repositories (the head of the
    # sorted stream would be the first two shards' ten repositories).
    assert len(shards) >= SHARDS - 1 and len(repos) > SHARDS * REPOS_PER_SHARD // 2


def test_same_set_however_computed(validation, tok_dir, monkeypatch):
    """The folder as str, Path or list of shards, texts kept or re-read, one round or many:
    the same rows and languages."""
    root, _ = validation
    kw = dict(block_size=BLOCK, eval_tokens=3000, seed=5)
    ref = H.heldout_rows(str(root), tok_dir, **kw)
    again = H.heldout_rows(root, str(tok_dir), **kw)
    monkeypatch.setattr(H, "_KEEP_TEXT_CHARS", 0)  # re-read texts by position
    monkeypatch.setattr(H, "_CHARS_PER_TOKEN_GUESS", 0.01)  # tiny first rounds: many of them
    monkeypatch.setattr(H, "_MIN_ROUND_DOCS", 1)
    reread = H.heldout_rows(list_shards(str(root)), tok_dir, **kw)
    for other in (again, reread):
        np.testing.assert_array_equal(other.rows, ref.rows)
        assert other.language == ref.language and other.tokens == ref.tokens


def test_another_seed_another_set(validation, tok_dir):
    """Another seed draws other documents: nearly every row differs."""
    root, _ = validation
    a, b = (H.heldout_rows(root, tok_dir, block_size=BLOCK, eval_tokens=3000, seed=s) for s in (0, 1))
    assert a.rows.shape == b.rows.shape
    assert (a.rows != b.rows).any(axis=1).mean() > 0.9


def test_too_many_eval_tokens_refused(validation, tok_dir):
    """The most the set can give (recomputed here) is served; one more is refused in one line."""
    root, records = validation
    docs = _doc_tokens(records, tok_dir)
    available = _available(records, docs, BLOCK + 1)
    held = H.heldout_rows(root, tok_dir, block_size=BLOCK, eval_tokens=available, seed=2)
    assert held.tokens == available
    with pytest.raises(ValueError, match=rf"^data\.eval_tokens: {available + 1} tokens requested .* at most "
                                         rf"{available} ") as err:
        H.heldout_rows(root, tok_dir, block_size=BLOCK, eval_tokens=available + 1, seed=2)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="data.eval_tokens"):
        H.heldout_rows(root, tok_dir, block_size=BLOCK, eval_tokens=0)


def test_batches_cover_every_row_once(validation, tok_dir):
    """Global batches padded with -1 rows; the process slices concatenate to the global batch."""
    root, _ = validation
    held = H.heldout_rows(root, tok_dir, block_size=BLOCK, eval_tokens=40 * (BLOCK + 1) + 5, seed=0)
    assert len(held.rows) == 41
    one = held.batches(16)
    assert len(one) == 3
    for count in (2, 4):
        parts = [held.batches(16, i, count) for i in range(count)]
        for step, (rows_BT, index_B) in enumerate(one):
            np.testing.assert_array_equal(np.concatenate([p[step][0] for p in parts]), rows_BT)
            np.testing.assert_array_equal(np.concatenate([p[step][1] for p in parts]), index_B)
    index = np.concatenate([i for _, i in one])
    assert index[:41].tolist() == list(range(41)) and (index[41:] == -1).all()
    rows = np.concatenate([r for r, _ in one])
    np.testing.assert_array_equal(rows[:41], held.rows)
    assert (rows[41:] == -1).all()
    with pytest.raises(ValueError, match="train.batch_size"):
        held.batches(6, 0, 4)


def test_bad_record_raises_or_is_skipped(tmp_path, tok_dir):
    """A bad record raises naming file:line, or with skip_bad is left out."""
    good = {"text": "def f():\n    return 1\n" * 20, "meta": {"language": "Python"}}
    (tmp_path / "v.jsonl").write_text(json.dumps(good) + "\n{broken\n" + json.dumps(good) + "\n")
    from data_processing.shards import ShardError

    with pytest.raises(ShardError, match=r"v\.jsonl:2"):
        H.heldout_rows(tmp_path, tok_dir, block_size=BLOCK, eval_tokens=100)
    held = H.heldout_rows(tmp_path, tok_dir, block_size=BLOCK, eval_tokens=100, skip_bad=True)
    assert held.tokens == 100 and held.language == ["Python", "Python"]
