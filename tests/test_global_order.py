"""The global data order (``data_processing.global_order``): rows are slices of the EOS-joined
corpus stream, recomputed here independently; every row once per epoch; process slices that
concatenate to the one-process batch for any process count, across epoch boundaries; exact
resume, also with another process count; coverage of many repositories; refused batch sizes."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_processing.global_order import GlobalOrderLoader, _UnitIndex, feistel_permute
from data_processing.loader import TokenLoader
from data_processing.packing import EncodeOptions, cut_windows
from data_processing.shards import ShardError, iter_lines, list_shards, write_shard
from data_processing.token_cache import TokenCacheError, build_cache
from data_processing.tokens import control_token
from tests.helpers import byte_level_bpe, stdlib_documents, stdlib_texts

LANGS = ["Python", "Shell"]
REPOS, FILES_PER_REPO, REPO_SHARDS = 60, 4, 4


def _tokenizer(tok_dir: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    return tok, tok.token_to_id("<|endoftext|>")


def _records(data_dir: Path) -> list[dict]:
    """Every good record of the shards under ``data_dir``, in corpus order (sorted shards, file
    order); blank and unparsable lines left out."""
    out = []
    for shard in list_shards(str(data_dir)):
        for _, line in iter_lines(shard):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _stream(records: list[dict], tok_dir: Path, control_codes: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The EOS-joined stream of ``records`` tokenized here, and the record index of every token."""
    tok, eos = _tokenizer(tok_dir)
    parts, owner = [], []
    for i, r in enumerate(records):
        head = [tok.token_to_id(control_token(r["meta"]["language"]))] if control_codes else []
        ids = head + tok.encode(r["text"], add_special_tokens=False).ids + [eos]
        parts.append(np.asarray(ids, np.int32))
        owner.append(np.full(len(ids), i))
    return np.concatenate(parts), np.concatenate(owner)


def _stream_rows(stream: np.ndarray, block: int) -> np.ndarray:
    w = block + 1
    n = len(stream) // w
    return stream[: n * w].reshape(n, w)


def _loader(cache_dir, data_dir, tok_dir, **kw) -> GlobalOrderLoader:
    kw.setdefault("block_size", 64)
    kw.setdefault("global_batch_size", 8)
    return GlobalOrderLoader(str(cache_dir), source=str(data_dir), tokenizer_path=str(tok_dir), **kw)


@pytest.fixture(scope="module")
def plain(tiny_corpus, tmp_path_factory):
    """The shared tiny corpus's training shards, their token cache and the tokenizer."""
    data_dir, tok_dir = tiny_corpus
    cache_dir = tmp_path_factory.mktemp("go_cache")
    build_cache(data_dir / "train", tok_dir, cache_dir, workers=1, progress=False)
    return cache_dir, data_dir / "train", tok_dir


@pytest.fixture(scope="module")
def code_tok(tmp_path_factory) -> Path:
    """A 600-token byte-level BPE with the control codes of ``LANGS``."""
    tok = byte_level_bpe(stdlib_texts(150_000), 600, tuple(control_token(x) for x in LANGS))
    out = tmp_path_factory.mktemp("go_tok")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def repos(code_tok, tmp_path_factory):
    """60 repositories of 4 files, stored repository after repository (as ingest writes them) in
    4 shards, languages alternating by repository; each file starts with ``# repo R file F``."""
    root = tmp_path_factory.mktemp("go_repos")
    texts = stdlib_documents(REPOS * FILES_PER_REPO, source_bytes=150_000, lengths=(300, 1500), header="")
    records = [{"text": f"# repo {r} file {f}\n" + texts[r * FILES_PER_REPO + f],
                "meta": {"repo_name": f"repo{r}", "language": LANGS[r % 2]}}
               for r in range(REPOS) for f in range(FILES_PER_REPO)]
    per = len(records) // REPO_SHARDS
    for s in range(REPO_SHARDS):
        write_shard(root / "data" / f"s{s}.jsonl.zst", records[s * per : (s + 1) * per])
    build_cache(root / "data", code_tok, root / "cache", workers=1, progress=False)
    return root / "cache", root / "data", code_tok


