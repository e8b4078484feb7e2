"""The streaming path reads K shards interleaved before its shuffle buffer (issue #25): mixing
in the first documents, K = 1 as the plain shard-after-shard read, exact resume, every document
once per epoch under both host splits, and a ``datasets`` stream of several files as several units."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_processing.docstream import EPOCH_END, DocStream, epoch_start
from data_processing.loader import HFDatasetSource, TokenLoader
from data_processing.shards import write_shard
from data_processing.sources import ShardSource
from tests.helpers import stdlib_documents

SHARDS = 8
PER_SHARD = 40
BLOCK = 64
BATCH = 4
BUFFER = 16  # far smaller than a shard, so that the buffer alone cannot mix shards


def _documents() -> list[str]:
    """``SHARDS * PER_SHARD`` distinct documents; document ``i`` belongs to shard ``i // PER_SHARD``."""
    return stdlib_documents(SHARDS * PER_SHARD, source_bytes=100_000, lengths=(20, 400), header="# doc {i}\n")


def _shard_of(text: str) -> int:
    """The shard a document was written to, from its numbered first line."""
    return int(text.split("\n", 1)[0].split()[-1]) // PER_SHARD


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """``SHARDS`` zstd shards of ``PER_SHARD`` documents each."""
    docs = _documents()
    root = tmp_path_factory.mktemp("shards")
    for s in range(SHARDS):
        write_shard(root / f"shard-{s:02d}.jsonl.zst",
                    ({"text": t} for t in docs[s * PER_SHARD : (s + 1) * PER_SHARD]))
    return root, docs


@pytest.fixture(scope="module")
def jsonl_files(tmp_path_factory) -> tuple[list[str], list[str]]:
    """The first 4 shards' documents as 4 plain jsonl files, for a ``datasets`` json stream."""
    docs = _documents()[: 4 * PER_SHARD]
    root = tmp_path_factory.mktemp("jsonl")
    files = []
    for s in range(4):
        path = root / f"part-{s}.jsonl"
        path.write_text("".join(json.dumps({"content": t}) + "\n" for t in docs[s * PER_SHARD : (s + 1) * PER_SHARD]))
        files.append(str(path))
    return files, docs


def _epoch(stream: DocStream) -> list[str]:
    """The texts of the stream's current epoch, up to its ``EPOCH_END``."""
    texts = []
    while (doc := stream.next_doc()) is not EPOCH_END:
        texts.append(doc.text)
    return texts


