"""Continuous batching: requests join and leave the running batch at every step, each with its own KV cache.

    sched = Scheduler(engine, max_batch=8)          # any attention backend, cache codec, prefetch policy
    sched.start()                                   # a thread runs the step loop
    req = sched.submit(prompt_ids, max_tokens=64, sampling=SamplingParams(temperature=0))
    async for event in req.stream(): ...            # TokenEvent per token; the last one has a finish_reason
    req.result()                                    # the same, blocking (sync code, tests)

One step of the loop:
1. queued requests past `queue_timeout_s` fail with a 429-style error; cancelled ones leave (their slot is free now);
2. admission: waiting requests (highest priority first, then oldest) join while fewer than `max_batch` run and
   their KV fits `kv_budget_bytes` (the codec's declared `bytes_for` the request's prompt + max_tokens, so a
   compressing codec admits more requests into the same memory); a request that can never fit is refused at
   `submit`;
3. prefill: joining requests' prompts go through the engine in chunks of `prefill_chunk` tokens, at most
   `prefill_budget` tokens a step (at least one chunk), requests whose next chunks have one length batched into
   one forward (`Engine.forward_rows`, each row on its own cache), so a long prompt is spread over several steps
   and never stalls the running decodes for more than the budget; a request whose prompt is done samples its
   first token;
4. decode: every running request feeds its last token, all rows in one model step; each samples its next token
   (greedy, or its own seeded generator) and finishes on EOS ("stop") or `max_tokens` ("length"). Where the KV
   lives and how the step runs is engine/slots.py: each request's own cache of the run's codec and
   `Engine.decode_rows` (any plugins), or slot rows of one dense cache and the captured static step (when the
   plugins declare what the whole static step needs: the GPU's fast path).

Each request's cache is built by the run's codec and lives only as long as the request (or in the prefix cache):
results equal running the request alone with the same prefill chunk (greedy token for token up to the rounding of
batched matmuls; sampling the same tokens for the same seed). A finished request's cache goes to a prefix cache keyed
by its tokens, so a chat's next turn, whose prompt starts with this turn's prompt and answer, prefills only its new
tokens
(`Request.prefill_tokens`). The prefix cache holds at most `prefix_cache_bytes` and drops the least recently used.

Long inputs. A codec that declares a bound on the tokens a layer holds (`CacheCodec.max_held_tokens(block)`: the
streaming and h2o codecs with a token budget) keeps a request's KV under `bytes_for(max_held_tokens(prefill_chunk))`
however long its prompt and answer, so such a run admits prompts longer than the model's context or the KV memory:
its KV is reserved at that bound, and the prompt goes through the eviction codec one chunk at a time (each chunk
attends to what the cache kept plus itself; the codec evicts before the next chunk lands). Positions keep counting
past the context (RoPE of the absolute position, as the engine's eviction codecs do everywhere). Without such a
codec, prompt + max_tokens beyond the context is refused with one line naming `prompt` or `max_tokens` and what is
accepted.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from ollm_triton.cache.base import KVCache
from ollm_triton.decoding.greedy import sampling_probs
from ollm_triton.engine.slots import CacheRows, SlotRows

MAX_LOGPROBS = 20
# what a refusal of a too-long input suggests (the codecs that declare CacheCodec.max_held_tokens given a budget)
LONG_INPUT_CODECS = "+cache=streaming or +cache=h2o with cache.budget > 0"
LATENCY_WINDOW = 4096  # recent samples kept for the latency percentiles


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None  # None: a fresh seed per request
    logprobs: int | None = None  # None: no logprobs; n >= 0: the chosen token's plus its n most likely alternatives

    def check(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise AdmissionError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}", 400, "temperature")
        if not 0 < self.top_p <= 1:
            raise AdmissionError(f"top_p must be in (0, 1], got {self.top_p}", 400, "top_p")
        if self.top_k < 0:
            raise AdmissionError(f"top_k must be >= 0, got {self.top_k}", 400, "top_k")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise AdmissionError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}", 400, "logprobs")


@dataclass
class TokenEvent:
    token_id: int | None  # None on an event that only ends the request (cancelled, error)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # None while running; "length" | "stop" | "cancelled" | "error" at the end
    error: str | None = None
    status: int | None = None  # for an error: the HTTP status it maps to (429 queue timeout, 500 engine failure)


class AdmissionError(Exception):
    """A request refused at submit: `status` 429 (the queue is full) or 400 (it can never run here)."""

    def __init__(self, message: str, status: int = 429, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class Request:
    """One submitted request: its events as they come (`stream`, `result`), `cancel`, and its counters."""

    def __init__(self, prompt: list[int], max_tokens: int, sampling: SamplingParams, priority: int):
        self.id = f"req-{uuid.uuid4().hex[:16]}"
        self.prompt = list(prompt)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.priority = priority
        self.prompt_tokens = len(prompt)
        self.prefill_tokens = 0  # prompt tokens actually prefilled (fewer on a prefix-cache hit)
        self.submitted = time.monotonic()
        self.started: float | None = None  # when it joined the running batch
        self.first_token_at: float | None = None
        self.events: list[TokenEvent] = []
        self.cancelled = False
        self.finished = False
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def generated(self) -> list[int]:
        return [e.token_id for e in self.events if e.token_id is not None]

    def cancel(self) -> None:
        """Leave at the next step (its slot and cache are freed); the last event says "cancelled"."""
        self.cancelled = True

    def _emit(self, event: TokenEvent) -> None:
        with self._cond:
            self.events.append(event)
            if event.finish_reason is not None:
                self.finished = True
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)

    async def stream(self):
        """The request's TokenEvents as they come, on an asyncio loop; ends after the event with a finish_reason."""
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            with self._cond:
                ready = self.events[i:]
                waiter = None
                if not ready:
                    waiter = asyncio.Event()
                    self._waiters.append((loop, waiter))
            for event in ready:
                i += 1
                yield event
                if event.finish_reason is not None:
                    return
            if waiter is not None:
                await waiter.wait()

    def result(self, timeout: float | None = None) -> list[TokenEvent]:
        """Every event, once the request has finished (blocking). Raises TimeoutError after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished, timeout):
                raise TimeoutError(f"{self.id} did not finish within {timeout} s")
            return list(self.events)


@dataclass
class _Running:
    """A request in the batch: its cache, the prompt tokens still to prefill, the next token to feed."""

    req: Request
    cache: KVCache
    pending: list[int]
    gen: torch.Generator | None
    next_token: int | None = None
    reused: int = 0  # prompt tokens taken from the prefix cache


class PrefixCache:
    """Finished requests' caches keyed by the tokens they hold, least recently used dropped beyond `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self.hits = 0
        self.tokens_reused = 0

    def bytes(self) -> int:
        return sum(_cache_bytes(c) for c in self.entries.values())

    def put(self, tokens: list[int], cache: KVCache) -> None:
        if self.max_bytes <= 0 or cache.position != len(tokens):
            return
        self.entries[tuple(tokens)] = cache
        self.entries.move_to_end(tuple(tokens))
        while self.entries and self.bytes() > self.max_bytes:
            self.entries.popitem(last=False)

    def take(self, prompt: list[int]) -> tuple[KVCache, int] | None:
        """The cache sharing the longest prefix with `prompt` (removed from the store), cut to that prefix, and its
        length; at least one prompt token is left to prefill (its logits give the first new token)."""
        best, best_len = None, 0
        for key in self.entries:
            n = _common_prefix(key, prompt)
            if n > best_len:
                best, best_len = key, n
        best_len = min(best_len, len(prompt) - 1)
        if best is None or best_len <= 0:
            return None
        cache = self.entries.pop(best)
        try:
            cache.truncate(best_len)
        except NotImplementedError:  # a codec that cannot roll back (it evicted since): not reusable
            return None
        self.hits += 1
        self.tokens_reused += best_len
        return cache, best_len


