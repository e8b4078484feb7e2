"""Corrupt, truncated and empty shards and oversized records (issue #23): every tool refuses them
by name with exit 2, or skips and counts them with --skip-bad; one huge line is never read whole."""

import gzip
import json
import struct
import tracemalloc

import numpy as np
import pytest
import zstandard

from data_processing import dedup, minhash, prepare, token_cache
from data_processing.loader import TokenLoader
from data_processing.shards import (
    BadRecordCounter,
    EmptyShardError,
    ShardError,
    iter_records,
    write_shard,
)
from tests.helpers import byte_level_bpe, stdlib_documents, stdlib_texts

MB = 1 << 20


def _records(n: int, start: int = 0) -> list[dict]:
    docs = stdlib_documents(n + start, source_bytes=200_000, lengths=(300, 1500))[start:]
    return [{"text": d, "meta": {"repo_name": f"r{i % 3}", "file_name": f"f{i}.py"}} for i, d in enumerate(docs)]


def _corrupt(path, records):
    """A zstd shard whose second half is garbage."""
    data = zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in records).encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2] + b"\x00garbage" * 10)


def _huge_line(path, size: int, before: list[dict], after: list[dict]):
    """A zstd shard with ``before``, one record line of about ``size`` bytes (a few KB on disk:
    it compresses to almost nothing) and ``after``, written without holding the line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as w:
        for r in before:
            w.write((json.dumps(r) + "\n").encode())
        w.write(b'{"text": "')
        for _ in range(size // MB):
            w.write(b"x = 1;  " * (MB // 8))
        w.write(b'"}\n')
        for r in after:
            w.write((json.dumps(r) + "\n").encode())


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    byte_level_bpe(stdlib_texts(100_000), 400).save(str(out / "tokenizer.json"))
    return out


# -- the shared reader ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz", ".jsonl"])
def test_empty_file_is_refused_by_name_or_counted(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(EmptyShardError, match=rf"^{path}: empty file \(0 bytes\)"):
        list(iter_records(path))
    bad = BadRecordCounter()
    assert list(iter_records(path, skip_bad=True, bad=bad)) == []
    assert bad.counts == {"empty file": 1}
    if suffix != ".jsonl":
        # A compressed shard holding no record is not empty: its header-only file reads as zero records.
        write_shard(tmp_path / f"none{suffix}", [])
        assert list(iter_records(tmp_path / f"none{suffix}")) == []


def test_line_over_the_limit_is_a_bad_record_and_reading_goes_on(tmp_path):
    path = tmp_path / "big.jsonl.zst"
    before, after = _records(2), _records(2, start=2)
    _huge_line(path, 40 * MB, before, after)
    assert path.stat().st_size < MB
    with pytest.raises(ShardError, match=rf"^{path}:3: record longer than the limit of {MB} bytes"):
        list(iter_records(path, max_record_bytes=MB))
    bad = BadRecordCounter()
    tracemalloc.start()
    try:
        got = list(iter_records(path, skip_bad=True, bad=bad, max_record_bytes=MB))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == before + after
    assert bad.counts == {f"record longer than the limit of {MB} bytes (max_record_bytes)": 1}
    assert peak < 8 * MB, f"reading past a 40 MB line held {peak / MB:.1f} MB"  # never the whole line
    assert len(list(iter_records(path, max_record_bytes=None))) == 5  # no limit: the line is a record


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_limit_holds_for_every_encoding_and_exact_size_passes(tmp_path, suffix):
    line = json.dumps({"text": "y" * 1000})
    path = tmp_path / f"s{suffix}"
    payload = (line + "\n" + json.dumps({"text": "z" * 5000}) + "\n" + line).encode()  # last line: no newline
    path.write_bytes(gzip.compress(payload) if suffix.endswith(".gz") else payload)
    bad = BadRecordCounter()
    got = list(iter_records(path, skip_bad=True, bad=bad, max_record_bytes=len(line)))
    assert [len(r["text"]) for r in got] == [1000, 1000] and bad.total == 1
    assert bad.examples == [f"{path}:2: record longer than the limit of {len(line)} bytes (max_record_bytes)"]


def test_invalid_utf8_is_one_bad_record_not_the_end_of_the_shard(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff\xfe"}\n{"text": "b"}\n')
    with pytest.raises(ShardError, match=rf"^{path}:2: not valid UTF-8"):
        list(iter_records(path))
    bad = BadRecordCounter()
    assert [r["text"] for r in iter_records(path, skip_bad=True, bad=bad)] == ["a", "b"]
    assert bad.counts == {"not valid UTF-8": 1}


def test_zstd_frames_checksums_skippable_frames_and_cuts(tmp_path):
    lines = [json.dumps({"text": f"t{i}"}) + "\n" for i in range(6)]
    checked = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
    frame_a, frame_b = checked.compress("".join(lines[:3]).encode()), zstandard.ZstdCompressor().compress(
        "".join(lines[3:]).encode())
    skippable = struct.pack("<II", 0x184D2A53, 5) + b"12345"
    cases = {
        "whole": (frame_a + skippable + frame_b + skippable, None),
        "cut in a checksum": ((frame_a + frame_b)[: len(frame_a) - 2], "truncated"),
        "cut in a skippable frame": (frame_a + skippable[:-2], "truncated"),
        "garbage after a frame": (frame_a + b"not zstd at all", "unreadable shard"),
    }
    for name, (data, error) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.jsonl.zst"
        path.write_bytes(data)
        if error is None:
            assert [r["text"] for r in iter_records(path)] == [f"t{i}" for i in range(6)], name
        else:
            with pytest.raises(ShardError, match=error):
                list(iter_records(path))


# -- prepare --------------------------------------------------------------------------------------


def test_prepare_refuses_empty_and_corrupt_shards_and_says_when_nothing_is_left(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a-empty.jsonl.zst").write_bytes(b"")
    out = tmp_path / "out"
    assert prepare.main(["--shards", str(src), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {src / 'a-empty.jsonl.zst'}: empty file (0 bytes), not a shard"]
    # Skipping it leaves nothing: one line, and no report or folders pretending to be a corpus.
    assert prepare.main(["--shards", str(src), "--out", str(out), "--workers", "1", "--skip-bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: no record left to write (0 ingested")
    assert "1 bad records skipped" in err[0] and not (out / "report.json").exists()
    # With good data beside a corrupt shard: refused by name, or skipped and counted.
    write_shard(src / "b-good.jsonl.zst", _records(12))
    _corrupt(src / "c-corrupt.jsonl.zst", _records(40, start=12))
    (src / "a-empty.jsonl.zst").unlink()
    assert prepare.main(["--shards", str(src), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {src / 'c-corrupt.jsonl.zst'}:") and "unreadable" in err[0]
    report = prepare.prepare(out, shards=[str(src)], skip_bad=True, workers=1, progress=False)
    assert report["bad_records"] == {"unreadable shard": 1}
    assert report["split"]["train"]["files"] + report["split"]["validation"]["files"] >= 12


def test_prepare_max_record_bytes(tmp_path, capsys):
    src = tmp_path / "in" / "s.jsonl.zst"
    _huge_line(src, 3 * MB, _records(5), _records(5, start=5))
    out = tmp_path / "out"
    args = ["--shards", str(src.parent), "--out", str(out), "--workers", "1", "--max-record-bytes", str(MB)]
    assert prepare.main(args) == 2
    assert capsys.readouterr().err.strip() == f"error: {src}:6: record longer than the limit of {MB} bytes " \
                                              "(max_record_bytes)"
    assert prepare.main([*args, "--skip-bad"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["bad_records"] == {f"record longer than the limit of {MB} bytes (max_record_bytes)": 1}
    assert report["ingest"]["files_kept"] == 10


# -- dedup ----------------------------------------------------------------------------------------


def test_dedup_refuses_empty_corrupt_and_oversized_or_counts_them(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_shard(src / "a.jsonl.zst", _records(10))
    (src / "b.jsonl.zst").write_bytes(b"")
    base = ["--input", str(src), "--output", str(out), "--workers", "1", "--quiet"]
    assert dedup.main(base) == 2
    assert capsys.readouterr().err.strip() == f"error: {src / 'b.jsonl.zst'}: empty file (0 bytes), not a shard"
    _corrupt(src / "c.jsonl.zst", _records(30, start=10))
    _huge_line(src / "d.jsonl.zst", 2 * MB, _records(3, start=40), [])
    (src / "b.jsonl.zst").unlink()
    assert dedup.main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {src / 'c.jsonl.zst'}:") and "unreadable shard" in err[0]
    (src / "b.jsonl.zst").write_bytes(b"")
    assert dedup.main([*base, "--skip-bad", "--max-record-bytes", str(MB)]) == 0
    report = json.loads((out / "dedup_report.json").read_text())
    assert report["bad_records"] == {"empty file": 1, "unreadable shard": 1,
                                     f"record longer than the limit of {MB} bytes (max_record_bytes)": 1}
    # The kept records are re-read with the same limit, so the written shards hold exactly them.
    written = [r for p in sorted(out.glob("dedup-*.jsonl.zst")) for r in iter_records(p)]
    assert len(written) == report["output"]["files"] and report["input"]["files"] >= 13


def test_dedup_memory_is_a_small_multiple_of_the_largest_record():
    """The signature map of one large record: bounded by blocks, not ~40 bytes per text byte."""
    text = "".join(stdlib_texts(6_000_000))
    size = len(text.encode("utf-8"))
    minhash.word_hashes("warm up " * 100_000)  # the shared power tables, not the record, first
    tracemalloc.start()
    try:
        dedup.map_signatures([text], 128, 1, 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * size, f"signatures of a {size / MB:.1f} MB record took {peak / size:.1f}x its size"


def test_blocked_hashing_is_exact(monkeypatch):
    text = "".join(stdlib_texts(400_000)) + "x" * 50_000 + " é " * 1000
    whole = minhash.word_hashes(text)
    expected = minhash.hash_bytes(dedup.normalise_whitespace(text).encode("utf-8"))
    monkeypatch.setattr(minhash, "_BLOCK_BYTES", 997)
    monkeypatch.setattr(dedup.params, "_PIECE_CHARS", 13)
    np.testing.assert_array_equal(minhash.word_hashes(text), whole)
    assert dedup.exact_hash(text) == expected


# -- token cache and loader ---------------------------------------------------------------------


def test_token_cache_build_refuses_a_corrupt_shard_or_records_it(tmp_path, tok_dir, capsys):
    data = tmp_path / "data"
    write_shard(data / "a.jsonl.zst", _records(8))
    _corrupt(data / "b.jsonl.zst", _records(30, start=8))
    args = ["--data", str(data), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "cache"), "--workers", "1"]
    assert token_cache.main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("token cache:")]
    assert len(err) == 1 and err[0].startswith(f"error: {data / 'b.jsonl.zst'}:") and "unreadable shard" in err[0]
    assert not list((tmp_path / "cache").rglob("b-*.npz"))
    assert token_cache.main([*args, "--skip-bad"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bad_records"] == {"unreadable shard": 1}
    (data / "c.jsonl.zst").write_bytes(b"")
    assert token_cache.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {data / 'b.jsonl.zst'}:")
    assert token_cache.main([*args[:-2], "--workers", "2", "--skip-bad"]) == 0  # builder processes too
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bad_records"] == {
        "unreadable shard": 1, "empty file": 1}
    # The loader meets the recorded ends as it meets them in the shards: by the same reasons.
    counts = []
    for cache in (None, str(tmp_path / "cache")):
        with TokenLoader(data, tok_dir, block_size=16, batch_size_per_host=2, num_workers=0, skip_bad=True,
                         token_cache=cache) as loader:
            for _ in range(10_000):
                next(loader)
                if loader.state()["docs"]["epoch"] >= 1:
                    break
            counts.append(set(loader.bad_records.counts))
    assert counts[0] == counts[1] == {"unreadable shard", "empty file"}


def test_loader_refuses_an_empty_or_oversized_shard_by_name(tmp_path, tok_dir):
    data = tmp_path / "data"
    write_shard(data / "a.jsonl.zst", _records(20))
    (data / "b.jsonl.zst").write_bytes(b"")
    kw = dict(block_size=16, batch_size_per_host=2, num_workers=0, shuffle_buffer=4, tokenize_batch=4)
    with TokenLoader(data, tok_dir, **kw) as loader, pytest.raises(ShardError, match=r"b\.jsonl\.zst: empty file"):
        for _ in range(1000):
            next(loader)
    with TokenLoader(data, tok_dir, skip_bad=True, **kw) as loader:
        for _ in range(10_000):  # until the first epoch is consumed: its every shard was read by then
            next(loader)
            if loader.state()["docs"]["epoch"] >= 1:
                break
        assert set(loader.bad_records.counts) == {"empty file"}
    (data / "b.jsonl.zst").unlink()
    _huge_line(data / "c.jsonl.zst", 2 * MB, _records(2, start=20), [])
    with TokenLoader(data, tok_dir, max_record_bytes=MB, **kw) as loader, \
            pytest.raises(ShardError, match=r"c\.jsonl\.zst:3: record longer than the limit"):
        for _ in range(1000):
            next(loader)


def test_train_cli_reports_bad_data_in_one_line(monkeypatch, capsys):
    import train.run
    from train.__main__ import main

    def bad_data(cfg):
        raise ShardError("data/train/x.jsonl.zst:7: unreadable shard (ZstdError: corrupt)")

    monkeypatch.setattr(train.run, "train", bad_data)
    assert main(["--config", "configs/tiny.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: data/train/x.jsonl.zst:7: unreadable shard (ZstdError: corrupt)"
