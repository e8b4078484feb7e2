"""Shard format: round trips in every accepted encoding, atomic writes, clear errors."""

import gzip
import json
import os
import stat

import pytest
import zstandard

from data_processing.shards import (
    BadRecordCounter,
    ShardError,
    ShardSetWriter,
    ShardWriter,
    iter_dir_records,
    iter_records,
    list_shards,
    write_shard,
)

RECORDS = [
    {"text": "def f():\n    return 1\n", "meta": {"repo_name": "a/b", "file_name": "f.py", "language": "Py"}},
    {"text": "int main() { return 0; }\n", "meta": {"repo_name": "a/c", "file_name": "m.c", "language": "C"}},
    {"text": "héllo ünïcode ✓\n", "meta": {"repo_name": "a/d", "file_name": "u.py"}},
]


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz", ".jsonl"])
def test_round_trip_every_encoding(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    assert write_shard(path, RECORDS) == 3
    assert list(iter_records(path)) == RECORDS
    assert list_shards(tmp_path) == [str(path)]


def test_reads_code_clippy_shard_as_is(tmp_path):
    # Code Clippy / lm_dataformat wrote `data_N_time..._default.jsonl.zst` with several zstd frames
    # and extra meta fields; both must read unchanged.
    path = tmp_path / "data_0_time1626000000_default.jsonl.zst"
    lines = [json.dumps({"text": f"print({i})\n", "meta": {"repo_name": "r", "file_name": "f.py",
                                                           "mime_type": "text/x-python", "stars": 3}})
             for i in range(4)]
    cctx = zstandard.ZstdCompressor()
    with open(path, "wb") as f:
        f.write(cctx.compress(("\n".join(lines[:2]) + "\n").encode()))
        f.write(cctx.compress(("\n".join(lines[2:]) + "\n").encode()))
    records = list(iter_records(path))
    assert [r["text"] for r in records] == [f"print({i})\n" for i in range(4)]
    assert records[0]["meta"]["stars"] == 3


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "out.jsonl.zst"
    with pytest.raises(RuntimeError), ShardWriter(path) as w:
        w.write(RECORDS[0])
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_written_shard_is_world_readable(tmp_path):
    path = tmp_path / "s.jsonl.zst"
    write_shard(path, RECORDS)
    assert os.stat(path).st_mode & stat.S_IROTH


def test_corrupt_zstd_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl.zst"
    payload = "\n".join(json.dumps(r) for r in RECORDS * 50) + "\n"
    data = zstandard.ZstdCompressor().compress(payload.encode())
    path.write_bytes(data[: len(data) // 2] + b"\x00garbage" * 10)
    with pytest.raises(ShardError, match=rf"^{path}:\d+: unreadable shard"):
        list(iter_records(path))
    bad = BadRecordCounter()
    got = list(iter_records(path, skip_bad=True, bad=bad))
    assert bad.counts == {"unreadable shard": 1}
    assert 0 <= len(got) < 150


def test_bad_lines_stop_or_are_counted(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\nnot json\n" + json.dumps({"meta": {}}) + "\n"
                    + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(ShardError, match=rf"^{path}:2: not a JSON object"):
        list(iter_records(path))
    bad = BadRecordCounter()
    assert list(iter_records(path, skip_bad=True, bad=bad)) == RECORDS[:2]
    assert bad.counts == {"not a JSON object (Expecting value)": 1, "record has no string field 'text'": 1}
    assert bad.examples[1] == f"{path}:3: record has no string field 'text'"


def test_gzip_plain_mixed_directory(tmp_path):
    write_shard(tmp_path / "a.jsonl", RECORDS[:1])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps(RECORDS[1]) + "\n")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r["text"] for r in iter_dir_records(tmp_path)] == [RECORDS[0]["text"], RECORDS[1]["text"]]
    with pytest.raises(ShardError, match="no shards found"):
        list_shards(tmp_path / "empty")


def test_shard_set_writer_rolls_and_removes_stale(tmp_path):
    stale = tmp_path / "train-00007.jsonl.zst"
    write_shard(stale, RECORDS)
    with ShardSetWriter(tmp_path, "train", max_records=2) as w:
        for r in RECORDS * 2:
            w.write(r)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["train-00000.jsonl.zst", "train-00001.jsonl.zst", "train-00002.jsonl.zst"]
    assert [len(list(iter_records(tmp_path / n))) for n in names] == [2, 2, 2]
    assert list(iter_dir_records(tmp_path)) == RECORDS * 2


def test_shard_set_writer_respects_byte_budget(tmp_path):
    with ShardSetWriter(tmp_path, "x", max_bytes=100) as w:
        for r in RECORDS * 3:
            w.write(r)
    assert len(w.paths) > 3
    assert w.count == 9


def test_truncated_zstd_is_an_error_not_an_empty_shard(tmp_path):
    # zstandard's own stream reader returns a silent short read here; a half-copied shard must
    # not pass for a valid (smaller) one.
    path = tmp_path / "cut.jsonl.zst"
    write_shard(tmp_path / "full.jsonl.zst", RECORDS * 100)
    data = (tmp_path / "full.jsonl.zst").read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(ShardError, match=rf"^{path}:\d+: unreadable shard .*truncated"):
        list(iter_records(path))
