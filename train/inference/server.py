"""OpenAI-compatible completion server: ``python -m train.serve --run RUN_DIR | --hf HF_DIR``.

FastAPI + uvicorn. One background worker thread owns the model and drains a bounded queue:
requests that arrive while a batch runs join the next one. Requests with the same sampling
settings (temperature, top_p, max_tokens bucket; and seed when sampling) share a batch, padded
to a batch size in ``BATCH_BUCKETS`` with dummy rows; the KV cache has room for the
``max_tokens`` bucket (``TOKEN_BUCKETS``) and each row stops at its own ``max_tokens``; prompts
are padded to 32-token buckets: the set of compiled shapes stays small. Greedy results equal
``python -m train.generate --temperature 0``.

A batch decodes in compiled segments of ``SEGMENT_TOKENS`` tokens (``train.generate.
SegmentDecoder``). After each segment the worker detokenizes every row, checks its stop strings,
hands new text to streaming requests (``stream: true``: one server-sent event per segment and
choice) and ends rows that are done; the batch stops when every row has hit EOS, a stop string
or its ``max_tokens``. Text is only sent once it can no longer change (``RowText``): an
incomplete UTF-8 character or a possible start of a stop string is held back, so the streamed
chunks add up to exactly the non-streamed text.

``suffix`` (fill-in-the-middle) is answered when the tokenizer has the FIM sentinels of
``data_processing/fim.py`` (``<|fim_prefix|>prompt<|fim_suffix|>suffix<|fim_middle|>``, the
completion is the middle); other models answer 400 naming ``suffix``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from data_processing.tokens import EOS_TOKEN

BATCH_BUCKETS = (1, 4, 16)
TOKEN_BUCKETS = (16, 64, 256)


def bucket(n: int, buckets) -> int:
    """The smallest bucket that holds ``n`` (``n`` itself beyond the largest)."""
    for b in buckets:
        if n <= b:
            return b
    return n


@dataclass
class Job:
    """One completion (one prompt, one of its ``n`` choices) waiting for the worker. ``future``
    resolves to a ``Completion``; ``on_text``, when set, is called from the worker thread with
    each new piece of text as soon as it is final (streaming)."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stops: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def key(self):
        bucket_n = bucket(self.max_tokens, TOKEN_BUCKETS)
        return (self.temperature, self.top_p, bucket_n, self.seed if self.temperature > 0 else None)


@dataclass
class Completion:
    """A finished choice: its text (cut before a stop string, EOS dropped), why it ended
    (``stop``: EOS or a stop string; ``length``: ``max_tokens``) and how many tokens it used."""

    text: str
    finish_reason: str
    tokens: int


