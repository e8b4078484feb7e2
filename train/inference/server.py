"""OpenAI-compatible completion server: ``python -m train.serve --run RUN_DIR | --hf HF_DIR``.

FastAPI + uvicorn. One background worker thread owns the model and drains a bounded queue with
continuous batching (``train/inference/batching.py``): rows live in the slots of a KV cache and
decode together in compiled segments of ``SEGMENT_TOKENS`` tokens; between two segments finished
rows leave and queued requests take their slots, each with its own temperature, top-p and seed
(so ``n`` sampled choices are rows of one batch). Greedy results equal ``python -m
train.generate --temperature 0``; a seed gives the same sample whoever shares the batch.
``Engine(continuous=False)`` keeps the earlier scheme: requests with the same sampling settings
(temperature, top_p, max_tokens bucket; and seed when sampling) share a whole batch, padded to a
size in ``BATCH_BUCKETS``, that runs until its last row is done.

After each segment the worker detokenizes every row, checks its stop strings, hands new text to
streaming requests (``stream: true``: one server-sent event per segment and choice) and ends rows
that are done (EOS, a stop string or ``max_tokens``). Text is only sent once it can no longer
change (``RowText``): an incomplete UTF-8 character or a possible start of a stop string is held
back, so the streamed chunks add up to exactly the non-streamed text.

``logprobs`` / ``echo`` are scored by a separate thread in one teacher-forced pass over prompt +
completion (``train/inference/logprobs.py``). Requests are checked before anything reaches the
model (``train/inference/requests.py``: every bad input is a 4xx naming the field); the API key
and the body limit sit in front of the app (``train/inference/http.py``); ``/metrics`` is
Prometheus' (``train/inference/metrics.py``).

``suffix`` (fill-in-the-middle) is answered when the tokenizer has the FIM sentinels of
``data_processing/fim.py`` (``<|fim_prefix|>prompt<|fim_suffix|>suffix<|fim_middle|>``, the
completion is the middle); other models answer 400 naming ``suffix``. The sentinels written in a
prompt are the special tokens too (client-side FIM templates).
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

from data_processing.tokens import EOS_TOKEN
from train.inference.http import Guard, error_body, resolve_api_key
from train.inference.jobs import BATCH_BUCKETS, Completion, Job, RowText, bucket, settle
from train.inference.metrics import ServerMetrics
from train.inference.requests import (
    SEED_LIMIT,
    CompletionRequest,
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    check_sampling,
    prompt_list,
    refuse_unknown,
    stop_list,
)


class Engine:
    """The model, a bounded queue and the worker thread that batches queued jobs; a scoring
    thread (log probabilities) and a small pool that tokenizes prompts off the event loop."""

    def __init__(self, cfg, params, tokenizer, *, queue_size: int = 64, max_batch: int = 16,
                 continuous: bool = True, warmup: bool = False):
        from train.inference.decoding import fim_sentinels

        self.cfg, self.params, self.tok = cfg, params, tokenizer
        self.eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        if not isinstance(self.eos, int) or self.eos < 0 or self.eos >= cfg.vocab_size:
            self.eos = None
        self.fim = fim_sentinels(tokenizer, cfg) is not None  # trained with fill-in-the-middle
        # The longest token's text: a prompt of C characters has at least C / this many tokens, so
        # longer prompts are refused before tokenizing them.
        self.max_token_chars = max(1, max(len(t) for t in tokenizer.get_vocab()))
        self.vocab_size = min(cfg.vocab_size, len(tokenizer))
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.submitting = threading.Lock()  # held while a request's jobs are queued (submit_all)
        self.max_batch = max_batch
        self.batches = 0
        self.segments = 0
        self.rows_running = 0
        self.tokenizer_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="codeneo-tokenize")
        self._scorer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="codeneo-score")
        self._stop = threading.Event()
        self.continuous = continuous  # slot KV cache (train/inference/batching.py), else whole batches
        self.warmup = warmup  # continuous: compile the decoder's shapes before serving (SlotDecoder.warm)
        # Set once the engine serves: /health answers 503 until then, so a load balancer (and a
        # test's "wait until healthy") sends nothing to a server still compiling its warm-up.
        self.ready = threading.Event()
        if not (continuous and warmup):
            self.ready.set()
        self._thread = threading.Thread(target=self._run_continuous if continuous else self._run,
                                        name="codeneo-engine", daemon=True)
        self._thread.start()

    def score(self, rows: list[list[int]], top_n: int) -> concurrent.futures.Future:
        """Log probabilities of each row's tokens (``train.inference.logprobs.score_rows``)."""
        from train.inference.logprobs import score_rows

        return self._scorer.submit(score_rows, self.cfg, self.params, rows, top_n)

    def submit(self, job: Job) -> concurrent.futures.Future:
        """Queue a job (raises ``queue.Full``); its future resolves to a ``Completion``."""
        return self.submit_all([job])[0]

    def submit_all(self, jobs: list[Job]) -> list[concurrent.futures.Future]:
        """Queue a request's jobs together (raises ``queue.Full``, with the jobs queued so far
        cancelled): a worker that has taken the first waits for the rest (``whole_requests``),
        so ``n`` choices start in one batch."""
        with self.submitting:
            queued = []
            try:
                for j in jobs:
                    self.queue.put_nowait(j)
                    queued.append(j)
            except queue.Full:
                for j in queued:
                    j.future.cancel()
                raise
        return [j.future for j in jobs]

    def whole_requests(self) -> None:
        """Wait until no request is half-queued (call after taking a first job, before draining)."""
        with self.submitting:
            pass

    def close(self):
        """Stop the worker after the batch it is running."""
        self._stop.set()
        self._thread.join(timeout=30)
        self._scorer.shutdown(wait=False, cancel_futures=True)
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    def _run_continuous(self):
        from train.inference.batching import ContinuousWorker

        ContinuousWorker(self).run(self._stop)

    def _run(self):
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [first]
            self.whole_requests()
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
                        self._run_isolated(key, group[start:start + self.max_batch])
                    except Exception:  # noqa: BLE001 - never let one batch stop the worker
                        traceback.print_exc()

    def _run_isolated(self, key, jobs: list[Job]):
        """Run a batch; if it fails, rerun its unfinished jobs one by one, so that only the job
        that caused the error gets it, never the others batched with it."""
        err = self._run_batch(key, jobs, settle_errors=len(jobs) == 1)
        for j in jobs if err is not None else []:
            if j.future.done():
                continue
            if j.streamed:
                settle(j.future, exc=err)
            else:
                self._run_batch(key, [j], settle_errors=True)

    def _run_batch(self, key, jobs: list[Job], settle_errors: bool = True) -> Exception | None:
        from train.inference import decoding as generate

        temperature, top_p, n_tokens, _ = key
        size = bucket(len(jobs), [b for b in BATCH_BUCKETS if b <= self.max_batch] + [self.max_batch])
        pad = size - len(jobs)
        rows = [RowText(self.tok, j.stops, self.eos) for j in jobs]
        self.rows_running += len(jobs)
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
                now = time.perf_counter()
                for b, (job, row) in enumerate(zip(jobs, rows, strict=True)):
                    if row.result is not None:
                        continue
                    if job.first_token_at is None and gained[b]:
                        job.first_token_at = now
                    delta = row.feed(gained[b], dec.done[b])
                    if delta and job.on_text is not None:
                        job.streamed = True
                        job.on_text(delta)
                    if row.result is not None:
                        dec.finish(b, keep=row.result.tokens)
                        settle(job.future, row.result)
        except Exception as err:  # noqa: BLE001 - the error goes to the waiting requests
            traceback.print_exc()
            if not settle_errors:
                return err
            for j in jobs:
                settle(j.future, exc=err)
            return None
        finally:
            self.rows_running -= len(jobs)
        self.batches += 1
        return None


