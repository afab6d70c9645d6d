"""The OpenAI request bodies the server accepts, validated into what the scheduler runs, and its error bodies.

A parameter OpenAI documents behaves as documented or is refused (400 naming it and what is accepted), never
ignored: `n`, `best_of`, penalties, `logit_bias`, `echo`, `suffix`, tools and the like are accepted only at their
neutral value. A key neither OpenAI nor this server knows is refused too (a typo would otherwise silently run
something else). Extensions beyond OpenAI's parameters: `top_k` (0 = off) and `priority` (higher runs first when
requests wait), as vLLM names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ollm_triton.serve.scheduler import LONG_INPUT_CODECS, SamplingParams

COMPLETION_MAX_LOGPROBS = 5  # OpenAI's documented maximum for /v1/completions `logprobs`
CHAT_MAX_TOP_LOGPROBS = 20  # and for /v1/chat/completions `top_logprobs`
MAX_STOP = 4  # OpenAI: up to 4 stop sequences
INT64 = 2**63


class APIError(Exception):
    """An error the client sees as OpenAI's body {"error": {message, type, param, code}} with `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or error_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 429:
        return "rate_limit_error"
    if status == 404:
        return "not_found_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


@dataclass
class Generate:
    """A validated request: what the scheduler runs and how the answer is shaped."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # completions: top-n per token; chat: top_logprobs when logprobs is true
    priority: int = 0


@dataclass
class Limits:
    """What the server can run, for the checks that need it."""

    model: str
    max_context: int
    vocab_size: int
    defaults: SamplingParams  # sampling of a request that omits temperature/top_p/top_k (the +decoder group)
    # the run's codec bounds the tokens a request holds (Scheduler.held_bound): prompt + max_tokens may exceed
    # max_context, the prompt streams through the codec in chunks (serve/scheduler.py, "Long inputs")
    long_inputs: bool = False


# ---- parameter readers --------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def read_int(body: dict, key: str, default: Any, *, lo: int | None = None, hi: int | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    accepted = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "") + \
        (f" from {lo} to {hi}" if lo is not None and hi is not None else "")
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise APIError(f"{key}={value!r} is not accepted; accepted: {accepted}", param=key,
                       code="invalid_value" if _is_int(value) else "invalid_type")
    return value


def read_number(body: dict, key: str, default: float, *, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    ok = _is_number(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise APIError(f"{key}={value!r} is not accepted; accepted: a number in {interval}", param=key,
                       code="invalid_value" if _is_number(value) else "invalid_type")
    return float(value)


def read_bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"{key}={value!r} is not accepted; accepted: true or false", param=key, code="invalid_type")
    return value


def read_stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise APIError(f"stop={value!r} is not accepted; accepted: a non-empty string or a list of up to {MAX_STOP} "
                       "non-empty strings", param="stop", code="invalid_value")
    return list(stops)


# Parameters OpenAI documents that this server does not implement: accepted only at the value that means "off".
def _neutral(*values: Any):
    return lambda v: v in values


def _empty(v: Any) -> bool:
    return v is None or v in ({}, [], "")


COMMON_NEUTRAL = {
    "n": (_neutral(None, 1), "1 (one choice per request)"),
    "presence_penalty": (_neutral(None, 0), "0 (penalties are not implemented)"),
    "frequency_penalty": (_neutral(None, 0), "0 (penalties are not implemented)"),
    "logit_bias": (_empty, "null or {} (logit_bias is not implemented)"),
}
COMPLETION_NEUTRAL = {
    **COMMON_NEUTRAL,
    "best_of": (_neutral(None, 1), "1"),
    "echo": (_neutral(None, False), "false (the prompt is not echoed)"),
    "suffix": (_empty, "null (insertion is not implemented)"),
}
CHAT_NEUTRAL = {
    **COMMON_NEUTRAL,
    "tools": (_empty, "null or [] (tool calls are not implemented)"),
    "tool_choice": (_neutral(None, "none"), "null or \"none\""),
    "functions": (_empty, "null or [] (function calls are not implemented)"),
    "function_call": (_neutral(None, "none"), "null or \"none\""),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "null, true or false (no tools run)"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "null or {\"type\": \"text\"}"),
    "modalities": (lambda v: v is None or v == ["text"], "null or [\"text\"]"),
    "audio": (_empty, "null (text only)"),
    "prediction": (_empty, "null (predicted outputs are not implemented)"),
    "store": (_neutral(None, False), "null or false (completions are not stored)"),
    "metadata": (_empty, "null (completions are not stored)"),
    "reasoning_effort": (_empty, "null (not a reasoning model)"),
    "web_search_options": (_empty, "null"),
    "service_tier": (_neutral(None, "auto", "default"), "null, \"auto\" or \"default\""),
    "verbosity": (_empty, "null"),
}
# Accepted, with no effect on the tokens: an end-user id and a caching hint (the prefix cache needs no hint).
METADATA = {"user", "safety_identifier", "prompt_cache_key"}
COMPLETION_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                   "stream_options", "logprobs", "priority"}
CHAT_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
             "stop", "stream", "stream_options", "logprobs", "top_logprobs", "priority"}


def check_keys(body: dict, known: set[str], neutral: dict) -> None:
    for key, value in body.items():
        if key in known or key in METADATA:
            continue
        if key in neutral:
            ok, accepted = neutral[key]
            if not ok(value):
                raise APIError(f"{key}={value!r} is not supported by this server; accepted: {accepted}", param=key,
                               code="unsupported_parameter")
            continue
        raise APIError(f"unknown parameter {key!r}; accepted: {', '.join(sorted(known | METADATA))} "
                       f"(and, at their neutral value only: {', '.join(sorted(neutral))})", param=key,
                       code="unknown_parameter")


def check_model(body: dict, limits: Limits) -> None:
    model = body.get("model")
    if model is None:
        raise APIError(f"model is required; accepted: {limits.model!r}", param="model",
                       code="missing_required_parameter")
    if model != limits.model:
        raise APIError(f"the model {model!r} does not exist here; accepted: {limits.model!r} (GET /v1/models)",
                       status=404, param="model", code="model_not_found")


def read_stream(body: dict) -> tuple[bool, bool]:
    stream = read_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise APIError("stream_options is only accepted with stream=true", param="stream_options",
                       code="invalid_value")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(f"stream_options={options!r} is not accepted; accepted: {{\"include_usage\": true|false}}",
                       param="stream_options", code="invalid_value")
    return stream, read_bool(options, "include_usage", False)


def read_sampling(body: dict, limits: Limits, logprobs: int | None) -> SamplingParams:
    d = limits.defaults
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -INT64 <= seed < INT64):
        raise APIError(f"seed={seed!r} is not accepted; accepted: a 64-bit integer or null", param="seed",
                       code="invalid_value")
    return SamplingParams(
        temperature=read_number(body, "temperature", d.temperature, lo=0.0, hi=2.0),
        top_p=read_number(body, "top_p", d.top_p, lo=0.0, hi=1.0, lo_open=True),
        top_k=read_int(body, "top_k", d.top_k, lo=0),
        seed=seed % 2**63 if seed is not None else None,  # torch seeds are unsigned; the same int, the same draws
        logprobs=logprobs,
    )


def check_length(prompt_len: int, max_tokens: int | None, limits: Limits, prompt_param: str) -> int:
    """max_tokens, checked against the context (None: the rest of the context, OpenAI's chat default)."""
    context = limits.max_context
    if limits.long_inputs:  # no context limit; without max_tokens: the rest of the context, or 16 (OpenAI's
        # completions default) once the prompt has passed it
        return max_tokens if max_tokens is not None else max(context - prompt_len, min(context, 16))
    if prompt_len >= context:
        raise APIError(f"the prompt has {prompt_len} tokens; the model's context is {context} tokens (accepted: "
                       f"prompt + max_tokens <= {context}, with max_tokens >= 1; a longer input needs a cache codec "
                       f"that bounds the tokens it holds: {LONG_INPUT_CODECS})", param=prompt_param,
                       code="context_length_exceeded")
    if max_tokens is None:
        return context - prompt_len
    if prompt_len + max_tokens > context:
        raise APIError(f"max_tokens={max_tokens} with a prompt of {prompt_len} tokens exceeds the model's context of "
                       f"{context} tokens; accepted: max_tokens <= {context - prompt_len}", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


# ---- the two endpoints ---------------------------------------------------------------------------------------------
def parse_completion(body: dict, limits: Limits, encode) -> Generate:
    """POST /v1/completions. encode: str -> token ids."""
    check_keys(body, COMPLETION_KEYS, COMPLETION_NEUTRAL)
    check_model(body, limits)
    prompt_ids = read_prompt(body.get("prompt"), limits, encode)
    max_tokens = read_int(body, "max_tokens", 16, lo=1)  # OpenAI's completions default: 16
    logprobs = read_int(body, "logprobs", None, lo=0, hi=COMPLETION_MAX_LOGPROBS)
    return _generate(body, limits, prompt_ids, max_tokens, logprobs, "prompt")


def read_prompt(prompt: Any, limits: Limits, encode) -> list[int]:
    """A string, or token ids; a list of one of those (OpenAI's batch form) only with one element."""
    accepted = "a non-empty string, or a non-empty list of token ids (one prompt per request)"
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = encode(prompt) if prompt else []
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = list(prompt)
        if min(ids) < 0 or max(ids) >= limits.vocab_size:
            raise APIError(f"prompt token ids must be in [0, {limits.vocab_size}); accepted: {accepted}",
                           param="prompt", code="invalid_value")
    elif prompt is None:
        raise APIError(f"prompt is required; accepted: {accepted}", param="prompt", code="missing_required_parameter")
    else:
        raise APIError(f"prompt is not accepted ({type(prompt).__name__}"
                       f"{f' of {len(prompt)} prompts' if isinstance(prompt, list) and len(prompt) > 1 else ''}); "
                       f"accepted: {accepted}", param="prompt", code="invalid_value")
    if not ids:
        raise APIError(f"prompt is empty; accepted: {accepted}", param="prompt", code="invalid_value")
    return ids


ROLES = ("system", "developer", "user", "assistant")


def read_messages(messages: Any) -> list[dict[str, str]]:
    """[{role, content: str}]: text content only (a list of text parts is joined)."""
    accepted = f"a non-empty list of {{role: {'|'.join(ROLES)}, content: string or text parts}}"
    if not isinstance(messages, list) or not messages:
        raise APIError(f"messages is {'required' if messages is None else 'not accepted'}; accepted: {accepted}",
                       param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{where} is not an object; accepted: {accepted}", param=where, code="invalid_value")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise APIError(f"{where}: {', '.join(sorted(extra))} not supported (no tool calls); accepted keys: role, "
                           "content, name", param=f"{where}.{sorted(extra)[0]}", code="unsupported_parameter")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise APIError(f"{where}.role={role!r} is not accepted; accepted: {', '.join(ROLES)}",
                           param=f"{where}.role", code="invalid_value")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"{where}.content: only text parts are accepted ({{\"type\": \"text\", \"text\": ...}})",
                               param=f"{where}.content", code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(f"{where}.content is not accepted; accepted: a string or a list of text parts",
                           param=f"{where}.content", code="invalid_value")
        entry = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            entry["name"] = m["name"]
        out.append(entry)
    return out


def parse_chat(body: dict, limits: Limits, render) -> Generate:
    """POST /v1/chat/completions. render: messages -> prompt token ids (the chat template)."""
    check_keys(body, CHAT_KEYS, CHAT_NEUTRAL)
    check_model(body, limits)
    messages = read_messages(body.get("messages"))
    max_tokens = read_int(body, "max_tokens", None, lo=1)
    newer = read_int(body, "max_completion_tokens", None, lo=1)
    if max_tokens is not None and newer is not None and max_tokens != newer:
        raise APIError(f"max_tokens={max_tokens} and max_completion_tokens={newer} disagree; give one of them",
                       param="max_completion_tokens", code="invalid_value")
    max_tokens = newer if newer is not None else max_tokens
    want = read_bool(body, "logprobs", False)
    top = read_int(body, "top_logprobs", None, lo=0, hi=CHAT_MAX_TOP_LOGPROBS)
    if top is not None and not want:
        raise APIError("top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
    logprobs = (top or 0) if want else None
    prompt_ids = render(messages)
    return _generate(body, limits, prompt_ids, max_tokens, logprobs, "messages")


def _generate(body, limits, prompt_ids, max_tokens, logprobs, prompt_param) -> Generate:
    """The request fields both endpoints share, read from `body` once the prompt and its token ids are known."""
    stream, include_usage = read_stream(body)
    return Generate(
        prompt_ids=prompt_ids,
        max_tokens=check_length(len(prompt_ids), max_tokens, limits, prompt_param),
        sampling=read_sampling(body, limits, logprobs),
        stop=read_stop(body),
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        priority=read_int(body, "priority", 0),
    )
