"""Fill-in-the-middle from the global data order (``data_processing.fim_rows``, applied by
``GlobalOrderLoader`` per ``<|endoftext|>`` segment of each assembled row, BigCode Megatron-LM's
way): the sentinel layouts put back give the segment's text, the rates hold, the global batches
are the same for any process count and after a resume, rows keep their length and pad only at
their end where the loss masks, no FIM leaves the rows as they were, and the trainer uses it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_processing.fim_rows import RowFim, fim_rows, segments
from data_processing.global_order import GlobalOrderLoader
from data_processing.packing import EncodeOptions
from data_processing.shards import write_shard
from data_processing.token_cache import build_cache
from data_processing.tokens import FIM_TOKENS, control_token, sentinel_ids
from tests.helpers import byte_level_bpe, stdlib_documents, stdlib_texts, tiny_config
from tests.test_global_order import _loader, _tokenizer

LANGS = ["Python", "Shell"]
BLOCK = 96


@pytest.fixture(scope="module")
def fim_corpus(tmp_path_factory):
    """160 documents of 60-1200 characters (non-ASCII headers) in 2 shards, languages alternating,
    their token cache, and a 600-token BPE with the control codes and the FIM sentinels."""
    root = tmp_path_factory.mktemp("go_fim")
    tok = byte_level_bpe(stdlib_texts(150_000), 600, tuple(control_token(x) for x in LANGS) + FIM_TOKENS)
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    texts = stdlib_documents(160, source_bytes=150_000, lengths=(60, 1200), seed=2)
    records = [{"text": t, "meta": {"language": LANGS[i % 2]}} for i, t in enumerate(texts)]
    write_shard(root / "data" / "s0.jsonl.zst", records[:80])
    write_shard(root / "data" / "s1.jsonl.zst", records[80:])
    build_cache(root / "data", root / "tok", root / "cache", workers=1, progress=False)
    return root / "cache", root / "data", root / "tok"


def _fim_loader(corpus, rate=1.0, spm=0.0, control=True, **kw) -> GlobalOrderLoader:
    encode = EncodeOptions(control_codes=control, fim_rate=rate, fim_spm_rate=spm,
                           window=kw.pop("window", 0), stride=kw.pop("stride", 0))
    kw.setdefault("block_size", BLOCK)
    return _loader(*corpus, encode=encode, seed=kw.pop("seed", 5), **kw)


def _pairs(loader: GlobalOrderLoader, positions: np.ndarray):
    """``(row before FIM, row handed out)`` at ``positions``, and each row's aligned segments
    ``(original tokens, new tokens)`` (FIM adds no EOS, so the segments pair up in order)."""
    raw = loader.gather(loader.row_indices(positions))
    got = loader.rows_at(int(positions[0]), len(positions))
    eos = loader.eos_id
    out = []
    for a, b in zip(raw, got, strict=True):
        sa, sb = segments(a, eos), segments(b, eos)
        assert len(sa) == len(sb)
        out.append([(a[i:j], b[k:m]) for (i, j), (k, m) in zip(sa, sb, strict=True)])
    return raw, got, out


def _pieces(new: np.ndarray, sentinels) -> tuple[bool, list[int], list[int], list[int]]:
    """``(spm, prefix, middle, suffix)`` ids of a FIM body laid out by ``arrange``."""
    pre, suf, mid = sentinels
    ids = new.tolist()
    assert ids.count(pre) == ids.count(suf) == ids.count(mid) == 1 and ids[0] == pre
    i, j = ids.index(suf), ids.index(mid)
    assert 0 < i < j
    if i == 1:  # SPM: <pre> <suf> suffix <mid> prefix+middle (the cut between them is not visible;
        # a PSM body with an empty prefix reads the same, and puts back the same text)
        return True, ids[j + 1 :], [], ids[2:j]
    return False, ids[1:i], ids[j + 1 :], ids[i + 1 : j]


@pytest.mark.parametrize("spm", [False, True])
def test_every_segment_is_rearranged_and_the_pieces_give_its_text_back(fim_corpus, spm):
    """fim_rate=1: every segment with room in its suffix carries the three sentinels once, in
    PSM or SPM order; decoding prefix + middle is the start of the segment's text and the
    (possibly cut) suffix continues it; a leading control code stays in front."""
    tok, _ = _tokenizer(fim_corpus[2])
    loader = _fim_loader(fim_corpus, 1.0, 1.0 if spm else 0.0, global_batch_size=8)
    sentinels = sentinel_ids(tok)
    controls = {tok.token_to_id(control_token(x)) for x in LANGS}
    _, _, rows = _pairs(loader, np.arange(loader.rows_per_epoch))
    changed = heads = total = psm_read_as_spm = 0
    for old, new in (pair for row in rows for pair in row):
        total += 1
        if old[0] in controls:
            assert new[0] == old[0]
            old, new, heads = old[1:], new[1:], heads + 1
        if np.array_equal(old, new):
            continue  # a suffix too short to absorb the sentinels: kept (Megatron's rule)
        changed += 1
        got_spm, prefix, middle, suffix = _pieces(new, sentinels)
        assert got_spm or not spm
        psm_read_as_spm += got_spm and not spm
        text = tok.decode(old.tolist(), skip_special_tokens=False)
        head = tok.decode(prefix + middle, skip_special_tokens=False)
        tail = tok.decode(suffix, skip_special_tokens=False).rstrip("\ufffd")  # a cut may split a character
        assert text.startswith(head) and text[len(head) :].startswith(tail)
        assert len(new) <= len(old)
    assert heads > 20 and total > 200
    # Kept: the segments whose suffix piece has no more tokens than the layout adds (3 sentinels
    # and the cuts' lost merges), a fifth of these short ones (median 39 tokens); an empty prefix is rare.
    assert changed > 0.7 * total and psm_read_as_spm < 0.05 * changed


def test_pieces_put_back_are_the_segment_and_a_shorter_segment_pads_the_row_end(fim_corpus):
    """A row of one-byte tokens re-encodes shorter: nothing is cut, the pieces put back are the
    segments' exact text, EOS stay, and the row ends in -1 exactly as many as the segments shrank."""
    tok, eos = _tokenizer(fim_corpus[2])
    ctrl = tok.token_to_id(control_token("Python"))
    texts = ["def add(a, b):\n    return a + b\n", "x = [i * i for i in range(10)]\n"]
    chars = [[tok.encode(c, add_special_tokens=False).ids[0] for c in t] for t in texts]
    row = np.array([ctrl, *chars[0], eos, *chars[1], eos, ctrl], np.int32)
    for spm in (0.0, 1.0):
        fim = RowFim(tok, 1.0, spm, 0, eos, sentinel_ids(tok), frozenset({ctrl}))
        out = fim_rows(row[None], np.array([0]), np.array([3]), fim)[0]
        assert out.shape == row.shape and out[0] == ctrl
        spans = segments(out, eos)
        assert len(spans) == 3 and out[spans[2][0]] == ctrl  # the control-only segment is left alone
        shrunk = 0
        for (lo, hi), text, orig in zip(spans[:2], texts, chars, strict=True):
            body = out[lo + (out[lo] == ctrl) : hi]
            got_spm, prefix, middle, suffix = _pieces(body, fim.sentinels)
            assert got_spm or not spm
            order = prefix + middle + suffix if not spm else prefix + suffix  # SPM: prefix+middle joined
            assert tok.decode(order, skip_special_tokens=False) == text
            shrunk += len(orig) - len(body)
        pads = np.flatnonzero(out == -1)
        assert shrunk > 0 and len(pads) == shrunk and (pads == np.arange(len(row) - shrunk, len(row))).all()
        assert (out[: len(row) - shrunk] != -1).all()
        again = fim_rows(row[None], np.array([0]), np.array([3]), fim)[0]
        np.testing.assert_array_equal(again, out)  # a pure function of the row and its key
        other = fim_rows(row[None], np.array([0]), np.array([4]), fim)[0]
        assert not np.array_equal(other, out)  # another global row, other cuts


