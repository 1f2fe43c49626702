"""Request bodies (msgspec Structs) and OpenAI's response and chunk shapes.

Clients send more fields than we use: unknown ones are ignored, as are known ones that change
nothing here (`user`, `store`, ...). Fields we cannot honour are refused with a 400 naming them
rather than silently dropped (`logprobs`, `tools`, penalties, `n > 1`).
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any

import msgspec
from msgspec import Struct

from finetune.shell.serve.errors import ApiError, bad_request, from_decode

CHAT_MAX_TOKENS = 256  # `ft generate`'s default; OpenAI's chat API has none
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SEED_MOD = 1 << 32  # seeds are taken modulo this (both engines' generators accept it)


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class _Sampling(Struct, kw_only=True):
    """What chat and text completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatRequest(_Sampling, kw_only=True):
    messages: list[Any]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[Any]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class AdapterRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    path: str


class Options(Struct, frozen=True, kw_only=True):
    """What one generation needs, checked: sampling, stops and how to answer."""

    max_tokens: int
    max_given: bool  # the client set max_tokens (else it may shrink to fit the context)
    temp: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def decode(body: bytes, kind: type[Struct]) -> Any:
    """The request body as `kind`, or an ApiError naming the field."""
    if not body.strip():
        raise bad_request("The request body is empty; send a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.MsgspecError as err:
        raise from_decode(err) from None


def options(req: ChatRequest | CompletionRequest) -> Options:
    """Checked sampling options of a request (OpenAI's ranges), or a 400 naming the field."""
    _refuse_unsupported(req)
    if req.n not in (None, 1):
        raise bad_request(f"n={req.n} is not supported: this server returns one choice per request", "n")
    chat = isinstance(req, ChatRequest)
    given = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
    field = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
    if given is not None and given < 1:
        raise bad_request(f"{field} must be at least 1, got {given}", field, "invalid_value")
    temp = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temp <= 2.0:
        raise bad_request(f"temperature must be between 0 and 2, got {temp}", "temperature", "invalid_value")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 <= top_p <= 1.0:
        raise bad_request(f"top_p must be between 0 and 1, got {top_p}", "top_p", "invalid_value")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4:
        raise bad_request(f"stop holds {len(stop)} sequences; at most 4", "stop", "invalid_value")
    default = CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS
    seed = secrets.randbelow(SEED_MOD) if req.seed is None else req.seed % SEED_MOD
    return Options(
        max_tokens=default if given is None else given, max_given=given is not None, temp=temp,
        top_p=top_p, seed=seed, stop=tuple(s for s in stop if s), stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
    )


def _refuse_unsupported(req: ChatRequest | CompletionRequest) -> None:
    unsupported: list[tuple[str, bool]] = [
        ("frequency_penalty", bool(req.frequency_penalty)),
        ("presence_penalty", bool(req.presence_penalty)),
        ("logit_bias", bool(req.logit_bias)),
        ("logprobs", bool(req.logprobs)),
    ]
    if isinstance(req, ChatRequest):
        kind = (req.response_format or {}).get("type", "text")
        unsupported += [("top_logprobs", bool(req.top_logprobs)), ("tools", bool(req.tools)),
                        ("functions", bool(req.functions)), ("response_format", kind != "text")]
    else:
        unsupported += [("echo", bool(req.echo)), ("suffix", bool(req.suffix)),
                        ("best_of", req.best_of not in (None, 1))]
    for name, used in unsupported:
        if used:
            raise bad_request(f"{name} is not supported by this server; leave it out", name, "unsupported_parameter")


def messages_row(req: ChatRequest) -> dict[str, Any]:
    """The conversation as a chat data row (`developer` is OpenAI's newer name for `system`)."""
    if not req.messages:
        raise bad_request("messages is empty; send at least one message", "messages")
    renamed = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
               for m in req.messages]
    return {"messages": renamed}


def prompt_of(req: CompletionRequest) -> str | list[int]:
    """A completion's prompt: a string, a list of one string, or a list of token ids."""
    p = req.prompt
    if isinstance(p, str):
        return p
    if len(p) == 1 and isinstance(p[0], str):
        return p[0]
    if p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
        return list(p)
    raise bad_request("prompt must be a string, a list of one string or a list of token ids "
                      "(batches of prompts are not supported)", "prompt")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Reply:
    """One response's id, time and model, building its bodies and stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.model = model
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head(self.object), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def check_adapter_name(name: str, taken: list[str]) -> None:
    if not name or len(name) > 128 or any(c.isspace() or c == "/" for c in name):
        raise bad_request(f"adapter name {name!r}: use 1-128 characters without spaces or '/'", "name")
    if name in taken:
        raise ApiError(409, f"a model named {name!r} is already served; DELETE /v1/adapters/{name} first",
                       "name", "model_exists")
