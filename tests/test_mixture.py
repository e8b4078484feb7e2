"""Language mixture weights (``data.mixture``) in the global data order: every row is a row of
one language's own stream (recomputed here), token shares of the first batches follow the
weights, ``other: 0`` drops the rest, the order is a pure function of the inputs and the same
for any process count, resume is exact from the small state, and bad mixtures are refused."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from data_processing.global_order import GlobalOrderLoader
from data_processing.mixture import PERIOD, MixtureSchedule, allocate, resolve_weights, weights_problem
from data_processing.packing import EncodeOptions, cut_windows
from data_processing.token_cache import build_cache
from data_processing.tokens import control_token
from tests.helpers import byte_level_bpe, stdlib_texts, tiny_config, write_language_shards

COUNTS = {"Python": 90, "JavaScript": 45, "Shell": 25, "Go": 20}  # natural shares about 50/25/14/11 by documents
COUNTS_KEYS = [k.lower() for k in COUNTS]
BLOCK, BATCH = 64, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four languages interleaved over three shards, a 400-token BPE with their control codes,
    the token cache; ``(cache, data, tokenizer, records)``."""
    root = tmp_path_factory.mktemp("mixture")
    records = write_language_shards(root / "data", COUNTS)
    tok = byte_level_bpe(stdlib_texts(80_000), 400, tuple(control_token(x) for x in COUNTS))
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    build_cache(root / "data", root / "tok", root / "cache", workers=1, progress=False)
    return root / "cache", root / "data", root / "tok", records


def _loader(corpus, mixture, **kw) -> GlobalOrderLoader:
    cache, data, tok, _ = corpus
    kw.setdefault("block_size", BLOCK)
    kw.setdefault("global_batch_size", BATCH)
    return GlobalOrderLoader(str(cache), source=str(data), tokenizer_path=str(tok), mixture=mixture, **kw)


def _language_docs(corpus, control: bool = False) -> dict[str, list[np.ndarray]]:
    """Each language's documents tokenized here, ``[<|lang|>] tokens <|endoftext|>``, in corpus order."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(corpus[2] / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    out: dict[str, list[np.ndarray]] = {}
    for r in corpus[3]:
        language = r["meta"]["language"]
        head = [tok.token_to_id(control_token(language))] if control else []
        ids = head + tok.encode(r["text"], add_special_tokens=False).ids + [eos]
        out.setdefault(language.lower(), []).append(np.asarray(ids, np.int32))
    return out


def _language_rows(corpus, control: bool = False) -> dict[str, np.ndarray]:
    """Each language's stream cut into rows of ``BLOCK + 1`` (the partial row dropped)."""
    out = {}
    for language, docs in _language_docs(corpus, control).items():
        stream = np.concatenate(docs)
        n = len(stream) // (BLOCK + 1)
        out[language] = stream[: n * (BLOCK + 1)].reshape(n, BLOCK + 1)
    return out


def _shares(loader: GlobalOrderLoader, steps: int) -> dict[str, float]:
    """Token shares by language of the first ``steps`` batches (from ``languages_at``)."""
    tokens: Counter = Counter()
    for _ in range(steps):
        names = loader.languages_at(loader.local_positions(loader.position)[0])
        for name, row in zip(names, next(loader), strict=True):
            tokens[name] += int((row >= 0).sum())
    total = sum(tokens.values())
    return {k: v / total for k, v in tokens.items()}


# -- the schedule ------------------------------------------------------------------------------


def test_schedule_counts_are_a_closed_form_of_the_row_count():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2 - 1e-4, "d": 1e-4}
    sched = MixtureSchedule(sorted(weights), weights)
    assert sched.slots.sum() == PERIOD and allocate([0.5, 0.5], 3).tolist() == [2, 1]
    n = 3 * PERIOD + 777
    lang, k = sched.at(np.arange(n))
    replay = np.bincount(lang, minlength=4)
    assert sched.counts(n).tolist() == replay.tolist()
    for L in range(4):  # the k-th row drawn from a language is its k-th position in the schedule
        assert k[lang == L].tolist() == list(range(replay[L]))
    # smooth: every prefix holds each language's share to within 1.5 rows
    prefix = np.cumsum(np.eye(4, dtype=np.int64)[lang[:PERIOD]], axis=0)
    want = np.arange(1, PERIOD + 1)[:, None] * sched.slots[None, :] / PERIOD
    assert np.abs(prefix - want).max() < 1.5