@pytest.fixture(scope="module")
def ragged(code_tok, tmp_path_factory):
    """Shards of very different sizes (two shorter than a row, one with blank lines) and a bad
    line in the last, so that rows span several shards."""
    root = tmp_path_factory.mktemp("go_ragged")
    texts = stdlib_documents(30, source_bytes=60_000, lengths=(20, 900), header="# doc {i}\n", seed=4)
    shards = {"a": ["x = 1\n"], "b": texts[:10], "c": ["y = 2\n"], "d": texts[10:30]}
    for name, docs in shards.items():
        lines = [json.dumps({"text": t, "meta": {"language": LANGS[i % 2]}}) for i, t in enumerate(docs)]
        if name == "b":
            lines[3:3] = ["", "   "]  # blank lines: no document, no tokens
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "data" / "e.jsonl").write_text(json.dumps({"text": "z = 3\n", "meta": {"language": "Python"}})
                                           + "\n{not json\n")
    # skip_bad: the build records the bad line (the loader then refuses it or skips it, tested below).
    build_cache(root / "data", code_tok, root / "cache", workers=1, progress=False, skip_bad=True)
    return root / "cache", root / "data", code_tok


# -- the rows and the order --------------------------------------------------------------------


def test_an_epoch_is_every_stream_row_once(plain):
    """The first epoch's rows (through ``next``) are exactly the rows of the EOS-joined stream
    tokenized here, each once; the partial last row is dropped."""
    cache_dir, data_dir, tok_dir = plain
    block, batch = 256, 8
    rows = _stream_rows(_stream(_records(data_dir), tok_dir)[0], block)
    loader = _loader(cache_dir, data_dir, tok_dir, block_size=block, global_batch_size=batch)
    assert loader.rows_per_epoch == len(rows) and loader.stream_tokens // (block + 1) == len(rows)
    steps = len(rows) // batch
    got = np.concatenate([next(loader) for _ in range(steps)])
    assert got.dtype == np.int32 and got.shape == (steps * batch, block + 1)
    want = Counter(r.tobytes() for r in rows)
    seen = Counter(r.tobytes() for r in got)
    assert not seen - want  # every row handed out is a stream row ...
    assert max(seen.values()) == 1 or max(want.values()) > 1  # ... at most once (unless duplicated in the corpus)
    assert sum((want - seen).values()) == len(rows) - steps * batch  # the rest of the epoch comes next
    # and the order is not the stream's: rows were shuffled
    index = {r.tobytes(): i for i, r in enumerate(rows)}
    order = np.array([index[r.tobytes()] for r in got])
    assert abs(np.corrcoef(order, np.arange(len(order)))[0, 1]) < 0.1


def test_rows_with_control_codes_and_across_shards(ragged):
    """With control codes each document is ``<|lang|> tokens <|endoftext|>``; rows span shards
    (one shard is shorter than a row), blank lines are skipped, a bad record is skipped when asked."""
    cache_dir, data_dir, tok_dir = ragged
    with pytest.raises(ShardError, match=r"e\.jsonl:2"):
        _loader(cache_dir, data_dir, tok_dir, block_size=48)
    good = _records(data_dir)
    for control in (False, True):
        loader = _loader(cache_dir, data_dir, tok_dir, block_size=48, skip_bad=True,
                         encode=EncodeOptions(control_codes=control))
        assert loader.bad_records.total == 1
        rows = _stream_rows(_stream(good, tok_dir, control_codes=control)[0], 48)
        index = loader.row_indices(np.arange(loader.rows_per_epoch))
        assert sorted(index.tolist()) == list(range(len(rows)))
        np.testing.assert_array_equal(loader.gather(index), rows[index])
        np.testing.assert_array_equal(loader.gather(np.arange(len(rows))), rows)


