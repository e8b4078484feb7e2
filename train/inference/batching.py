"""Continuous batching: a KV cache of slots that rows join and leave at segment boundaries.

``SlotDecoder`` holds up to ``slots`` rows, each with its own prompt, token limit, temperature,
top-p and seed. A row is admitted into a free slot between two segments: its prompt is prefilled
alone (batch 1, the prompt's 32-token bucket, as ``train.generate`` does) and its keys, values
and positions are copied into its slot; then it decodes with every other live row, 16 tokens a
segment. A row that ends frees its slot for the next request at once, instead of the whole batch
waiting for its longest row.

The cache is a ring of ``ring`` columns written one column per step for all rows, the write
head going back to column 0 after the last one at any step; attention masks by position, not
column, so a row's prompt can sit in the columns just behind the write head and its tokens in the
columns after it. A row of ``p`` prompt tokens and ``m`` new ones needs ``p + m`` columns (its
prompt bucket too, to insert it): in a ring at least that long, none of its columns is written
again before it ends. The ring is only as long as the live rows need, one of ``ring_buckets``
(64, 128, 256, ... up to the model's positions): attention per step costs what the live
rows need, not the model's whole context. A row that needs more grows the ring before it is
inserted, and the ring shrinks when the rows that needed it end; both copy the columns just
behind the head into the new ring, so every live row keeps the columns it needs. The number of
slots grows and shrinks through ``SLOT_BUCKETS`` (live rows are moved to the lowest slots), so
one request alone decodes a batch of one. Each (slots, ring) pair is one compiled segment.

Row ``b``'s sample at its step ``i`` uses ``fold_in(seed_key(seed_b), i)``: the same seed gives the
same sample whoever else is in the batch, and ``n`` choices are ``n`` rows of one batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from train.config import ModelConfig
from train.core import model as M
from train.inference.decoding import PROMPT_BUCKET, SEGMENT_TOKENS, prefill, sample_logits, seed_key

SLOT_BUCKETS = (1, 4, 16)


def ring_buckets(positions: int, smallest: int = 2 * PROMPT_BUCKET) -> tuple[int, ...]:
    """Ring lengths for a model of ``positions`` positions: ``smallest`` doubled until the
    positions rounded up to the prompt bucket (the last one). Few lengths, because each one
    multiplies the compiled shapes (segment, insert, copies) by the slot buckets."""
    full = -(-positions // PROMPT_BUCKET) * PROMPT_BUCKET
    sizes, p = [], max(PROMPT_BUCKET, smallest)
    while p < full:
        sizes.append(p)
        p *= 2
    return (*sizes, full)


def _with_index(cache, head):
    """The cache with every layer's write index at ``head``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(head, jnp.int32) if path[-1].key == "cache_index" else x, cache)


@functools.partial(jax.jit, donate_argnames=("cache", "logits_BV"))
def _insert(cache, logits_BV, row_cache, row_logits_RV, slots_R, head):
    """Copy prefilled rows (R rows, T columns each) into slots ``slots_R``: each row's T columns
    just behind ``head`` (mod the ring); every other column of those slots is cleared (hidden by
    position). A slot index past the last slot drops that row (padding of the prefill batch)."""

    def put(path, big, rows):
        name = path[-1].key
        if name == "cache_index":
            return big
        ring, T = big.shape[1], rows.shape[1]
        cols_T = (head - T + jnp.arange(T)) % ring
        if name == "cached_pos":
            big = big.at[slots_R].set(2**30, mode="drop")
        return big.at[slots_R[:, None], cols_T[None, :]].set(rows.astype(big.dtype), mode="drop")

    cache = jax.tree_util.tree_map_with_path(put, cache, row_cache)
    return cache, logits_BV.at[slots_R].set(row_logits_RV.astype(jnp.float32), mode="drop")