def _first_texts(loader: TokenLoader, tok, n: int) -> list[str]:
    """The first ``n`` whole documents of the loader's packed stream, decoded."""
    eos = tok.token_to_id("<|endoftext|>")
    stream = np.zeros(0, np.int32)
    while (stream == eos).sum() < n:
        stream = np.concatenate([stream, next(loader).ravel()])
    ends = np.flatnonzero(stream == eos)[:n]
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(stream[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def _loader(source, tokenizer_dir, **kw) -> TokenLoader:
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", BUFFER)
    kw.setdefault("tokenize_batch", 8)
    return TokenLoader(source, tokenizer_dir, block_size=BLOCK, batch_size_per_host=BATCH, **kw)


# -- mixing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_documents_come_from_many_shards_only_when_interleaved(corpus, seed):
    root, _ = corpus
    counts = {}
    for k in (1, 16):
        stream = DocStream(ShardSource(root), seed=seed, shuffle_buffer=BUFFER, interleave=k)
        counts[k] = len({_shard_of(stream.next_doc().text) for _ in range(16)})
    # K = 1: the buffer's 16 documents are the first shard's, so at most the next shard creeps in.
    assert counts[1] <= 2
    # K = 16 over 8 shards: all 8 are open and drawn from line by line.
    assert counts[16] >= 4, counts


def test_loader_batches_mix_shards(corpus, tokenizer_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    shards = {}
    for k in (1, 16):
        with _loader(corpus[0], tokenizer_dir, interleave=k) as loader:
            shards[k] = len({_shard_of(t) for t in _first_texts(loader, tok, 16)})
    assert shards[1] <= 2 and shards[16] >= 4, shards


def test_k1_reads_shard_after_shard(corpus):
    """K = 1 is the plain read (the order before interleaving): the epoch's shards one after
    another, each in file order, when the buffer holds one document."""
    root, docs = corpus
    stream = DocStream(ShardSource(root), seed=5, shuffle_buffer=1, interleave=1)
    order = stream._unit_order(0)
    expected = [t for unit in order for t in docs[unit * PER_SHARD : (unit + 1) * PER_SHARD]]
    assert _epoch(stream) == expected
    assert order != sorted(order), "the shard order is seeded"


def test_interleave_validated(corpus, tokenizer_dir):
    with pytest.raises(ValueError, match="interleave"):
        DocStream(ShardSource(corpus[0]), interleave=0)
    with pytest.raises(ValueError, match="interleave must be positive"):
        _loader(corpus[0], tokenizer_dir, interleave=0)


# -- every document once -----------------------------------------------------------------------


@pytest.mark.parametrize("split", ["lines", "shards"])
def test_every_document_once_per_epoch_two_hosts(corpus, split):
    root, docs = corpus
    for epoch in range(2):
        per_host = []
        for host in range(2):
            stream = DocStream(ShardSource(root), seed=3, shuffle_buffer=BUFFER, interleave=4, process_index=host,
                               process_count=2, host_split=split, state=epoch_start(epoch))
            per_host.append(_epoch(stream))
        a, b = per_host
        assert not set(a) & set(b), f"{split}, epoch {epoch}: hosts never read the same document"
        assert Counter(a + b) == Counter(docs), f"{split}, epoch {epoch}: no document lost or repeated"
        if split == "lines":
            # Every host reads every shard, and the line split stays balanced to one document.
            assert {_shard_of(t) for t in a} == {_shard_of(t) for t in b} == set(range(SHARDS))
            assert abs(len(a) - len(b)) <= 1
        else:
            assert not {_shard_of(t) for t in a} & {_shard_of(t) for t in b}


def test_every_document_once_per_epoch_one_host_and_reshuffled(corpus):
    root, docs = corpus
    stream = DocStream(ShardSource(root), seed=3, shuffle_buffer=BUFFER, interleave=16)
    epoch0, epoch1 = _epoch(stream), _epoch(stream)
    assert Counter(epoch0) == Counter(docs) == Counter(epoch1)
    assert epoch0 != epoch1


# -- exact resume ------------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "host"), [("lines", 0), ("lines", 1), ("shards", 0), ("shards", 1)])
def test_docstream_resumes_at_any_document(corpus, split, host):
    """A snapshot taken after any document (some mid-unit, some just as a unit ended, some in
    the next epoch) restores into the same following documents."""
    root, _ = corpus
    kw = dict(seed=7, shuffle_buffer=BUFFER, interleave=3, process_index=host, process_count=2, host_split=split)
    straight = DocStream(ShardSource(root), **kw)
    reference, snapshots = [], []
    for _ in range(2 * SHARDS * PER_SHARD // 2 + 10):  # past the first epoch
        snapshots.append(json.loads(json.dumps(straight.snapshot())))
        doc = straight.next_doc()
        reference.append(doc if doc is EPOCH_END else doc.text)
    for k in range(0, len(reference) - 20, 17):
        resumed = DocStream(ShardSource(root), state=snapshots[k], **kw)
        got = [doc if (doc := resumed.next_doc()) is EPOCH_END else doc.text for _ in range(20)]
        assert got == reference[k : k + 20], f"resumed after {k} documents"


def test_pre_interleave_state_resumes_as_k1(corpus):
    """A state written before interleaving (unit / line / line_base) continues the K = 1 stream."""
    root, _ = corpus
    kw = dict(seed=2, shuffle_buffer=BUFFER, interleave=1, process_count=2, host_split="lines")
    straight = DocStream(ShardSource(root), **kw)
    for _ in range(PER_SHARD // 2 + 5):  # the second shard is being read
        straight.next_doc()
    state = straight.snapshot()
    (unit, line), = state["open"]
    legacy = {"epoch": state["epoch"], "unit": unit, "line": line, "line_base": state["read"] - line,
              "emitted": state["emitted"], "buffer": state["buffer"]}
    resumed = DocStream(ShardSource(root), state=legacy, **kw)
    assert [resumed.next_doc().text for _ in range(30)] == [straight.next_doc().text for _ in range(30)]


def _check_resume(source, tokenizer_dir, k: int, **kw) -> None:
    """State saved after ``k`` batches and restored into a new loader: the following batches are
    those of an uninterrupted run."""
    with _loader(source, tokenizer_dir, **kw) as straight:
        reference = [next(straight) for _ in range(k + 12)]
    with _loader(source, tokenizer_dir, **kw) as first:
        for _ in range(k):
            next(first)
        saved = json.loads(json.dumps(first.state()))
    assert saved["interleave"] == kw.get("interleave", 16) and len(saved["docs"]["open"]) > 1
    with _loader(source, tokenizer_dir, **kw) as second:
        second.restore(saved)
        resumed = [next(second) for _ in range(12)]
    for i, (a, b) in enumerate(zip(reference[k:], resumed, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"batch {k + i} differs after restore")


def test_loader_exact_resume_shards(corpus, tokenizer_dir):
    _check_resume(corpus[0], tokenizer_dir, 9, seed=4)
    _check_resume(corpus[0], tokenizer_dir, 9, seed=4, interleave=3, process_index=1, process_count=2)


def test_loader_refuses_a_state_of_another_interleave(corpus, tokenizer_dir):
    with _loader(corpus[0], tokenizer_dir, interleave=4) as a:
        next(a)
        state = a.state()
    with _loader(corpus[0], tokenizer_dir) as b, pytest.raises(ValueError, match="data.stream_interleave=4"):
        b.restore(state)
    del state["interleave"]  # saved before interleaving: one shard at a time
    with _loader(corpus[0], tokenizer_dir) as c, pytest.raises(ValueError, match="data.stream_interleave=1"):
        c.restore(state)


def test_restart_at_epoch_interleaved(corpus):
    root, _ = corpus
    straight = DocStream(ShardSource(root), seed=9, shuffle_buffer=BUFFER, interleave=16)
    _epoch(straight)
    epoch1 = _epoch(straight)
    restarted = DocStream(ShardSource(root), seed=9, shuffle_buffer=BUFFER, interleave=16, state=epoch_start(1))
    assert _epoch(restarted) == epoch1


# -- a datasets stream of several files --------------------------------------------------------


def test_datasets_stream_of_four_files_is_four_units(jsonl_files):
    files, docs = jsonl_files
    src = HFDatasetSource("json", data_files=files, text_field="content")
    assert len(src) == 4
    assert [d.text for _, d in src.iter_unit(2)] == docs[2 * PER_SHARD : 3 * PER_SHARD]
    assert [line for line, _ in src.iter_unit(1, start_line=PER_SHARD - 2)] == [PER_SHARD - 1, PER_SHARD]
    counts = {}
    for k in (1, 16):
        stream = DocStream(src, seed=1, shuffle_buffer=BUFFER, interleave=k)
        counts[k] = len({_shard_of(stream.next_doc().text) for _ in range(16)})
    assert counts[1] <= 2 and counts[16] == 4, counts
    # The shard split works on a datasets stream too: 2 hosts, 2 files each, together every document.
    hosts = [_epoch(DocStream(src, seed=1, shuffle_buffer=BUFFER, interleave=16, process_index=h,
                              process_count=2, host_split="shards")) for h in range(2)]
    assert Counter(hosts[0] + hosts[1]) == Counter(docs) and not set(hosts[0]) & set(hosts[1])
    assert len({_shard_of(t) for t in hosts[0]}) == 2


def test_datasets_stream_exact_resume(jsonl_files, tokenizer_dir):
    files, _ = jsonl_files
    src = HFDatasetSource("json", data_files=files, text_field="content")
    _check_resume(src, tokenizer_dir, 6, seed=2)
    with _loader(src, tokenizer_dir, process_count=2, process_index=1) as two_hosts:
        assert two_hosts.host_split == "shards"  # "auto": 4 units for 2 hosts
        next(two_hosts)