def test_weights_resolve_named_rest_and_other():
    rows = {"python": 60, "javascript": 30, "go": 10}
    assert resolve_weights({"python": 0.5}, rows) == pytest.approx({"python": 0.5, "javascript": 0.375, "go": 0.125})
    assert resolve_weights({"python": 1, "other": 0}, rows) == {"python": 1.0, "javascript": 0.0, "go": 0.0}
    assert resolve_weights({"Python": 2, "other": 2}, rows) == pytest.approx(
        {"python": 0.5, "javascript": 0.375, "go": 0.125})
    with pytest.raises(ValueError, match="data.mixture: language 'rust' is not in the training corpus"):
        resolve_weights({"rust": 0.1}, rows)
    with pytest.raises(ValueError, match="data.mixture: the weights give no language"):
        resolve_weights({"python": 0, "javascript": 0, "go": 0}, rows)
    with pytest.raises(ValueError, match="data.mixture: language 'go' has weight 0.5 but not one full row"):
        resolve_weights({"go": 0.5}, {**rows, "go": 0})
    assert weights_problem({"python": 0.5}) is None
    for bad in ({"python": -1}, {"python": float("nan")}, {"python": 0, "other": 0}, {"python": 0.8, "go": 0.3},
                {"Python": 0.1, "python": 0.1}, {"python": "x"}):
        assert weights_problem(bad), bad


# -- the loader --------------------------------------------------------------------------------


@pytest.mark.parametrize("control", [False, True])
def test_rows_are_rows_of_one_language_stream(corpus, control):
    """Every row served is the row of its language's own stream that ``language_rows`` names;
    each language's epoch is every row of it once."""
    loader = _loader(corpus, {"python": 0.4, "javascript": 0.3}, encode=EncodeOptions(control_codes=control))
    want = _language_rows(corpus, control)
    assert loader.mixture.languages == sorted(want)
    assert loader.mixture.rows.tolist() == [len(want[k]) for k in loader.mixture.languages]
    n = 4 * BATCH
    positions = np.arange(n)
    got = loader.rows_at(0, n)
    lang, rows = loader.language_rows(positions)
    for i in range(n):
        np.testing.assert_array_equal(got[i], want[loader.mixture.languages[lang[i]]][rows[i]])
    go = loader.mixture.languages.index("go")
    lang, rows = loader.language_rows(np.arange(40 * PERIOD))
    first = rows[lang == go][: len(want["go"])]
    assert sorted(first.tolist()) == list(range(len(want["go"])))  # upsampled: whole epochs, then the next


def test_windows_rows_are_windows_of_one_language(corpus):
    stride = 40
    loader = _loader(corpus, {"shell": 0.5}, encode=EncodeOptions(window=BLOCK + 1, stride=stride))
    want = {k: np.concatenate([cut_windows(d, BLOCK + 1, stride) for d in docs])
            for k, docs in _language_docs(corpus).items()}
    lang, rows = loader.language_rows(np.arange(3 * BATCH))
    got = loader.rows_at(0, 3 * BATCH)
    for i in range(len(got)):
        np.testing.assert_array_equal(got[i], want[loader.mixture.languages[lang[i]]][rows[i]])


def test_token_shares_follow_the_weights(corpus):
    weights = {"python": 0.2, "javascript": 0.2, "shell": 0.4, "go": 0.2}
    shares = _shares(_loader(corpus, weights), 8)
    print("shares", {k: round(v, 4) for k, v in sorted(shares.items())})
    assert shares.keys() == weights.keys()
    for k, w in weights.items():
        assert abs(shares[k] - w) <= 0.03, (k, shares[k], w)
    # the named rest by natural share: python 0.5, the others share 0.5 by their rows
    loader = _loader(corpus, {"python": 0.5})
    counts = loader.language_counts(8 * BATCH)
    rest = sum(v["corpus_rows"] for k, v in counts.items() if k != "python")
    shares = _shares(loader, 8)
    print("shares", {k: round(v, 4) for k, v in sorted(shares.items())})
    for k, v in counts.items():
        want = 0.5 if k == "python" else 0.5 * v["corpus_rows"] / rest
        assert abs(shares[k] - want) <= 0.03 and abs(v["weight"] - want) < 1e-3, (k, shares[k], want)


