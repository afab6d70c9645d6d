"""The draft-then-verify loop shared by `speculative`, `adaptive`, `prompt_lookup` and `self_speculative`.

One iteration, with `seq` holding the prompt and every emitted token, and the target cache holding all of them but
the last (the *pending* token, whose logits the target has not computed yet):

    drafter.propose(seq, m)             -> m draft tokens d_1..d_m (and the draft's distributions q_1..q_m)
    target.forward([pending, d_1..d_m]) -> p_0..p_m, one forward (the engine appends K/V first, so these are the
                                           logits of m+1 single steps)
    accept                              -> the leading drafts the target agrees with, plus one target token
    roll back                           -> both caches truncated to the accepted tokens (KVCache.truncate)

Greedy mode (temperature 0) accepts d_i while it equals argmax p_{i-1} and then emits argmax p_n: token for token
what `greedy` emits. Sampling mode uses the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023):
accept d_i with probability min(1, p(d_i) / q(d_i)); at the first rejection emit a sample of the normalised
residual max(0, p - q); after m acceptances emit a sample of p_m. Each emitted token is then distributed exactly
as the target's (filtered) distribution, the one `sample` draws from.

Lossy KV codecs: exact with `dense`; with a codec whose stored values depend on how tokens arrive (`quant`
compresses its oldest residual group when a verify block overflows the window, before the block's queries read it)
the tokens can differ from `greedy` with the same codec (measured in experiments/decoding/README.md).

Batches: every row shares one cache length, so an iteration keeps n = the fewest drafts any unfinished row accepted.
Rows that accepted more emit their (accepted) draft token at position n, which is itself a valid outcome of the
rule; since n depends only on the other rows' randomness, each row remains an exact sampler (and, in greedy mode,
identical to `greedy`). Batch 1 is where the speed-up is.

Host cost: on a GPU a verify block is one graph replay (~0.3 ms for the embedded pair), so the Python and small
tensor ops around it decide whether speculation beats greedy's 0.16 ms step. An iteration reads the device once
(`tolist` of what acceptance needs: the target's argmax, with the drafts when they live on the device, or the
sampled rule's accepted counts and outcome); acceptance, the eos rule (EmittedTokens) and the output stay on the
host from there. Prompt lookup drafts from a host copy of the sequence (`Drafter.host_tokens`), so its verify block
is one host-to-device copy; draft models' greedy chains are one replay (static_steps.Chain). Measured by
experiments/decoding/host_overhead.py (the model steps stubbed out).

Speculation off: a controller that asks for 0 drafts (`adaptive`, `+adapt=speculative`, when drafting does not pay)
gets, in greedy mode, up to OFF_BURST plain target steps that feed each argmax back on the device, with one sync for
all of them (`greedy_burst`): a one-token iteration's host work would otherwise cost about as much as the step
(~0.1 ms against 0.13 ms on the H100, experiments/decoding/README.md), and "off" would still be slower than greedy.
The burst is one observation of the controller (its per-token cost is the k = 0 cost it weighs drafting against).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ollm_triton.decoding.base import Drafter, Generation
from ollm_triton.decoding.greedy import sampling_probs
from ollm_triton.timing import Timer

OFF_BURST = 16  # target steps per host sync while speculation is off (see the module docstring)


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax); > 0 = sampling from `sampling_probs` (the `sample` decoder's distribution)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_probs(logits, self.temperature, self.top_k, self.top_p)

    def pick(self, logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """logits [B, V] -> tokens [B]."""
        if self.greedy:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1, generator=gen)[:, 0]


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Range checks shared by the strategies' config schemas (raise ValueError with the accepted range)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy, lossless against decoder=greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# ------------------------------------------------------------------------------------------------- acceptance rules


def accept_greedy(drafts: list[list[int]], target: list[list[int]]) -> list[int]:
    """Host lists, after the loop's one sync: drafts [B][m], target [B][m+1] the target's argmax at the pending
    token and after each draft. Returns accepted [B]: leading drafts equal to the target's argmax. A row that
    accepted a drafts emits target[:a+1] (target[i] == drafts[i] for i < a). A few ints per row: cheaper on the host
    than the five device ops (and their launches) of the same rule on tensors."""
    out = []
    for d, t in zip(drafts, target, strict=True):
        a = 0
        for x, y in zip(d, t, strict=False):  # t is one longer; stops at the first disagreement: at most m compares
            if x != y:
                break
            a += 1
        out.append(a)
    return out


def accept_sampled(
    p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule, every row independently.

    p: [B, m+1, V] target probabilities at the pending token and after each draft; q: [B, m, V] the draft's
    probabilities the drafts were sampled from, or None for deterministic drafts (q one-hot: prompt lookup);
    drafts: [B, m]. Returns (accepted [B], outcome [B, m+1]): a row that accepted a drafts emits outcome[:, :a+1]:
    drafts[:, :a] (accepted), then a sample of the residual at position a (or of p_m when a = m). Emitting only
    outcome[:, :n+1] for some n <= a chosen independently of the row (the batch rule) is also exact: it is the rule
    run with n drafts, whose last token is then drawn from p_n by accept-or-residual.
    """
    b, m1, v = p.shape
    m = m1 - 1
    if q is None:
        q = torch.nn.functional.one_hot(drafts, v).to(p.dtype)
    p_d = p[:, :m].gather(-1, drafts[..., None])[..., 0]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(b, m, generator=gen, device=p.device, dtype=p.dtype)
    ok = u * q_d < p_d  # u < p/q without dividing by a q that may underflow to 0
    accepted = ok.long().cumprod(-1).sum(-1)
    # corrections at every position: residual max(0, p_i - q_i) for i < m, p_m itself after the last draft
    residual = torch.cat((torch.clamp(p[:, :m] - q, min=0.0), p[:, m:]), dim=1)
    mass = residual.sum(-1, keepdim=True)
    # where p == q (mass 0) rejection has probability 0; fall back to p so multinomial gets a distribution
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)
    correction = torch.multinomial(residual.reshape(b * m1, v), 1, generator=gen).view(b, m1)
    outcome = correction.clone()
    outcome[:, :m] = torch.where(ok, drafts, correction[:, :m])
    return accepted, outcome


