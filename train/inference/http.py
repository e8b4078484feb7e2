"""HTTP plumbing of the completion server: OpenAI-style error bodies, the API key check and the
request body limit (plain ASGI, so an oversized body is refused before it is read into memory)."""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers' probes)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def resolve_api_key(flag: str | None, key_file: str | None, env=os.environ) -> str | None:
    """The API key from ``--api-key``, else ``--api-key-file`` (first line), else the
    ``CODENEO_API_KEY`` environment variable; None when none is set (no key required)."""
    if flag:
        return flag
    if key_file:
        key = Path(key_file).read_text(encoding="utf-8").strip()
        if not key:
            raise ValueError(f"--api-key-file: {key_file} is empty")
        return key
    return env.get("CODENEO_API_KEY") or None


def key_matches(header: str, api_key: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer api_key``, compared in constant time
    (no timing leak of how many leading characters were right)."""
    want = f"Bearer {api_key}".encode()
    return hmac.compare_digest(header.encode("utf-8", "surrogateescape"), want)


async def _send_json(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class Guard:
    """ASGI middleware in front of the app: every route but ``OPEN_PATHS`` needs the API key
    (401), and a body longer than ``max_body_bytes`` is refused (413) from its
    ``Content-Length`` or, without one, as soon as that many bytes have arrived. The body is
    buffered here (at most the limit) and replayed to the app."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, on_refused=None):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes
        self.on_refused = on_refused  # (path, status) -> None: counts refusals in the metrics

    async def _refuse(self, scope, send, status: int, body: dict) -> None:
        if self.on_refused is not None:
            self.on_refused(scope.get("path", ""), status)
        await _send_json(send, status, body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path") not in OPEN_PATHS \
                and not key_matches(headers.get("authorization", ""), self.api_key):
            return await self._refuse(scope, send, 401, error_body("invalid API key", None, "authentication_error"))
        too_big = error_body(f"request body larger than {self.limit} bytes", None, "request_too_large")
        length = headers.get("content-length")
        if length is not None and not length.strip().isdigit():
            return await self._refuse(scope, send, 400, error_body(
                f"Content-Length: expected a number of bytes, got {length[:40]!r}", None))
        if length is not None and int(length) > self.limit:
            return await self._refuse(scope, send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client gone before the body arrived
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, send, 413, too_big)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices for streaming responses

        return await self.app(scope, replay, send)
