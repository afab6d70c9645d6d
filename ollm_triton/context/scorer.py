"""The small language model that scores a prompt for the compressors (LLMLingua's "small LM"): per-token
self-information and the conditional surprisal of a question given a piece of context.

It is an Engine with the baseline plugins (dense cache, sdpa), built from `embedded:NAME`, a checkpoint directory or
`random:...` (the draft-model source forms of decoding/drafters.py), on the target's device and dtype. It must
tokenize text exactly as the target does: the ids it scores are the target's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PROBE_TEXT = "def probe(x):\n    return {'key': x} # 12345\n"  # code, digits, newline: what the prompts hold
SCORE_PIECE = 1024  # tokens per scoring forward: logits of [piece, vocab] float32 stay small at any prompt length


class Scorer:
    """engine: the scorer's Engine. newline: bool [V], tokens whose text holds a newline (chunk boundaries)."""

    def __init__(self, spec: str, target: Any = None):
        from ollm_triton.decoding.drafters import draft_source
        from ollm_triton.engine import load_engine

        source, seed = draft_source(spec)  # ValueError naming the forms it accepts
        device = target.device if target is not None else "cpu"
        dtype = target.dtype if target is not None else torch.float32
        self.spec = spec
        self.engine = load_engine(source, device=device, dtype=dtype, seed=seed)
        tok = self.engine.tokenizer
        target_tok = getattr(target, "tokenizer", None)
        if target_tok is not None and tok is not None and _probe(tok) != _probe(target_tok):
            raise ValueError(f"context scorer {spec!r} tokenizes differently from the target model; a scorer must "
                             f"share the target's tokenizer (the embedded models share one)")
        # A target without a tokenizer (random weights: timing only) is scored with its ids clamped into the
        # scorer's vocabulary (`_ids`); which tokens survive then means nothing, how long it takes still does.
        vocab = self.engine.config.vocab_size
        self.newline = torch.zeros(vocab, dtype=torch.bool)
        if tok is not None:
            for i in range(vocab):
                self.newline[i] = "\n" in tok.decode([i])
        self.bos = tok.bos_token_id if tok is not None and tok.add_bos else None

    def _ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids clamped into the scorer's vocabulary (a target with a larger padded vocabulary)."""
        return ids.clamp(max=self.engine.config.vocab_size - 1)

    def self_information(self, ids: torch.Tensor, cache=None, first: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(x_i | x_<i) in nats for ids [T] continuing `cache` (a fresh one when None), float32 [T]. `first`:
        logits [V] predicting ids[0] (the cache's last); without it the first token gets +inf (nothing predicts it,
        so no method drops it for being predictable)."""
        eng = self.engine
        ids = self._ids(ids.to(eng.device))
        if cache is None:
            cache = eng.new_cache(1, ids.numel() + 1)
        out = torch.empty(ids.numel(), dtype=torch.float32)
        prev = first
        for start in range(0, ids.numel(), SCORE_PIECE):
            piece = ids[start : start + SCORE_PIECE]
            logits = eng.forward(piece[None], cache)[0]  # [t, V]
            pred = logits[:-1] if prev is None else torch.cat((prev[None].to(logits.device), logits[:-1]))
            nll = F.cross_entropy(pred.float(), piece[-pred.shape[0] :], reduction="none").cpu()
            if prev is None:
                out[start] = float("inf")
                out[start + 1 : start + piece.numel()] = nll
            else:
                out[start : start + piece.numel()] = nll
            prev = logits[-1]
        self.last_logits = prev
        return out

    def question_nll(self, context: torch.Tensor, question: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(mean -log p(question | [BOS] context), self-information of the context's tokens [len(context)]):
        LongLLMLingua's coarse relevance of one chunk to the question (lower = more relevant), and the chunk's own
        token scores from the same forward."""
        eng = self.engine
        head = [self.bos] if self.bos is not None else []
        ids = torch.cat((torch.tensor(head, dtype=torch.long), context.cpu(), question.cpu()))
        ids = self._ids(ids).to(eng.device)
        cache = eng.new_cache(1, ids.numel())
        logits = eng.forward(ids[None], cache)[0, :-1].float()
        nll = F.cross_entropy(logits, ids[1:], reduction="none").cpu()
        q = question.numel()
        own = nll[: context.numel()] if head else torch.cat((torch.tensor([float("inf")]), nll[: context.numel() - 1]))
        return float(nll[-q:].mean()), own

    @torch.inference_mode()
    def read(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states [T, H] float32, self-information [T]) of [BOS] ids from one fresh forward: the
        hidden states are the final norm's output, what the LM head reads (Engine.forward returns only logits, so
        this runs the model step itself with the same mixer and records the head's input)."""
        from ollm_triton.engine.mixers import PluginMixer
        from ollm_triton.engine.model import rope_cos_sin

        eng = self.engine
        head = [self.bos] if self.bos is not None else []
        x = self._ids(torch.cat((torch.tensor(head, dtype=torch.long), ids.cpu()))).to(eng.device)
        cache = eng.new_cache(1, x.numel())
        cos, sin = rope_cos_sin(eng.inv_freq, torch.arange(x.numel(), device=eng.device), eng.dtype)
        mixer = PluginMixer(cache.layers, eng.attention, cos, sin, kernels=eng.use_kernels(), tree_mask=None,
                            decode_max_tokens=eng.decode_max_tokens)
        seen = {}
        lm_head = eng.model.lm_head.weight

        def linear(h, weight, bias=None):
            if weight is lm_head:
                seen["hidden"] = h
            return F.linear(h, weight, bias)

        logits = eng.model.step(x[None], mixer, kernels=eng.use_kernels(), linear=linear)[0].float()
        nll = F.cross_entropy(logits[:-1], x[1:], reduction="none").cpu()
        own = nll if head else torch.cat((torch.tensor([float("inf")]), nll))
        return seen["hidden"][0, len(head) :].float().cpu(), own

    def close(self) -> None:
        self.engine.close()


def _probe(tokenizer: Any) -> list[int]:
    return list(tokenizer.encode(PROBE_TEXT))
