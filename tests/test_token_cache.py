"""The pre-tokenized token cache: batches identical to the live loader (every encode option,
both host splits, workers), exact resume across live and cached loaders, incremental and
atomic builds, stale / missing / damaged entries, bad records replayed, and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from data_processing import token_cache as tc
from data_processing.loader import TokenLoader
from data_processing.packing import EncodeOptions
from data_processing.shards import ShardError, write_shard
from data_processing.token_cache import TokenCacheError, build_cache
from data_processing.tokens import FIM_TOKENS, control_token
from tests.helpers import byte_level_bpe, stdlib_documents, stdlib_texts

BLOCK, BATCH = 32, 3
LANGS = ["Python", "Shell"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A 600-token byte-level BPE with the control codes and FIM sentinels as special tokens."""
    tok = byte_level_bpe(stdlib_texts(150_000), 600, tuple(control_token(x) for x in LANGS) + FIM_TOKENS)
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    return out


def _docs(n: int) -> list[str]:
    return stdlib_documents(n, source_bytes=120_000, lengths=(10, 700))


def _write_corpus(root: Path, n_shards: int = 3, per_shard: int = 25) -> Path:
    docs = _docs(n_shards * per_shard)
    for s in range(n_shards):
        rows = [{"text": t, "meta": {"language": LANGS[i % 2]}}
                for i, t in enumerate(docs[s * per_shard : (s + 1) * per_shard])]
        write_shard(root / f"s{s}.jsonl.zst", rows)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cache(corpus, tok_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    summary = build_cache(corpus, tok_dir, out, workers=1, progress=False)
    assert (summary.shards, summary.built, summary.reused) == (3, 3, 0) and summary.tokens_built > 0
    return out


def _loader(corpus, tok_dir, **kw) -> TokenLoader:
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 8)
    kw.setdefault("tokenize_batch", 4)
    kw.setdefault("seed", 2)
    return TokenLoader(corpus, tok_dir, block_size=BLOCK, batch_size_per_host=BATCH, **kw)


def _take(loader, n: int) -> np.ndarray:
    return np.stack([next(loader) for _ in range(n)])


