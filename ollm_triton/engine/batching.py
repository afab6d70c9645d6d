"""Batched decode of sequences of different lengths, on the static decode step (engine/fast_decode.py).

    gen = generate_ragged(engine, [ids_a, ids_b, ids_c], max_new_tokens=128)   # 1-D prompts of any lengths
    gen.tokens: [B, N]; gen.counters: prefill_s, decode_s, generated_tokens, ... as every decoder reports

Each prompt is prefilled on its own (chunked when the engine has a `prefill_chunk`) straight into its row of one
bucket's KV buffers (a batch-1 view of row b: no copy, no padding tokens run through the model). Decoding then
advances all rows together: every row sits at its own position, RoPE takes each row's angle, the K/V write goes to
each row's own slot, and the attention reads each row's own `lengths[b]` keys from the device (no padding waste in
attention; the projections and MLP run the B rows as one matmul, which is what batching buys). On CUDA with a
capturable engine the steps replay a CUDA graph captured for this batch size; on the CPU they run eagerly.

This is the engine support a dynamic batcher builds on; rows that finish (eos) keep emitting eos until all are
done, as in greedy.decode_loop (the graph has static shapes, so a finished row still costs its share of a step).
"""

from __future__ import annotations

import torch

from ollm_triton.engine.fast_decode import FastDecoder, capture_blocker
from ollm_triton.engine.generation import Generation, argmax_pick
from ollm_triton.timing import Timer


def ragged_decoder(engine) -> FastDecoder:
    """The engine's fast decoder, or a static (uncaptured) one where graphs are unavailable (the CPU, or
    fast_decode=off). Raises ValueError (one line) when the plugins have no static decode step at all."""
    fast = engine.fast_decoder()
    if fast is not None and not fast.piecewise:
        return fast
    reason = capture_blocker(engine)  # piecewise steps attend through the codec's cache, one length for all rows
    if reason is not None:
        raise ValueError(f"batched decode of different lengths needs the static decode step, and {reason}")
    if getattr(engine, "_ragged", None) is None:
        engine._ragged = FastDecoder(engine, capture=False, use_kernels=engine.kernels)
    return engine._ragged


def generate_ragged(engine, prompts: list[torch.Tensor], max_new_tokens: int, *, pick=argmax_pick,
                    eos_id: int | None = None) -> Generation:
    """Decode B prompts of different lengths together. prompts: B 1-D long tensors (or lists of ids).

    pick: logits [B, V] -> tokens [B] (default greedy, which runs inside the captured step). Returns tokens
    [B, N] and counters; row b's tokens equal what decoding prompt b alone would give (up to the rounding of
    batched matmuls on the GPU).
    """
    if not prompts:
        raise ValueError("generate_ragged needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = [torch.as_tensor(p, dtype=torch.long).reshape(-1).to(engine.device) for p in prompts]
    if any(p.numel() == 0 for p in ids):
        raise ValueError("generate_ragged: every prompt needs at least one token")
    lengths = [p.numel() for p in ids]
    fast = ragged_decoder(engine)
    bk = fast.bucket(len(ids), max(lengths) + max_new_tokens)
    bk.reset()
    with Timer(engine.device) as prefill:
        rows = [bk.row_cache(b) for b in range(len(ids))]
        first = torch.cat([engine.prefill(p[None], row) for p, row in zip(ids, rows, strict=True)])  # [B, V]
    capture_before = fast.capture_s
    if max_new_tokens > 1:
        fast.ensure_graph(bk, lengths)
    with Timer(engine.device) as decode:
        tokens, n = fast.decode(bk, first, lengths, max_new_tokens, pick, eos_id, greedy=pick is argmax_pick,
                                rows=rows)
    counters = {"generated_tokens": n * len(ids), "target_forwards": n, "prefill_s": prefill.seconds,
                "decode_s": decode.seconds, "graph_capture_s": fast.capture_s - capture_before,
                "fast_path_graph": int(fast.capture), "prompt_tokens": sum(lengths)}
    return Generation(tokens, counters)


__all__ = ["generate_ragged", "ragged_decoder"]