class RowText:
    """The text of one generated row as its tokens arrive, and how much of it is final.

    ``feed`` returns the text that became final since the previous call. Until the row ends, it
    holds back replacement characters at the end (an incomplete UTF-8 character of byte-level
    BPE, completed by the next token) and any tail that could be the start of a stop string; so
    everything handed out is a prefix of the final text. A stop string ends the row as soon as
    no earlier-starting stop string could still complete: the same cut as generating to
    ``max_tokens`` and cutting the text before the first stop string.
    """

    def __init__(self, tok, stops: list[str], eos: int | None):
        self.tok, self.stops, self.eos = tok, [s for s in stops if s], eos
        self.ids: list[int] = []
        self.sent = ""
        self.result: Completion | None = None  # set once the row has ended

    def _text(self, ids: list[int], final: bool) -> str:
        from train.inference.decoding import decode_text

        text = decode_text(self.tok, ids, self.eos)
        return text if final else text.rstrip("\ufffd")

    def _first_stop(self, text: str) -> tuple[int, int] | None:
        """(start, end) of the earliest stop string in ``text``, or None."""
        hits = [(i, i + len(s)) for s in self.stops if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def _open_start(self, text: str) -> int:
        """Where the earliest tail of ``text`` that a stop string could still complete begins
        (``len(text)`` when there is none)."""
        for i in range(max(0, len(text) - max((len(s) for s in self.stops), default=0)), len(text)):
            if any(s.startswith(text[i:]) for s in self.stops):
                return i
        return len(text)

    def feed(self, new_ids: list[int], ended: bool) -> str:
        """Add the row's new ids (``ended``: the decoder finished the row: EOS or ``max_tokens``);
        the newly final text. When the row ends (here or at a stop string) ``result`` is set."""
        if self.result is not None:
            return ""
        self.ids.extend(new_ids)
        text = self._text(self.ids, ended)
        stop = self._first_stop(text)
        if stop is not None and (ended or self._open_start(text) >= stop[0]):
            final = text[: stop[0]]
            # The fewest tokens whose text already holds the stop string: what the row used.
            lo, hi = 1, len(self.ids)
            while lo < hi:
                mid = (lo + hi) // 2
                if len(self._text(self.ids[:mid], False)) >= stop[1]:
                    hi = mid
                else:
                    lo = mid + 1
            self.result = Completion(final, "stop", lo)
        elif ended:
            final = text
            hit_eos = self.eos is not None and self.eos in self.ids
            self.result = Completion(final, "stop" if hit_eos else "length", len(self.ids))
        else:
            final = text[: min(self._open_start(text), stop[0] if stop else len(text))]
        if not final.startswith(self.sent):  # cannot happen: byte-level BPE decodes prefix-consistently
            raise RuntimeError(f"streamed text {self.sent!r} is not a prefix of {final!r}")
        delta, self.sent = final[len(self.sent):], final
        return delta


def _settle(future: concurrent.futures.Future, result=None, exc: BaseException | None = None) -> None:
    """Resolve a job's future unless its request already gave up on it (timeout, 429)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class Engine:
    """The model, a bounded queue and the worker thread that batches queued jobs."""

    def __init__(self, cfg, params, tokenizer, *, queue_size: int = 64, max_batch: int = 16):
        from train.inference.decoding import fim_sentinels

        self.cfg, self.params, self.tok = cfg, params, tokenizer
        self.eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        if not isinstance(self.eos, int) or self.eos < 0 or self.eos >= cfg.vocab_size:
            self.eos = None
        self.fim = fim_sentinels(tokenizer, cfg) is not None  # trained with fill-in-the-middle
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.max_batch = max_batch
        self.batches = 0
        self.segments = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="codeneo-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job (raises ``queue.Full``); its future resolves to a ``Completion``."""
        self.queue.put_nowait(job)
        return job.future

    def close(self):
        """Stop the worker after the batch it is running."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self):
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [first]
            while len(jobs) < 4 * self.max_batch:
                try:
                    jobs.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict = {}
            for j in jobs:
                groups.setdefault(j.key(), []).append(j)
            for key, group in groups.items():
                group = [j for j in group if not j.future.cancelled()]  # timed out or refused while queued
                for start in range(0, len(group), self.max_batch):
                    try:
                        self._run_batch(key, group[start:start + self.max_batch])
                    except Exception:  # noqa: BLE001 - never let one batch stop the worker
                        traceback.print_exc()

    def _run_batch(self, key, jobs: list[Job]):
        from train.inference import decoding as generate

        temperature, top_p, n_tokens, _ = key
        size = bucket(len(jobs), [b for b in BATCH_BUCKETS if b <= self.max_batch] + [self.max_batch])
        pad = size - len(jobs)
        rows = [RowText(self.tok, j.stops, self.eos) for j in jobs]
        try:
            # Dummy rows (limit 0) only fill the batch to its bucket; each real row stops at its own
            # max_tokens, the cache has room for the bucket's.
            dec = generate.SegmentDecoder(self.cfg, self.params, [j.ids for j in jobs] + [jobs[0].ids] * pad,
                                          max_new_tokens=n_tokens, temperature=temperature, top_p=top_p,
                                          seed=jobs[0].seed, eos_id=self.eos,
                                          row_limits=[j.max_tokens for j in jobs] + [0] * pad)
            while True:
                for b, (job, row) in enumerate(zip(jobs, rows, strict=True)):
                    if row.result is None and job.future.cancelled():  # client gone, timed out: no more steps
                        dec.finish(b)
                        row.result = Completion(row.sent, "cancelled", len(row.ids))
                if dec.finished:
                    break
                gained = dec.step()
                self.segments += 1
                for b, (job, row) in enumerate(zip(jobs, rows, strict=True)):
                    if row.result is not None:
                        continue
                    delta = row.feed(gained[b], dec.done[b])
                    if delta and job.on_text is not None:
                        job.on_text(delta)
                    if row.result is not None:
                        dec.finish(b, keep=row.result.tokens)
                        _settle(job.future, row.result)
        except Exception as err:  # noqa: BLE001 - the error goes to the waiting requests
            for j in jobs:
                _settle(j.future, exc=err)
            return
        self.batches += 1


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | list[str] = ""
    suffix: str | None = None
    max_tokens: int = Field(default=16)
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    seed: int | None = None
    language: str | None = None  # not OpenAI's: the control code to prepend (data.control_codes models)


def create_app(engine: Engine, *, model_name: str = "codeneo", api_key: str | None = None,
               max_prompt_tokens: int | None = None, max_tokens_limit: int = 256, max_n: int = 16,
               request_timeout: float = 60.0):
    """The FastAPI app over ``engine``: ``/health``, ``/v1/models``, ``/v1/completions``. Bad
    requests get 400/422 naming the field, a full queue 429, a request not answered within
    ``request_timeout`` s 504 (a stream that makes no progress for that long ends with an
    error event)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    positions = engine.cfg.max_position_embeddings
    max_prompt_tokens = max_prompt_tokens or max(1, positions - 16)

    app = FastAPI(title="codeneo completions")

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        return JSONResponse(status_code=status,
                            content={"error": {"message": message, "type": kind, "param": param, "code": None}})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # noqa: ARG001
        errs = exc.errors()
        loc = ".".join(str(x) for x in errs[0]["loc"][1:]) if errs else None
        return error(422 if errs and errs[0].get("type") != "json_invalid" else 400,
                     f"invalid request: {loc}: {errs[0]['msg'] if errs else ''}", loc)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        auth = request.headers.get("authorization", "")
        if api_key and request.url.path.startswith("/v1/") and auth != f"Bearer {api_key}":
            return error(401, "invalid API key", None, "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.queue.qsize(), "batches": engine.batches,
                "segments": engine.segments, "fill_in_the_middle": engine.fim}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "codeneo"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        from train.inference.decoding import NOT_FIM, encode_prompt

        # An empty suffix asks nothing of a model without FIM; a FIM model infills before it.
        suffix = req.suffix if req.suffix or (engine.fim and req.suffix is not None) else None
        if suffix is not None and not engine.fim:
            return error(400, f"suffix: {NOT_FIM}", "suffix")
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            return error(400, "prompt: empty list", "prompt")
        if not 1 <= req.max_tokens <= max_tokens_limit:
            return error(400, f"max_tokens: must be between 1 and {max_tokens_limit}", "max_tokens")
        if not 1 <= req.n <= max_n or req.n * len(prompts) > max_n:
            return error(400, f"n: must be between 1 and {max_n} (times the number of prompts)", "n")
        if not 0.0 <= req.temperature <= 2.0:
            return error(400, "temperature: must be between 0 and 2", "temperature")
        if not 0.0 < req.top_p <= 1.0:
            return error(400, "top_p: must be in (0, 1]", "top_p")
        stops = [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if len(stops) > 4:
            return error(400, "stop: at most 4 stop strings", "stop")
        encoded = []
        for p in prompts:
            try:
                ids = encode_prompt(engine.tok, p, suffix, engine.cfg, language=req.language) \
                    if p or suffix is not None else []
            except ValueError as err:
                return error(400, str(err), "language")
            if not ids:
                ids = [engine.eos] if engine.eos is not None else []
            if not ids:
                return error(400, "prompt: empty", "prompt")
            if len(ids) > max_prompt_tokens or len(ids) + req.max_tokens > positions:
                what = "prompt and suffix" if suffix is not None else "prompt"
                return error(400, f"prompt: {what}: {len(ids)} tokens + max_tokens {req.max_tokens} exceed the "
                                  f"limit ({max_prompt_tokens} prompt tokens, {positions} positions)", "prompt")
            encoded.append(ids)
        seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()  # (choice index, new text | finished future), streaming only

        def emitter(index: int):
            # Called on the worker thread: hand the text to the event loop that serves the stream.
            return lambda text: loop.call_soon_threadsafe(events.put_nowait, (index, text))

        jobs = [Job(ids, req.max_tokens, req.temperature, req.top_p, seed + k, stops)
                for ids in encoded for k in range(req.n)]
        if req.stream:
            for i, j in enumerate(jobs):
                j.on_text = emitter(i)
        futures = []
        try:
            for j in jobs:
                futures.append(engine.submit(j))
        except queue.Full:
            for f in futures:
                f.cancel()
            return error(429, "server busy: request queue is full, retry later", None, "rate_limit_error")
        rid = f"cmpl-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": req.model or model_name}
        prompt_tokens = sum(len(e) for e in encoded) * req.n
        if not req.stream:
            try:
                done = await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)),
                                              timeout=request_timeout)
            except TimeoutError:
                for f in futures:  # the worker drops rows nobody waits for
                    f.cancel()
                return error(504, f"request timed out after {request_timeout} s", None, "timeout")
            except ValueError as err:
                return error(400, str(err), None)
            choices = [{"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                       for i, c in enumerate(done)]
            completion_tokens = sum(c.tokens for c in done)
            return {**base, "choices": choices,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}}

        for i, f in enumerate(futures):
            f.add_done_callback(lambda f, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, f)))

        def chunk(index: int, text: str, finish_reason: str | None) -> str:
            body = {**base, "choices": [{"text": text, "index": index, "logprobs": None,
                                         "finish_reason": finish_reason}]}
            return f"data: {json.dumps(body)}\n\n"

        async def sse():
            open_choices = len(futures)
            try:
                while open_choices:
                    try:
                        index, item = await asyncio.wait_for(events.get(), timeout=request_timeout)
                    except TimeoutError:
                        # Headers are sent: the error can only travel as an event.
                        err = {"message": f"no progress for {request_timeout} s", "type": "timeout",
                               "param": None, "code": None}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        return
                    if isinstance(item, str):
                        yield chunk(index, item, None)
                        continue
                    open_choices -= 1
                    if item.cancelled():
                        return
                    if item.exception() is not None:
                        err = {"message": str(item.exception()), "type": "server_error", "param": None,
                               "code": None}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        return
                    yield chunk(index, "", item.result().finish_reason)
                yield "data: [DONE]\n\n"
            finally:
                for f in futures:  # client gone or stream over: nothing left for the worker to do
                    f.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.serve", description=__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (latest checkpoint)")
    src.add_argument("--hf", help="Hugging Face GPT-Neo / GPT-2 folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default="codeneo")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens accepted")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    args = parser.parse_args(argv)
    import uvicorn

    from train.inference.decoding import load_model

    cfg, params, tok = load_model(args.run, args.hf)
    engine = Engine(cfg, params, tok, queue_size=args.queue_size)
    app = create_app(engine, model_name=args.model_name, api_key=args.api_key, max_tokens_limit=args.max_tokens,
                     request_timeout=args.timeout)
    # uvicorn handles SIGTERM: stops accepting, finishes in-flight requests, then exits
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=60)
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