OPTIONS = {
    "plain": EncodeOptions(),
    "control_codes+windows": EncodeOptions(control_codes=True, window=BLOCK + 1, stride=20),
    "fim+control_codes": EncodeOptions(control_codes=True, fim_rate=0.5, fim_spm_rate=0.5, seed=5),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_cached_batches_equal_live_batches(corpus, tok_dir, cache, name):
    opts = OPTIONS[name]
    n = 90  # more than one epoch (~70 batches of 3 x 33 tokens per epoch without windows)
    with _loader(corpus, tok_dir, encode=opts) as live:
        expected = _take(live, n)
    workers = 2 if opts.fim_rate else 1
    with _loader(corpus, tok_dir, encode=opts, token_cache=str(cache), num_workers=workers) as cached:
        assert isinstance(cached._docs_source, tc.CachedShardSource)
        # Without FIM nothing is left to tokenize: no worker process is started.
        assert (cached._pool is None) == (opts.fim_rate == 0)
        np.testing.assert_array_equal(_take(cached, n), expected)


@pytest.mark.parametrize("split", ["shards", "lines"])
def test_cached_two_hosts_equal_live(corpus, tok_dir, cache, split):
    for host in range(2):
        kw = dict(process_index=host, process_count=2, host_split=split)
        with _loader(corpus, tok_dir, **kw) as live, _loader(corpus, tok_dir, token_cache=str(cache), **kw) as cached:
            np.testing.assert_array_equal(_take(cached, 40), _take(live, 40))


@pytest.mark.parametrize("k", [5, 80])
def test_resume_across_live_and_cached(corpus, tok_dir, cache, k):
    """A state saved by a live loader resumes in a cached one (and back): the state holds
    positions, which the two share; k = 80 is past the first epoch."""
    opts = OPTIONS["control_codes+windows"]
    with _loader(corpus, tok_dir, encode=opts) as straight:
        reference = _take(straight, k + 12)
    for first_cache, second_cache in ((None, str(cache)), (str(cache), None)):
        with _loader(corpus, tok_dir, encode=opts, token_cache=first_cache) as first:
            _take(first, k)
            saved = json.loads(json.dumps(first.state()))
        with _loader(corpus, tok_dir, encode=opts, token_cache=second_cache) as second:
            second.restore(saved)
            np.testing.assert_array_equal(_take(second, 12), reference[k:])


def test_build_is_incremental_atomic_and_parallel(corpus, tok_dir, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    # A build that fails half way leaves no entry and no temporary file behind.
    real = np.savez

    def broken(file, **arrays):
        real(file, **arrays)
        raise OSError("disk full")

    monkeypatch.setattr(tc.np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        build_cache(corpus, tok_dir, out, workers=1, progress=False)
    monkeypatch.undo()
    assert [p for p in out.rglob("*") if p.is_file()] == []
    # Two builder processes give the same entries as one.
    first = build_cache(corpus, tok_dir, out, workers=2, progress=False)
    assert first.built == 3
    single = build_cache(corpus, tok_dir, tmp_path / "single", workers=1, progress=False)
    for a, b in zip(sorted(out.rglob("*.npz")), sorted((tmp_path / "single").rglob("*.npz")), strict=True):
        with np.load(a) as za, np.load(b) as zb:
            for key in ("tokens", "offsets", "kinds"):
                np.testing.assert_array_equal(za[key], zb[key])
    assert single.tokens_built == first.tokens_built
    again = build_cache(corpus, tok_dir, out, workers=2, progress=False)
    assert (again.built, again.reused) == (0, 3)
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and p.name.startswith(".")) == []
    forced = build_cache(corpus, tok_dir, out, workers=1, progress=False, force=True)
    assert forced.built == 3


def test_stale_missing_and_damaged_entries(tok_dir, tmp_path):
    data = _write_corpus(tmp_path / "data", n_shards=2, per_shard=20)
    out = tmp_path / "cache"
    with pytest.raises(TokenCacheError, match=r"no token cache entry for .*s0\.jsonl\.zst .*python -m "
                                              r"data_processing\.token_cache --data"):
        _loader(data, tok_dir, token_cache=str(out))
    build_cache(data, tok_dir, out, workers=1, progress=False)
    with _loader(data, tok_dir, token_cache=str(out)) as ok:
        expected = _take(ok, 5)
    # A shard rewritten since the build is stale: one line naming it.
    shard = data / "s1.jsonl.zst"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(TokenCacheError, match=r"stale token cache entry: .*s1\.jsonl\.zst changed") as err:
        _loader(data, tok_dir, token_cache=str(out))
    assert "\n" not in str(err.value)
    summary = build_cache(data, tok_dir, out, workers=1, progress=False)  # rebuilds just that one
    assert (summary.built, summary.reused) == (1, 1)
    # Flipped bits inside the tokens: the zip CRC-32 fails when the entry is read.
    entry = next(p for p in out.rglob("s0-*.npz"))
    raw = bytearray(entry.read_bytes())
    with np.load(entry) as z:
        tokens = z["tokens"].tobytes()
    at = bytes(raw).index(tokens[:64]) + 20
    raw[at] ^= 0xFF
    entry.write_bytes(bytes(raw))
    with _loader(data, tok_dir, token_cache=str(out)) as damaged, pytest.raises(TokenCacheError, match="damaged"):
        _take(damaged, 20)
    # A truncated entry is refused when the loader opens the cache.
    entry.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(TokenCacheError, match=r"s0-.*\.npz: damaged token cache entry"):
        _loader(data, tok_dir, token_cache=str(out))
    summary = build_cache(data, tok_dir, out, workers=1, progress=False)  # a damaged entry is rebuilt
    assert summary.built == 1
    with _loader(data, tok_dir, token_cache=str(out)) as rebuilt:
        np.testing.assert_array_equal(_take(rebuilt, 5), expected)


def test_other_tokenizer_has_its_own_entries(corpus, tok_dir, cache, tmp_path):
    changed = json.loads((tok_dir / "tokenizer.json").read_text())
    changed["added_tokens"][-1]["content"] = "<|other|>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(changed))
    with pytest.raises(TokenCacheError, match="no token cache entry"):
        _loader(corpus, tmp_path, token_cache=str(cache))
    # Key order and whitespace do not change the hash.
    (tmp_path / "tokenizer.json").write_text(json.dumps(json.loads((tok_dir / "tokenizer.json").read_text()),
                                                        indent=1, sort_keys=True))
    assert tc.tokenizer_hash(tmp_path) == tc.tokenizer_hash(tok_dir)


def test_bad_records_are_replayed_like_the_live_reader(tok_dir, tmp_path):
    docs = _docs(40)
    data = tmp_path / "data"
    write_shard(data / "a.jsonl.zst", ({"text": t} for t in docs[:20]))
    lines = [json.dumps({"text": t}) for t in docs[20:]]
    lines[4] = '{"text": broken'
    lines[7] = ""
    (data / "b.jsonl").write_text("\n".join(lines) + "\n")
    # Without skip_bad the build refuses the shard the loader would refuse, and writes no entry for it.
    with pytest.raises(ShardError, match=r"b\.jsonl:5: not a JSON object"):
        build_cache(data, tok_dir, tmp_path / "cache", workers=1, progress=False)
    assert not list((tmp_path / "cache").rglob("b-*.npz"))
    summary = build_cache(data, tok_dir, tmp_path / "cache", workers=1, progress=False, skip_bad=True)
    assert summary.bad_records == {"not a JSON object (Expecting value)": 1}
    with pytest.raises(ShardError, match=r"b\.jsonl:5: not a JSON object"):  # fresh entry, still refused
        build_cache(data, tok_dir, tmp_path / "cache", workers=1, progress=False)
    for token_cache in (None, str(tmp_path / "cache")):
        with _loader(data, tok_dir, token_cache=token_cache) as loader, \
                pytest.raises(ShardError, match=r"b\.jsonl:5: not a JSON object"):
            _take(loader, 200)
    counts = []
    for token_cache in (None, str(tmp_path / "cache")):
        with _loader(data, tok_dir, token_cache=token_cache, skip_bad=True) as loader:
            batches = _take(loader, 60)
            # How many times the bad line was met depends on how far the prefetching thread got;
            # which lines are bad, why, and which one comes first do not.
            counts.append((batches, set(loader.bad_records.counts), loader.bad_records.examples[:1]))
    np.testing.assert_array_equal(counts[0][0], counts[1][0])
    reason = "not a JSON object (Expecting value)"
    assert counts[0][1:] == counts[1][1:] == ({reason}, [f"{data / 'b.jsonl'}:5: {reason}"])


def test_cli_builds_and_reports(corpus, tok_dir, tmp_path, capsys):
    rc = tc.main(["--data", str(corpus), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "c"), "--workers", "1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["built"] == 3 and summary["tokens_built"] > 0 and summary["tokens_per_second"] > 0
    rc = tc.main(["--data", str(tmp_path / "nothing"), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "no shards found" in err and "\n" not in err


def test_datasets_source_cannot_be_cached(tok_dir, tmp_path):
    from data_processing.loader import HFDatasetSource

    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x = 1\n"}) + "\n")
    src = HFDatasetSource("json", data_files=str(tmp_path / "d.jsonl"))
    with pytest.raises(ValueError, match="token_cache: only shard files"):
        TokenLoader(src, tok_dir, block_size=8, batch_size_per_host=1, num_workers=0, token_cache=str(tmp_path))