@dataclass
class ServerLimits:
    """What the app accepts (``main``'s flags)."""

    max_prompt_tokens: int | None = None  # default: the model's positions
    max_tokens_limit: int = 256
    max_n: int = 16
    request_timeout: float = 60.0
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass
class Plan:
    """A checked completion request: the token ids of each prompt (control code, FIM sentinels
    and all), the stop strings and the seed of its first choice."""

    req: CompletionRequest
    prompts: list[list[int]]
    stops: list[str]
    seed: int
    started: float = field(default_factory=time.perf_counter)
    jobs: list[Job] = field(default_factory=list)


def _encode(engine: Engine, req: CompletionRequest, prompt, suffix: str | None, limits: ServerLimits) -> list[int]:
    """Token ids of one prompt (runs on the tokenizer pool, off the event loop)."""
    from train.inference.decoding import encode_prompt

    positions = engine.cfg.max_position_embeddings
    max_prompt = limits.max_prompt_tokens or positions
    if isinstance(prompt, list):
        if suffix is not None or req.language is not None:
            param = "suffix" if suffix is not None else "language"
            raise RequestError(400, f"{param}: needs a text prompt, not token ids", param)
        ids = list(prompt)
    else:
        chars = len(prompt) + len(suffix or "")
        if chars > max_prompt * engine.max_token_chars:  # certainly too many tokens: do not tokenize it
            raise RequestError(400, f"prompt: {chars} characters, more than {max_prompt} tokens can hold", "prompt")
        try:
            ids = encode_prompt(engine.tok, prompt, suffix, engine.cfg, language=req.language) \
                if prompt or suffix is not None else []
        except ValueError as err:
            raise RequestError(400, str(err), "language") from None
        if not ids and engine.eos is not None:
            ids = [engine.eos]
    if not ids:
        raise RequestError(400, "prompt: empty", "prompt")
    if len(ids) > max_prompt or len(ids) + req.max_tokens > positions:
        what = "prompt and suffix" if suffix is not None else "prompt"
        raise RequestError(400, f"prompt: {what}: {len(ids)} tokens + max_tokens {req.max_tokens} exceed the "
                                f"limit ({max_prompt} prompt tokens, {positions} positions)", "prompt")
    return ids


