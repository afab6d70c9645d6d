"""Where draft tokens come from: a draft model, the target's own first layers, or the text itself (n-gram lookup).

Also resolves a draft-model source (`embedded:NAME`, a checkpoint directory, `random:<json|preset>`) into an
Engine built on the target's device and dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ollm_triton.cache.base import KVCache
from ollm_triton.decoding.base import Drafter
from ollm_triton.decoding.speculation import Sampling
from ollm_triton.timing import Timer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CONF_MODELS = Path(__file__).resolve().parents[1] / "conf" / "model"
SOURCE_FORMS = "embedded:NAME, a checkpoint directory, or random:<json of HF config fields | conf/model preset>"


def draft_source(spec: str):
    """(what load_engine takes, seed) for a draft-model source string.

    embedded:NAME      -> ollm_triton/assets/NAME (a checkpoint directory shipped with the package)
    random:{...}       -> seeded random weights from a JSON object of Hugging Face config fields ("seed" optional)
    random:PRESET      -> the `arch` of conf/model/PRESET.yaml (a random-weight model option)
    anything else      -> a checkpoint directory (or a hub id when online)
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"draft must be a non-empty string: {SOURCE_FORMS}")
    if spec.startswith("embedded:"):
        path = ASSETS / spec.split(":", 1)[1]
        if not (path / "config.json").is_file():
            raise ValueError(f"draft model {spec!r} is not in this checkout ({path}); train it with "
                             f"scripts/train_tiny_lm.py or pass draft=<{SOURCE_FORMS}>")
        return str(path), 0
    if spec.startswith("random:"):
        body = spec.split(":", 1)[1].strip()
        if body.startswith("{"):
            try:
                fields = json.loads(body)
            except json.JSONDecodeError as e:
                raise ValueError(f"draft {spec!r}: the JSON after random: does not parse ({e})") from None
        else:
            preset = CONF_MODELS / f"{body}.yaml"
            if not preset.is_file():
                known = sorted(p.stem for p in CONF_MODELS.glob("*.yaml")) if CONF_MODELS.is_dir() else []
                raise ValueError(f"draft {spec!r}: no preset conf/model/{body}.yaml; presets: {', '.join(known)}")
            from omegaconf import OmegaConf

            fields = OmegaConf.to_container(OmegaConf.load(preset), resolve=True).get("arch")
            if not fields:
                raise ValueError(f"draft {spec!r}: conf/model/{body}.yaml has no `arch` (not a random-weight model)")
        seed = int(fields.pop("seed", 0))
        return fields, seed
    return spec, 0


def load_draft_engine(spec: str, target):
    """The draft Engine for `spec` on the target's device and dtype, with the baseline plugins (sdpa, dense,
    resident): the draft's attention is not the subject of a run, and a small model stays resident."""
    from ollm_triton.engine import load_engine

    source, seed = draft_source(spec)
    return load_engine(source, device=target.device, dtype=target.dtype, seed=seed,
                       decode_max_tokens=target.decode_max_tokens)


def fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Draft logits [..., Vd] over the target's vocabulary [..., V]: extra draft entries dropped, missing ones -inf
    (checkpoints often pad their vocabularies to different multiples)."""
    vd = logits.shape[-1]
    if vd == vocab:
        return logits
    if vd > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - vd), float("-inf"))
    return torch.cat((logits, pad), dim=-1)


def draw_chain(step, logits: torch.Tensor, m: int, sampling: Sampling, gen):
    """m tokens from a model one step at a time. logits [B, V] predict the first; step(tokens [B]) -> logits [B, V]
    of the next. Returns (tokens [B, m], q [B, m, V] or None in greedy mode)."""
    tokens, probs = [], []
    for i in range(m):
        if sampling.greedy:
            t = logits.argmax(-1)
        else:
            pr = sampling.probs(logits)
            t = torch.multinomial(pr, 1, generator=gen)[:, 0]
            probs.append(pr)
        tokens.append(t)
        if i < m - 1:
            logits = step(t)
    return torch.stack(tokens, 1), (torch.stack(probs, 1) if probs else None)


class ModelDrafter(Drafter):
    """A separate draft model with its own cache. The cache lags the sequence by the tokens it has not seen; each
    proposal first feeds those (1 or 2 tokens: the pending one, and the last accepted draft after a full accept)."""

    def __init__(self, draft_engine, vocab: int, sampling: Sampling):
        self.engine = draft_engine
        self.vocab = vocab
        self.sampling = sampling
        self.cache = None
        self.prefill_s = 0.0
        self.forwards = 0

    def start(self, prompt, target, max_len, gen):
        with Timer(self.engine.device) as t:
            self.cache = self.engine.new_cache(batch=prompt.shape[0], max_len=max_len)
            self.engine.forward(prompt, self.cache, last_only=True)
        self.prefill_s = t.seconds
        self.forwards = 0

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return fit_vocab(self.engine.forward(ids, self.cache, last_only=True)[:, -1], self.vocab)

    def propose(self, seq, seq_len, m, gen):
        logits = self._forward(seq[:, self.cache.position : seq_len])
        return draw_chain(lambda t: self._forward(t[:, None]), logits, m, self.sampling, gen)

    def commit(self, valid_len):
        if self.cache.position > valid_len:
            self.cache.truncate(valid_len)


class LayerSkipDrafter(Drafter):
    """The target's first k layers as the draft, reading and writing the target cache's first k layers.

    Those layers' K/V for accepted tokens are exactly the target's (same weights, same inputs), so the draft needs
    no prefill and no cache of its own: it appends its drafts to the shared layers and truncates them back to the
    target's length before the target verifies.
    """

    def __init__(self, engine, num_layers: int, sampling: Sampling):
        self.engine = engine
        self.num_layers = num_layers
        self.sampling = sampling
        self.forwards = 0

    def start(self, prompt, target, max_len, gen):
        self.target_cache = target.cache
        self.view = KVCache(target.cache.layers[: self.num_layers])
        self.forwards = 0

    def _forward(self, ids):
        """The target's own model step through its first k layers, then its final norm and head (early exit)."""
        self.forwards += 1
        return self.engine.forward(ids, self.view, last_only=True, num_layers=self.num_layers)[:, -1]

    def propose(self, seq, seq_len, m, gen):
        base = self.target_cache.position
        self.view.position = base
        logits = self._forward(seq[:, base:seq_len])
        out = draw_chain(lambda t: self._forward(t[:, None]), logits, m, self.sampling, gen)
        self.view.truncate(base)  # the target's verify forward re-appends these layers' K/V
        return out