def _rollback(cache: KVCache, position: int) -> None:
    """Put a cache back to `position` tokens after a step that failed part-way (some layers appended, some not)."""
    for layer in cache.layers:
        if layer.appended > position:
            layer.truncate(position)
    cache.position = position


def _keep_argmax(result, store: list, whole: bool):
    """rows.decode's (logits, argmax): keep the in-step argmax of a whole-batch call, return the logits."""
    logits, argmax = result
    if whole and argmax is not None:
        store.append(argmax)
    return logits


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _cache_bytes(cache: KVCache) -> int:
    return sum(layer.stored_bytes() for layer in cache.layers)


def _percentile(values, q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Scheduler:
    """Continuous batching over one Engine (see the module docstring)."""

    def __init__(self, engine, *, max_batch: int = 8, max_queue: int = 64, queue_timeout_s: float = 60.0,
                 prefill_chunk: int = 256, prefill_budget: int | None = None, kv_budget_bytes: int | None = None,
                 prefix_cache_bytes: int | None = None, max_context: int | None = None):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or queue_timeout_s <= 0:
            raise ValueError("need max_batch >= 1, max_queue >= 0, prefill_chunk >= 1, queue_timeout_s > 0")
        self.engine = engine
        self.max_batch, self.max_queue = max_batch, max_queue
        self.queue_timeout_s, self.prefill_chunk = queue_timeout_s, prefill_chunk
        self.prefill_budget = prefill_chunk if prefill_budget is None else prefill_budget  # prompt tokens a step
        self.max_context = int(max_context or engine.config.max_position_embeddings)
        self.kv_budget_bytes = kv_budget_bytes
        self._spec = engine.layer_spec(1, self.max_context)
        # tokens a request's cache layer can hold at most, whatever its length (None: all it has seen): blocks are
        # at most one prefill chunk (decode steps are one token)
        held = getattr(engine.codec, "max_held_tokens", None)
        self.held_bound: int | None = held(prefill_chunk) if held is not None else None
        default_prefix = 256 * 2**20 if kv_budget_bytes is None else kv_budget_bytes // 4
        self.prefix = PrefixCache(default_prefix if prefix_cache_bytes is None else prefix_cache_bytes)
        tok = engine.tokenizer
        self.eos_ids = set(getattr(tok, "eos_token_ids", None) or [])
        self.rows = SlotRows(engine, max_batch, self.max_context) if engine.fast_path.mode == "graph" \
            else CacheRows(engine)
        self._queue: list[tuple[int, int, Request]] = []  # heap of (-priority, order, request)
        self._order = itertools.count()
        self._running: list[_Running] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.started_at = time.monotonic()
        self.counts = {"submitted": 0, "refused": 0, "finished": 0, "cancelled": 0, "errors": 0, "timeouts": 0,
                       "generated_tokens": 0, "prefill_tokens": 0, "prefill_chunks": 0, "prefill_forwards": 0,
                       "steps": 0, "decode_rows": 0}
        self._ttft: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._itl: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._queue_s: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._last_token_at: dict[str, float] = {}

    # ---- submitting ------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams | None = None, *,
               priority: int = 0) -> Request:
        """Queue a request; raises AdmissionError (400: it can never run here; 429: the queue is full)."""
        sampling = sampling or SamplingParams()
        sampling.check()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise AdmissionError("the prompt is empty; give at least one token", 400, "prompt")
        vocab = self.engine.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise AdmissionError(f"prompt token ids must be in [0, {vocab})", 400, "prompt")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise AdmissionError(f"max_tokens must be an integer >= 1, got {max_tokens!r}", 400, "max_tokens")
        if len(prompt) + max_tokens > self.max_context and self.held_bound is None:
            field = "prompt" if len(prompt) >= self.max_context else "max_tokens"
            raise AdmissionError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                 f"context of {self.max_context} tokens; accepted: prompt + max_tokens <= "
                                 f"{self.max_context}, or a longer input with a cache codec that bounds the tokens "
                                 f"it holds ({LONG_INPUT_CODECS})", 400, field)
        need = self.kv_bytes(self.kv_tokens(len(prompt) + max_tokens))
        if self.kv_budget_bytes is not None and need > self.kv_budget_bytes:
            raise AdmissionError(f"the request's KV cache ({need / 2**20:.1f} MiB) exceeds the server's KV budget "
                                 f"({self.kv_budget_bytes / 2**20:.1f} MiB)", 400, "max_tokens")
        req = Request(prompt, max_tokens, sampling, priority)
        with self._lock:
            if self._stopping:
                raise AdmissionError("the server is shutting down", 503)
            free_slots = max(self.max_batch - len(self._running), 0)  # queued requests about to join
            if len(self._queue) >= self.max_queue + free_slots:
                self.counts["refused"] += 1
                raise AdmissionError(f"too many requests: {len(self._running)} running and {len(self._queue)} "
                                     f"queued (max_queue {self.max_queue}); retry later", 429)
            heapq.heappush(self._queue, (-priority, next(self._order), req))
            self.counts["submitted"] += 1
            self._lock.notify_all()
        return req

    # ---- the loop ----------------------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="ollm-scheduler", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    if not self._queue and not self._running:
                        self._lock.wait(timeout=0.1)
                        continue
                self.step()

    def shutdown(self, cancel: bool = True, timeout: float = 30.0) -> None:
        """Stop the loop. cancel: running and queued requests end with "cancelled" (else the loop first finishes
        them, within `timeout` seconds)."""
        if not cancel and self._thread is not None:
            deadline = time.monotonic() + timeout
            while (self._queue or self._running) and time.monotonic() < deadline:
                time.sleep(0.01)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            for _, _, req in self._queue:
                req._emit(TokenEvent(None, finish_reason="cancelled"))
            self._queue.clear()
            for run in list(self._running):
                self._leave(run)
                run.req._emit(TokenEvent(None, finish_reason="cancelled"))

    @torch.inference_mode()
    def step(self) -> bool:
        """One step of the loop (this module's docstring). Returns whether it did any work."""
        now = time.monotonic()
        self._expire_and_drop(now)
        self._admit(now)
        did = self._prefill()
        did = self._decode() or did
        self.counts["steps"] += int(did)
        return did

    def _expire_and_drop(self, now: float) -> None:
        with self._lock:
            kept = []
            for item in self._queue:
                req = item[2]
                if req.cancelled:
                    self._finish(req, "cancelled")
                elif now - req.submitted > self.queue_timeout_s:
                    self.counts["timeouts"] += 1
                    self._finish(req, "error", f"queued longer than queue_timeout_s ({self.queue_timeout_s} s)", 429)
                else:
                    kept.append(item)
            if len(kept) != len(self._queue):
                heapq.heapify(kept)
                self._queue = kept
        for run in [r for r in self._running if r.req.cancelled]:
            self._leave(run)
            self._finish(run.req, "cancelled")

    def kv_bytes(self, tokens: int) -> float:
        """The KV bytes a request of `tokens` tokens may take in the run's codec, every layer (admission); a hybrid
        model's linear-attention layers count their fixed-size state instead, and the earlier states the rows keep
        (Engine.cache_bytes)."""
        return self.engine.cache_bytes(tokens, max_len=self._spec.max_len, rollback_tokens=self.rows.rollback_tokens)

    def kv_tokens(self, tokens: int) -> int:
        """The most tokens a request of `tokens` tokens (prompt + max_tokens) holds in a layer of the run's codec."""
        return tokens if self.held_bound is None else min(tokens, self.held_bound)

    def _kv_reserved(self) -> float:
        return sum(self.kv_bytes(self.kv_tokens(r.req.prompt_tokens + r.req.max_tokens)) for r in self._running)

    def _admit(self, now: float) -> None:
        while True:
            with self._lock:
                if not self._queue or len(self._running) >= self.max_batch:
                    return
                req = self._queue[0][2]
                need = self.kv_bytes(self.kv_tokens(req.prompt_tokens + req.max_tokens))
                if self.kv_budget_bytes is not None and self._running and \
                        self._kv_reserved() + need > self.kv_budget_bytes:
                    return  # waits until running requests free their KV
                heapq.heappop(self._queue)
            req.started = now
            self._queue_s.append(now - req.submitted)
            hit = self.prefix.take(req.prompt)
            reused = hit[1] if hit is not None else 0
            if hit is not None and isinstance(self.rows, CacheRows):
                cache = hit[0]
            else:
                cache = self.rows.allocate(req.prompt_tokens + req.max_tokens)
                if hit is not None:
                    cache = self.rows.adopt(cache, hit[0])
            gen = None
            if req.sampling.temperature > 0:
                seed = req.sampling.seed if req.sampling.seed is not None else int(torch.seed() % 2**63)
                gen = torch.Generator(device=self.engine.device).manual_seed(seed)
            self._running.append(_Running(req, cache, req.prompt[reused:], gen, reused=reused))

    def _prefill(self) -> bool:
        """Whole chunks of `prefill_chunk` tokens (the last one shorter), at least one a step, at most
        `prefill_budget` tokens beyond it; joining requests whose next chunks have one length go through one batched
        forward. A request's chunk boundaries do not depend on what else runs, so its result equals the request
        alone through `Engine.prefill` with the same chunk (an eviction codec scores per chunk)."""
        budget, did = self.prefill_budget, False
        waiting = [r for r in self._running if r.pending]
        while waiting:
            n = min(self.prefill_chunk, len(waiting[0].pending))
            if did and n > budget:
                break
            group = [r for r in waiting if min(self.prefill_chunk, len(r.pending)) == n][: max(1, budget // n)]
            ids = torch.tensor([r.pending[:n] for r in group], dtype=torch.long)
            logits = self._rows_call(group, lambda rows, sel, ids=ids: self.rows.prefill([r.cache for r in rows],
                                                                                          ids[sel]))
            for r, row in zip(group, logits, strict=True):
                waiting.remove(r)
                if row is None:
                    continue
                r.pending = r.pending[n:]
                r.req.prefill_tokens += n
                self.counts["prefill_tokens"] += n
                if not r.pending:
                    self._take_token(r, row)
            budget -= n * len(group)
            self.counts["prefill_chunks"] += len(group)
            self.counts["prefill_forwards"] += 1
            did = True
        return did

    def _decode(self) -> bool:
        rows = [r for r in self._running if not r.pending and r.next_token is not None]
        if not rows:
            return False
        tokens = torch.tensor([r.next_token for r in rows], dtype=torch.long)
        argmax = []
        logits = self._rows_call(rows, lambda sub, sel: _keep_argmax(
            self.rows.decode([r.cache for r in sub], tokens[sel], []), argmax, len(sub) == len(rows)))
        argmax = argmax[0] if argmax else None
        self.counts["decode_rows"] += len(rows)
        for i, (r, row) in enumerate(zip(rows, logits, strict=True)):
            if row is not None:
                self._take_token(r, row, None if argmax is None else int(argmax[i]))
        return True

    def _rows_call(self, rows: list[_Running], call) -> list:
        """call(rows, index) -> logits [len(rows), V] for all rows at once; when it raises, every row's cache is
        rolled back to where it stood (a step can fail after some layers appended) and each row runs alone, so the
        failing request fails alone and the others get exactly the tokens they would have had. A cache that cannot
        roll back (an eviction codec that evicted in the failed step) fails its request too."""
        before = [r.cache.position for r in rows]
        try:
            return list(call(rows, slice(None)))
        except Exception:
            pass
        out = []
        for i, r in enumerate(rows):
            try:
                _rollback(r.cache, before[i])
                out.append(call([r], slice(i, i + 1))[0])
            except Exception as e:
                self._fail(r, e)
                out.append(None)
        return out

    def _take_token(self, run: _Running, logits: torch.Tensor, argmax: int | None = None) -> None:
        """Pick the next token from logits [V] (greedy: `argmax` when the step computed it), emit it, and finish
        the request or queue the token to feed."""
        req, s = run.req, run.req.sampling
        if s.temperature == 0:
            token = int(logits.argmax()) if argmax is None else argmax
        else:
            probs = sampling_probs(logits[None], s.temperature, s.top_k, s.top_p)
            token = int(torch.multinomial(probs, 1, generator=run.gen)[0, 0])
        logprob, top = None, None
        if s.logprobs is not None:
            lp = torch.log_softmax(logits.float(), dim=-1)
            logprob = float(lp[token])
            if s.logprobs > 0:
                values, ids = lp.topk(s.logprobs)
                top = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
            self._ttft.append(now - req.submitted)
        else:
            self._itl.append(now - self._last_token_at.get(req.id, now))
        self._last_token_at[req.id] = now
        self.counts["generated_tokens"] += 1
        done = "stop" if token in self.eos_ids else "length" if len(req.generated) + 1 >= req.max_tokens else None
        req._emit(TokenEvent(token, logprob, top, finish_reason=done))
        if done is None:
            run.next_token = token
            return
        self._last_token_at.pop(req.id, None)
        self.counts["finished"] += 1
        # the cache holds the prompt and every generated token but the last (never fed): keep it for a next turn
        self._leave(run, keep=req.prompt + req.generated[:-1])

    def _leave(self, run: _Running, keep: list[int] | None = None) -> None:
        """Take a request out of the batch and give its rows back; `keep`: the tokens its cache holds, to keep it
        in the prefix cache."""
        if run in self._running:
            self._running.remove(run)
        if keep is not None and self.prefix.max_bytes > 0:
            kept = self.rows.release(run.cache)
            if kept is not None:
                self.prefix.put(keep, kept)
        else:
            self.rows.free(run.cache)

    def _fail(self, run: _Running, error: Exception) -> None:
        if run in self._running:
            self._leave(run)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        self._finish(run.req, "error", f"{type(error).__name__}: {message}", 500)

    def _finish(self, req: Request, reason: str, error: str | None = None, status: int | None = None) -> None:
        if reason == "cancelled":
            self.counts["cancelled"] += 1
        elif reason == "error":
            self.counts["errors"] += 1
        self._last_token_at.pop(req.id, None)
        req._emit(TokenEvent(None, finish_reason=reason, error=error, status=status))

    # ---- statistics --------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Counters and latencies of the dynamic batch (exported on /metrics and by the benchmark)."""
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        running = list(self._running)
        steps = max(self.counts["steps"], 1)
        return {
            "running": len(running),
            "queued": len(self._queue),
            **{f"requests_{k}": v for k, v in self.counts.items() if k in ("submitted", "refused", "finished",
                                                                             "cancelled", "errors", "timeouts")},
            "generated_tokens": self.counts["generated_tokens"],
            "prefill_tokens": self.counts["prefill_tokens"],
            "prefill_rows_mean": self.counts["prefill_chunks"] / max(self.counts["prefill_forwards"], 1),
            "prefix_cache_hits": self.prefix.hits,
            "prefix_tokens_reused": self.prefix.tokens_reused,
            "requests_per_s": self.counts["finished"] / elapsed,
            "generated_tokens_per_s": self.counts["generated_tokens"] / elapsed,
            "batch_size_mean": self.counts["decode_rows"] / steps,
            # rows computed for no request (slot rows inside a bucket that are free or still prefilling)
            "padding_ratio": self.rows.padding_rows / max(self.rows.padding_rows + self.counts["decode_rows"], 1),
            "queue_s_p50": _percentile(self._queue_s, 0.5),
            "queue_s_p99": _percentile(self._queue_s, 0.99),
            "ttft_s_p50": _percentile(self._ttft, 0.5),
            "ttft_s_p99": _percentile(self._ttft, 0.99),
            "itl_s_p50": _percentile(self._itl, 0.5),
            "itl_s_p99": _percentile(self._itl, 0.99),
            "kv_bytes_in_use": self.rows.bytes_held([r.cache for r in running]),
            "kv_bytes_prefix_cache": self.prefix.bytes(),
            "kv_bytes_reserved": self._kv_reserved(),
        }


__all__ = ["AdmissionError", "PrefixCache", "Request", "SamplingParams", "Scheduler", "TokenEvent"]
