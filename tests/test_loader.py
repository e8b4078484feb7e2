"""Tests of the streaming loader: packing, coverage, shuffling, host split, exact resumption,
validation stream and bad input. Everything runs on tiny local shards and a tiny tokenizer."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_processing.loader import HFDatasetSource, TokenLoader, validation_batches
from data_processing.shards import ShardError, write_shard
from tests.helpers import stdlib_documents

BLOCK = 64
BATCH = 4


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def eos(tok) -> int:
    return tok.token_to_id("<|endoftext|>")


def _documents(n: int) -> list[str]:
    """``n`` distinct documents of varied length (a numbered header + a slice of stdlib code)."""
    return stdlib_documents(n, source_bytes=200_000, lengths=(20, 1200), header="# document {i}\n")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """3 zstd shards, 90 documents, ~15k tokens per epoch."""
    docs = _documents(90)
    root = tmp_path_factory.mktemp("corpus")
    for s in range(3):
        write_shard(
            root / f"shard-{s:02d}.jsonl.zst",
            ({"text": t, "meta": {"i": i}} for i, t in list(enumerate(docs))[s * 30 : (s + 1) * 30]),
        )
    return root, docs


def _loader(corpus_dir, tokenizer_dir, **kw) -> TokenLoader:
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 16)
    kw.setdefault("tokenize_batch", 8)
    return TokenLoader(corpus_dir, tokenizer_dir, block_size=BLOCK, batch_size_per_host=BATCH, **kw)


def _take(loader, n: int) -> list[np.ndarray]:
    return [next(loader) for _ in range(n)]


def _split_docs(stream: np.ndarray, eos: int) -> list[np.ndarray]:
    """Token runs between EOS tokens (the last, unterminated run is dropped)."""
    ends = np.flatnonzero(stream == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s:e] for s, e in zip(starts, ends, strict=True)]


def _epoch_texts(loader, tok, eos, n_docs: int) -> list[list[str]]:
    """Decode the documents of the first two epochs from the packed stream."""
    batches = []
    stream = np.zeros(0, np.int32)
    while (stream == eos).sum() < 2 * n_docs:
        batches.append(next(loader))
        stream = np.concatenate(batches).ravel()
    texts = [tok.decode(d.tolist()) for d in _split_docs(stream, eos)]
    return [texts[:n_docs], texts[n_docs : 2 * n_docs]]


def global_batch(host_batches: list[np.ndarray]) -> np.ndarray:
    """How host batches compose: the global batch is their concatenation in process order,
    which is what ``jax.make_array_from_process_local_data`` builds along the data axes."""
    return np.concatenate(host_batches, axis=0)


# -- packing -----------------------------------------------------------------------------------


def test_shape_dtype_eos_and_no_padding(corpus, tokenizer_dir, tok, eos):
    root, docs = corpus
    with _loader(root, tokenizer_dir, shuffle_buffer=1) as loader:
        batches = _take(loader, 30)
    for b in batches:
        assert b.shape == (BATCH, BLOCK + 1) and b.dtype == np.int32
    stream = np.concatenate(batches).ravel()
    # No padding: every window is filled with real tokens; EOS only between documents.
    texts = [tok.decode(d.tolist()) for d in _split_docs(stream, eos)]
    assert len(texts) > 5
    # Every decoded run is exactly one whole document: EOS follows every document.
    assert all(t in set(docs) for t in texts)
    # Windows are consecutive slices of one stream: batch k+1 continues where batch k stopped.
    whole = np.concatenate([np.asarray(tok.encode(t, add_special_tokens=False).ids + [eos]) for t in texts])
    np.testing.assert_array_equal(stream[: len(whole)], whole)


def test_every_document_once_per_epoch_and_reshuffled(corpus, tokenizer_dir, tok, eos):
    root, docs = corpus
    with _loader(root, tokenizer_dir, seed=3) as loader:
        epoch0, epoch1 = _epoch_texts(loader, tok, eos, len(docs))
    assert Counter(epoch0) == Counter(docs)
    assert Counter(epoch1) == Counter(docs)
    assert epoch0 != epoch1, "each epoch is reshuffled"
    assert epoch0 != docs, "documents are shuffled"
    with _loader(root, tokenizer_dir, seed=3) as again:
        np.testing.assert_array_equal(
            np.stack(_take(again, 10)), np.stack(_take(_loader(root, tokenizer_dir, seed=3), 10))
        )
    with _loader(root, tokenizer_dir, seed=4) as other:
        first_other = np.stack(_take(other, 10))
    with _loader(root, tokenizer_dir, seed=3) as same:
        assert not np.array_equal(first_other, np.stack(_take(same, 10)))


# -- exact resumption --------------------------------------------------------------------------


def _check_resume(root, tokenizer_dir, k: int, **kw):
    with _loader(root, tokenizer_dir, **kw) as straight:
        reference = _take(straight, k + 21)
    with _loader(root, tokenizer_dir, **kw) as first:
        _take(first, k)
        saved = json.loads(json.dumps(first.state()))  # goes through a checkpoint file
    assert len(json.dumps(saved)) < 20_000
    with _loader(root, tokenizer_dir, **kw) as second:
        _take(second, 3)  # a restore replaces whatever the loader was doing
        second.restore(saved)
        resumed = _take(second, 21)
    for i, (a, b) in enumerate(zip(reference[k:], resumed, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"batch {k + i} differs after restore")


@pytest.mark.parametrize("k", [0, 7, 50, 75])
def test_exact_resume_single_process(corpus, tokenizer_dir, k):
    # k = 50..75 crosses the epoch boundary (about 58 batches per epoch).
    _check_resume(corpus[0], tokenizer_dir, k)


@pytest.mark.parametrize("workers", [1, 2])
def test_exact_resume_worker_processes(corpus, tokenizer_dir, workers):
    _check_resume(corpus[0], tokenizer_dir, 13, num_workers=workers, prefetch=3)


def test_worker_processes_give_the_same_stream(corpus, tokenizer_dir):
    with _loader(corpus[0], tokenizer_dir, num_workers=0) as inline:
        expected = np.stack(_take(inline, 30))
    with _loader(corpus[0], tokenizer_dir, num_workers=2, tokenize_batch=3) as workers:
        np.testing.assert_array_equal(np.stack(_take(workers, 30)), expected)
        processes = workers._pool.processes
    # Closed with chunks still in flight: every worker process has exited.
    assert processes and all(p.exitcode is not None for p in processes)


def test_a_killed_worker_is_an_error_not_a_hang(corpus, tokenizer_dir):
    loader = _loader(corpus[0], tokenizer_dir, num_workers=2, tokenize_batch=2)
    next(loader)
    processes = loader._pool.processes
    os.kill(processes[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="tokenizer worker process died"):
        for _ in range(500):  # the corpus repeats: without the error this never ends
            next(loader)
    closer = threading.Thread(target=loader.close, daemon=True)
    closer.start()
    closer.join(300)  # a bound against a hang only
    assert not closer.is_alive() and all(p.exitcode is not None for p in processes)


def _epoch_sizes_texts(loader, tok, eos, sizes: list[int]) -> list[list[str]]:
    """Decode consecutive epochs of ``sizes[e]`` documents each from the packed stream."""
    batches = []
    stream = np.zeros(0, np.int32)
    while (stream == eos).sum() < sum(sizes):
        batches.append(next(loader))
        stream = np.concatenate(batches).ravel()
    texts = [tok.decode(d.tolist()) for d in _split_docs(stream, eos)]
    bounds = np.cumsum([0, *sizes])
    return [texts[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _shard_of(text: str) -> int:
    """Shard of a corpus document (30 per shard, numbered in the first line)."""
    return int(text.split("\n", 1)[0].split()[-1]) // 30


def test_two_hosts_line_split_disjoint_cover_and_resume(corpus, tokenizer_dir, tok, eos):
    root, docs = corpus
    per_host = []
    for host in range(2):
        with _loader(root, tokenizer_dir, process_index=host, process_count=2, seed=1, host_split="lines") as loader:
            assert loader.state()["host_split"] == "lines"
            # 90 documents, every other line per host: each host owns 45 of them per epoch.
            epoch0, _ = _epoch_texts(loader, tok, eos, len(docs) // 2)
        with _loader(root, tokenizer_dir, process_index=host, process_count=2, seed=1, host_split="lines") as loader:
            first = next(loader)
        per_host.append((first, epoch0))
    docs0, docs1 = per_host[0][1], per_host[1][1]
    assert not set(docs0) & set(docs1), "hosts never read the same document"
    assert Counter(docs0 + docs1) == Counter(docs), "together the hosts cover the epoch"
    # Line split: every host reads from every shard.
    assert {_shard_of(t) for t in docs0} == {_shard_of(t) for t in docs1} == {0, 1, 2}
    gb = global_batch([per_host[0][0], per_host[1][0]])
    assert gb.shape == (2 * BATCH, BLOCK + 1)
    np.testing.assert_array_equal(gb[BATCH:], per_host[1][0])
    for host in range(2):
        _check_resume(root, tokenizer_dir, 9, process_index=host, process_count=2, seed=1, host_split="lines")


def test_two_hosts_shard_split_disjoint_cover_balanced_and_resume(corpus, tokenizer_dir, tok, eos):
    root, docs = corpus
    # 3 shards dealt to 2 hosts: in epoch e host h reads the shards at positions (h + e) % 2, +2, ...
    # of the epoch's order: 2 + 1 shards in epoch 0, 1 + 2 in epoch 1.
    sizes = {0: [60, 30], 1: [30, 60]}
    epochs = {}
    for host in range(2):
        with _loader(root, tokenizer_dir, process_index=host, process_count=2, seed=1) as loader:
            assert loader.state()["host_split"] == "shards"  # "auto" with at least as many shards as hosts
            epochs[host] = _epoch_sizes_texts(loader, tok, eos, sizes[host])
    for e in range(2):
        a, b = epochs[0][e], epochs[1][e]
        assert not set(a) & set(b), f"epoch {e}: hosts never read the same document"
        assert Counter(a + b) == Counter(docs), f"epoch {e}: together the hosts cover the epoch"
        # Whole shards per host: a host's documents come from its own shards only.
        shards_a, shards_b = {_shard_of(t) for t in a}, {_shard_of(t) for t in b}
        assert not shards_a & shards_b and len(a) == 30 * len(shards_a) and len(b) == 30 * len(shards_b)
    # Balanced over P = 2 epochs: each host read 90 documents.
    assert [sum(map(len, epochs[h])) for h in range(2)] == [90, 90]
    for host in range(2):
        # k = 25 crosses host 1's first epoch (30 documents, ~20 batches).
        _check_resume(root, tokenizer_dir, 25, process_index=host, process_count=2, seed=1)


@pytest.mark.parametrize("split", ["lines", "shards"])
def test_shard_split_opens_only_own_shards(corpus, tokenizer_dir, monkeypatch, split):
    from data_processing.sources import ShardSource

    opened: list[str] = []
    real = ShardSource.iter_unit

    def spy(self, unit, **kw):
        opened.append(Path(self.paths[unit]).name)
        return real(self, unit, **kw)

    monkeypatch.setattr(ShardSource, "iter_unit", spy)
    root, _ = corpus
    first_epoch = []
    for host in range(2):
        opened.clear()
        with _loader(root, tokenizer_dir, process_index=host, process_count=2, host_split=split) as loader:
            # Consume the whole first epoch: by then the host has certainly opened all of its units
            # of that epoch, however far its prefetching thread got into the next one.
            for _ in range(10_000):
                next(loader)
                if loader.state()["docs"]["epoch"] >= 1:
                    break
            else:
                raise AssertionError("the first epoch never ended")
        # Units are read in the epoch's order, so the epoch's own units are the first opened;
        # with the shards split host i owns every other one of the 3 shards, starting at the i-th.
        own = len(range(host, 3, 2)) if split == "shards" else 3
        assert len(opened) >= own
        first_epoch.append(opened[:own])
    if split == "shards":
        assert not set(first_epoch[0]) & set(first_epoch[1])
        assert sorted(first_epoch[0] + first_epoch[1]) == [f"shard-{s:02d}.jsonl.zst" for s in range(3)]
    else:
        assert first_epoch[0] == first_epoch[1]  # every host reads every shard, in the same order
        assert sorted(first_epoch[0]) == [f"shard-{s:02d}.jsonl.zst" for s in range(3)]


def test_host_split_choice_and_errors(corpus, tokenizer_dir):
    root, _ = corpus
    for count, expected in ((1, "lines"), (2, "shards"), (3, "shards"), (4, "lines")):
        with _loader(root, tokenizer_dir, process_index=0, process_count=count) as loader:
            assert loader.host_split == expected, count
    with pytest.raises(ValueError, match="host_split='shards' needs at least as many shards as hosts: 3 shard"):
        _loader(root, tokenizer_dir, process_index=0, process_count=4, host_split="shards")
    with pytest.raises(ValueError, match="host_split: expected"):
        _loader(root, tokenizer_dir, host_split="files")


def test_restore_rejects_other_host_split(corpus, tokenizer_dir):
    root, _ = corpus
    with _loader(root, tokenizer_dir, process_index=0, process_count=2, host_split="lines") as a:
        next(a)
        state = json.loads(json.dumps(a.state()))
    with (
        _loader(root, tokenizer_dir, process_index=0, process_count=2) as b,
        pytest.raises(ValueError, match="host_split='lines' but this loader has 'shards'.*data.host_split=lines"),
    ):
        b.restore(state)
    # A state saved before the split was recorded (no key) is a line split.
    del state["host_split"]
    with _loader(root, tokenizer_dir, process_index=0, process_count=2, host_split="lines") as c:
        c.restore(state)
        next(c)
    # One host: both splits read the same stream, so either state resumes.
    with _loader(root, tokenizer_dir, host_split="shards") as one:
        next(one)
        single = one.state()
    with _loader(root, tokenizer_dir) as other:
        other.restore(single)
        next(other)


def test_restart_at_epoch(corpus, tokenizer_dir, tok, eos):
    root, docs = corpus
    with _loader(root, tokenizer_dir, seed=3) as straight:
        _, epoch1 = _epoch_texts(straight, tok, eos, len(docs))
    with _loader(root, tokenizer_dir, seed=3) as loader:
        _take(loader, 4)
        loader.restart_at_epoch(1)
        state = loader.state()
        assert state["docs"]["epoch"] == 1 and state["skip"] == 0
        batches = _take(loader, 30)
    texts = [tok.decode(d.tolist()) for d in _split_docs(np.concatenate(batches).ravel(), eos)]
    # The stream restarts at the first document of epoch 1, in epoch 1's order.
    assert texts == epoch1[: len(texts)] and len(texts) > 10
    with _loader(root, tokenizer_dir, seed=3) as again:
        again.restart_at_epoch(1)
        np.testing.assert_array_equal(np.stack(_take(again, 30)), np.stack(batches))
        with pytest.raises(ValueError, match="epoch must be >= 0"):
            again.restart_at_epoch(-1)
    # The state after a restart resumes exactly.
    with _loader(root, tokenizer_dir, seed=3) as first:
        first.restart_at_epoch(1)
        _take(first, 7)
        saved = json.loads(json.dumps(first.state()))
    with _loader(root, tokenizer_dir, seed=3) as second:
        second.restore(saved)
        np.testing.assert_array_equal(np.stack(_take(second, 5)), np.stack(batches[7:12]))


# -- validation and other sources --------------------------------------------------------------


def test_validation_deterministic_and_unshuffled(corpus, tokenizer_dir, tok, eos):
    root, docs = corpus
    a = validation_batches(root, tokenizer_dir, block_size=BLOCK, batch_size_per_host=BATCH, num_batches=5)
    b = validation_batches(root, tokenizer_dir, block_size=BLOCK, batch_size_per_host=BATCH, num_batches=5)
    assert len(a) == 5
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    texts = [tok.decode(d.tolist()) for d in _split_docs(np.concatenate(a).ravel(), eos)]
    assert texts == docs[: len(texts)], "validation reads documents in file order"
    with pytest.raises(ValueError, match="validation data too small"):
        validation_batches(
            root, tokenizer_dir, block_size=BLOCK, batch_size_per_host=BATCH, num_batches=10_000
        )


def test_hf_datasets_source(tmp_path, tokenizer_dir, tok, eos):
    docs = _documents(12)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"content": t}) + "\n" for t in docs))
    src = HFDatasetSource("json", data_files=str(data), text_field="content")
    with TokenLoader(
        src,
        tokenizer_dir,
        block_size=BLOCK,
        batch_size_per_host=BATCH,
        num_workers=0,
        shuffle_buffer=4,
        tokenize_batch=4,
    ) as loader:
        epoch0, _ = _epoch_texts(loader, tok, eos, len(docs))
    assert Counter(epoch0) == Counter(docs)
    _check_resume(src, tokenizer_dir, 6, shuffle_buffer=4, tokenize_batch=4)
    with pytest.raises(ValueError, match="allow_hub"):
        HFDatasetSource("someone/some-dataset")


# -- bad input ---------------------------------------------------------------------------------


def test_bad_line_names_file_and_line(tmp_path, tokenizer_dir):
    docs = _documents(40)
    write_shard(tmp_path / "a.jsonl.zst", ({"text": t} for t in docs[:20]))
    bad = tmp_path / "b.jsonl"
    lines = [json.dumps({"text": t}) for t in docs[20:]]
    lines[4] = '{"text": broken'
    bad.write_text("\n".join(lines) + "\n")
    where = r"b\.jsonl:5: not a JSON"
    with _loader(tmp_path, tokenizer_dir) as loader, pytest.raises(ShardError, match=where):
        _take(loader, 100)
    with _loader(tmp_path, tokenizer_dir, skip_bad=True) as loader:
        _take(loader, 60)  # more than one epoch
        assert loader.bad_records.total >= 1
        assert any("b.jsonl:5" in e for e in loader.bad_records.examples)


def test_empty_dir_is_a_clear_error(tmp_path, tokenizer_dir):
    with pytest.raises(ShardError, match="no shards found"):
        _loader(tmp_path, tokenizer_dir)


def test_corpus_smaller_than_a_block(tmp_path, tokenizer_dir):
    write_shard(tmp_path / "tiny.jsonl.zst", [{"text": "x = 1"}])
    with _loader(tmp_path, tokenizer_dir) as loader, pytest.raises(ValueError, match="corpus too small"):
        next(loader)
    # A host that owns no document at all is an error too, not an endless loop.
    with (
        _loader(tmp_path, tokenizer_dir, process_index=1, process_count=2) as loader,
        pytest.raises(ShardError, match="no documents for host 1"),
    ):
        next(loader)


def test_tokenizer_without_eos(tmp_path, corpus):
    from tokenizers import Tokenizer, models

    no_eos = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    no_eos.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="endoftext"):
        _loader(corpus[0], tmp_path)


def test_import_does_not_need_jax():
    import subprocess
    import sys

    code = "import sys, data_processing.loader; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_fsspec_url_and_glob_read_the_same_stream(corpus, tokenizer_dir):
    root, _ = corpus
    with _loader(root, tokenizer_dir) as plain:
        expected = np.stack(_take(plain, 5))
    for source in (f"file://{root}", str(root / "shard-*.jsonl.zst")):
        with _loader(source, tokenizer_dir) as other:
            np.testing.assert_array_equal(np.stack(_take(other, 5)), expected)


def test_host_batches_assemble_into_one_sharded_array(corpus, tokenizer_dir):
    """What ``train/sharding.py`` does with the host batches: with 2 simulated hosts of 4 devices
    each, host h's rows land on the data shards of its devices, in process order."""
    jax = pytest.importorskip("jax")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    root, _ = corpus
    hosts = []
    for host in range(2):
        with _loader(root, tokenizer_dir, process_index=host, process_count=2) as loader:
            hosts.append(next(loader))
    full = global_batch(hosts)
    devices = np.array(jax.devices()[:8])
    sharding = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
    # In one process the "local" data is the whole global batch; on a pod each host passes its own.
    array = jax.make_array_from_process_local_data(sharding, full)
    assert array.shape == (2 * BATCH, BLOCK + 1)
    for shard in array.addressable_shards:
        row = shard.index[0].start
        host, local_row = divmod(row, BATCH)
        np.testing.assert_array_equal(np.asarray(shard.data)[0], hosts[host][local_row])