class LookupDrafter(Drafter):
    """Drafts the tokens that followed the most recent earlier occurrence of the sequence's last n-gram
    (n from max_ngram down to min_ngram), in the prompt or the generated text. Deterministic drafts (q one-hot).

    Works on the host (`host_tokens`): each row keeps its tokens as a list and an index n-gram -> the position right
    after its latest occurrence, updated with each iteration's new tokens (a few dict writes per token) instead of
    re-scanning the sequence; a proposal is at most max_ngram - min_ngram + 1 dict lookups per row.
    """

    host_tokens = True

    def __init__(self, max_ngram: int, min_ngram: int):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.forwards = 0
        self.lookups = 0
        self.hits = 0

    def start(self, prompt, target, max_len, gen):
        self.rows: list[list[int]] = [[] for _ in range(prompt.shape[0])]
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in self.rows]
        self.lookups = self.hits = 0

    def extend(self, tokens):
        for row, index, new in zip(self.rows, self.index, tokens, strict=True):
            old = len(row)
            row.extend(new)
            for n in range(self.min_ngram, self.max_ngram + 1):
                # the n-grams that now have a continuation: the one at position i (i >= n) is row[i-n:i]; later
                # positions overwrite earlier ones, so each key keeps its most recent occurrence. zip builds the
                # tuples in C: no Python loop per token
                first = max(old, n)
                if first >= len(row):  # no n-gram of this length with a continuation yet (slices would wrap)
                    continue
                keys = zip(*(row[first - n + j : len(row) - n + j] for j in range(n)), strict=True)
                index.update(zip(keys, range(first, len(row)), strict=True))

    def propose(self, seq, seq_len, m, gen):
        drafts = []
        for row, index in zip(self.rows, self.index, strict=True):
            length = len(row)
            if length != seq_len:
                raise RuntimeError(f"prompt lookup holds {length} tokens of a row, the loop {seq_len}: extend() missed")
            found = []
            # windows that end before the last token: the tail itself has no continuation yet, so is never found
            for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
                i = index.get(tuple(row[length - n :]))
                if i is not None:
                    found = row[i : i + m]
                    break
            drafts.append(found)
        self.lookups += len(drafts)
        self.hits += sum(len(d) > 0 for d in drafts)
        width = max(len(d) for d in drafts)
        if width == 0:
            return None, None
        # shorter rows are padded with their last token: any draft is safe, the target only accepts agreement
        rows = self.rows
        return [d + [d[-1] if d else row[-1]] * (width - len(d)) for d, row in zip(drafts, rows, strict=True)], None

    def counters(self):
        return {"lookup_hit_rate": self.hits / self.lookups if self.lookups else 0.0}


