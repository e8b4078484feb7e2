"""Continuous batching: rows that join a slot KV cache at segment boundaries decode exactly as
they would alone (greedy), through ring wraps and slot resizes; a seeded sample does not depend
on its batch-mates; in the engine a short request overtakes a long one and n choices share one
batch."""

import pytest

from tests.helpers import tiny_hf_gpt_neo
from tests.test_serve import PROMPTS, hf_dir  # noqa: F401 - module fixture
from train.inference.batching import SlotDecoder, ring_buckets
from train.inference.decoding import generate_ids
from train.interop.hf_io import load_hf_folder

ROWS = [[5, 17, 42, 9, 100, 3, 77, 12, 250, 8, 61], [33, 2, 199, 45, 7], [1, 2, 3]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("neo")
    tiny_hf_gpt_neo().save_pretrained(d)
    cfg, params = load_hf_folder(d)  # 64 positions: the ring wraps after a few rows
    return cfg.__class__(**{**cfg.__dict__, "compute_dtype": "float32"}), params


def test_rows_joining_later_decode_as_alone(tiny):
    cfg, params = tiny
    alone = [generate_ids(cfg, params, [p], max_new_tokens=30)[0] for p in ROWS]
    dec = SlotDecoder(cfg, params)
    slots = []
    for p in ROWS:  # one row joins per segment
        slots.append(dec.free_slot())
        dec.admit(slots[-1], p, max_new_tokens=30)
        dec.step()
    assert dec.slots == 4  # grew from 1 to the next bucket
    while not all(dec.done):
        dec.step()
    assert [dec.tokens[s] for s in slots] == alone
    # Rows admitted together share one prefill (padded to the longest prompt's bucket).
    both = SlotDecoder(cfg, params)
    slots = both.reserve(2)
    both.admit_many([(slots[0], ROWS[0], 30, 0.0, 1.0, 0), (slots[1], ROWS[2], 30, 0.0, 1.0, 0)])
    while not all(both.done):
        both.step()
    assert [both.tokens[s] for s in slots] == [alone[0], alone[2]] and both.slots == 4
    # Growing keeps every row in its slot (callers hold slot numbers), even with gaps.
    both.release(slots[0])
    both.admit(0, ROWS[1], max_new_tokens=8)
    both.admit(2, ROWS[1], max_new_tokens=8)
    assert both.used == [True, True, True, False]
    mine = list(both.tokens[1])
    new = both.reserve(3)
    assert both.slots == 16 and new == [3, 4, 5] and both.tokens[1] == mine and both.used[:3] == [True] * 3
    # One row after another, each released and the cache shrunk: the write head wraps the ring
    # (64 columns, the model's positions) several times, results unchanged.
    for k in range(9):
        for s in range(dec.slots):
            if dec.used[s]:
                dec.release(s)
        dec.shrink()
        s = dec.free_slot()
        dec.admit(s, ROWS[k % 3], max_new_tokens=30)
        while not dec.done[s]:
            dec.step()
        assert dec.tokens[s] == alone[k % 3], k
    assert dec.slots == 1 and dec.segments * 16 > 2 * dec.ring


def test_ring_grows_and_shrinks_with_the_rows_it_holds(tiny):
    cfg, params = tiny
    assert ring_buckets(64) == (64,) and ring_buckets(128) == (64, 128) and ring_buckets(100) == (64, 128)
    assert ring_buckets(2048) == (64, 128, 256, 512, 1024, 2048) and ring_buckets(64, 32) == (32, 64)
    alone = {(k, n): generate_ids(cfg, params, [ROWS[k]], max_new_tokens=n)[0] for k, n in ((2, 20), (0, 40), (1, 20))}
    dec = SlotDecoder(cfg, params, min_ring=32)  # rings of 32 and 64 columns
    a = dec.free_slot()
    dec.admit(a, ROWS[2], max_new_tokens=20)  # 3 + 20 columns: the 32-column ring
    assert dec.ring == 32
    dec.step()
    b = dec.free_slot()
    dec.admit(b, ROWS[0], max_new_tokens=40)  # 11 + 40: the ring grows to 64 while A runs
    assert dec.ring == 64 and dec.slots == 4 and not dec.done[a]
    while not dec.done[a]:
        dec.step()
    assert dec.tokens[a] == alone[2, 20]
    dec.release(a)
    dec.shrink(slots=False)
    assert dec.ring == 64  # B still needs it
    dec.step()  # B: 32 tokens
    c = dec.free_slot()
    dec.admit(c, ROWS[1], max_new_tokens=20)  # 5 + 20: fits the ring as it is
    dec.step()
    assert dec.done[b] and dec.tokens[b] == alone[0, 40] and not dec.done[c]
    dec.release(b)
    assert dec.shrink(slots=False) == [0, 1, 2, 3] and dec.ring == 32  # C alone: its columns move
    while not dec.done[c]:  # ... and the head wraps the shorter ring
        dec.step()
    assert dec.tokens[c] == alone[1, 20]
    # Moving rows to fewer slots shrinks the ring too; a joiner that needs more grows it again.
    d = dec.free_slot()
    dec.admit(d, ROWS[2], max_new_tokens=10)
    dec.release(c)
    assert dec.shrink() == [-1, 0, -1, -1] and dec.slots == 1 and dec.ring == 32
    dec.admit(dec.reserve(1)[0], ROWS[0], max_new_tokens=50)
    assert dec.ring == 64 and dec.slots == 4
    while not all(dec.done):
        dec.step()
    assert dec.tokens[0] == generate_ids(cfg, params, [ROWS[2]], max_new_tokens=10)[0]
    assert dec.tokens[1] == generate_ids(cfg, params, [ROWS[0]], max_new_tokens=50)[0]


def test_seeded_sample_ignores_batch_mates(tiny):
    cfg, params = tiny

    def sample(mates: int, seed: int):
        dec = SlotDecoder(cfg, params)
        for m in range(mates):
            dec.admit(dec.free_slot(), ROWS[1], max_new_tokens=30, temperature=0.9, seed=100 + m)
        s = dec.free_slot()
        dec.admit(s, ROWS[0], max_new_tokens=30, temperature=0.9, top_p=0.95, seed=seed)
        while not dec.done[s]:
            dec.step()
        return dec.tokens[s]

    assert sample(0, 7) == sample(3, 7) != sample(0, 8)
    with pytest.raises(ValueError, match="positions"):
        SlotDecoder(cfg, params).admit(0, [1] * 60, max_new_tokens=8)


@pytest.fixture(scope="module")
def engine(hf_dir):  # noqa: F811
    from train.inference.decoding import load_model
    from train.inference.server import Engine

    eng = Engine(*load_model(hf_dir=str(hf_dir)))
    yield eng
    eng.close()


def test_short_request_overtakes_a_long_one(engine):
    import threading

    from train.inference.server import Job

    started, queued = threading.Event(), threading.Event()

    def hold_first_text(_text):
        # The worker waits on the long request's first text until the short one is queued, so
        # the short one joins with ~1 of the 96 tokens done however slowly this thread runs.
        if not started.is_set():
            started.set()
            queued.wait(120)

    long = Job(engine.tok.encode(PROMPTS[2]), 96, 0.0, 1.0, 0, on_text=hold_first_text)
    engine.submit(long)
    assert started.wait(120)
    short = engine.submit(Job(engine.tok.encode(PROMPTS[0]), 16, 0.0, 1.0, 0))
    queued.set()
    assert short.result(timeout=120).tokens == 16
    assert not long.future.done()  # joined the running batch instead of waiting for it
    assert long.future.result(timeout=120).tokens == 96


@pytest.mark.parametrize("n", [4, 16])
def test_n_choices_at_temperature_run_as_one_batch(engine, n):
    from fastapi.testclient import TestClient

    from train.inference.server import create_app

    assert n <= engine.max_batch
    with TestClient(create_app(engine)) as client:
        body = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 1.0, "n": n, "seed": 3}
        before = engine.segments
        first = client.post("/v1/completions", json=body).json()
        assert len(first["choices"]) == n
        assert engine.segments - before == 1  # n rows, one 16-token segment
        again = client.post("/v1/completions", json=body).json()
        texts = [c["text"] for c in first["choices"]]
        assert texts == [c["text"] for c in again["choices"]] and len(set(texts)) > 1


