"""``TokenLoader``: the streaming, packing, host-split, exactly resumable training loader.

Pipeline (one background thread in the host process, plus tokenizer worker processes)::

    DocStream (seeded order, host split, K shards interleaved, shuffle buffer)   main process, one thread
      -> chunks of ``tokenize_batch`` documents, each tagged with the stream state before it
      -> tokenized in worker processes, results taken back in submission order (with a token
         cache: token arrays read by position, joined in the loader thread; see token_cache.py)
      -> Packer: EOS-joined token stream cut into [batch, block_size + 1] windows
      -> bounded prefetch queue -> ``next(loader)``

Because the order of documents is decided in one thread and workers only turn a chunk into
tokens, the batches are a pure function of ``(source, tokenizer, seed, host split, block and
batch size)``, whatever the worker timing. ``state()`` is the resume point of the last batch
handed out: the stream state at the start of the chunk holding the next unused token plus how
many of its tokens were already used; restoring re-tokenizes that one chunk.

No JAX here: the host split arrives as ``process_index`` / ``process_count`` and each host gets
numpy arrays; ``train/sharding.py`` assembles the global ``jax.Array``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_processing.docstream import EPOCH_END, HOST_SPLITS, DocStream, at_epoch_start, epoch_start
from data_processing.packing import DocumentEncoder, EncodeOptions, Packer, init_worker, worker_encode
from data_processing.shards import MAX_RECORD_BYTES, BadRecordCounter
from data_processing.sources import HFDatasetSource, ShardSource, make_source
from data_processing.token_cache import CachedShardSource, TokenCache
from data_processing.tokens import tokenizer_file
from data_processing.workers import WorkerDiedError, WorkerProcesses

__all__ = ["EncodeOptions", "HFDatasetSource", "LoaderState", "ShardSource", "TokenLoader", "validation_batches"]

logger = logging.getLogger(__name__)

LoaderState = dict[str, Any]  # JSON-serialisable; see ``TokenLoader.state``
STATE_VERSION = 1
_POLL_S = 0.1  # how often blocked pipeline steps check for close()


class _ClosedError(Exception):
    """Raised inside the producer thread when the loader is closed or restored."""


def _chunks(docs: DocStream, tokenize_batch: int, stop: threading.Event):
    """``(start_state, end_state, documents, epoch_end)`` groups of documents; a chunk never
    spans an epoch boundary so that each epoch's size can be checked."""
    while not docs.finished:
        if stop.is_set():
            raise _ClosedError
        start = docs.snapshot()
        chunk: list = []
        epoch_end = False
        while len(chunk) < tokenize_batch:
            try:
                doc = docs.next_doc()
            except StopIteration:
                break
            if doc is EPOCH_END:
                epoch_end = True
                break
            chunk.append(doc)
        yield start, docs.snapshot(), chunk, epoch_end


def _check_epoch_sizes(chunks, *, window: int, process_index: int, process_count: int, from_start: bool):
    """Pass tokenized chunks through, raising if a whole epoch is shorter than one window:
    such a corpus cannot fill a block, and training on it would be a mistake."""
    tokens = 0
    for start, end, ids, epoch_end in chunks:
        tokens += len(ids)
        if epoch_end:
            if from_start and tokens < window:
                raise ValueError(
                    f"corpus too small: one epoch gives host {process_index} of {process_count} only "
                    f"{tokens} tokens, fewer than one block of block_size + 1 = {window}"
                )
            tokens, from_start = 0, True
        yield start, end, ids