class StaticModelDrafter(Drafter):
    """ModelDrafter on static buffers (_static.py): each draft token is one replayed single-token step of the
    draft model (a CUDA graph on the GPU); rolling back only lowers `held`, the slot the next step writes."""

    def __init__(self, draft_engine, vocab: int, sampling: Sampling, capture: bool):
        self.engine = draft_engine
        self.vocab = vocab
        self.sampling = sampling
        self.capture = capture
        self.prefill_s = 0.0
        self.forwards = 0

    @property
    def capture_s(self) -> float:
        return self.sm.capture_s if getattr(self, "sm", None) is not None else 0.0

    def start(self, prompt, target, max_len, gen):
        from ollm_triton.decoding.static_steps import static_model

        self.sm = static_model(self.engine, prompt.shape[0], max_len, self.capture)
        self.step = self.sm.step(1)
        with Timer(self.engine.device) as t:
            self.sm.prefill(prompt)
        self.held = prompt.shape[1]
        self.prefill_s = t.seconds
        self.forwards = 0

    def prepare(self, catch_up: int = 2):
        """Capture the single-token step and the catch-up steps of 2..catch_up tokens."""
        for t in range(1, catch_up + 1):
            st = self.sm.step(t)
            st.base.fill_(self.held)
            self.sm.prepare(st)

    def _feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] at slot `held` -> the draft's logits [B, V] for the next token."""
        st = self.step
        st.tokens.copy_(tokens[:, None])
        st.base.fill_(self.held)
        self.sm.run(st)
        self.held += 1
        self.forwards += 1
        return fit_vocab(st.logits[:, 0], self.vocab)

    def catch_up(self, seq: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Feed the tokens the draft has not seen (the pending one, and the accepted drafts it never fed) in one
        step -> logits [B, V] after the last."""
        r = seq_len - self.held
        if r == 1:
            return self._feed(seq[:, self.held])
        st = self.sm.step(r)
        st.tokens.copy_(seq[:, self.held : seq_len])
        st.base.fill_(self.held)
        self.sm.run(st)
        self.held = seq_len
        self.forwards += 1
        return fit_vocab(st.logits[:, -1], self.vocab)

    chain_layers: int | None = None  # layers a draft step runs (None: all of the draft model's)

    def propose(self, seq, seq_len, m, gen):
        # greedy drafts whose argmax the step already computes (a draft vocabulary no larger than the target's: the
        # -inf padding of fit_vocab cannot move it): the catch-up and all m drafts in one replay
        if self.sampling.greedy and self.engine.config.vocab_size <= self.vocab:
            r = seq_len - self.held
            ch = self.sm.chain(r, m, self.chain_layers)
            ch.first.tokens.copy_(seq[:, self.held : seq_len])
            ch.first.base.fill_(self.held)
            self.sm.run_chain(ch)
            self.held = seq_len + m - 1  # the last draft is not fed: its K/V would be rolled back or rewritten
            self.forwards += m
            return ch.drafts, None  # a static buffer: read before the next proposal (the loop does)
        return draw_chain(self._feed, self.catch_up(seq, seq_len), m, self.sampling, gen)

    def commit(self, valid_len):
        self.held = min(self.held, valid_len)


class StaticLayerSkipDrafter(StaticModelDrafter):
    """LayerSkipDrafter on the target's static buffers: single-token steps through the first k layers write those
    layers' K/V at the slots the target's verify block then overwrites, so nothing is ever rolled back."""

    def __init__(self, engine, num_layers: int, sampling: Sampling):
        self.engine = engine
        self.num_layers = num_layers
        self.vocab = engine.config.vocab_size
        self.sampling = sampling
        self.prefill_s = 0.0
        self.forwards = 0

    @property
    def capture_s(self) -> float:
        return 0.0  # the target's StaticModel counts its captures

    def start(self, prompt, target, max_len, gen):
        self.target = target
        self.sm = target.sm
        self.step = self.sm.step(1, layers=self.num_layers)
        self.chain_layers = self.num_layers
        self.held = target.length
        self.forwards = 0

    def propose(self, seq, seq_len, m, gen):
        self.held = self.target.length  # = seq_len - 1: the pending token goes to the target's next slot
        return super().propose(seq, seq_len, m, gen)


class DraftEngineHolder:
    """Loads the draft Engine on first use and keeps it while the target's device and dtype stay the same, so the
    tasks of a run (and repeated generate calls) share one; `close()` frees it. A draft Engine passed in by the
    caller (`draft_engine=`) is used as is and never closed here."""

    def __init__(self, spec: str, engine=None):
        self.spec = spec
        self.given = engine
        self._key = None
        self._engine = None

    def get(self, target):
        if self.given is not None:
            return self.given
        key = (self.spec, str(target.device), target.dtype)
        if self._key != key:
            self.close()
            self._engine = load_draft_engine(self.spec, target)
            self._key = key
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine, self._key = None, None


def model_drafter(draft_engine, vocab: int, sampling: Sampling, path: str) -> Drafter:
    """The draft-model drafter for the target's path ("eager", "static", "graph")."""
    if path == "eager":
        return ModelDrafter(draft_engine, vocab, sampling)
    return StaticModelDrafter(draft_engine, vocab, sampling, capture=path == "graph")


def layer_skip_drafter(engine, num_layers: int, sampling: Sampling, path: str) -> Drafter:
    if path == "eager":
        return LayerSkipDrafter(engine, num_layers, sampling)
    return StaticLayerSkipDrafter(engine, num_layers, sampling)
