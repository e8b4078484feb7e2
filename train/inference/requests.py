"""Request bodies of the completion server and their checks.

Every malformed, oversized or out-of-range input is a ``RequestError`` (a 4xx naming the field)
raised here, before anything reaches the model: one request's bad input can never fail the batch
it would have joined. Fields the server does not implement and that would change the output
(``best_of`` > 1, ``logit_bias``, ``presence_penalty`` ...) are refused by name rather than
silently ignored; harmless ones (``user``) are accepted.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOPS = 32  # stop strings per request (editors add their own; OpenAI's 4 is too few)
MAX_STOP_CHARS = 256
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (a signed 64-bit integer, as vLLM takes them)
MAX_LOGPROBS = 20

# Fields accepted and ignored: they do not change the completion.
HARMLESS = frozenset({"user", "metadata", "service_tier", "store"})
# Fields not implemented: accepted only at the value that means "off" (what many clients send).
NOT_IMPLEMENTED = {
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "top_k": (None, -1, 0),
    "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0),
    "stop_token_ids": (None, []),
    "ignore_eos": (None, False),
    "skip_special_tokens": (None, True),
    "include_stop_str_in_output": (None, False),
    "prompt_logprobs": (None,),
    "response_format": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "stream_options": (None, {}, {"include_usage": False}),
}


class RequestError(Exception):
    """A client error: HTTP ``status`` (4xx) with a message that starts with the field's name."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string in ``value`` that is not valid Unicode text (a lone
    surrogate such as "\\ud800", which JSON allows but UTF-8 cannot encode), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        if isinstance(k, str) and _lone_surrogate(k, path) is not None:
            return path or "body"
        found = _lone_surrogate(v, f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data):
        where = _lone_surrogate(data, "")
        if where is not None:
            raise RequestError(400, f"{where}: not valid Unicode text (a lone surrogate)", where)
        return data


class CompletionRequest(_Body):
    """``POST /v1/completions``: OpenAI's completion fields (``prompt`` may also be token ids,
    or a list of them, as lm-evaluation-harness sends) plus ``language`` (a control code)."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    suffix: str | None = None
    max_tokens: int = Field(default=16)
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    language: str | None = None  # not OpenAI's: the control code to prepend (data.control_codes models)


class TokenizeRequest(_Body):
    """``POST /tokenize`` (vLLM's shape)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    """``POST /detokenize`` (vLLM's shape)."""

    model: str | None = None
    tokens: list[int]


def refuse_unknown(body: BaseModel, harmless=HARMLESS) -> None:
    """Raise 400 naming the first extra field that would change the output."""
    for name, value in (body.model_extra or {}).items():
        if name in harmless:
            continue
        if name in NOT_IMPLEMENTED:
            if any(value is None if off is None else type(value) is type(off) and value == off
                   for off in NOT_IMPLEMENTED[name]):
                continue
            raise RequestError(400, f"{name}: not supported by this server (only {NOT_IMPLEMENTED[name][-1]!r})", name)
        raise RequestError(400, f"{name}: unknown field", name)


def stop_list(stop: str | list[str] | None) -> list[str]:
    """The request's stop strings, checked against ``MAX_STOPS`` / ``MAX_STOP_CHARS``."""
    stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise RequestError(400, f"stop: at most {MAX_STOPS} stop strings ({len(stops)} given)", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise RequestError(400, f"stop: each stop string at most {MAX_STOP_CHARS} characters", "stop")
    return stops


def check_sampling(req: CompletionRequest, *, max_tokens_limit: int, max_n: int, n_prompts: int) -> None:
    """Range checks of the numeric fields (400 naming the field)."""
    low = 0 if req.echo else 1  # max_tokens 0 scores an echoed prompt without generating
    if not low <= req.max_tokens <= max_tokens_limit:
        raise RequestError(400, f"max_tokens: must be between {low} and {max_tokens_limit}"
                           + ("" if req.echo else " (0 only with echo)"), "max_tokens")
    if not 1 <= req.n <= max_n or req.n * n_prompts > max_n:
        raise RequestError(400, f"n: must be between 1 and {max_n} (times the number of prompts)", "n")
    if not 0.0 <= req.temperature <= 2.0:
        raise RequestError(400, "temperature: must be between 0 and 2", "temperature")
    if not 0.0 < req.top_p <= 1.0:
        raise RequestError(400, "top_p: must be in (0, 1]", "top_p")
    if req.seed is not None and not 0 <= req.seed < SEED_LIMIT:
        raise RequestError(400, "seed: must be an integer with 0 <= seed < 2**63", "seed")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise RequestError(400, f"logprobs: must be between 0 and {MAX_LOGPROBS}", "logprobs")
    if req.echo and req.suffix:
        raise RequestError(400, "echo: not supported together with suffix", "echo")
    if req.echo and req.stream:
        raise RequestError(400, "echo: not supported with stream", "echo")
    if req.logprobs is not None and req.stream:
        raise RequestError(400, "logprobs: not supported with stream", "logprobs")


def prompt_list(prompt, vocab_size: int) -> list[str | list[int]]:
    """The request's prompts: strings, or token id lists checked against the vocabulary."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError(400, "prompt: empty list", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, list):
            if not p:
                raise RequestError(400, "prompt: an empty list of token ids", "prompt")
            if any(not 0 <= t < vocab_size for t in p):
                raise RequestError(400, f"prompt: token ids must be in [0, {vocab_size})", "prompt")
        out.append(p)
    return out