async def _plan(engine: Engine, req: CompletionRequest, limits: ServerLimits) -> Plan:
    """Check ``req`` and tokenize its prompts; raises ``RequestError`` (4xx) on bad input."""
    from train.inference.decoding import NOT_FIM

    refuse_unknown(req)
    # An empty suffix asks nothing of a model without FIM; a FIM model infills before it.
    suffix = req.suffix if req.suffix or (engine.fim and req.suffix is not None) else None
    if suffix is not None and not engine.fim:
        raise RequestError(400, f"suffix: {NOT_FIM}", "suffix")
    prompts = prompt_list(req.prompt, engine.vocab_size)
    check_sampling(req, max_tokens_limit=limits.max_tokens_limit, max_n=limits.max_n, n_prompts=len(prompts))
    stops = stop_list(req.stop)
    loop = asyncio.get_running_loop()
    encoded = [await loop.run_in_executor(engine.tokenizer_pool, _encode, engine, req, p, suffix, limits)
               for p in prompts]
    seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
    return Plan(req, encoded, stops, seed)


def _submit(engine: Engine, plan: Plan, emitter=None) -> list[concurrent.futures.Future]:
    """Queue one job per prompt and choice (none for ``max_tokens: 0``, which only scores);
    raises ``RequestError`` 429 when the queue is full."""
    req = plan.req
    if req.max_tokens == 0:
        return []
    jobs = [Job(ids, req.max_tokens, req.temperature, req.top_p, (plan.seed + k) % SEED_LIMIT, plan.stops)
            for ids in plan.prompts for k in range(req.n)]
    if emitter is not None:
        for i, j in enumerate(jobs):
            j.on_text = emitter(i)
    try:
        futures = engine.submit_all(jobs)
    except queue.Full:
        raise RequestError(429, "server busy: request queue is full, retry later", None, "rate_limit_error") from None
    plan.jobs = jobs
    return futures


