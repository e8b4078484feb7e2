"""OpenAI-compatible completion server: ``python -m train.serve --run RUN_DIR | --hf HF_DIR``.

FastAPI + uvicorn. One background worker thread owns the model and drains a bounded queue:
requests that arrive while a batch runs join the next one. Requests with the same sampling
settings (temperature, top_p, max_tokens bucket; and seed when sampling) share a batch, padded
to a batch size in ``BATCH_BUCKETS`` with dummy rows; ``max_tokens`` is rounded up to a bucket in
``TOKEN_BUCKETS`` and cut afterwards, and prompts are padded to 32-token buckets by
``generate_ids``: the set of compiled shapes stays small. Greedy results equal
``python -m train.generate --temperature 0``.

``stream: true`` sends the finished completion as server-sent events, one event per token
(generation itself is one compiled call). ``suffix`` (fill-in-the-middle) is refused with 400:
no codeneo config trains with FIM yet.
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
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

BATCH_BUCKETS = (1, 4, 16)
TOKEN_BUCKETS = (16, 64, 256)


def bucket(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    return n


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def key(self):
        bucket_n = bucket(self.max_tokens, TOKEN_BUCKETS)
        return (self.temperature, self.top_p, bucket_n, self.seed if self.temperature > 0 else None)


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
        self.cfg, self.params, self.tok = cfg, params, tokenizer
        self.eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if not isinstance(self.eos, int) or self.eos < 0 or self.eos >= cfg.vocab_size:
            self.eos = None
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.max_batch = max_batch
        self.batches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="codeneo-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        self.queue.put_nowait(job)  # raises queue.Full
        return job.future

    def close(self):
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
        from train.generate import generate_ids

        temperature, top_p, n_tokens, _ = key
        size = bucket(len(jobs), [b for b in BATCH_BUCKETS if b <= self.max_batch] + [self.max_batch])
        prompts = [j.ids for j in jobs] + [jobs[0].ids] * (size - len(jobs))
        limit = self.cfg.max_position_embeddings
        n_tokens = min(n_tokens, limit - max(len(p) for p in prompts))
        try:
            out = generate_ids(self.cfg, self.params, prompts, max_new_tokens=n_tokens, temperature=temperature,
                               top_p=top_p, seed=jobs[0].seed, eos_id=self.eos)
        except Exception as err:  # noqa: BLE001 - the error goes to the waiting requests
            for j in jobs:
                _settle(j.future, exc=err)
            return
        self.batches += 1
        for j, row in zip(jobs, out, strict=False):
            _settle(j.future, row[: j.max_tokens])

    def decode(self, ids: list[int]) -> tuple[list[str], bool]:
        """Per-token text pieces (prefix-consistent) and whether EOS ended the row."""
        hit_eos = self.eos is not None and self.eos in ids
        ids = [t for t in ids if t != self.eos]
        pieces, prev = [], ""
        for i in range(1, len(ids) + 1):
            text = self.tok.decode(ids[:i])
            if text.startswith(prev):
                pieces.append(text[len(prev):])
                prev = text
        full = self.tok.decode(ids)
        if full != prev:
            pieces.append(full[len(prev):] if full.startswith(prev) else full)
        return pieces, hit_eos


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text cut before the first occurrence of any stop string (OpenAI semantics)."""
    best = None
    for s in stops:
        i = text.find(s) if s else -1
        if i >= 0 and (best is None or i < best):
            best = i
    return (text, False) if best is None else (text[:best], True)


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


def create_app(engine: Engine, *, model_name: str = "codeneo", api_key: str | None = None,
               max_prompt_tokens: int | None = None, max_tokens_limit: int = 256, max_n: int = 16,
               request_timeout: float = 60.0):
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
        return {"status": "ok", "queued": engine.queue.qsize(), "batches": engine.batches}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "codeneo"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.suffix:
            return error(400, "suffix: this model was not trained with fill-in-the-middle", "suffix")
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
            ids = engine.tok.encode(p) if p else []
            if not ids:
                ids = [engine.eos] if engine.eos is not None else []
            if not ids:
                return error(400, "prompt: empty", "prompt")
            if len(ids) > max_prompt_tokens or len(ids) + req.max_tokens > positions:
                return error(400, f"prompt: {len(ids)} tokens + max_tokens {req.max_tokens} exceed the limit "
                                  f"({max_prompt_tokens} prompt tokens, {positions} positions)", "prompt")
            encoded.append(ids)
        seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        jobs = [Job(ids, req.max_tokens, req.temperature, req.top_p, seed + k)
                for ids in encoded for k in range(req.n)]
        futures = []
        try:
            for j in jobs:
                futures.append(engine.submit(j))
        except queue.Full:
            for f in futures:
                f.cancel()
            return error(429, "server busy: request queue is full, retry later", None, "rate_limit_error")
        try:
            rows = await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)),
                                          timeout=request_timeout)
        except TimeoutError:
            return error(504, f"request timed out after {request_timeout} s", None, "timeout")
        except ValueError as err:
            return error(400, str(err), None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        choices, completion_tokens = [], 0
        for i, row in enumerate(rows):
            pieces, hit_eos = engine.decode(row)
            text, stopped = cut_at_stop("".join(pieces), stops)
            completion_tokens += len(row)
            reason = "stop" if stopped or hit_eos else "length"
            choices.append({"text": text, "index": i, "logprobs": None, "finish_reason": reason,
                            "_pieces": pieces})
        usage = {"prompt_tokens": sum(len(e) for e in encoded) * req.n, "completion_tokens": completion_tokens,
                 "total_tokens": sum(len(e) for e in encoded) * req.n + completion_tokens}
        base = {"id": rid, "object": "text_completion", "created": created, "model": req.model or model_name}
        if not req.stream:
            for c in choices:
                c.pop("_pieces")
            return {**base, "choices": choices, "usage": usage}

        def events():
            for c in choices:
                sent = ""
                for piece in c["_pieces"]:
                    if len(sent) >= len(c["text"]):
                        break
                    piece = c["text"][len(sent):len(sent) + len(piece)]
                    sent += piece
                    chunk = {**base, "choices": [{"text": piece, "index": c["index"], "logprobs": None,
                                                  "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                chunk = {**base, "choices": [{"text": "", "index": c["index"], "logprobs": None,
                                              "finish_reason": c["finish_reason"]}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

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

    from train.generate import load_model

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
