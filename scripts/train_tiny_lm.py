"""Train the embedded tokenizer, tiny target Llama and its draft model from the offline stdlib corpus.

    python scripts/train_tiny_lm.py --out ollm_triton/assets              # the shipped models (GPU: ~6 minutes)
    python scripts/train_tiny_lm.py --smoke                               # the whole pipeline at toy sizes on a CPU
    python scripts/train_tiny_lm.py --long 16384 --out /tmp/long          # tiny-llama-16k (+ draft) continued from the
                                                                          # shipped pair (GPU: ~6 minutes, see --long)

Pipeline: corpus (ollm_triton.data.corpus) -> byte-level BPE tokenizer -> target LlamaForCausalLM trained on corpus
windows mixed with synthetic key-value retrieval documents (ollm_triton.data.retrieval), a short-context phase then
a long-context phase -> draft LlamaForCausalLM trained on the same mix, distilled from the target -> both saved in
Hugging Face format (bf16 safetensors + tokenizer) and evaluated from the saved files: held-out perplexity, passkey
accuracy by length, draft/target greedy agreement. A model card (README.md) is written next to each checkpoint and
a JSON log to --log.

Long context (--init, or --long N which sets the whole recipe): training continues from a saved checkpoint (its
architecture and tokenizer), with RoPE's base raised (--rope-theta; the new model's config records it and
max_position_embeddings = --context), a short-then-long curriculum (--short-context 4096 -> --context), and
retrieval documents with up to --max-needles pairs spread through the long sequences, because corpus windows alone
carry few dependencies longer than one file. Corpus windows of a long context are cut from the train split's files
joined in sorted path order (a package's modules sit next to each other) with a blank line between files.

Deterministic given --seed and explicit --target-steps / --draft-steps (0 picks the step count from a short timing
of the device, which the log and the cards record so that the run can be repeated exactly). Needs torch,
transformers, tokenizers, safetensors; no hydra or wandb.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ollm_triton.data.corpus import DOC_SEPARATOR, build_corpus, load_corpus  # noqa: E402
from ollm_triton.data.retrieval import (  # noqa: E402
    FillerStream,
    extract_answer,
    make_multikey_doc,
    make_retrieval_doc,
    make_training_doc,
)
from ollm_triton.progress import progress  # noqa: E402

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2


@dataclass
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int = 64


# ----------------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def save_tokenizer(tok, folder: Path, context: int) -> None:
    tok.save(str(folder / "tokenizer.json"))
    # Written by hand rather than through a transformers tokenizer class: the fields AutoTokenizer needs are stable
    # across transformers 4.x / 5.x, the class layout is not.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "model_max_length": context,
        "add_bos_token": False,  # training never saw a BOS: sequences are windows that start anywhere
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def tokenize_stream(tok, docs: list[str]) -> np.ndarray:
    """Every doc tokenized and joined with the separator's tokens, as the corpus eval text is joined."""
    sep = tok.encode(DOC_SEPARATOR).ids
    out: list[int] = []
    for enc in tok.encode_batch(docs):
        out += enc.ids
        out += sep
    return np.asarray(out, dtype=np.int64)


# ------------------------------------------------------------------------------------------------------------- models