@functools.partial(jax.jit, static_argnames=("ring",))
def _relayout_cache(cache, logits_BV, rows_S, head, *, ring: int):
    """A cache of ``len(rows_S)`` slots and ``ring`` columns: slot ``s`` holds old slot
    ``rows_S[s]`` (a negative index: an empty slot), its last ``min(old ring, ring)`` columns
    behind the old ``head`` put just behind column 0 (the new head), the other columns empty."""
    keep_S = rows_S >= 0
    rows_S = jnp.maximum(rows_S, 0)

    def move(path, x):
        if path[-1].key == "cache_index":
            return x
        old = x.shape[1]
        k = min(old, ring)
        src_R = (head - ring + jnp.arange(ring)) % old  # new column c <- old column head - (ring - c)
        valid_R = jnp.arange(ring) >= ring - k
        fill = 2**30 if path[-1].key == "cached_pos" else 0
        y = x[rows_S[:, None], src_R[None, :]]
        ok = (keep_S[:, None] & valid_R[None, :]).reshape(keep_S.shape[0], ring, *([1] * (x.ndim - 2)))
        return jnp.where(ok, y, jnp.asarray(fill, x.dtype))

    cache = jax.tree_util.tree_map_with_path(move, cache)
    return cache, jnp.where(keep_S[:, None], logits_BV[rows_S], 0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "n_tokens"), donate_argnames=("logits_BV", "cache"))
def _slot_segment(params, logits_BV, cache, pos_B, done_B, limit_B, step_B, keys_B2, temperature_B, top_p_B,
                  eos_id, head, *, cfg: ModelConfig, top_k: int, n_tokens: int):
    """Up to ``n_tokens`` decode steps of every slot with per-row settings; the write head
    starts at ``head`` and goes round the ring. Returns (logits, cache, tokens [B, n_tokens],
    positions, steps run)."""
    ring = next(x.shape[1] for p, x in jax.tree_util.tree_leaves_with_path(cache) if p[-1].key == "cached_pos")
    out_BN = jnp.zeros((logits_BV.shape[0], n_tokens), jnp.int32)

    def sample_row(logits_V, key, i, temperature, top_p):
        return sample_logits(logits_V[None], jax.random.fold_in(key, i), temperature, top_k, top_p)[0]

    def cond(carry):
        j, _, _, _, _, done_B = carry
        return (j < n_tokens) & ~jnp.all(done_B)

    def body(carry):
        j, logits_BV, cache, out_BN, pos_B, done_B = carry
        i_B = step_B + j  # each row's own step index: its samples do not depend on when it joined
        # Greedy rows only take the argmax: the sort and the draw run only when some row samples.
        token_B = jax.lax.cond(
            jnp.any(temperature_B > 0),
            lambda: jax.vmap(sample_row)(logits_BV, keys_B2, i_B, temperature_B, top_p_B),
            lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))
        out_BN = out_BN.at[:, j].set(token_B)
        done_B = done_B | (token_B == eos_id) | (i_B + 1 >= limit_B)
        in_pos_B = jnp.minimum(pos_B, cfg.max_position_embeddings - 1)  # finished and free slots step too
        cache = _with_index(cache, (head + j) % ring)
        logits_B1V, cache = M.decode_step(cfg, params, cache, token_B[:, None], in_pos_B[:, None])
        # fp32 carry whatever the compute dtype (exact for bf16; sampling is in fp32 anyway)
        return j + 1, logits_B1V[:, 0].astype(jnp.float32), cache, out_BN, pos_B + 1, done_B

    j, logits_BV, cache, out_BN, pos_B, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(0), logits_BV, cache, out_BN, pos_B, done_B))
    return logits_BV, cache, out_BN, pos_B, j


@functools.lru_cache(maxsize=4096)
def _key_array(seed: int) -> np.ndarray:
    # A host copy of the seed's key (seeds repeat: n choices, retries, lm-eval's fixed seed).
    return np.asarray(seed_key(seed))