@pytest.mark.parametrize("control", [False, True])
def test_sliding_windows_are_every_window_of_every_document(ragged, control):
    """``packing: windows``: the rows of an epoch are the windows ``cut_windows`` cuts from each
    document (``[<|lang|>] tokens <|endoftext|>``, -1 padded), in corpus order before the permutation."""
    cache_dir, data_dir, tok_dir = ragged
    block, stride = 40, 25
    tok, eos = _tokenizer(tok_dir)
    want = []
    for r in _records(data_dir):
        head = [tok.token_to_id(control_token(r["meta"]["language"]))] if control else []
        doc = np.asarray(head + tok.encode(r["text"], add_special_tokens=False).ids + [eos], np.int32)
        want.append(cut_windows(doc, block + 1, stride))
    want = np.concatenate(want)
    assert (want == -1).any() and len(want) > 40  # short documents are padded, long ones cut
    encode = EncodeOptions(control_codes=control, window=block + 1, stride=stride)
    loader = _loader(cache_dir, data_dir, tok_dir, block_size=block, global_batch_size=4, skip_bad=True, encode=encode)
    assert loader.rows_per_epoch == len(want)
    np.testing.assert_array_equal(loader.gather(np.arange(len(want))), want)
    index = loader.row_indices(np.arange(len(want)))
    assert sorted(index.tolist()) == list(range(len(want)))
    steps = len(want) // 4
    np.testing.assert_array_equal(np.concatenate([next(loader) for _ in range(steps)]), want[index[: 4 * steps]])
    with pytest.raises(ValueError, match="block_size \\+ 1 = 41"):
        _loader(cache_dir, data_dir, tok_dir, block_size=block, skip_bad=True,
                encode=EncodeOptions(window=block, stride=stride))


def test_process_slices_concatenate_to_the_global_batch(plain):
    """For 1, 2 and 4 processes, the process slices of every step, across an epoch boundary
    (a batch straddles it), concatenate to the one-process batch."""
    cache_dir, data_dir, tok_dir = plain
    block, batch = 1024, 12
    single = _loader(cache_dir, data_dir, tok_dir, block_size=block, global_batch_size=batch)
    assert single.rows_per_epoch % batch  # some batch holds rows of two epochs
    steps = single.rows_per_epoch // batch + 6
    want = [next(single) for _ in range(steps)]
    assert single.epoch == 1
    for count in (2, 4):
        hosts = [_loader(cache_dir, data_dir, tok_dir, block_size=block, global_batch_size=batch,
                         process_index=i, process_count=count) for i in range(count)]
        for step in range(steps):
            parts = [next(h) for h in hosts]
            assert all(p.shape == (batch // count, block + 1) for p in parts)
            np.testing.assert_array_equal(np.concatenate(parts), want[step])
        assert len({json.dumps(h.state(), sort_keys=True) for h in hosts}) == 1
        assert hosts[0].state() == single.state()


def test_same_seed_same_order_other_seed_or_epoch_another(plain):
    """Two constructions with one seed agree; another seed, or the next epoch, is another order."""
    cache_dir, data_dir, tok_dir = plain
    la, lb, lc = (_loader(cache_dir, data_dir, tok_dir, seed=s) for s in (3, 3, 4))
    a = np.stack([next(la) for _ in range(10)])
    b = np.stack([next(lb) for _ in range(10)])
    c = np.stack([next(lc) for _ in range(10)])
    np.testing.assert_array_equal(a, b)
    assert (a != c).any(axis=2).mean() > 0.9  # nearly every row differs
    n = la.rows_per_epoch
    epoch0, epoch1 = la.row_indices(np.arange(n)), la.row_indices(np.arange(n, 2 * n))
    assert sorted(epoch1.tolist()) == list(range(n)) and (epoch0 != epoch1).mean() > 0.9


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4099])
def test_feistel_is_a_permutation(n):
    """A bijection of range(n) for every n, seed and epoch; another seed is another permutation."""
    for seed, epoch in ((0, 0), (1, 0), (0, 7)):
        perm = feistel_permute(np.arange(n), n, seed, epoch)
        assert sorted(perm.tolist()) == list(range(n))
    if n >= 1000:
        assert (feistel_permute(np.arange(n), n, 0, 0) != feistel_permute(np.arange(n), n, 1, 0)).mean() > 0.9


# -- resume ------------------------------------------------------------------------------------