def test_fim_and_spm_rates(fim_corpus):
    """Over three epochs of rows the share of rearranged segments is fim_rate (0.5) of the share
    at fim_rate=1 (where only suffixes too short are kept), and SPM's share is fim_spm_rate."""
    tok, _ = _tokenizer(fim_corpus[2])
    sentinels = sentinel_ids(tok)

    def shares(rate):
        loader = _fim_loader(fim_corpus, rate, 0.3, control=False)
        _, _, rows = _pairs(loader, np.arange(3 * loader.rows_per_epoch))
        pairs = [pair for row in rows for pair in row]
        new = [n for o, n in pairs if not np.array_equal(o, n)]
        return len(new) / len(pairs), sum(_pieces(n, sentinels)[0] for n in new) / len(new), len(pairs)

    full, _, _ = shares(1.0)
    half, spm, n = shares(0.5)
    assert n > 1000
    assert abs(half - 0.5 * full) < 0.05
    assert abs(spm - 0.3) < 0.06


@pytest.mark.parametrize("packing", ["concat", "windows", "mixture"])
def test_same_global_batches_for_two_processes_and_after_resume(fim_corpus, packing):
    """With FIM (and windows, or a language mixture) the two processes' rows concatenate to the
    one-process batch, across an epoch boundary; a restored state (one process into two)
    continues with the same batches."""
    kw = {"window": BLOCK + 1, "stride": 48} if packing == "windows" else {}
    if packing == "mixture":
        kw["mixture"] = {"python": 0.75, "shell": 0.25}
    single = _fim_loader(fim_corpus, 0.5, 0.5, global_batch_size=8, **kw)
    steps = single.rows_per_epoch // 8 + 4
    want = [next(single) for _ in range(steps)]
    fim_prefix = sentinel_ids(_tokenizer(fim_corpus[2])[0])[0]
    assert sum((w == fim_prefix).sum() for w in want) > 2 * steps  # FIM'd rows
    hosts = [_fim_loader(fim_corpus, 0.5, 0.5, global_batch_size=8, process_index=i, process_count=2, **kw)
             for i in range(2)]
    for step in range(steps):
        np.testing.assert_array_equal(np.concatenate([next(h) for h in hosts]), want[step])
    first = _fim_loader(fim_corpus, 0.5, 0.5, global_batch_size=8, **kw)
    for _ in range(7):
        next(first)
    saved = json.loads(json.dumps(first.state()))
    again = [_fim_loader(fim_corpus, 0.5, 0.5, global_batch_size=8, process_index=i, process_count=2, **kw)
             for i in range(2)]
    for h in again:
        h.restore(saved)
    for step in range(7, 12):
        np.testing.assert_array_equal(np.concatenate([next(h) for h in again]), want[step])