def make_model(arch: Arch, vocab_size: int, context: int, rope_theta: float, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=context,
        rope_theta=rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    stored = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    if stored is None or float(stored) != float(rope_theta):  # config layouts moved between transformers versions
        raise RuntimeError(f"LlamaConfig kept rope_theta={stored}, asked for {rope_theta}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    return model


def continue_from(folder: str | Path, context: int, rope_theta: float):
    """The checkpoint in `folder` as a new model whose RoPE base is `rope_theta` and whose context is `context`.

    The weights are copied into a model built from the new config rather than patched into the loaded one: the
    rotary embedding's inverse frequencies are a buffer computed from the config at construction and not saved, so a
    config edit after loading would leave the old frequencies in place."""
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    c = src.config
    arch = Arch(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                c.intermediate_size, head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    model = make_model(arch, c.vocab_size, context, rope_theta, seed=0)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings, saved once
    if missing or unexpected:
        raise RuntimeError(f"{folder}: checkpoint does not match its own config: missing {missing}, unexpected "
                           f"{unexpected}")
    old_theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
    return model, arch, {"from": str(folder), "rope_theta": old_theta, "context": c.max_position_embeddings}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings are counted once by parameters()


# --------------------------------------------------------------------------------------------------------------- data


class Batches:
    """Seeded batches: corpus windows mixed with retrieval documents; labels are inputs shifted by one."""

    def __init__(self, tok, stream: np.ndarray, seed: int, retrieval_frac: float, answer_weight: float,
                 max_needles: int = 6):
        self.tok = tok
        self.max_needles = max_needles
        self.filler = FillerStream(stream)
        self.rng = random.Random(seed)
        self.retrieval_frac = retrieval_frac
        self.answer_weight = answer_weight

    def get(self, batch: int, length: int, device: torch.device):
        ids, weights = [], []
        for _ in range(batch):
            if self.rng.random() < self.retrieval_frac:
                seq, mask = make_training_doc(self.tok, self.filler, length + 1, self.rng,
                                              max_needles=self.max_needles)
                w = [self.answer_weight if m else 1.0 for m in mask]
            else:
                seq, w = self.filler.window(length + 1, self.rng), [1.0] * (length + 1)
            ids.append(seq)
            weights.append(w)
        t = torch.tensor(ids, dtype=torch.long)
        w = torch.tensor(weights, dtype=torch.float32)
        # The weight of a target token sits at its own position, i.e. on the labels.
        return t[:, :-1].to(device, non_blocking=True), t[:, 1:].to(device, non_blocking=True), w[:, 1:].to(device)


# ----------------------------------------------------------------------------------------------------------- training


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def context_at(step: int, total: int, short_frac: float, short_ctx: int, long_ctx: int) -> int:
    return short_ctx if step < int(short_frac * total) else long_ctx


def loss_fn(model, inputs, labels, weights, teacher, distill: float, amp: bool):
    with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(input_ids=inputs, use_cache=False).logits
    logits = logits.float().flatten(0, 1)
    ce = F.cross_entropy(logits, labels.flatten(), reduction="none")
    w = weights.flatten()
    loss = (ce * w).sum() / w.sum()
    if teacher is not None:
        with torch.no_grad(), torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16, enabled=amp):
            t_logits = teacher(input_ids=inputs, use_cache=False).logits
        t_logp = F.log_softmax(t_logits.float().flatten(0, 1), dim=-1)
        s_logp = F.log_softmax(logits, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        loss = (1.0 - distill) * loss + distill * kl
    with torch.no_grad():  # next-token accuracy on the retrieval answers: shows whether retrieval is being learned
        answers = w > 1.0
        answer_acc = (logits.argmax(-1) == labels.flatten())[answers].float().mean() if answers.any() else None
    return loss, answer_acc


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, batches_factory, args, device, lengths: list[int], teacher=None) -> dict[int, float]:
    """Seconds per optimizer step at each context length, measured on a throwaway copy of the model."""
    probe = copy.deepcopy(model)
    opt = make_optimizer(probe, 1e-9, 0.0, device)
    batches = batches_factory(args.seed + 999)
    out = {}
    for length in lengths:
        b = max(1, args.batch_tokens // length)
        times = []
        for i in range(3):
            x, y, w = batches.get(b, length, device)
            sync(device)
            t0 = time.perf_counter()
            loss, _ = loss_fn(probe, x, y, w, teacher, args.distill, args.amp)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if i > 0:  # the first step carries one-off kernel selection and allocation
                times.append(time.perf_counter() - t0)
        out[length] = float(np.median(times))
    del probe, opt
    return out


def train(model, name: str, steps: int, seconds: float, args, device, batches_factory, seed: int, log: dict,
          teacher=None, deadline: float | None = None) -> dict:
    """deadline: a time.perf_counter() after which the loop stops at the end of the current step (the schedule
    stays the planned one, so a cut run is the first part of the planned run, and the log says where it stopped)."""
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    lengths = sorted({args.short_context, args.context})
    if steps <= 0:
        per_step = time_steps(model, batches_factory, args, device, lengths, teacher)
        mean_step = args.short_frac * per_step[args.short_context] + (1 - args.short_frac) * per_step[args.context]
        steps = max(10, int(seconds / mean_step))
        print(f"[{name}] timed steps {per_step} s -> {steps} steps for {seconds:.0f} s", flush=True)
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    batches = batches_factory(seed)
    warmup = max(1, int(0.03 * steps))
    tokens = 0
    history = []
    t_start = time.perf_counter()
    bar = progress(range(steps), desc=name, unit="step")
    stopped_at = None
    for step in bar:
        if deadline is not None and time.perf_counter() >= deadline:
            stopped_at = step
            bar.write(f"[{name}] --max-seconds reached: stopping at step {step}/{steps}")
            break
        length = context_at(step, steps, args.short_frac, args.short_context, args.context)
        b = max(1, args.batch_tokens // length)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, warmup)
        x, y, w = batches.get(b, length, device)
        loss, answer_acc = loss_fn(model, x, y, w, teacher, args.distill, args.amp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += x.numel()
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            value = loss.item()
            acc = round(answer_acc.item(), 3) if answer_acc is not None else None  # None: no answers in batch
            elapsed = time.perf_counter() - t_start
            history.append({"step": step, "loss": round(value, 4), "answer_acc": acc, "context": length,
                            "tokens": tokens, "seconds": round(elapsed, 1)})
            bar.write(f"[{name}] step {step}/{steps} ctx {length} loss {value:.4f} answer-acc {acc} tokens {tokens} "
                      f"{elapsed:.0f}s")  # above the bar on a terminal, a plain line in a log
            sys.stdout.flush()
            bar.set_postfix(loss=f"{value:.3f}", ctx=length)
    sync(device)
    wall = time.perf_counter() - t_start
    result = {"steps": steps if stopped_at is None else stopped_at, "planned_steps": steps, "tokens_seen": tokens,
              "train_seconds": round(wall, 1), "history": history, "warmup_steps": warmup,
              "stopped_by_max_seconds": stopped_at is not None}
    log[name]["training"] = result
    return result


# --------------------------------------------------------------------------------------------------------- evaluation


# Evaluation runs every sequence through the model in query chunks with transformers' own KV cache (chunked prefill):
# memory grows with the length, never with its square. A full-length forward cannot be trusted to stay small: in fp32
# with grouped KV heads, torch's sdpa on CUDA has no fused kernel and takes its math path, which holds
# heads x length^2 scores per sequence (the 2026-12-07 H100 run: batch 8 at 16384 asked for 48 GiB and died). The
# CPU's sdpa is memory-bounded either way (16384 tokens at batch 1: 1.4 GB peak), so chunks cost it little.
EVAL_CHUNK = 2048


def available_memory(device: torch.device) -> int:
    """Bytes free for evaluation tensors on `device` (CUDA: the driver's free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # no /proc (macOS, Windows): assume a small machine


def eval_batch(config, length: int, device: torch.device, chunk: int = EVAL_CHUNK, cap: int = 8,
               free: int | None = None) -> int:
    """Sequences of `length` tokens per chunked forward that fit in half the device's free memory (at least 1).

    Per sequence, in fp32: the KV cache (layers x 2 x kv_heads x head_dim x length), one layer's attention scores and
    probabilities for a chunk of queries if sdpa falls back to its math path (2 x heads x chunk x length), and the
    chunk's logits with their fp32 copy and log-softmax (3 x chunk x vocab)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    chunk = min(chunk, length)
    per_seq = 4 * (config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * length
                   + 2 * config.num_attention_heads * chunk * length + 3 * chunk * config.vocab_size)
    free = available_memory(device) if free is None else free
    return max(1, min(cap, int(0.5 * free) // per_seq))


def chunked_logits(model, x: torch.Tensor, chunk: int = EVAL_CHUNK, keep: int | None = None):
    """x: [B, T] -> yields (start, logits [B, n, V]) for consecutive query chunks of at most `chunk` tokens, each
    attending to everything before it through a DynamicCache; keep=1 returns only each chunk's last position.
    The last item's cache is the whole prefix's (returned as the generator's value)."""
    from transformers import DynamicCache

    cache = DynamicCache()  # filled in place by every forward
    for start in range(0, x.shape[1], chunk):
        out = model(input_ids=x[:, start:start + chunk], use_cache=True, logits_to_keep=keep or 0,
                    **cache_kwarg(model, cache))
        yield start, out.logits
    return cache


def cache_kwarg(model, cache) -> dict:
    """The forward's cache argument: `past_key_values` up to transformers ~5.2x, `cache` after (the old name warns
    from 5.25 and goes in 5.40)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


@torch.no_grad()
def perplexity(model, stream: np.ndarray, context: int, max_tokens: int, device, batch: int | None = None,
               chunk: int = EVAL_CHUNK) -> dict:
    """exp(mean NLL) over non-overlapping windows of `context` tokens (each window predicts its tokens 1..context-1).
    batch None: sized from the context and the device's memory (eval_batch)."""
    n_windows = max(1, min(len(stream), max_tokens) // context)
    windows = torch.from_numpy(stream[: n_windows * context].reshape(n_windows, context))
    batch = batch or eval_batch(model.config, context, device, chunk)
    nll, count = 0.0, 0
    for i in range(0, n_windows, batch):
        x = windows[i:i + batch].to(device)
        for start, logits in chunked_logits(model, x, chunk):
            n = min(logits.shape[1], x.shape[1] - 1 - start)  # the window's last token predicts nothing scored
            labels = x[:, start + 1:start + 1 + n]
            nll += F.cross_entropy(logits[:, :n].float().flatten(0, 1), labels.flatten(), reduction="sum").item()
            count += labels.numel()
    return {"ppl": math.exp(nll / count), "tokens": count, "window": context, "batch": batch, "chunk": chunk}


@torch.no_grad()
def agreement(target, draft, stream: np.ndarray, context: int, max_tokens: int, device, batch: int | None = None,
              chunk: int = EVAL_CHUNK) -> dict:
    """Fraction of held-out positions where the draft's argmax next token equals the target's."""
    n_windows = max(1, min(len(stream), max_tokens) // context)
    windows = torch.from_numpy(stream[: n_windows * context].reshape(n_windows, context))
    batch = batch or min(eval_batch(target.config, context, device, chunk),
                         eval_batch(draft.config, context, device, chunk))
    same, count = 0, 0
    for i in range(0, n_windows, batch):
        x = windows[i:i + batch].to(device)
        for (_, a), (_, b) in zip(chunked_logits(target, x, chunk), chunked_logits(draft, x, chunk), strict=True):
            same += (a.argmax(-1) == b.argmax(-1)).sum().item()
            count += a.shape[0] * a.shape[1]
    return {"agreement": same / count, "positions": count}


@torch.no_grad()
def greedy(model, ids: torch.Tensor, max_new_tokens: int, chunk: int = EVAL_CHUNK) -> torch.Tensor:
    """ids: [B, T] -> [B, max_new_tokens] greedy continuation with the KV cache (prefilled in chunks)."""
    prefill = chunked_logits(model, ids, chunk, keep=1)
    try:
        while True:
            _, logits = next(prefill)
    except StopIteration as done:
        past = done.value
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    new = [nxt]
    for _ in range(max_new_tokens - 1):
        out = model(input_ids=nxt, use_cache=True, **cache_kwarg(model, past))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(nxt)
    return torch.cat(new, dim=1)


def passkey(model, tok, filler: FillerStream, lengths: list[int], samples: int, seed: int, device,
            max_new_tokens: int = 10, batch: int | None = None, pairs: int = 0) -> dict:
    """Accuracy by length; sample i of a length asks for the needle at depth (i + 0.5) / samples. pairs > 0: the
    multi-key documents of the `multikey` task (that many confusable pairs spread evenly, one asked)."""
    rng = random.Random(seed)
    by_length, by_depth = {}, {}
    for length in lengths:
        docs = [make_multikey_doc(tok, filler, length, rng, depth=(i + 0.5) / samples, num_pairs=pairs) if pairs
                else make_retrieval_doc(tok, filler, length, rng, depth=(i + 0.5) / samples) for i in range(samples)]
        correct = []
        b = batch or eval_batch(model.config, length, device)
        for i in range(0, samples, b):
            chunk = docs[i:i + b]
            ids = torch.tensor([d.ids for d in chunk], dtype=torch.long, device=device)
            gen = greedy(model, ids, max_new_tokens).tolist()
            for d, g in zip(chunk, gen, strict=True):
                ok = extract_answer(tok.decode(g)) == d.answer
                correct.append(ok)
                bucket = f"{min(int(d.depth * 5), 4) / 5:.1f}"  # depth buckets 0.0, 0.2, ..., 0.8
                by_depth.setdefault(bucket, []).append(ok)
        by_length[str(length)] = sum(correct) / len(correct)
        print(f"[{'multikey' if pairs else 'passkey'}] length {length}: {by_length[str(length)]:.3f}", flush=True)
    return {"by_length": by_length, "by_depth": {k: sum(v) / len(v) for k, v in sorted(by_depth.items())},
            "samples_per_length": samples}


def load_saved(folder: Path, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------------------- card


def write_card(folder: Path, name: str, log: dict, role: str) -> None:
    m = log[name]
    t = m["training"]
    ev = m["eval"]
    ee = log["eval_env"]
    a = m["arch"]
    init = m.get("init")
    args = log["args"]
    origin = "trained from scratch" if not init else (
        f"continued from `{Path(init['from']).name}` (trained at context {init['context']}, RoPE base "
        f"{float(init['rope_theta']):g}) with the RoPE base raised to {args['rope_theta']:g} and the context to "
        f"{args['context']}")
    lines = [
        f"# {folder.name}: the embedded {role} model of ollm-triton",
        "",
        f"A Llama-architecture decoder {origin} by `scripts/train_tiny_lm.py` on the Python standard",
        "library source (the toolkit's offline corpus, train split) mixed with synthetic key-value retrieval",
        "documents. It exists so that quality numbers (perplexity, passkey retrieval, speculative acceptance) mean",
        "something on a machine with no network. It is not a general-purpose language model.",
        "",
        "## Architecture",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| parameters | {m['params']:,} (embeddings tied) |",
        f"| hidden / intermediate | {a['hidden']} / {a['intermediate']} |",
        f"| layers | {a['layers']} |",
        f"| query heads / KV heads / head_dim | {a['heads']} / {a['kv_heads']} / {a['head_dim']} |",
        f"| vocabulary | {log['tokenizer']['vocab_size']} (byte-level BPE; `<|pad|>`=0, `<|bos|>`=1, `<|eos|>`=2) |",
        f"| trained context / RoPE theta | {log['args']['context']} / {log['args']['rope_theta']:g} |",
        f"| weights | bf16 safetensors, {m['bytes_on_disk'] / 1e6:.1f} MB |",
        "",
        "## Training",
        "",
        "```",
        log["command"],
        "```",
        "",
        "The same run with its step counts fixed (what was timed above, repeatable without the timing probe):",
        "",
        "```",
        reproduce_command(log),
        "```",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| device | {log['device_name']} |",
        f"| steps | {t['steps']} ({log['args']['short_frac']:.0%} at context {log['args']['short_context']}, "
        f"then {log['args']['context']}) |",
        f"| tokens seen | {t['tokens_seen']:,} |",
        f"| wall time (training loop) | {t['train_seconds']:.0f} s |",
        f"| batch | {log['args']['batch_tokens']:,} tokens, AdamW (0.9, 0.95), peak lr {log['args']['lr']:g}, "
        "cosine to "
        f"10%, {'bf16 autocast' if log['args'].get('amp') else 'fp32'} |",
        f"| retrieval documents | {log['args']['retrieval_frac']:.0%} of sequences, 1 to "
        f"{log['args'].get('max_needles', 6)} key-value pairs each at uniform depths, answer tokens weighted "
        f"{log['args']['answer_weight']:g}x |",
        "| corpus windows | cut from the train split's files joined in sorted path order, a blank line between files "
        "|",
        f"| corpus | Python {log['corpus']['python_version']} stdlib ({log['corpus'].get('source', 'the interpreter')}"
        f"), {log['corpus']['train_docs']} train files; "
        f"eval split hash `{log['corpus']['eval_hash'][:16]}` |",
        f"| versions | torch {log['versions']['torch']}, transformers {log['versions']['transformers']}, "
        f"tokenizers {log['versions']['tokenizers']}, Python {log['versions']['python']} |",
        f"| git | {log['git_sha']} |",
        f"| date | {log['date']} |",
    ]
    if t.get("stopped_by_max_seconds"):
        lines.append(f"| stopped by `--max-seconds` | after {t['steps']} of {t['planned_steps']} planned steps (the "
                     "learning-rate schedule is the planned run's) |")
    if role == "draft":
        lines.append(f"| distillation | loss = {1 - log['args']['distill']:g} x CE + {log['args']['distill']:g} x "
                     "KL(target || draft) |")
    lines += [
        "",
        "## Evaluation",
        "",
        f"From the saved bf16 files, computed in fp32 with transformers {ee['versions']['transformers']} on "
        f"{ee['device_name']}; corpus eval split of Python {ee['corpus']['python_version']} "
        f"({ee['corpus']['eval_docs']} files, {ee['eval_tokens']:,} tokens, hash `{ee['corpus']['eval_hash'][:16]}`).",
        "",
        *([f"Evaluated separately from training ({ee['date']}, git {ee['git_sha']}, torch {ee['versions']['torch']}), "
           "by:", "", "```", ee["command"], "```", ""] if ee.get("command") else []),
        f"Held-out perplexity (corpus eval split, non-overlapping windows of {ev['perplexity']['window']} tokens, "
        f"{ev['perplexity']['tokens']:,} predicted tokens): **{ev['perplexity']['ppl']:.2f}**",
        "",
    ]
    if "agreement" in ev:
        lines += [f"Agreement with the target's greedy next token on held-out positions: "
                  f"**{ev['agreement']['agreement']:.1%}** ({ev['agreement']['positions']:,} positions)", ""]
    pk = ev.get("passkey")  # a draft evaluated with --draft-eval ppl has none
    lines += [] if pk is None else [
        f"Passkey retrieval (one needle `<key> = <5-7 digit value>` in held-out filler, question at the end, greedy, "
        f"exact match; {pk['samples_per_length']} samples per length with depths spread evenly over 0..1):",
        "",
        "| length | " + " | ".join(pk["by_length"]) + " |",
        "| --- | " + " | ".join("---" for _ in pk["by_length"]) + " |",
        "| accuracy | " + " | ".join(f"{v:.0%}" for v in pk["by_length"].values()) + " |",
        "",
        "Lengths past the trained context test extrapolation; the quality bar (>= 95%) applies up to the trained "
        "context." if role == "target" else "The draft is not expected to retrieve: it proposes tokens for "
        "speculative decoding, where the target verifies them.",
        "",
    ]
    if "multikey" in ev:
        mk = ev["multikey"]
        lines += [
            f"Multi-key retrieval ({mk['pairs']} key-value pairs spread evenly through held-out filler, keys in pairs "
            f"that share their first word, one asked; greedy, exact match; {mk['samples_per_length']} samples per "
            "length, the asked pair's depth spread over 0..1; the `multikey` task's documents):",
            "",
            "| length | " + " | ".join(mk["by_length"]) + " |",
            "| --- | " + " | ".join("---" for _ in mk["by_length"]) + " |",
            "| accuracy | " + " | ".join(f"{v:.0%}" for v in mk["by_length"].values()) + " |",
            "",
        ]
    lines += [
        *(["## Notes", "", log["card_note"].strip(), ""] if log.get("card_note") else []),
        "## Data and license",
        "",
        "Trained on text from the CPython standard library (PSF License), read from a Python installation at run",
        "time; no text is redistributed here.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder that receives tiny-llama/ and tiny-llama-draft/ "
                   "(default: ollm_triton/assets, or a temporary folder with --smoke)")
    p.add_argument("--log", default=None, help="JSON log path (default: <out>/train_log.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="toy sizes, a few steps: checks the pipeline on a CPU")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--target", default="384,6,6,2,1024", help="hidden,layers,heads,kv_heads,intermediate")
    p.add_argument("--draft", default="192,2,3,1,512", help="hidden,layers,heads,kv_heads,intermediate")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--short-context", type=int, default=1024)
    p.add_argument("--short-frac", type=float, default=0.3, help="fraction of steps at the short context")
    p.add_argument("--rope-theta", type=float, default=100000.0)
    p.add_argument("--batch-tokens", type=int, default=65536)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--retrieval-frac", type=float, default=0.35)
    p.add_argument("--answer-weight", type=float, default=5.0)
    p.add_argument("--distill", type=float, default=0.7, help="weight of KL(target||draft) in the draft's loss")
    p.add_argument("--target-steps", type=int, default=0, help="0: as many as fit in --target-seconds")
    p.add_argument("--target-seconds", type=float, default=240.0)
    p.add_argument("--draft-steps", type=int, default=0, help="0: as many as fit in --draft-seconds")
    p.add_argument("--draft-seconds", type=float, default=75.0)
    p.add_argument("--eval-tokens", type=int, default=1_000_000, help="cap on held-out tokens for ppl/agreement")
    p.add_argument("--passkey-lengths", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--passkey-samples", type=int, default=20)
    p.add_argument("--corpus-root", default=None, help="stdlib folder to read (default: this interpreter's)")
    p.add_argument("--corpus-python", default=None, help="Python version of --corpus-root, for the record")
    p.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json instead of training one")
    p.add_argument("--card-note", default=None, help="a markdown file appended to both model cards under Notes")
    p.add_argument("--skip-eval", action="store_true", help="stop after saving the models (evaluate later with "
                   "--eval-only, e.g. on another machine)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the models already in --out and rewrite the "
                   "cards, taking the training record from the existing log")
    p.add_argument("--eval-batch", type=int, default=0, help="sequences per evaluation forward (0: sized from "
                   "each length and the device's free memory)")
    p.add_argument("--draft-eval", choices=("full", "ppl", "none"), default="full", help="ppl: the draft gets "
                   "perplexity and agreement only (no passkey), for a slow device; none: the target alone")
    p.add_argument("--max-docs", type=int, default=0, help="use only the first N train docs (0: all)")
    p.add_argument("--max-eval-docs", type=int, default=0, help="use only the first N eval docs (0: all)")
    p.add_argument("--no-amp", action="store_true", help="train in fp32 (default: bf16 autocast on CUDA)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on any device (the CPU too)")
    p.add_argument("--names", default="tiny-llama,tiny-llama-draft", help="folder names of target,draft under --out")
    p.add_argument("--init", default=None, help="continue the target from this checkpoint folder (its architecture "
                   "and tokenizer; --target is ignored)")
    p.add_argument("--init-draft", default=None, help="continue the draft from this checkpoint folder")
    p.add_argument("--max-needles", type=int, default=6, help="most key-value pairs in one retrieval document")
    p.add_argument("--multikey-pairs", type=int, default=0, help="also evaluate multi-key retrieval with this many "
                   "pairs per document at the passkey lengths (target only; 0: skip)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="wall-clock budget from the start to the end of "
                   "training: both loops stop cleanly and save (0: none); evaluation comes after it")
    p.add_argument("--long", type=int, default=0, help="the long-context recipe at this context (e.g. 16384): "
                   "continue the shipped pair with RoPE base 1e6, 20%% of steps at 4096; explicit options still win")
    args = p.parse_args(argv)
    if args.long:  # the long-context recipe becomes the defaults; options given explicitly still win
        shipped = REPO / "ollm_triton" / "assets"
        p.set_defaults(**long_recipe(args.long, shipped))
        args = p.parse_args(argv)
    if args.smoke:  # toy sizes become the defaults; options given explicitly still win
        p.set_defaults(vocab_size=384, target="64,2,2,1,128", draft="32,1,2,1,32", head_dim=32, context=256,
                       short_context=128, batch_tokens=2048, target_steps=12, draft_steps=6, eval_tokens=2048,
                       passkey_lengths="256,512", passkey_samples=2, max_docs=40, max_eval_docs=10)
        args = p.parse_args(argv)
    return args


def long_recipe(context: int, shipped: Path) -> dict:
    """Defaults of --long: continue the shipped pair at `context` tokens.

    RoPE base 1e6 for a 4x-8x longer context than the shipped 4096 at base 1e5: raising the base ("adjusted base
    frequency", as Code Llama did going from 4k to 16k with 1e4 -> 1e6) keeps the longest wavelengths past the new
    context, and continued training adapts the weights to the slower rotations; it needs far fewer steps than training
    from scratch. The peak learning rate is a quarter of from-scratch training, since the weights are already trained.

    Time on an H100 (a budget for one device call of ~8 minutes): the target (12.6M parameters, 6 layers, 384 wide)
    costs about 6 x 12.6M = 76 MFLOP per token for its matmuls plus 12 x layers x width x context / 2 (causal) =
    226 MFLOP per token for attention at 16384; the shipped run trained at 4096 (132 MFLOP per token) at 450k tokens/s
    on the H200 (59 TFLOP/s achieved, an H100 about as much for a model this small). At ~300 MFLOP per token that is
    ~200k tokens/s at 16k: 225 s of target training sees ~45M tokens (~690 steps of 64k tokens), the draft ~70 s. The
    step counts come from timing the device (--target-seconds / --draft-seconds); --max-seconds stops both loops and
    saves if the estimate is off, leaving room for evaluation (~60 s) in the call.

    Retrieval documents: half the sequences (as in the shipped run) with up to 16 pairs each, spread uniformly over
    the whole sequence, answers weighted 5x."""
    size = f"{context // 1024}k" if context % 1024 == 0 else str(context)  # tiny-llama-16k
    return dict(init=str(shipped / "tiny-llama"), init_draft=str(shipped / "tiny-llama-draft"), context=context,
                short_context=4096, short_frac=0.2, rope_theta=1e6, lr=5e-4, batch_tokens=65536,
                target_seconds=225.0, draft_seconds=70.0, max_seconds=345.0, retrieval_frac=0.5, max_needles=16,
                multikey_pairs=16,
                names=f"tiny-llama-{size},tiny-llama-{size}-draft",
                passkey_lengths=",".join(str(n) for n in (4096, context // 2, context, 2 * context)),
                passkey_samples=20, eval_tokens=400_000)


def reproduce_command(log: dict) -> str:
    """The logged command without paths and time budgets, with the step counts the run resolved."""
    words = shlex.split(log["command"])[2:]
    drop_with_value = {"--out", "--log", "--target-seconds", "--draft-seconds", "--target-steps", "--draft-steps",
                       "--corpus-root", "--corpus-python", "--tokenizer", "--max-seconds"}
    kept, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in drop_with_value:
            skip = True
        elif w.split("=", 1)[0] not in drop_with_value and w not in ("--skip-eval", "--eval-only"):
            kept.append(w)
    if log.get("tokenizer", {}).get("source", "").endswith(".json"):  # a reused tokenizer: the shipped copy of it
        kept += ["--tokenizer", "ollm_triton/assets/tiny-llama/tokenizer.json"]
    steps = [f"--target-steps {log['target']['training']['steps']}",
             f"--draft-steps {log['draft']['training']['steps']}"]
    return " ".join(["python scripts/train_tiny_lm.py", *kept, *steps])


def git_sha() -> str:
    if os.environ.get("OLLM_GIT_SHA"):  # the device copy of the tree has no .git: the caller passes the commit
        return os.environ["OLLM_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def cpu_name() -> str:
    """'CPU: <model> (<n> cores)' -- a card evaluated on a CPU says so, and how small the machine was."""
    model = platform.processor() or platform.machine() or "unknown"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device) -> dict:
    import tokenizers
    import transformers

    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "python": platform.python_version()},
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.amp = args.amp or (device.type == "cuda" and not args.no_amp)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="tiny_lm_")) if args.smoke
                                           else REPO / "ollm_triton" / "assets")
    log_path = Path(args.log) if args.log else out / "train_log.json"
    target_name, draft_name = args.names.split(",")
    target_dir, draft_dir = out / target_name, out / draft_name
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    t0 = time.perf_counter()
    corpus = build_corpus(args.corpus_root, args.corpus_python) if args.corpus_root else load_corpus()
    train_docs = corpus.train_docs[: args.max_docs] if args.max_docs else corpus.train_docs
    eval_docs = corpus.eval_docs[: args.max_eval_docs] if args.max_eval_docs else corpus.eval_docs
    print(f"corpus: Python {corpus.python_version}, {len(train_docs)} train / {len(eval_docs)} eval files "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    corpus_info = {"python_version": corpus.python_version, "eval_hash": corpus.eval_hash,
                   "source": f"a copy of the stdlib at {args.corpus_root}" if args.corpus_root else "the interpreter's",
                   "train_docs": len(train_docs), "eval_docs": len(eval_docs)}

    if args.eval_only:
        from tokenizers import Tokenizer

        log = json.loads(log_path.read_text())
        tok = Tokenizer.from_file(str(target_dir / "tokenizer.json"))
    else:
        log = {
            "command": "python " + " ".join(shlex.quote(a) for a in [
                "scripts/train_tiny_lm.py", *(sys.argv[1:] if argv is None else argv)]),
            "args": {k: v for k, v in vars(args).items()},
            **environment(device),
            "corpus": corpus_info,
        }
        t1 = time.perf_counter()
        if args.tokenizer or args.init:  # a continued model keeps the vocabulary its embeddings were trained on
            from tokenizers import Tokenizer

            args.tokenizer = args.tokenizer or str(Path(args.init) / "tokenizer.json")
            tok = Tokenizer.from_file(args.tokenizer)
        else:
            tok = train_tokenizer(train_docs, args.vocab_size)
        train_stream = tokenize_stream(tok, train_docs)
        log["tokenizer"] = {"vocab_size": tok.get_vocab_size(), "train_tokens": int(len(train_stream)),
                            "source": args.tokenizer or "trained on the train split",
                            "seconds": round(time.perf_counter() - t1, 1)}
        print(f"tokenizer: vocab {tok.get_vocab_size()}, train {len(train_stream)} tokens "
              f"({time.perf_counter() - t1:.1f}s)", flush=True)
        deadline = t0 + args.max_seconds if args.max_seconds else None
        train_both(args, device, tok, train_stream, target_dir, draft_dir, log, log_path, deadline)
        if args.skip_eval:
            return log

    eval_stream = tokenize_stream(tok, eval_docs)
    if args.card_note:
        log["card_note"] = Path(args.card_note).read_text()
    log["eval_env"] = {**environment(device), "corpus": corpus_info, "eval_tokens": int(len(eval_stream))}
    if args.eval_only:  # the log's "command" is the training run's; this one made the numbers below it
        log["eval_env"]["command"] = "python " + " ".join(shlex.quote(a) for a in [
            "scripts/train_tiny_lm.py", *(sys.argv[1:] if argv is None else argv)])
    evaluate_both(args, device, tok, eval_stream, target_dir, draft_dir, log)
    log["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_card(target_dir, "target", log, "target")
    if args.draft_eval != "none":
        write_card(draft_dir, "draft", log, "draft")
    json_dump(log, log_path)
    print(summary(log), flush=True)
    return log


def train_both(args, device, tok, train_stream: np.ndarray, target_dir: Path, draft_dir: Path, log: dict,
               log_path: Path, deadline: float | None = None) -> None:
    """deadline (--max-seconds after the start): the target stops early enough to leave the draft its
    --draft-seconds share (or a third of what is left), the draft stops at the deadline itself; both are saved."""
    target_arch = Arch(*[int(v) for v in args.target.split(",")], head_dim=args.head_dim)
    draft_arch = Arch(*[int(v) for v in args.draft.split(",")], head_dim=args.head_dim)
    for arch in (target_arch, draft_arch):
        if arch.heads % arch.kv_heads:
            raise ValueError(f"heads={arch.heads} is not a multiple of kv_heads={arch.kv_heads}")
    log["target"] = {"arch": asdict(target_arch)}
    log["draft"] = {"arch": asdict(draft_arch)}

    def batches_factory(seed: int) -> Batches:
        return Batches(tok, train_stream, seed, args.retrieval_frac, args.answer_weight, args.max_needles)

    def save(model, name: str, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("model*.safetensors*"):
            old.unlink()
        log[name]["params"] = n_params(model)
        model.to(torch.bfloat16).save_pretrained(str(folder), max_shard_size="15MB")
        save_tokenizer(tok, folder, args.context)
        log[name]["bytes_on_disk"] = folder_bytes(folder)

    if args.init:
        target, target_arch, log["target"]["init"] = continue_from(args.init, args.context, args.rope_theta)
        log["target"]["arch"] = asdict(target_arch)
    else:
        target = make_model(target_arch, tok.get_vocab_size(), args.context, args.rope_theta, args.seed)
    if target.config.vocab_size != tok.get_vocab_size():
        raise ValueError(f"--init model has vocab {target.config.vocab_size}, the tokenizer {tok.get_vocab_size()}; "
                         "pass the checkpoint's own tokenizer.json")
    print(f"target: {n_params(target):,} params", flush=True)
    target_deadline = None
    if deadline is not None:
        left = deadline - time.perf_counter()
        target_deadline = deadline - min(args.draft_seconds, left / 3)
    train(target, "target", args.target_steps, args.target_seconds, args, device, batches_factory, args.seed + 1, log,
          deadline=target_deadline)
    save(target, "target", target_dir)
    json_dump(log, log_path)
    del target

    teacher = load_saved(target_dir, device)  # the teacher is the saved bf16 target, as shipped
    if args.init_draft:
        draft, draft_arch, log["draft"]["init"] = continue_from(args.init_draft, args.context, args.rope_theta)
        log["draft"]["arch"] = asdict(draft_arch)
    else:
        draft = make_model(draft_arch, tok.get_vocab_size(), args.context, args.rope_theta, args.seed + 2)
    print(f"draft: {n_params(draft):,} params ({n_params(draft) / n_params(teacher):.3f} of the target)", flush=True)
    train(draft, "draft", args.draft_steps, args.draft_seconds, args, device, batches_factory, args.seed + 3, log,
          teacher=teacher, deadline=deadline)
    save(draft, "draft", draft_dir)
    log["draft"]["param_ratio"] = log["draft"]["params"] / log["target"]["params"]
    json_dump(log, log_path)


def evaluate_both(args, device, tok, eval_stream: np.ndarray, target_dir: Path, draft_dir: Path, log: dict) -> None:
    # --draft-eval none: the target alone (a draft that was not shipped need not be on the machine)
    target = load_saved(target_dir, device)
    draft = load_saved(draft_dir, device) if args.draft_eval != "none" else None
    batch = args.eval_batch or None  # None: each length sizes its own batch from the device's memory (eval_batch)
    eval_filler = FillerStream(eval_stream)
    lengths = [int(v) for v in args.passkey_lengths.split(",")]
    context = log["args"]["context"]
    for name, model in (("target", target), ("draft", draft))[: 1 if draft is None else 2]:
        t2 = time.perf_counter()
        ev = {"perplexity": perplexity(model, eval_stream, context, args.eval_tokens, device, batch)}
        print(f"[{name}] held-out ppl {ev['perplexity']['ppl']:.3f}", flush=True)
        if name == "target" or args.draft_eval == "full":
            ev["passkey"] = passkey(model, tok, eval_filler, lengths, args.passkey_samples, args.seed + 7, device,
                                    batch=batch)
        if args.multikey_pairs and name == "target":
            ev["multikey"] = passkey(model, tok, eval_filler, lengths, args.passkey_samples, args.seed + 8, device,
                                     batch=batch, pairs=args.multikey_pairs)
            ev["multikey"]["pairs"] = args.multikey_pairs
        if name == "draft":
            ev["agreement"] = agreement(target, draft, eval_stream, context, args.eval_tokens, device, batch)
            print(f"[draft] agreement {ev['agreement']['agreement']:.3f}", flush=True)
        ev["seconds"] = round(time.perf_counter() - t2, 1)
        log[name]["eval"] = ev


def json_dump(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def summary(log: dict) -> str:
    rows = ["| model | params | steps | tokens | train s | held-out ppl | passkey by length | agreement |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("target", "draft"):
        m = log[name]
        if "eval" not in m:  # --draft-eval none on a log that never evaluated the draft
            continue
        pk = " ".join(f"{k}:{v:.0%}" for k, v in m["eval"].get("passkey", {"by_length": {}})["by_length"].items())
        if "multikey" in m["eval"]:
            pk += " / multikey " + " ".join(f"{k}:{v:.0%}" for k, v in m["eval"]["multikey"]["by_length"].items())
        agree = f"{m['eval']['agreement']['agreement']:.1%}" if "agreement" in m["eval"] else "-"
        rows.append(f"| {name} | {m['params']:,} | {m['training']['steps']} | {m['training']['tokens_seen']:,} | "
                    f"{m['training']['train_seconds']:.0f} | {m['eval']['perplexity']['ppl']:.2f} | {pk} | {agree} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