def test_warm_compiles_the_shapes_decoding_uses(tiny):
    from train.inference import batching

    cfg, params = tiny
    dec = SlotDecoder(cfg, params, max_slots=4, min_ring=32)
    dec.warm()
    sizes = {f: f._cache_size() for f in (batching._slot_segment, batching._insert, batching._relayout_cache)}
    s = dec.free_slot()
    dec.admit(s, ROWS[2], max_new_tokens=8)  # ring 32, one slot
    dec.admit(dec.reserve(1)[0], ROWS[0], max_new_tokens=40)  # 4 slots, ring 64
    while not all(dec.done):
        dec.step()
    dec.release(0)
    dec.release(1)
    dec.shrink()
    assert {f: f._cache_size() for f in sizes} == sizes  # nothing compiled on first use


def test_health_is_503_until_the_warm_up_is_done(hf_dir, monkeypatch):  # noqa: F811
    """A load balancer must not route to a server still compiling: /health says "warming up" (503)
    until SlotDecoder.warm returns, then "ok"; requests queued meanwhile are answered after it."""
    import threading

    from fastapi.testclient import TestClient

    from train.inference import batching
    from train.inference.decoding import load_model
    from train.inference.server import Engine, create_app

    release = threading.Event()
    monkeypatch.setattr(batching.SlotDecoder, "warm", lambda self: release.wait(120))
    eng = Engine(*load_model(hf_dir=str(hf_dir)), warmup=True)
    try:
        with TestClient(create_app(eng)) as client:
            r = client.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "warming up"
            release.set()
            assert eng.ready.wait(120)
            assert client.get("/health").json()["status"] == "ok"
            body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
    finally:
        release.set()
        eng.close()


def test_a_request_is_queued_whole_before_a_worker_drains_it(engine):
    """A worker that took a request's first job waits for the rest (submit_all holds the lock
    while it queues), and a full queue cancels the jobs of the request queued so far."""
    import queue
    import threading

    from train.inference.server import Engine, Job

    drained = threading.Event()

    def take_then_drain():
        engine.whole_requests()
        drained.set()

    with engine.submitting:  # a request half-queued
        worker = threading.Thread(target=take_then_drain)
        worker.start()
        assert not drained.wait(0.2)
    worker.join(10)
    assert drained.is_set()

    small = Engine.__new__(Engine)  # only the queue and the lock, no worker thread
    small.queue, small.submitting = queue.Queue(maxsize=2), threading.Lock()
    jobs = [Job([1, 2], 4, 0.0, 1.0, 0) for _ in range(3)]
    with pytest.raises(queue.Full):
        small.submit_all(jobs)
    assert [j.future.cancelled() for j in jobs] == [True, True, False]