@pytest.mark.parametrize("windows", [False, True])
def test_rows_keep_their_length_and_pad_only_at_the_end_where_the_loss_masks(fim_corpus, windows):
    """Every row is block_size + 1 tokens; -1 only at its end, as many more than before FIM as
    its segments shrank; those are exactly the labels the training step gives no weight."""
    from train.core.step import split_batch

    kw = {"window": BLOCK + 1, "stride": 48} if windows else {}
    loader = _fim_loader(fim_corpus, 1.0, 0.5, global_batch_size=8, **kw)
    raw, got, rows = _pairs(loader, np.arange(loader.rows_per_epoch))
    assert got.shape == raw.shape == (loader.rows_per_epoch, BLOCK + 1) and got.dtype == np.int32
    for a, b, pairs in zip(raw, got, rows, strict=True):
        real = int((b >= 0).sum())
        assert (b[:real] >= 0).all() and (b[real:] == -1).all()  # padding is a suffix of the row
        assert (b == -1).sum() - (a == -1).sum() == sum(len(o) - len(n) for o, n in pairs)
    _, _, valid = split_batch(got)
    np.testing.assert_array_equal(np.asarray(valid) == 0, got[:, 1:] == -1)
    if windows:
        assert (raw == -1).any()  # short documents were padded before FIM too


def test_no_fim_gives_todays_rows(fim_corpus):
    """fim_rate=0: the rows handed out are the cache's rows in the global order, as without options."""
    plain = _loader(*fim_corpus, block_size=BLOCK, encode=EncodeOptions(control_codes=True), seed=5)
    zero = _fim_loader(fim_corpus, 0.0, 0.5)
    assert zero._fim is None
    for _ in range(5):
        np.testing.assert_array_equal(next(zero), next(plain))
    np.testing.assert_array_equal(zero.rows_at(0, 16), zero.gather(zero.row_indices(np.arange(16))))


def test_the_trainer_and_train_batches_use_the_global_order_with_fim(fim_corpus, tmp_path):
    """A local corpus with fim_rate > 0 has no stream reason; the run's loader is the global
    order, and ``python -m train.batches`` writes its FIM'd rows."""
    from train import config as C
    from train.batches import main
    from train.run import make_train_loader, stream_reason

    cache, data, tok = fim_corpus
    sets = [f"data.train_dir={data}", f"tokenizer.path={tok}", f"data.token_cache={cache}",
            f"run.output_dir={tmp_path}", "data.control_codes=true", "data.fim_rate=0.5", "data.block_size=32"]
    assert stream_reason(tiny_config(*sets), str(cache)) is None
    sets.append("train.batch_size=8")
    cfg = C.load("configs/tiny.yaml", sets)
    loader = make_train_loader(cfg, quiet=True)
    assert isinstance(loader, GlobalOrderLoader) and loader._fim is not None
    want = loader.rows_at(0, 2 * cfg.train.batch_size)
    loader.close()
    out = tmp_path / "b.jsonl"
    args = [a for s in sets for a in ("--set", s)]
    assert main(["--config", "configs/tiny.yaml", *args, "--steps", "2", "--out", str(out)]) == 0
    got = np.array([json.loads(line)["tokens"] for line in out.read_text().splitlines()])
    np.testing.assert_array_equal(got, want)
    assert (got == sentinel_ids(_tokenizer(tok)[0])[0]).any()