# ----------------------------------------------------------------------------------------------- output and timing


class EmittedTokens:
    """The [B, max_new] output with `greedy`'s eos rule: a row that emitted eos_id keeps emitting it, and the
    output ends at the first column where every row is done (or at max_new). Kept on the host as lists of ints,
    filled from the loop's one sync per iteration (the eos rule then costs no device op and no extra sync)."""

    def __init__(self, batch: int, max_new: int, eos_id: int | None):
        self.rows: list[list[int]] = [[] for _ in range(batch)]
        self.max_new = max_new
        self.eos_id = eos_id
        self.count = 0
        self.done = [False] * batch
        self.finished = max_new <= 0

    @property
    def remaining(self) -> int:
        return self.max_new - self.count

    def extend(self, chunk: list[list[int]]) -> None:
        """chunk: [B][c] tokens in order (every row c long); keeps what fits and applies the eos rule."""
        c = min(len(chunk[0]), self.remaining)
        if self.eos_id is None or c == 0:
            for row, new in zip(self.rows, chunk, strict=True):
                row.extend(new[:c])
        else:
            eos, last = self.eos_id, -1  # last: the column at which the last row to finish emitted eos
            for r, new in enumerate(chunk):
                new = new[:c]
                if self.done[r]:
                    new = [eos] * c
                elif eos in new:
                    j = new.index(eos)
                    new = new[: j + 1] + [eos] * (c - j - 1)
                    self.done[r] = True
                    last = max(last, j)
                self.rows[r].extend(new)
            if all(self.done):  # the output ends where its last row finished
                c = last + 1
                for row in self.rows:
                    del row[self.count + c :]
                self.finished = True
        self.count += c
        if self.count >= self.max_new:
            self.finished = True

    def result(self, device: torch.device) -> torch.Tensor:
        """[B, N] long on `device`."""
        return torch.tensor(self.rows, dtype=torch.long, device=device).view(len(self.rows), self.count)


# --------------------------------------------------------------------------------------------------- the loop


class FixedCandidates:
    """The number of drafts per iteration for `speculative`, `prompt_lookup`, `self_speculative`."""

    needs_timing = False  # the loop reads the phase clock for observe() only when a controller uses it

    def __init__(self, k: int):
        self.k = k
        self.max_candidates = k

    def candidates(self) -> int:
        return self.k

    def observe(self, drafted: int, accepted: int, draft_s: float, iteration_s: float, emitted: int) -> None:
        """After each iteration: drafts verified and accepted, seconds spent drafting, the iteration's wall time
        (between the loop's host syncs), and tokens emitted so far."""


@dataclass
class LoopStats:
    iterations: int = 0
    drafted: int = 0  # drafts verified
    accepted: int = 0  # drafts accepted (the batch rule's n)
    target_forwards: int = 0
    off_bursts: int = 0  # bursts of plain steps while speculation was off (each one controller observation)
    off_steps: int = 0  # the target steps of those bursts (also counted in iterations and target_forwards)