async def _choices(engine: Engine, plan: Plan, done: list[Completion]) -> list[dict]:
    """The response's choices: the text (after the echoed prompt with ``echo``) and, when asked
    for, the log probabilities of the echoed and generated tokens. Decoding runs in the tokenizer
    pool: a long echoed prompt with ``logprobs`` decodes thousands of pieces, which would hold the
    event loop (and ``/health``) for as long."""
    req = plan.req
    if not done:  # max_tokens 0: the echoed prompt is the whole choice
        done = [Completion("", "length", 0) for _ in plan.prompts for _ in range(req.n)]
    fed = [plan.prompts[i // req.n] for i in range(len(done))]
    scores = None
    if req.logprobs is not None:
        rows = [ids + c.ids for ids, c in zip(fed, done, strict=True)]
        scores = await asyncio.wrap_future(engine.score(rows, req.logprobs))
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(engine.tokenizer_pool, _decode_choices, engine, req, fed, done, scores)


def _decode_choices(engine: Engine, req: CompletionRequest, fed: list[list[int]], done: list[Completion],
                    scores) -> list[dict]:
    from train.inference.logprobs import logprobs_field

    choices = []
    for i, (ids, c) in enumerate(zip(fed, done, strict=True)):
        head = engine.tok.decode(ids, clean_up_tokenization_spaces=False) if req.echo else ""
        lp = None
        if scores is not None:
            lp = logprobs_field(engine.tok, ids + c.ids, scores[i], 0 if req.echo else len(ids), req.logprobs)
        choices.append({"text": head + c.text, "index": i, "logprobs": lp, "finish_reason": c.finish_reason})
    return choices


def _sse_stream(futures, events: asyncio.Queue, base: dict, timeout: float, on_end: Callable[[list], None]):
    """Server-sent events of a streamed request: each choice's new text as it becomes final,
    a ``finish_reason`` event per choice, ``[DONE]`` (then ``on_end(completions)``); an error
    travels as an event."""

    def chunk(index: int, text: str, finish_reason: str | None) -> str:
        body = {**base, "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(body)}\n\n"

    def error_event(message: str, kind: str) -> str:
        return f"data: {json.dumps(error_body(message, None, kind))}\n\n"

    async def sse():
        open_choices = len(futures)
        try:
            while open_choices:
                try:
                    index, item = await asyncio.wait_for(events.get(), timeout=timeout)
                except TimeoutError:
                    yield error_event(f"no progress for {timeout} s", "timeout")  # headers are sent already
                    return
                if isinstance(item, str):
                    yield chunk(index, item, None)
                    continue
                open_choices -= 1
                if item.cancelled():
                    return
                if item.exception() is not None:
                    yield error_event(str(item.exception()), "server_error")
                    return
                yield chunk(index, "", item.result().finish_reason)
            yield "data: [DONE]\n\n"
            on_end([f.result() for f in futures])
        finally:
            for f in futures:  # client gone or stream over: nothing left for the worker to do
                f.cancel()

    return sse()


def _observe(metrics: ServerMetrics, plan: Plan, done: list[Completion]) -> None:
    """Latency, time to first token and token counts of a finished request."""
    now = time.perf_counter()
    metrics.latency.observe(now - plan.started)
    firsts = [j.first_token_at for j in plan.jobs if j.first_token_at is not None]
    if firsts:
        metrics.ttft.observe(min(firsts) - plan.started)
    metrics.generated.inc(sum(c.tokens for c in done))
    metrics.prompt_tokens.inc(sum(len(p) for p in plan.prompts) * plan.req.n)


async def complete(engine: Engine, req: CompletionRequest, limits: ServerLimits, metrics: ServerMetrics,
                   model_name: str):
    """Answer one ``/v1/completions`` request (a JSON body, or a stream of events)."""
    from fastapi.responses import StreamingResponse

    plan = await _plan(engine, req, limits)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()  # (choice index, new text | finished future), streaming only

    def emitter(index: int):
        # Called on the worker thread: hand the text to the event loop that serves the stream.
        return lambda text: loop.call_soon_threadsafe(events.put_nowait, (index, text))

    futures = _submit(engine, plan, emitter if req.stream else None)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": req.model or model_name}
    if req.stream:
        for i, f in enumerate(futures):
            f.add_done_callback(lambda f, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, f)))
        return StreamingResponse(_sse_stream(futures, events, base, limits.request_timeout,
                                             lambda done: _observe(metrics, plan, done)),
                                 media_type="text/event-stream")
    try:
        done = await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)),
                                      timeout=limits.request_timeout)
    except TimeoutError:
        for f in futures:  # the worker drops rows nobody waits for
            f.cancel()
        raise RequestError(504, f"request timed out after {limits.request_timeout} s", None, "timeout") from None
    choices = await _choices(engine, plan, list(done))
    _observe(metrics, plan, list(done))
    prompt_tokens = sum(len(p) for p in plan.prompts) * req.n
    completion_tokens = sum(c.tokens for c in done)
    return {**base, "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens":
                                                  completion_tokens, "total_tokens": prompt_tokens + completion_tokens}}


def _tokenizer_routes(app, engine: Engine, model_name: str) -> None:
    """vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` (lm-evaluation-harness's
    remote tokenizer uses all three)."""
    positions = engine.cfg.max_position_embeddings

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        refuse_unknown(req)
        if len(req.prompt) > 4 * positions * engine.max_token_chars:
            raise RequestError(400, f"prompt: longer than {4 * positions} tokens can hold", "prompt")
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(engine.tokenizer_pool, lambda: engine.tok.encode(
            req.prompt, add_special_tokens=req.add_special_tokens))
        return {"count": len(ids), "max_model_len": positions, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        refuse_unknown(req)
        if any(not 0 <= t < engine.vocab_size for t in req.tokens):
            raise RequestError(400, f"tokens: token ids must be in [0, {engine.vocab_size})", "tokens")
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(engine.tokenizer_pool, lambda: engine.tok.decode(
            req.tokens, clean_up_tokenization_spaces=False))
        return {"prompt": text}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = engine.tok
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token, "model_max_length": positions,
                "vocab_size": engine.vocab_size}


