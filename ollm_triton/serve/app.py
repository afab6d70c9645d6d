"""The OpenAI-compatible HTTP layer over the scheduler (FastAPI).

    app = create_app(scheduler, tokenizer, model_name="tiny", chat_template=template)
    uvicorn.run(app)          # the lifespan starts the scheduler and shuts it down (SIGTERM included)

Endpoints: POST /v1/completions, POST /v1/chat/completions (`stream: true`: server-sent events in OpenAI's chunk
format, ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text).

What this layer owns beyond validation (protocol.py): text from tokens and stop strings (detokenize.py; a stop
string cancels the request in the scheduler and is trimmed), a client that disconnects cancels its request (its slot
is freed at the scheduler's next step), and errors as OpenAI's body with a 4xx/5xx status. A request that fails in
the engine fails alone (the scheduler ends only that request with "error"; this layer answers it with 500).
`usage.prompt_tokens_details.cached_tokens` (and the `x-prefill-tokens` header of a non-streamed answer) report the
prompt tokens the prefix cache supplied: a chat's second turn prefills only its new tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ollm_triton.serve.chat import ChatTemplate, ChatTemplateError
from ollm_triton.serve.detokenize import Detokenizer, NoTokenizer, TokenText
from ollm_triton.serve.metrics import make_registry
from ollm_triton.serve.protocol import APIError, Generate, Limits, parse_chat, parse_completion
from ollm_triton.serve.scheduler import AdmissionError, SamplingParams

log = logging.getLogger("ollm_triton.serve")
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


@dataclass
class ServeInfo:
    """What /v1/models, /health and /metrics say about the server."""

    model_name: str
    plugins: dict[str, str] = field(default_factory=dict)  # group -> plugin name
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "ollm-triton"


class ClientGone(Exception):
    """The client closed the connection while its request ran."""


def create_app(scheduler, tokenizer, *, model_name: str, chat_template: ChatTemplate | None = None,
               defaults: SamplingParams | None = None, plugins: dict[str, str] | None = None,
               shutdown_cancel: bool = True, monitor=None) -> FastAPI:
    """The FastAPI app serving `scheduler` (started by the app's lifespan, shut down with it); `monitor`: the
    system monitor whose readings /metrics exports (serve/metrics.py), None for none."""
    info = ServeInfo(model_name, dict(plugins or {}))
    limits = Limits(model=model_name, max_context=int(scheduler.max_context),
                    vocab_size=int(scheduler.engine.config.vocab_size), defaults=defaults or SamplingParams(),
                    long_inputs=getattr(scheduler, "held_bound", None) is not None)
    eos_ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    registry, http_count = make_registry(scheduler, {"model": model_name, **info.plugins},
                                         codec=info.plugins.get("cache", "unknown"), monitor=monitor)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        app.state.status = "ok"
        try:
            yield
        finally:  # uvicorn's shutdown (SIGTERM, Ctrl-C): requests still running end "cancelled"
            app.state.status = "stopped"
            await asyncio.to_thread(scheduler.shutdown, shutdown_cancel)

    app = FastAPI(title="ollm-triton", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.state.status = "starting"  # ok | shutting_down (server.py's graceful shutdown) | stopped
    app.state.requests = {}  # request id -> scheduler Request of the last answers (tests, debugging)

    # ---- errors: OpenAI's body everywhere ----------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}; routes: POST /v1/completions, "
                        "POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics",
                   405: f"method {request.method} is not accepted on {request.url.path}"}.get(e.status_code,
                                                                                          str(e.detail))
        return JSONResponse(APIError(message, status=e.status_code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        body = APIError(f"internal error: {type(e).__name__}: {e}", status=500).body()
        return JSONResponse(body, status_code=500)

    app.add_middleware(CountRequests, counter=http_count)

    # ---- info --------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        stats = scheduler.stats()
        ok = app.state.status == "ok"
        return JSONResponse({"status": app.state.status, "model": model_name, **info.plugins,
                             "running": stats.get("running"), "queued": stats.get("queued")},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": info.created,
                                            "owned_by": info.owned_by, "max_model_len": limits.max_context}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # ---- generation --------------------------------------------------------------------------------------------
    def render_chat(messages: list[dict[str, str]]) -> list[int]:
        if chat_template is None:
            raise APIError(f"the model {model_name!r} has no chat template (tokenizer_config.json chat_template); "
                           "use POST /v1/completions", param="messages", code="no_chat_template")
        try:
            return chat_template.encode(tokenizer, messages)
        except ChatTemplateError as e:
            raise APIError(str(e), param="messages", code="invalid_value") from None

    def encode(text: str) -> list[int]:
        try:
            return tokenizer.encode(text)
        except NoTokenizer as e:
            raise APIError(str(e), param="prompt", code="invalid_value") from None

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        gen = parse_completion(await read_body(request), limits, encode)
        return await respond(request, gen, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        gen = parse_chat(await read_body(request), limits, render_chat)
        return await respond(request, gen, chat=True)

    async def respond(request: Request, gen: Generate, *, chat: bool) -> Response:
        try:
            req = scheduler.submit(gen.prompt_ids, gen.max_tokens, gen.sampling, priority=gen.priority)
        except AdmissionError as e:
            raise admission_error(e) from None
        keep(app, req)
        answer = Answer(req, gen, Detokenizer(tokenizer, gen.stop, eos_ids, context_ids=gen.prompt_ids),
                        chat=chat, model=model_name)
        events = Watch(req, request)
        try:
            first = await anext(events)  # before any header: a queue timeout or an early error keeps its status
        except ClientGone:
            return Response(status_code=499)
        if first.finish_reason in ("error", "cancelled") and first.token_id is None:
            raise event_error(first)
        if gen.stream:
            events.poll = False
            return StreamingResponse(answer.sse(first, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": req.id})
        try:
            body = await answer.complete(first, events)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(body, headers={"X-Request-Id": req.id, "X-Prefill-Tokens": str(req.prefill_tokens),
                                           "X-Prompt-Tokens": str(req.prompt_tokens)})

    return app


class CountRequests:
    """ASGI middleware: ollm_http_requests_total{route, status} (a plain ASGI wrapper, so streams and disconnects
    pass through untouched)."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
            self.counter.labels(route, str(status[0])).inc()


KNOWN_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
KEEP_REQUESTS = 256


def keep(app: FastAPI, req) -> None:
    kept = app.state.requests
    kept[req.id] = req
    while len(kept) > KEEP_REQUESTS:
        kept.pop(next(iter(kept)))


async def read_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON ({e}); send a JSON object with "
                       "Content-Type: application/json", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(f"the request body is a JSON {type(body).__name__}; accepted: a JSON object",
                       code="invalid_json")
    return body


def admission_error(e: AdmissionError) -> APIError:
    status = int(getattr(e, "status", 429) or 429)
    if status == 429:
        return APIError(str(e), status=429, code="rate_limit_exceeded", headers={"Retry-After": "1"})
    if status == 503:
        return APIError(str(e), status=503, code="shutting_down")
    return APIError(str(e), status=status, param=getattr(e, "param", None), code="invalid_value")


def event_error(event) -> APIError:
    """The error a request's last event carries (queue timeout: 429; an engine failure: 500; shutdown: 503)."""
    if event.finish_reason == "cancelled":
        return APIError("the request was cancelled: the server is shutting down", status=503, code="cancelled")
    status = int(getattr(event, "status", None) or 500)
    code = "queue_timeout" if status == 429 else "engine_error"
    headers = {"Retry-After": "1"} if status == 429 else None
    return APIError(f"the request failed: {event.error or 'unknown error'}", status=status, code=code,
                    headers=headers)


class Watch:
    """A request's events as an async iterator. While `poll` is on (a non-streamed answer) the client's connection
    is checked every DISCONNECT_POLL_S and a disconnect cancels the request (ClientGone). A stream turns it off:
    there Starlette listens for the disconnect itself and cancels the stream, which cancels the request here."""

    def __init__(self, req, request: Request):
        self.req, self.request, self.poll = req, request, True
        self._stream = req.stream()
        self._done = False
        self._checked = time.monotonic()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        task = asyncio.ensure_future(anext(self._stream))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                now = time.monotonic()
                if self.poll and now - self._checked >= DISCONNECT_POLL_S:  # also while tokens keep coming
                    self._checked = now
                    if await self.request.is_disconnected():
                        raise ClientGone()
                if done:
                    break
        except BaseException:  # client gone, or this coroutine cancelled (a stream whose client left)
            task.cancel()
            self.close()
            raise
        try:
            event = task.result()
        except StopAsyncIteration:
            self._done = True
            raise
        if event.finish_reason is not None:
            self._done = True
        return event

    def close(self) -> None:
        """Cancel the request unless it has finished (its slot is freed at the scheduler's next step)."""
        self._done = True
        if not getattr(self.req, "finished", False):
            self.req.cancel()


class Answer:
    """Shapes one request's events into OpenAI's completion or chat body, or its stream of chunks."""

    def __init__(self, req, gen: Generate, detok: Detokenizer, *, chat: bool, model: str):
        self.req, self.gen, self.detok, self.chat, self.model = req, gen, detok, chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.generated = 0
        self.finish: str | None = None
        self.error = None

    def take(self, event) -> str:
        """One event -> the text it releases; sets `finish` at the end (a stop string cancels the request)."""
        text = ""
        if event.token_id is not None:
            self.generated += 1
            text = self.detok.add(event.token_id, event.logprob, event.top_logprobs)
        if self.detok.stopped and self.finish is None:
            self.finish = "stop"
            self.req.cancel()  # the stop string ended the answer: free the slot at the next step
        elif event.finish_reason is not None and self.finish is None:
            if event.finish_reason in ("length", "stop"):
                self.finish = event.finish_reason
                text += self.detok.finish()
            else:
                self.finish = event.finish_reason
                self.error = event
        return text

    def usage(self) -> dict[str, Any]:
        prompt = int(self.req.prompt_tokens)
        cached = max(prompt - int(getattr(self.req, "prefill_tokens", prompt)), 0)
        return {"prompt_tokens": prompt, "completion_tokens": self.generated, "total_tokens": prompt + self.generated,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # ---- logprobs in OpenAI's two shapes --------------------------------------------------------------------------
    def token_str(self, token_id: int) -> str:
        return self.detok.tokenizer.decode([token_id])

    def completion_logprobs(self, tokens: list[TokenText]) -> dict[str, Any]:
        return {
            "tokens": [self.token_str(t.token_id) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self.token_str(i): lp for i, lp in (t.top_logprobs or [])} for t in tokens]
            if self.gen.logprobs else None,
            "text_offset": [t.offset for t in tokens],
        }

    def chat_logprobs(self, tokens: list[TokenText]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
            s = self.token_str(token_id)
            return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(t.token_id, t.logprob),
                             "top_logprobs": [entry(i, lp) for i, lp in (t.top_logprobs or [])]} for t in tokens],
                "refusal": None}

    def logprobs(self, tokens: list[TokenText]) -> dict[str, Any] | None:
        if self.gen.logprobs is None:
            return None
        return self.chat_logprobs(tokens) if self.chat else self.completion_logprobs(tokens)

    # ---- one body ------------------------------------------------------------------------------------------------
    async def complete(self, first, events: Watch) -> dict[str, Any]:
        parts = [self.take(first)]
        if self.finish is None:
            async for event in events:
                parts.append(self.take(event))
                if self.finish is not None:
                    break
        events.close()
        if self.error is not None:
            raise event_error(self.error)
        text = "".join(parts)
        logprobs = self.logprobs(self.detok.answered())
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": logprobs, "finish_reason": self.finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": self.finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(), "system_fingerprint": None}

    # ---- a stream --------------------------------------------------------------------------------------------------
    def chunk(self, text: str | None, finish: str | None, tokens: list[TokenText], *, role: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": self.logprobs(tokens) if tokens else None,
                      "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": self.logprobs(tokens) if tokens else None,
                      "finish_reason": finish}
            obj = "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        if self.gen.include_usage:
            body["usage"] = None
        return sse(body)

    async def sse(self, first, events: Watch) -> AsyncIterator[str]:
        sent_tokens = 0
        try:
            if self.chat:
                yield self.chunk("", None, [], role=True)
            event: Any = first
            while True:
                text = self.take(event)
                if self.error is not None:
                    yield sse(event_error(self.error).body())
                    break
                if self.finish is not None:
                    tokens = self.detok.answered()[sent_tokens:]
                    if text or tokens:
                        yield self.chunk(text, None, tokens)
                    yield self.chunk(None if self.chat else "", self.finish, [])
                    if self.gen.include_usage:
                        yield sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else
                                   "text_completion", "created": self.created, "model": self.model, "choices": [],
                                   "usage": self.usage()})
                    break
                if text:
                    tokens = self.detok.released(sent_tokens)
                    sent_tokens += len(tokens)
                    yield self.chunk(text, None, tokens)
                event = await anext(events)
            yield "data: [DONE]\n\n"
        finally:
            events.close()  # cancels the request when the client left mid-stream (or a stop string ended it)


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