def speculate(
    engine,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_id: int | None,
    drafter: Drafter,
    sampling: Sampling,
    seed: int,
    controller=None,
    path: str = "eager",
    keep_state: dict | None = None,
) -> Generation:
    """Draft-then-verify decoding (this module's docstring). prompt_ids: [B, P]. path: "eager", "static" or
    "graph" (static_steps.resolve_fast_path). Returns Generation with tokens [B, N] and the counters every speculative
    strategy reports."""
    from ollm_triton.decoding.targets import make_target

    controller = controller or FixedCandidates(1)
    ids = prompt_ids.to(engine.device)
    batch, prompt_len = ids.shape
    if prompt_len < 1:
        raise ValueError("speculative decoding needs a prompt of at least one token")
    max_len = prompt_len + max(max_new_tokens, 1) + controller.max_candidates + 2
    device = engine.device
    gen = None if sampling.greedy else torch.Generator(device=device).manual_seed(seed)
    out = EmittedTokens(batch, max_new_tokens, eos_id)
    # the device copy of the sequence feeds device-side drafters (draft models); a host-side drafter (prompt
    # lookup) gets the tokens on the host instead (`extend`) and the device copy is only written at the end
    host_drafter = drafter.host_tokens
    seq = torch.empty(batch, max_len, dtype=torch.long, device=device)
    seq[:, :prompt_len] = ids
    emitted_rows: list[list[int]] = [[] for _ in range(batch)]  # every emitted token before the eos rule
    stats = LoopStats()
    clock = Timer(device)
    with torch.inference_mode():
        target = make_target(engine, batch, max_len, path)
        with Timer(device) as prefill:
            if max_new_tokens > 0:
                first = sampling.pick(target.prefill(ids), gen)
                stats.target_forwards = 1
                drafter.start(ids, target, max_len, gen)
                seq[:, prompt_len] = first
                chunk = [[t] for t in first.tolist()]
                out.extend(chunk)
                for row, new in zip(emitted_rows, chunk, strict=True):
                    row.extend(new)
                if host_drafter:
                    drafter.extend([p + c for p, c in zip(ids.tolist(), chunk, strict=True)])
        seq_len = prompt_len + 1
        pending = [row[-1] for row in emitted_rows]  # the last token of each row, whose logits come next
        # graphs of the usual block are captured here, outside the timers; any captured later (adaptive's other
        # block lengths) are taken out of decode_s and reported as graph_capture_s
        if not out.finished:
            target.prepare(controller.k + 1)
            drafter.prepare()
        capture_before = target.capture_s + drafter.capture_s
        with Timer(device) as decode:
            wall = time.perf_counter()
            while not out.finished:
                start = clock.mark("draft")
                m = controller.candidates()
                if m == 0 and sampling.greedy:  # speculation off: plain steps, one sync per burst
                    steps = min(OFF_BURST, out.remaining)
                    clock.mark("verify")
                    chunk = greedy_burst(target, seq, seq_len, pending, steps)
                    clock.mark("accept")
                    n, forwards = 0, steps
                    stats.off_bursts += 1
                    stats.off_steps += steps
                else:
                    if not target.fixed_width:  # no drafts past the end (a static target keeps one block length)
                        m = min(m, out.remaining - 1)
                    drafts, q = drafter.propose(seq, seq_len, m, gen) if m > 0 else (None, None)
                    if not target.fixed_width:
                        m = 0 if drafts is None else len(drafts[0]) if host_drafter else drafts.shape[1]
                    if host_drafter:  # the whole block [pending, drafts] is known here: one host-to-device copy
                        # (a static target keeps one block length: rows with fewer drafts repeat the pending token;
                        # any draft is safe, the target only accepts agreement)
                        host_block = [[t] + (d or [])[:m] + [t] * (m - len(d or ())) for t, d in
                                      zip(pending, drafts or [None] * batch, strict=True)]
                        block = torch.tensor(host_block, dtype=torch.long)  # the target copies it in
                        drafts = None
                    else:
                        if drafts is None:
                            drafts = seq.new_empty(batch, 0)
                        root = seq[:, seq_len - 1 : seq_len]
                        if target.fixed_width and drafts.shape[1] < m:
                            drafts = torch.cat((drafts, root.expand(batch, m - drafts.shape[1])), dim=1)
                        block = torch.cat((root, drafts), dim=1)
                        host_block = None
                    clock.mark("verify")
                    logits = target.verify(block)
                    clock.mark("accept")
                    # the iteration's one host sync: what acceptance needs, read in one device-to-host copy
                    if sampling.greedy:
                        outcome = target.argmax(logits)  # [B, m+1]
                        if host_block is None:
                            host = torch.cat((block, outcome), dim=1).tolist()
                            host_block, target_rows = [r[: m + 1] for r in host], [r[m + 1 :] for r in host]
                        else:
                            target_rows = outcome.tolist()
                        accepted = accept_greedy([r[1:] for r in host_block], target_rows)
                    else:
                        if drafts is None:  # host drafts: the device copy the sampled rule compares with
                            drafts = block[:, 1:].to(device)
                        acc, outcome = accept_sampled(sampling.probs(logits), q, drafts, gen)
                        host = torch.cat((acc[:, None], outcome), dim=1).tolist()
                        accepted, target_rows = [r[0] for r in host], [r[1:] for r in host]
                    # finished rows emit eos whatever they accept, so they do not hold the batch back
                    n = min((a for a, done in zip(accepted, out.done, strict=True) if not done), default=m)
                    chunk = [r[: n + 1] for r in target_rows]
                    if not host_drafter:
                        seq[:, seq_len : seq_len + n + 1] = outcome[:, : n + 1]
                    target.commit(seq_len + n)  # pending + n accepted drafts; the rejected ones never happened
                    drafter.commit(seq_len + n)
                    forwards = 1
                if host_drafter:
                    drafter.extend(chunk)
                for row, new in zip(emitted_rows, chunk, strict=True):
                    row.extend(new)
                pending = [r[-1] for r in chunk]
                seq_len += len(chunk[0])
                out.extend(chunk)
                stats.iterations += forwards
                stats.target_forwards += forwards
                stats.drafted += m
                stats.accepted += n
                now = time.perf_counter()
                draft_s = clock.phases(start).get("draft", 0.0) if controller.needs_timing else 0.0
                # a burst is one observation at its cost per step: the k = 0 cost drafting is weighed against
                controller.observe(m, n, draft_s, (now - wall) / forwards, out.count)
                wall = now
            clock.mark("end")
        capture_s = target.capture_s + drafter.capture_s - capture_before
        if host_drafter and emitted_rows[0]:
            seq[:, prompt_len:seq_len] = torch.tensor(emitted_rows, dtype=torch.long, device=device)
        if keep_state is not None:  # tests compare the final caches with a fresh run
            keep_state.update(target=target, seq=seq[:, :seq_len], drafter=drafter)
    phases = clock.phases()
    counters = speculation_counters(out, stats, prefill.seconds, decode.seconds - capture_s, phases, drafter)
    counters.update(graph_capture_s=capture_s, fast_path_graph=int(path == "graph"),
                    fast_path_static=int(path != "eager"))
    return Generation(out.result(device), counters)