def _info_routes(app, engine: Engine, model_name: str, metrics: ServerMetrics) -> None:
    """``/health``, ``/metrics`` and ``/v1/models``."""
    from fastapi.responses import JSONResponse, Response

    @app.get("/health")
    async def health():
        body = {"status": "ok", "queued": engine.queue.qsize(), "batches": engine.batches,
                "segments": engine.segments, "fill_in_the_middle": engine.fim}
        ready = getattr(engine, "ready", None)  # an engine without a warm-up is always ready
        if ready is not None and not ready.is_set():
            return JSONResponse({**body, "status": "warming up"}, status_code=503)
        return body

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "codeneo",
                                            "max_model_len": engine.cfg.max_position_embeddings}]}


def _error_handlers(app) -> None:
    """Every input error as an OpenAI error body with a 4xx status."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        return JSONResponse(status_code=status, content=error_body(message, param, kind))

    @app.exception_handler(RequestError)
    async def _refused(request, exc: RequestError):  # noqa: ARG001
        return error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(Exception)
    async def _failed(request, exc):  # noqa: ARG001 - a fault of ours (input errors never get here)
        traceback.print_exception(exc)
        return error(500, f"internal error: {type(exc).__name__}", None, "server_error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # noqa: ARG001
        errs = exc.errors()
        loc = ".".join(str(x) for x in errs[0]["loc"][1:]) if errs else None
        msg = str(errs[0].get("msg", "")) if errs else ""
        # The message may quote the input; never let a lone surrogate in it break the response.
        msg = msg.encode("utf-8", "replace").decode("utf-8")
        # param: the request field (the location also names the union member that was tried).
        param = str(errs[0]["loc"][1]) if errs and len(errs[0]["loc"]) > 1 else None
        return error(422 if errs and errs[0].get("type") != "json_invalid" else 400, f"invalid request: {loc}: {msg}",
                     param)


def create_app(engine: Engine, *, model_name: str = "codeneo", api_key: str | None = None,
               limits: ServerLimits | None = None, **limit_overrides):
    """The app over ``engine``: ``/v1/completions``, ``/v1/models``, ``/tokenize``,
    ``/detokenize``, ``/tokenizer_info``, ``/metrics``, ``/health``. Bad requests get a 4xx naming
    the field, a full queue 429, a request not answered within ``request_timeout`` s 504 (a
    stream that makes no progress for that long ends with an error event). With ``api_key``
    every route but ``/health`` needs ``Authorization: Bearer KEY``. ``limit_overrides`` are
    ``ServerLimits`` fields."""
    from fastapi import FastAPI, Request

    limits = limits or ServerLimits(**limit_overrides)
    metrics = ServerMetrics(engine)
    app = FastAPI(title="codeneo completions")
    _error_handlers(app)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        metrics.count(request.url.path, response.status_code)
        return response

    _info_routes(app, engine, model_name, metrics)
    _tokenizer_routes(app, engine, model_name)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await complete(engine, req, limits, metrics, model_name)

    return Guard(app, api_key=api_key, max_body_bytes=limits.max_body_bytes, on_refused=metrics.count)

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.serve", description=__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (latest checkpoint)")
    src.add_argument("--hf", help="Hugging Face GPT-Neo / GPT-2 folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default="codeneo")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health (visible in ps: prefer "
                             "--api-key-file or the CODENEO_API_KEY environment variable)")
    parser.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens accepted")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: positions)")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get 413")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    parser.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                        help="continuous: requests join the running batch at segment boundaries; static: whole batches "
                             "of requests with the same settings (see docs/benchmarks.md#serving)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="continuous batching: do not compile every (slots, ring) shape before serving (requests "
                             "wait for each compile on first use instead)")
    args = parser.parse_args(argv)
    try:
        api_key = resolve_api_key(args.api_key, args.api_key_file)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    import uvicorn

    from train.inference.decoding import load_model

    cfg, params, tok = load_model(args.run, args.hf)
    engine = Engine(cfg, params, tok, queue_size=args.queue_size, continuous=args.batching == "continuous",
                    warmup=not args.no_warmup)
    limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens,
                          request_timeout=args.timeout, max_body_bytes=args.max_body_bytes)
    app = create_app(engine, model_name=args.model_name, api_key=api_key, limits=limits)
    # uvicorn handles SIGTERM: stops accepting, finishes in-flight requests, then exits
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=60)
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