def test_other_zero_drops_the_unnamed_languages(corpus):
    loader = _loader(corpus, {"python": 0.5, "go": 0.5, "other": 0.0})
    shares = _shares(loader, 6)
    assert set(shares) == {"python", "go"} and abs(shares["go"] - 0.5) <= 0.03
    counts = loader.language_counts(6 * BATCH)
    assert counts["shell"]["rows"] == 0 and counts["shell"]["corpus_tokens"] > 0
    assert counts["go"]["rows"] == 3 * BATCH and counts["go"]["tokens"] == 3 * BATCH * BLOCK
    assert loader.rows_per_epoch == counts["python"]["corpus_rows"] + counts["go"]["corpus_rows"]
    assert loader.state()["mixture"] == {"go": PERIOD // 2, "python": PERIOD // 2}


def test_deterministic_and_the_same_for_any_process_count(corpus):
    mixture = {"python": 0.3, "shell": 0.3}
    steps = 12  # past go's first epoch (it is upsampled)
    single, again = _loader(corpus, mixture), _loader(corpus, mixture)
    one = [next(single) for _ in range(steps)]
    for step in range(steps):
        np.testing.assert_array_equal(next(again), one[step])
    for count in (2, 4):
        parts = [_loader(corpus, mixture, process_index=p, process_count=count) for p in range(count)]
        for step in range(steps):
            np.testing.assert_array_equal(np.concatenate([next(p) for p in parts]), one[step])
    other_seed = next(_loader(corpus, mixture, seed=1))
    assert not np.array_equal(other_seed, one[0])


def test_exact_resume_from_the_state_with_another_process_count(corpus):
    mixture = {"javascript": 0.5, "go": 0.25}
    full = _loader(corpus, mixture)
    want = [next(full) for _ in range(10)]
    first = _loader(corpus, mixture)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state()))
    assert state["position"] == 4 * BATCH and set(state["mixture"]) == set(COUNTS_KEYS)
    parts = [_loader(corpus, mixture, process_index=p, process_count=2) for p in range(2)]
    for p in parts:
        p.restore(state)
    for step in range(4, 10):
        np.testing.assert_array_equal(np.concatenate([next(p) for p in parts]), want[step])
    with pytest.raises(ValueError, match="mixture="):
        _loader(corpus, {"javascript": 0.4}).restore(state)
    with pytest.raises(ValueError, match="mixture="):
        _loader(corpus, None).restore(state)


def test_no_mixture_keeps_the_order_of_today(corpus):
    plain = _loader(corpus, None)
    empty = _loader(corpus, {})
    assert plain.mixture is None and "mixture" not in plain.state()
    np.testing.assert_array_equal(next(plain), next(empty))
    np.testing.assert_array_equal(plain.rows_at(0, BATCH), plain.gather(plain.row_indices(np.arange(BATCH))))


def test_loader_refuses_a_language_the_corpus_lacks(corpus):
    with pytest.raises(ValueError, match=r"^data.mixture: language 'rust' is not in the training corpus \(it has: go,"):
        _loader(corpus, {"rust": 0.1})


# -- the config and the run --------------------------------------------------------------------


@pytest.mark.parametrize("raw, words", [
    ("{python: -0.5}", "finite weights >= 0"), ("{python: .inf}", "finite weights >= 0"),
    ("{python: 0, other: 0}", "a positive sum"), ("{python: 0.7, go: 0.6}", "at most 1"),
    ("[python]", "a mapping"),
])
def test_config_refuses_bad_mixtures_in_one_line(raw, words):
    from train import config as C

    with pytest.raises(C.ConfigError) as err:
        tiny_config(f"data.mixture={raw}")
    assert str(err.value).startswith("data.mixture: expected ") and words in str(err.value)
    assert "\n" not in str(err.value)