def greedy_burst(target, seq: torch.Tensor, seq_len: int, pending: list[int], steps: int) -> list[list[int]]:
    """`steps` single-token target steps from the pending tokens, each feeding its argmax back on the device (no
    host sync between them); the tokens land in seq[:, seq_len : seq_len + steps] -> [B][steps] on the host. Nothing
    is rolled back: after each step the target holds every token but the one it just predicted, so no commit."""
    tok = torch.tensor(pending, dtype=torch.long, device=seq.device)[:, None]
    for i in range(steps):
        logits = target.verify(tok)
        tok = target.argmax(logits)[:, :1]
        seq[:, seq_len + i] = tok[:, 0]
    return seq[:, seq_len : seq_len + steps].tolist()


def speculation_counters(out: EmittedTokens, stats: LoopStats, prefill_s: float, decode_s: float,
                         phases: dict[str, float], drafter: Drafter) -> dict[str, float]:
    """The counters every speculative strategy reports (see base.Generation)."""
    n = max(out.count, 1)
    batch = len(out.rows)
    iters = max(stats.iterations, 1)
    draft_forwards = drafter.forwards
    return {
        "generated_tokens": int(out.count * batch),
        "acceptance_rate": stats.accepted / stats.drafted if stats.drafted else 0.0,
        "mean_accepted_length": (stats.accepted + stats.iterations) / iters,  # tokens per verify forward
        "mean_drafted": stats.drafted / iters,
        "iterations": int(stats.iterations),
        "target_forwards": int(stats.target_forwards),
        "target_forwards_per_token": stats.target_forwards / n,
        "draft_forwards": int(draft_forwards),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "draft_prefill_s": drafter.prefill_s,
        "draft_s": phases.get("draft", 0.0),
        "verify_s": phases.get("verify", 0.0),
        "accept_s": phases.get("accept", 0.0),
        "draft_step_s": phases.get("draft", 0.0) / draft_forwards if draft_forwards else 0.0,
        "verify_step_s": phases.get("verify", 0.0) / iters,
        "speculation_off_steps": int(stats.off_steps),  # plain target steps while a controller asked for 0 drafts
        "speculation_off_bursts": int(stats.off_bursts),
        **drafter.counters(),
    }