class SlotDecoder:
    """Rows decoding together in a slot KV cache; ``admit`` between ``step`` calls.

    ``tokens[s]`` holds what the row in slot ``s`` generated (cut after EOS and at its limit);
    ``done[s]`` is True for a finished row and for a free slot. ``step()`` returns what each slot
    gained; ``finish(s)`` ends a row early; ``release(s)`` frees its slot.
    """

    def __init__(self, cfg: ModelConfig, params, *, max_slots: int = 16, eos_id: int | None = None,
                 top_k: int = 0, segment_tokens: int = SEGMENT_TOKENS, min_ring: int = 2 * PROMPT_BUCKET):
        self.cfg, self.params = cfg, params
        self.max_slots = max_slots
        self.eos_id = eos_id
        self.rings = ring_buckets(cfg.max_position_embeddings, min_ring)
        self.ring = self.rings[0]
        self.segments = 0
        self._seg, self._top_k = int(segment_tokens), int(top_k)
        self._eos = np.int32(-1 if eos_id is None else eos_id)
        self._head = 0
        self._V = self._vocab()
        self._alloc(1)

    def _alloc(self, slots: int) -> None:
        self.slots = slots
        self.cache = M.init_cache(self.cfg, self.params, slots, self.ring)
        self.logits_BV = jnp.zeros((slots, self._V), jnp.float32)
        self.pos_B = np.zeros(slots, np.int32)
        self.step_B = np.zeros(slots, np.int32)
        self.limit_B = np.zeros(slots, np.int32)
        self.keys_B2 = np.zeros((slots, 2), np.uint32)
        self.temperature_B = np.zeros(slots, np.float32)
        self.top_p_B = np.ones(slots, np.float32)
        self.need_B = np.zeros(slots, np.int32)  # columns each row needs: prompt + max new tokens
        self.done = [True] * slots
        self.used = [False] * slots  # a row (live or finished) occupies the slot
        self.tokens: list[list[int]] = [[] for _ in range(slots)]

    def warm(self) -> None:
        """Compile, before the first request, what the decoder runs between (slots, ring) shapes:
        every segment; the prefill and insert of the first prompt bucket for each row bucket; the
        copies that change the slots or the ring. Longer prompts' buckets compile on first use."""
        T = PROMPT_BUCKET
        buckets = sorted({b for b in SLOT_BUCKETS if b < self.max_slots} | {self.max_slots})
        rows = {R: prefill(self.params, np.zeros((R, T), np.int32), np.tile(np.arange(T, dtype=np.int32), (R, 1)),
                           cfg=self.cfg, max_len=T) for R in buckets}
        for B in buckets:
            for ring in self.rings:
                z = np.zeros(B, np.int32)

                def fresh(B=B, ring=ring):
                    return M.init_cache(self.cfg, self.params, B, ring), jnp.zeros((B, self._V), jnp.float32)

                cache, logits = fresh()
                _slot_segment(self.params, logits, cache, z, np.ones(B, bool), z, z, np.zeros((B, 2), np.uint32),
                              np.zeros(B, np.float32), np.ones(B, np.float32), self._eos, np.int32(0), cfg=self.cfg,
                              top_k=self._top_k, n_tokens=self._seg)
                for R in (b for b in buckets if b <= B):
                    logits_RV, row_cache, _ = rows[R]
                    _insert(*fresh(), row_cache, logits_RV, np.full(R, B, np.int32), np.int32(0))
                for B2 in (b for b in buckets if b != B):
                    _relayout_cache(*fresh(), np.full(B2, -1, np.int32), np.int32(0), ring=ring)
                for ring2 in (r for r in self.rings if r != ring):
                    _relayout_cache(*fresh(), np.arange(B, dtype=np.int32), np.int32(0), ring=ring2)

    def _vocab(self) -> int:
        # The logits' width is the padded vocabulary of the output layer, not cfg.vocab_size.
        return int(jax.eval_shape(lambda: prefill(self.params, jnp.zeros((1, 1), jnp.int32),
                                                   jnp.zeros((1, 1), jnp.int32), cfg=self.cfg,
                                                   max_len=1))[0].shape[-1])

    @property
    def live(self) -> int:
        """Slots holding a row (running or finished but not yet released)."""
        return sum(self.used)

    def free_slot(self) -> int | None:
        """A free slot, growing the cache to the next bucket when every slot is used (None at
        ``max_slots``)."""
        if not all(self.used):
            return self.used.index(False)
        if self.slots >= self.max_slots:
            return None
        grow = next((b for b in SLOT_BUCKETS if b > self.slots), self.max_slots)
        self._relayout(list(range(self.slots)), min(grow, self.max_slots))
        return self.used.index(False)

    def reserve(self, n: int) -> list[int]:
        """``n`` free slots (at most the free ones at ``max_slots``), growing the cache once to
        the bucket that holds every row plus ``n``."""
        free = [s for s in range(self.slots) if not self.used[s]]
        if len(free) < n and self.slots < self.max_slots:
            want = self.live + n
            grow = next((b for b in SLOT_BUCKETS if b >= want), self.max_slots)
            self._relayout(list(range(self.slots)), min(grow, self.max_slots))  # rows keep their slots
            free = [s for s in range(self.slots) if not self.used[s]]
        return free[:n]

    def ring_for(self, need: int = 0) -> int:
        """The shortest ring that holds every running row and a row needing ``need`` columns."""
        live = [int(self.need_B[s]) for s in range(self.slots) if self.used[s] and not self.done[s]]
        want = max([need, *live])
        return next((b for b in self.rings if b >= want), self.rings[-1])

    def shrink(self, slots: bool = True) -> list[int]:
        """Move the rows to the lowest slots of the smallest bucket that holds them (with
        ``slots=False`` they keep theirs) in the shortest ring the running rows need; returns
        each old slot's new index (-1: released) so callers can follow their rows."""
        keep = [s for s in range(self.slots) if self.used[s]]
        target = next((b for b in SLOT_BUCKETS if b >= max(1, len(keep))), self.max_slots)
        # An empty cache keeps its ring: the next row sets it (one copy instead of two).
        ring = self.ring_for() if keep else self.ring
        if not slots or target >= self.slots:
            if ring < self.ring:
                self._relayout(list(range(self.slots)), self.slots, ring)
            return list(range(self.slots))
        moved = [-1] * self.slots
        for new, old in enumerate(keep):
            moved[old] = new
        # Slots, then ring: two copies, but each changes one dimension, so the compiled copies
        # are per (slots, slots', ring) and (slots, ring, ring'), not every pair of shapes.
        self._relayout(keep, target)
        if ring < self.ring:
            self._relayout(list(range(self.slots)), self.slots, ring)
        return moved

    def _relayout(self, keep: list[int], slots: int, ring: int | None = None) -> None:
        """Rows ``keep`` into slots 0.. of a cache of ``slots`` slots (the rest free) and ``ring``
        columns (default: the current ring); the write head goes to column 0."""
        ring = self.ring if ring is None else ring
        idx = np.asarray(keep, np.int32)
        pad = slots - len(keep)
        rows_S = np.concatenate([idx, np.full(pad, -1, np.int32)]) if pad > 0 else idx
        cache, logits = _relayout_cache(self.cache, self.logits_BV, rows_S, np.int32(self._head), ring=ring)
        arrays = {name: getattr(self, name) for name in ("pos_B", "step_B", "limit_B", "keys_B2", "temperature_B",
                                                         "top_p_B", "need_B")}
        done = [self.done[s] for s in keep] + [True] * pad
        used = [self.used[s] for s in keep] + [False] * pad
        tokens = [self.tokens[s] for s in keep] + [[] for _ in range(pad)]
        self.slots, self.cache, self.logits_BV, self.ring, self._head = slots, cache, logits, ring, 0
        for name, a in arrays.items():
            new = np.zeros((slots, *a.shape[1:]), a.dtype)
            new[: len(keep)] = a[idx]
            setattr(self, name, new)
        self.top_p_B[len(keep):] = 1.0
        self.done, self.used, self.tokens = done, used, tokens

    def check(self, prompt: list[int], max_new_tokens: int) -> None:
        """Raise ValueError when ``prompt`` with ``max_new_tokens`` cannot be decoded."""
        positions = self.cfg.max_position_embeddings
        if not prompt:
            raise ValueError("prompt: needs at least one token")
        if max_new_tokens < 1 or len(prompt) + max_new_tokens > positions:
            raise ValueError(f"max_new_tokens: prompt ({len(prompt)} tokens) + {max_new_tokens} new tokens exceed "
                             f"the model's {positions} positions")

    def admit(self, slot: int, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0,
              top_p: float = 1.0, seed: int = 0) -> None:
        """Prefill ``prompt`` and put it in free ``slot``; it decodes from the next ``step``."""
        self.admit_many([(slot, prompt, max_new_tokens, temperature, top_p, seed)])

    def admit_many(self, rows: list[tuple[int, list[int], int, float, float, int]]) -> None:
        """``admit`` several (slot, prompt, max_new_tokens, temperature, top_p, seed) rows with
        one prefill call: padded to a row bucket and to the longest prompt's 32-token bucket."""
        for _, prompt, max_new, *_ in rows:
            self.check(prompt, max_new)
        R = next((b for b in SLOT_BUCKETS if b >= len(rows)), len(rows))
        T = -(-max(len(r[1]) for r in rows) // PROMPT_BUCKET) * PROMPT_BUCKET
        ring = self.ring_for(max(T, *(len(r[1]) + r[2] for r in rows)))
        if ring > self.ring or (ring < self.ring and not any(self.used)):  # the running rows into a longer ring
            self._relayout(list(range(self.slots)), self.slots, ring)
        ids = np.zeros((R, T), np.int32)
        pos = np.full((R, T), -1, np.int32)
        slots_R = np.full(R, self.slots, np.int32)  # padding rows: dropped by _insert
        for r, (slot, prompt, *_) in enumerate(rows):
            ids[r, T - len(prompt):] = prompt
            pos[r, T - len(prompt):] = np.arange(len(prompt))
            slots_R[r] = slot
        logits_RV, row_cache, _ = prefill(self.params, ids, pos, cfg=self.cfg, max_len=T)
        self.cache, self.logits_BV = _insert(self.cache, self.logits_BV, row_cache, logits_RV, slots_R,
                                             np.int32(self._head))
        for slot, prompt, max_new, temperature, top_p, seed in rows:
            self.pos_B[slot] = len(prompt)
            self.step_B[slot] = 0
            self.limit_B[slot] = max_new
            self.need_B[slot] = len(prompt) + max_new
            self.keys_B2[slot] = _key_array(seed)
            self.temperature_B[slot], self.top_p_B[slot] = temperature, top_p
            self.done[slot], self.used[slot], self.tokens[slot] = False, True, []

    def finish(self, slot: int, keep: int | None = None) -> None:
        """End the row in ``slot`` now; with ``keep``, also drop its tokens after the first ``keep``."""
        self.done[slot] = True
        if keep is not None:
            del self.tokens[slot][keep:]

    def release(self, slot: int) -> None:
        """Free ``slot`` for another row."""
        self.done[slot], self.used[slot], self.tokens[slot] = True, False, []

    def step(self) -> list[list[int]]:
        """One segment of every slot; the ids each slot gained (empty for finished and free ones)."""
        if all(self.done):
            return [[] for _ in range(self.slots)]
        done_B = np.asarray(self.done)
        self.logits_BV, self.cache, out_BN, pos_B, n = _slot_segment(
            self.params, self.logits_BV, self.cache, self.pos_B, done_B, self.limit_B, self.step_B, self.keys_B2,
            self.temperature_B, self.top_p_B, self._eos, np.int32(self._head), cfg=self.cfg, top_k=self._top_k,
            n_tokens=self._seg)
        n = int(n)
        self._head = (self._head + n) % self.ring
        self.pos_B = np.asarray(pos_B).copy()
        self.step_B = self.step_B + n
        gained = []
        for s, row in enumerate(np.asarray(out_BN)[:, :n].tolist()):
            if done_B[s]:
                gained.append([])
                continue
            row = row[: self.limit_B[s] - len(self.tokens[s])]
            if self.eos_id is not None and self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
                self.done[s] = True
            self.tokens[s].extend(row)
            if len(self.tokens[s]) >= self.limit_B[s]:
                self.done[s] = True
            gained.append(row)
        self.segments += 1
        return gained


class ContinuousWorker:
    """The engine's worker loop with continuous batching: between two segments, finished rows
    leave, queued jobs take the free slots (up to ``engine.max_batch``), then one segment runs
    for every live row. Text and results go out per segment as in the static engine."""

    def __init__(self, engine):
        self.engine = engine
        self.dec = SlotDecoder(engine.cfg, engine.params, max_slots=engine.max_batch, eos_id=engine.eos)
        self.rows: dict = {}  # slot -> (Job, RowText)

    def run(self, stop) -> None:
        """Serve queued jobs until ``stop`` is set (after compiling the decoder's shapes when the
        engine asks for a warm-up)."""
        if getattr(self.engine, "warmup", False):
            self.dec.warm()
        if hasattr(self.engine, "ready"):
            self.engine.ready.set()
        while not stop.is_set():
            self._admit(block=not self.rows)
            if not self.rows:
                continue
            try:
                self._segment()
            except Exception as err:  # noqa: BLE001 - the error goes to the rows that were running
                import traceback

                traceback.print_exc()
                self._fail_all(err)

    def _admit(self, block: bool) -> None:
        """Take queued jobs into free slots with one prefill (waiting up to 0.1 s for a first one
        when nothing runs). A job that cannot start fails alone."""
        import queue

        from train.inference.jobs import RowText, settle

        jobs = []
        while self.dec.live + len(jobs) < self.dec.max_slots:
            try:
                wait = block and not self.rows and not jobs
                job = self.engine.queue.get(timeout=0.1) if wait else self.engine.queue.get_nowait()
            except queue.Empty:
                break
            if not jobs:
                self.engine.whole_requests()  # the rest of this job's request is queued before we drain
            if job.future.cancelled():  # timed out or refused while queued
                continue
            try:
                self.dec.check(job.ids, job.max_tokens)
            except ValueError as err:
                settle(job.future, exc=err)
                continue
            jobs.append(job)
        if not jobs:
            return
        slots = self.dec.reserve(len(jobs))
        try:
            self.dec.admit_many([(s, j.ids, j.max_tokens, j.temperature, j.top_p, j.seed)
                                 for s, j in zip(slots, jobs, strict=True)])
        except Exception as err:  # noqa: BLE001 - cannot happen after check(); never stop the worker
            for s, j in zip(slots, jobs, strict=True):
                self.dec.release(s)
                settle(j.future, exc=err)
            return
        for s, j in zip(slots, jobs, strict=True):
            self.rows[s] = (j, RowText(self.engine.tok, j.stops, self.engine.eos))
        self.engine.rows_running = len(self.rows)

    def _segment(self) -> None:
        """Drop rows nobody waits for, run one segment, hand out text, end finished rows."""
        import time

        from train.inference.jobs import Completion, settle

        live = len(self.rows)
        for slot, (job, row) in list(self.rows.items()):
            if job.future.cancelled():  # client gone, timed out: no more steps
                row.result = Completion(row.sent, "cancelled", len(row.ids))
                self._end(slot)
        if not self.rows:
            self._compact()
            return
        gained = self.dec.step()
        self.engine.segments += 1
        now = time.perf_counter()
        for slot, (job, row) in list(self.rows.items()):
            if job.first_token_at is None and gained[slot]:
                job.first_token_at = now
            delta = row.feed(gained[slot], self.dec.done[slot])
            if delta and job.on_text is not None:
                job.streamed = True
                job.on_text(delta)
            if row.result is not None:
                settle(job.future, row.result)
                self._end(slot)
        if len(self.rows) < live:
            self._compact()

    def _end(self, slot: int) -> None:
        self.dec.release(slot)
        del self.rows[slot]
        self.engine.rows_running = len(self.rows)
        if not self.rows:
            self.engine.batches += 1  # a stretch of decoding that ran until no row was left

    def _compact(self) -> None:
        """A shorter ring once the rows that needed it ended; fewer slots once the batch is
        empty, or has at most 1/8 of its slots in use: a lone request decodes alone, and a load
        that keeps a few rows busy does not make the cache shrink and grow again at every
        boundary."""
        moved = self.dec.shrink(slots=not self.rows or len(self.rows) <= self.dec.slots // 8)
        if moved != list(range(len(moved))):
            self.rows = {moved[s]: r for s, r in self.rows.items()}

    def _fail_all(self, err: Exception) -> None:
        from train.inference.jobs import settle

        for job, _ in self.rows.values():
            settle(job.future, exc=err)
        self.rows = {}
        self.engine.rows_running = 0
        self.dec = SlotDecoder(self.engine.cfg, self.engine.params, max_slots=self.engine.max_batch,
                               eos_id=self.engine.eos)