def test_restore_is_exact_mid_epoch_and_across_epochs(plain):
    cache_dir, data_dir, tok_dir = plain
    make = lambda **kw: _loader(cache_dir, data_dir, tok_dir, block_size=1024, global_batch_size=8, **kw)  # noqa: E731
    ref = make()
    per_epoch = ref.rows_per_epoch // 8
    run = [next(ref) for _ in range(per_epoch + 20)]
    for cut in (5, per_epoch - 1, per_epoch + 3):
        first = make()
        for _ in range(cut):
            next(first)
        saved = json.loads(json.dumps(first.state()))
        first.close()
        again = make()
        again.restore(saved)
        for step in range(cut, cut + 10):
            np.testing.assert_array_equal(next(again), run[step])


def test_restore_with_another_process_count(plain):
    """A one-process state restored on 4 processes (and back) continues the same global batches."""
    cache_dir, data_dir, tok_dir = plain
    make = lambda i=0, p=1: _loader(cache_dir, data_dir, tok_dir, block_size=512, global_batch_size=8,  # noqa: E731
                                    process_index=i, process_count=p)
    ref = make()
    run = [next(ref) for _ in range(60)]
    one = make()
    for _ in range(25):
        next(one)
    hosts = [make(i, 4) for i in range(4)]
    for h in hosts:
        h.restore(one.state())
    for step in range(25, 40):
        np.testing.assert_array_equal(np.concatenate([next(h) for h in hosts]), run[step])
    back = make()
    back.restore(hosts[2].state())
    for step in range(40, 50):
        np.testing.assert_array_equal(next(back), run[step])
    # Another global batch size continues at the same row: nothing repeated or skipped.
    half = _loader(cache_dir, data_dir, tok_dir, block_size=512, global_batch_size=4)
    half.restore(back.state())
    np.testing.assert_array_equal(np.concatenate([next(half) for _ in range(20)]), np.concatenate(run[50:60]))
    assert half.rows_at(0, 0).shape == (0, 513)


def test_restore_refuses_another_run(plain):
    """Another seed or block size, or the other loader's state (both ways), is refused in one line."""
    cache_dir, data_dir, tok_dir = plain
    loader = _loader(cache_dir, data_dir, tok_dir, seed=1)
    next(loader)
    state = loader.state()
    with pytest.raises(ValueError, match="seed=1"):
        _loader(cache_dir, data_dir, tok_dir, seed=2).restore(state)
    with pytest.raises(ValueError, match="block_size"):
        _loader(cache_dir, data_dir, tok_dir, seed=1, block_size=32).restore(state)
    with pytest.raises(ValueError, match="TokenLoader"):
        loader.restore({"version": 1, "docs": None, "skip": 0})
    streaming = TokenLoader(str(data_dir), str(tok_dir), block_size=64, batch_size_per_host=8,
                            token_cache=str(cache_dir), num_workers=0)
    with pytest.raises(ValueError, match="loader state version 'global_order/1'"):
        streaming.restore(state)  # and the other way round: each loader refuses the other's state
    streaming.close()
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


# -- bad input ---------------------------------------------------------------------------------


def test_batch_sizes_the_order_cannot_serve(plain):
    """Not a multiple of the processes, or more rows than an epoch: one line naming train.batch_size."""
    cache_dir, data_dir, tok_dir = plain
    with pytest.raises(ValueError, match=r"^train\.batch_size: .*multiple of the 4 processes$"):
        _loader(cache_dir, data_dir, tok_dir, global_batch_size=6, process_index=1, process_count=4)
    rows = _loader(cache_dir, data_dir, tok_dir, block_size=4096).rows_per_epoch
    with pytest.raises(ValueError, match=rf"^train\.batch_size: .* exceeds the {rows} rows") as err:
        _loader(cache_dir, data_dir, tok_dir, block_size=4096, global_batch_size=rows + 1)
    assert "\n" not in str(err.value)
    _loader(cache_dir, data_dir, tok_dir, block_size=4096, global_batch_size=rows)  # exactly one epoch: fine


def test_damaged_tokens_refused(plain, tmp_path):
    """Memory-mapped tokens skip the zip CRC; an id outside the vocabulary is still caught."""
    import shutil

    cache_dir, data_dir, tok_dir = plain
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    entry = sorted(copy.rglob("*.npz"))[0]
    loader = _loader(copy, data_dir, tok_dir, block_size=64)
    offset, dtype, _ = loader._layouts[0]
    with open(entry, "r+b") as f:
        f.seek(offset + 10 * dtype.itemsize)
        f.write(np.array([60000], dtype).tobytes())
    with pytest.raises(TokenCacheError, match=rf"{entry.name}: damaged token cache entry"):
        loader.gather(np.arange(loader.rows_per_epoch))