class TokenLoader:
    """Infinite iterator of host-local int32 batches ``[batch_size_per_host, block_size + 1]``.

    ``source``: a shard directory / glob / fsspec URL / list, or an ``HFDatasetSource``.
    ``tokenizer_path``: a folder holding ``tokenizer.json`` (or the file) with ``<|endoftext|>``.
    Host ``process_index`` of ``process_count`` reads only its own documents: ``host_split``
    ``"shards"`` gives it whole shards of each epoch (``order[(i + epoch) % P :: P]``),
    ``"lines"`` every ``process_count``-th line of the epoch's stream, ``"auto"`` shards when
    there are at least as many shards as hosts (see ``docstream``). ``interleave``: how many of the
    host's shards (units) are read at once, line by line in a seeded mix, before the
    ``shuffle_buffer`` (1: one shard after another). ``num_workers`` tokenizer processes
    (0: tokenize in the loader thread). ``skip_bad`` counts, logs and skips bad records instead
    of raising ``ShardError``; ``bad_records`` holds the counts. Epochs repeat forever, each with
    a new seeded shard order and shuffle.

    ``token_cache``: a folder built by ``python -m data_processing.token_cache`` for these
    shards and this tokenizer. Documents then come as cached token arrays (same order, state
    and batches as without it); only fill-in-the-middle documents are tokenized, in the
    workers, and without FIM no worker process is started at all.

    ``max_record_bytes``: a shard line longer than this is a bad record (refused, or counted and
    skipped with ``skip_bad``) and is never read into memory whole. A corrupt, truncated or empty
    (0-byte) shard raises ``ShardError`` naming it from ``next()``, or is counted and skipped.
    """

    def __init__(
        self,
        source,
        tokenizer_path,
        *,
        block_size: int,
        batch_size_per_host: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        num_workers: int = 1,
        process_index: int = 0,
        process_count: int = 1,
        skip_bad: bool = False,
        prefetch: int = 2,
        tokenize_batch: int = 256,
        encode: EncodeOptions | None = None,
        host_split: str = "auto",
        token_cache: str | None = None,
        max_record_bytes: int | None = MAX_RECORD_BYTES,
        interleave: int = 16,
    ):
        if block_size < 1 or batch_size_per_host < 1 or tokenize_batch < 1 or interleave < 1:
            raise ValueError("block_size, batch_size_per_host, tokenize_batch and interleave must be positive")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.source = make_source(source, max_record_bytes=max_record_bytes)
        self.host_split = _resolve_host_split(host_split, len(self.source), process_count)
        self.tokenizer_path = tokenizer_file(tokenizer_path)
        self.encode_options = encode or EncodeOptions()
        if self.encode_options.window not in (0, block_size + 1):
            raise ValueError(f"sliding windows must be block_size + 1 = {block_size + 1} tokens long")
        self._encoder = DocumentEncoder(self.tokenizer_path, self.encode_options)  # checks tokens early
        self.eos_id = self._encoder.eos_id
        self.block_size = block_size
        self.batch_size_per_host = batch_size_per_host
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.interleave = int(interleave)
        self.num_workers = num_workers
        self.process_index = process_index
        self.process_count = process_count
        self.skip_bad = skip_bad
        self.prefetch = max(1, prefetch)
        self.tokenize_batch = tokenize_batch
        self.bad_records = BadRecordCounter()
        self._docs_source = self.source
        self.token_cache = token_cache or None
        if self.token_cache:
            if not isinstance(self.source, ShardSource):
                raise ValueError("data.token_cache: only shard files can be cached, not a datasets stream")
            cache = TokenCache(self.token_cache, self.tokenizer_path, self.source.paths)
            # FIM documents are cut from their text, so the shards are read beside the cache then.
            self._docs_source = CachedShardSource(self.source, cache, with_text=self.encode_options.fim_rate > 0)
        self._pool = None
        # Cached tokens without FIM leave nothing to tokenize: packing them is cheaper than
        # sending them to a worker and back.
        needs_tokenizer = not self.token_cache or self.encode_options.fim_rate > 0
        if num_workers > 0 and needs_tokenizer:
            # spawn, not fork: the host process usually runs JAX threads, which fork would break.
            self._pool = WorkerProcesses(num_workers, init_worker, (self.tokenizer_path, self.encode_options),
                                         context="spawn")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._state = self._make_state(None, 0)
        self._start(None, 0)

    # -- public API ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        """The next batch, int32 ``[batch_size_per_host, block_size + 1]``."""
        if self._thread is None:
            raise RuntimeError("TokenLoader is closed")
        while True:
            try:
                kind, value, state = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("loader thread died without reporting an error") from None
        if kind == "error":
            raise value
        self._state = state
        return value

    def state(self) -> LoaderState:
        """Small JSON-serialisable state (KBs: positions, not text) of the last batch returned.

        Save it with every checkpoint (per host); ``restore`` makes the following batches
        identical to those of an uninterrupted run.
        """
        return self._state

    def restore(self, state: LoaderState) -> None:
        """Continue exactly after the batch at which ``state`` was taken."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self._make_state(None, 0)
        for key in ("seed", "process_index", "process_count", "num_units", "encode"):
            if state.get(key, mine[key]) != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {mine[key]!r}")
        # States saved before the shard-level split existed split by lines. With one host both
        # splits give the same stream, so only a multi-host state must match.
        saved_split = state.get("host_split", "lines")
        if self.process_count > 1 and saved_split != self.host_split:
            raise ValueError(
                f"loader state has host_split={saved_split!r} but this loader has {self.host_split!r}: "
                f"the hosts' documents differ; set data.host_split={saved_split} to resume it"
            )
        # States saved before interleaving read one shard at a time.
        saved_interleave = state.get("interleave", 1)
        if saved_interleave != self.interleave:
            raise ValueError(
                f"loader state has interleave={saved_interleave!r} but this loader has {self.interleave!r}: "
                f"the document order differs; set data.stream_interleave={saved_interleave} to resume it exactly"
            )
        self._shutdown_thread()
        self._state = state
        self._start(state["docs"], int(state["skip"]))

    def restart_at_epoch(self, epoch: int) -> None:
        """Restart the stream at the first document of ``epoch`` (its seeded shard order and
        shuffle), dropping anything not yet delivered. For a resume whose saved positions cannot
        be used, e.g. with a different number of hosts; ``state()`` is resumable afterwards."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.restore(self._make_state(epoch_start(epoch), 0))

    def close(self) -> None:
        """Stop the background thread and the worker processes."""
        self._shutdown_thread()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def __enter__(self) -> TokenLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    # -- pipeline -------------------------------------------------------------------------------

    def _make_state(self, doc_state: dict[str, Any] | None, skip: int) -> LoaderState:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "num_units": len(self.source),
            "host_split": self.host_split,
            "interleave": self.interleave,
            "encode": dataclasses.asdict(self.encode_options),
            "docs": doc_state,
            "skip": skip,
        }

    def _start(self, doc_state: dict[str, Any] | None, skip: int) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(
            target=self._run, args=(doc_state, skip, self._stop, self._queue), name="TokenLoader", daemon=True
        )
        self._thread.start()

    def _shutdown_thread(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def _tokenized(self, chunks, stop: threading.Event):
        """Tokenize chunks, in order, with up to two chunks per worker in flight."""
        if self._pool is None:
            for start, end, docs, epoch_end in chunks:
                yield start, end, self._encoder.encode(docs), epoch_end
            return
        self._pool.discard_pending()  # results of a stopped stream (restore) are not ours
        pending: deque = deque()
        inflight = 2 * self.num_workers
        for start, end, docs, epoch_end in chunks:
            if docs:
                self._pool.submit(worker_encode, docs)
            pending.append((start, end, bool(docs), epoch_end))
            if len(pending) >= inflight:
                yield self._collect(pending.popleft(), stop)
        while pending:
            yield self._collect(pending.popleft(), stop)

    def _collect(self, item, stop: threading.Event):
        start, end, submitted, epoch_end = item
        if not submitted:
            return start, end, np.zeros(0, dtype=np.int32), epoch_end
        while True:
            try:
                return start, end, self._pool.result(timeout=_POLL_S), epoch_end
            except TimeoutError:
                if stop.is_set():
                    raise _ClosedError from None
            except WorkerDiedError as e:
                raise RuntimeError(f"a tokenizer worker process died (killed for memory?); "
                                   f"its chunk is lost: {e}") from None

    def _run(self, doc_state, skip: int, stop: threading.Event, out: queue.Queue) -> None:
        def put(item) -> None:
            while True:
                try:
                    out.put(item, timeout=_POLL_S)
                    return
                except queue.Full:
                    if stop.is_set():
                        raise _ClosedError from None

        try:
            docs = DocStream(
                self._docs_source,
                seed=self.seed,
                shuffle_buffer=self.shuffle_buffer,
                process_index=self.process_index,
                process_count=self.process_count,
                skip_bad=self.skip_bad,
                bad=self.bad_records,
                state=doc_state,
                host_split=self.host_split,
                interleave=self.interleave,
            )
            window = self.block_size + 1
            chunks = _check_epoch_sizes(
                self._tokenized(_chunks(docs, self.tokenize_batch, stop), stop),
                window=window,
                process_index=self.process_index,
                process_count=self.process_count,
                from_start=at_epoch_start(doc_state) and skip == 0,
            )
            packer = Packer(
                chunks, block_size=self.block_size, batch_size=self.batch_size_per_host, skip=skip
            )
            for batch in packer:
                if stop.is_set():
                    return
                start, used = packer.resume_point()
                put(("batch", batch, self._make_state(start, used)))
        except _ClosedError:
            return
        except BaseException as err:  # hand every failure to the consumer instead of hanging it
            try:
                put(("error", err, None))
            except _ClosedError:
                return


def _resolve_host_split(host_split: str, num_units: int, process_count: int) -> str:
    """``"auto"``: whole shards per host when every host can get one, else lines; one host reads
    everything either way and is recorded as ``"lines"``."""
    if host_split == "auto":
        return "shards" if process_count > 1 and num_units >= process_count else "lines"
    if host_split not in HOST_SPLITS:
        raise ValueError(f"host_split: expected auto, {', '.join(HOST_SPLITS)}; got {host_split!r}")
    if host_split == "shards" and num_units < process_count:
        raise ValueError(
            f"host_split='shards' needs at least as many shards as hosts: {num_units} shard(s) for "
            f"{process_count} hosts (use 'auto' or 'lines')"
        )
    return host_split


def validation_batches(
    source,
    tokenizer_path,
    *,
    block_size: int,
    batch_size_per_host: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    skip_bad: bool = False,
    encode: EncodeOptions | None = None,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
) -> list[np.ndarray]:
    """The first ``num_batches`` batches of one unshuffled pass (sorted shards, file order),
    packed (and encoded, per ``encode``) like training batches; identical on every call.
    Raises ``ValueError`` if one pass does not hold ``num_batches`` batches for this host."""
    src = make_source(source, max_record_bytes=max_record_bytes)
    encoder = DocumentEncoder(tokenizer_path, encode)
    docs = DocStream(
        src,
        shuffle_buffer=1,
        shuffle_units=False,
        process_index=process_index,
        process_count=process_count,
        skip_bad=skip_bad,
        max_epochs=1,
    )
    never = threading.Event()
    chunks = ((s, e, encoder.encode(d)) for s, e, d, _ in _chunks(docs, 256, never))
    packer = Packer(chunks, block_size=block_size, batch_size=batch_size_per_host)
    batches = []
    for batch in packer:
        batches.append(batch)
        if len(batches) == num_batches:
            return batches
    raise ValueError(
        f"validation data too small: one pass gives host {process_index} of {process_count} only "
        f"{len(batches)} batches of {batch_size_per_host} x {block_size + 1} tokens, {num_batches} requested"
    )