def test_config_refuses_a_mixture_off_the_global_order():
    from train import config as C

    assert tiny_config("data.mixture={Python: 0.5}").data.mixture == {"python": 0.5}
    with pytest.raises(C.ConfigError, match=r"^data.mixture: applies to the global data order only"):
        tiny_config("data.mixture={python: 0.5}", "data.order=stream")
    # FIM is applied per row in the global order, so a mixture may have it
    assert tiny_config("data.mixture={python: 0.5}", "data.fim_rate=0.5").data.fim_rate == 0.5


def test_run_refuses_a_language_the_corpus_lacks(corpus, tmp_path):
    from train import config as C
    from train.run import make_train_loader

    cache, data, tok, _ = corpus
    cfg = tiny_config(f"data.train_dir={data}", f"tokenizer.path={tok}", f"data.token_cache={cache}",
                      "data.mixture={rust: 0.2}", f"run.output_dir={tmp_path}", "data.block_size=32")
    with pytest.raises(C.ConfigError, match=r"^data.mixture: language 'rust' is not in the training corpus"):
        make_train_loader(cfg)


def _run_config(corpus, out, *extra):
    cache, data, tok, _ = corpus
    return tiny_config(f"data.train_dir={data}", f"tokenizer.path={tok}", f"data.token_cache={cache}",
                       f"run.output_dir={out}", "data.block_size=32", "train.max_steps=10", *extra)


def test_train_batches_writes_the_language_of_each_row(corpus, tmp_path, capsys):
    from train.batches import main

    out = tmp_path / "b.jsonl"
    sets = [a for o in ["data.mixture={go: 0.5, other: 0.5}", f"data.train_dir={corpus[1]}",
                        f"tokenizer.path={corpus[2]}", f"data.token_cache={corpus[0]}", f"run.output_dir={tmp_path}",
                        "data.block_size=32", "train.batch_size=8"] for a in ("--set", o)]
    assert main(["--config", "configs/tiny.yaml", *sets, "--steps", "3", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["step"], r["row"]) for r in lines] == [(s, i) for s in range(1, 4) for i in range(8)]
    assert sum(r["language"] == "go" for r in lines) == 12  # half of every batch: the schedule alternates
    headers = [(r["language"], h.lower()) for r in lines for h in re.findall(r"# (Python|JavaScript|Shell|Go) doc \d+",
                                                                             r["text"])]
    assert headers and all(a == b for a, b in headers)  # a row holds documents of its language only
    bad = [a if a != "data.mixture={go: 0.5, other: 0.5}" else "data.mixture={rust: 0.5}" for a in sets]
    assert main(["--config", "configs/tiny.yaml", *bad, "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.mixture: language 'rust' is not in the training corpus") and "\n" not in err


def test_run_records_token_counts_before_and_after_weighting(corpus, tmp_path):
    from train.reports import run_report as R
    from train.run import MIXTURE_FILE, write_mixture_info

    cfg = _run_config(corpus, tmp_path, "data.mixture={shell: 0.5}", "train.batch_size=8")
    loader = _loader(corpus, cfg.data.mixture, block_size=32, global_batch_size=8)
    assert write_mixture_info(_loader(corpus, None), cfg, tmp_path) is None
    path = write_mixture_info(loader, cfg, tmp_path)
    info = json.loads(path.read_text())
    assert path.name == MIXTURE_FILE and info["run_rows"] == 80 and info["mixture"] == {"shell": 0.5}
    shell = info["languages"]["shell"]
    assert shell["rows"] == 40 and shell["tokens"] == 40 * 32 and shell["weight"] == 0.5
    assert sum(c["rows"] for c in info["languages"].values()) == 80
    assert sum(c["corpus_rows"] for c in info["languages"].values()) == sum(loader.mixture.rows)
    rows = R.mixture_rows(R.Run("r", tmp_path, cfg, [], [], info))
    assert [r[0] for r in rows] == sorted(COUNTS_KEYS) and rows[sorted(COUNTS_KEYS).index("shell")][4] == 40 * 32


def test_run_refuses_a_mixture_without_the_global_order(corpus, tmp_path):
    from train import config as C
    from train.run import make_train_loader

    cfg = _run_config(corpus, tmp_path, "data.mixture={python: 0.5}", "data.token_cache=")
    with pytest.raises(C.ConfigError, match=r"^data.mixture: applies to the global data order only, and this run "
                                            r"streams \(no token cache"):
        make_train_loader(cfg)