def test_supported_options():
    """Every option is served, fill-in-the-middle too (per row: tests/test_global_order_fim.py);
    the trainer streams only with data.order: stream or without a token cache."""
    from tests.helpers import tiny_config
    from train.run import stream_reason

    for extra in ([], ["data.control_codes=true"], ["data.fim_rate=0.5", "data.fim_spm_rate=0.5"],
                  ["data.packing=windows", "data.window_stride=16", "data.control_codes=true", "data.fim_rate=0.5"]):
        assert stream_reason(tiny_config(*extra), "cache") is None, extra
    assert stream_reason(tiny_config("data.order=stream"), "cache") == "data.order is stream"
    assert stream_reason(tiny_config(), None).startswith("no token cache")


def test_missing_fim_sentinels_and_control_codes_refused(plain):
    """FIM sentinels or control codes the tokenizer lacks are named, in one line."""
    cache_dir, data_dir, tok_dir = plain
    with pytest.raises(ValueError, match=r"^data.fim_rate: .* lacks the fill-in-the-middle tokens \['<\|fim_prefix"):
        _loader(cache_dir, data_dir, tok_dir, encode=EncodeOptions(fim_rate=0.1))
    with pytest.raises(ValueError, match=r"data.control_codes: .* has no token '<\|python\|>'"):
        _loader(cache_dir, data_dir, tok_dir, encode=EncodeOptions(control_codes=True))


# -- coverage and memory -----------------------------------------------------------------------


def test_first_batches_cover_many_repositories(repos):
    """Repositories are stored contiguously. In the first 4 batches the global order draws from
    more than half of the 60 repositories; the streaming loader, whose batches are consecutive
    tokens of a locally shuffled stream, from a few."""
    cache_dir, data_dir, tok_dir = repos
    block, batch, steps = 128, 16, 4
    records = _records(data_dir)
    stream, owner = _stream(records, tok_dir)
    loader = _loader(cache_dir, data_dir, tok_dir, block_size=block, global_batch_size=batch)
    rows = loader.row_indices(np.arange(steps * batch))
    np.testing.assert_array_equal(np.concatenate([next(loader) for _ in range(steps)]),
                                  _stream_rows(stream, block)[rows])
    first_token = rows * (block + 1)
    global_repos = {records[i]["meta"]["repo_name"] for i in owner[first_token]}

    tok, _ = _tokenizer(tok_dir)
    streaming = TokenLoader(str(data_dir), str(tok_dir), block_size=block, batch_size_per_host=batch,
                            token_cache=str(cache_dir), shuffle_buffer=8, num_workers=0)
    text = tok.decode(np.concatenate([next(streaming).reshape(-1) for _ in range(steps)]).tolist())
    streaming.close()
    # The streaming batches are one contiguous piece of its document stream: the headers it
    # holds name every document it reached.
    streaming_repos = {f"repo{m}" for m in re.findall(r"# repo (\d+) file", text)}
    assert len(global_repos) > REPOS // 2
    assert 0 < len(streaming_repos) < REPOS // 4
    assert len(global_repos) >= 3 * len(streaming_repos)


def test_index_memory_is_a_few_bytes_per_document():
    """The order keeps 4 bytes (stream start) per document, plus 1 (language) with control
    codes; 10M documents are under 100 MB (docs/data_order.md)."""
    n_docs = 1_000_000
    lengths = np.random.default_rng(0).integers(1, 4000, n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    plain = _UnitIndex(offsets, np.zeros(n_docs, np.int16), specials=1)
    assert plain.starts.dtype == np.uint32 and plain.nbytes <= 4 * n_docs + 16
    index = _UnitIndex(offsets, np.zeros(n_docs, np.int16), specials=2)
    assert index.nbytes <= 5 * n_docs + 16
    assert int(index.starts[-1]) == int(offsets[-1]) + 2 * n_docs
    assert 10 * index.nbytes < 100_000_000
