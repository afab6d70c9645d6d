"""Weights for the native decoder: a checkpoint directory (safetensors only), a hub id, or seeded random weights.

A model is first built on the `meta` device (no memory), then every parameter is created once, directly on the
target device in the target dtype: read from safetensors (which can read straight to a CUDA device) or drawn from
a seeded normal. An 8B model in bf16 therefore never passes through host memory when it is random, and a
checkpoint tensor is converted on the device it lands on.

Pickle is never used: `.bin` / `.pt` files are ignored and a directory without `*.safetensors` is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ollm_triton.engine.config import ModelConfig
from ollm_triton.engine.model import CausalLM
from ollm_triton.kernels import mxfp4

Keep = Callable[[str, torch.Tensor], torch.Tensor]  # (parameter name, value just created) -> what the model keeps
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", INDEX_FILE, "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json"]
# owner/name or name: letters, digits, '-', '_', '.'; a path-like string (/, ./, ~) is never a hub id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
INIT_STD = 0.02  # transformers' default initializer_range for these model types


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded. The message is one line naming the file or tensor at fault."""


def resolve_source(source: str | os.PathLike) -> Path:
    """A local checkpoint directory for `source`: the directory itself, or a hub snapshot when `source` is a hub id.

    Raises CheckpointError (one line) for a missing path or a hub id that cannot be fetched (offline, unknown).
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model path {str(source)!r} is not a directory; pass a checkpoint directory "
                              "(config.json + *.safetensors), a dict of config fields, or a hub id")
    text = str(source)
    if not _HUB_ID.match(text):
        raise CheckpointError(f"model path {text!r} does not exist; pass a checkpoint directory "
                              "(config.json + *.safetensors), a dict of config fields, or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, no network: all end the same way for the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise CheckpointError(
            f"{text!r} is not a local directory and could not be fetched from the Hugging Face hub{offline}: "
            f"{type(e).__name__}: {reason}; pass a checkpoint directory (config.json + *.safetensors)"
        ) from None


def read_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"no config.json in {directory}; a checkpoint directory holds config.json and "
                              "*.safetensors")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None


def empty_model(cfg: ModelConfig) -> CausalLM:
    """The decoder with every parameter on the meta device (no storage yet)."""
    with torch.device("meta"):
        return CausalLM(cfg)


def weight_files(directory: Path) -> dict[str, Path]:
    """tensor name -> safetensors file that holds it, from the shard index or from the files' own headers."""
    index = directory / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        return {name: directory / file for name, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {', '.join(pickled)}: pickle files are never loaded)" if pickled else ""
        raise CheckpointError(f"no *.safetensors weights in {directory}{hint}; convert the checkpoint to safetensors")
    out: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out.setdefault(name, file)
    return out


def load_weights(model: CausalLM, directory: Path, device: torch.device, dtype: torch.dtype,
                 keep: Keep | None = None) -> None:
    """Fill every parameter of a meta `model` from the checkpoint in `directory`, on `device` in `dtype`.

    Tensors the model does not use (e.g. a tied `lm_head.weight`, old `rotary_emb.inv_freq`) are skipped. A MoE's
    stacked expert tensors (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`: transformers 5's names) are read
    as they are; or stacked from per-expert tensors (`mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`:
    the official Qwen3-MoE checkpoints); or dequantized from MXFP4 (`..._blocks` + `..._scales`: the official
    gpt-oss checkpoints, `dequantize_mxfp4`). The last two go one expert at a time on `device`. keep(name, value):
    what the model keeps for each parameter just read (default: the value; a prefetch policy's `keep_weight`).
    """
    keep = keep or (lambda name, value: value)
    where = weight_files(directory)
    needed = dict(model.named_parameters())  # deduplicated: a tied lm_head is filled through embed_tokens
    sources: dict[str, tuple[str, Any]] = {}
    for name in needed:
        if name in where:
            sources[name] = ("tensor", None)
            continue
        packed = (f"{name}_blocks", f"{name}_scales")
        if _STACKED_EXPERTS.match(name) and all(p in where for p in packed):
            sources[name] = ("mxfp4", packed)
            continue
        if not needed[name].dtype.is_floating_point:  # MXFP4 codes or scales the model keeps as they are
            raise CheckpointError(f"checkpoint {directory}: tensor {name!r} is missing: experts=mxfp4 keeps a "
                                  "checkpoint's MXFP4 experts (gpt-oss's *_blocks / *_scales) and this one stores "
                                  "them otherwise; leave experts=dense")
        parts = _per_expert_sources(name, needed[name].shape[0])
        if parts is None or any(p not in where for group in parts for p in group):
            listed = f"{INDEX_FILE}" if (directory / INDEX_FILE).is_file() else "any *.safetensors file"
            also = f" nor as per-expert tensors ({parts[0][0]!r}, ...) or MXFP4 {packed[0]!r}" if parts else ""
            raise CheckpointError(f"checkpoint {directory}: tensor {name!r} is missing (not in {listed}{also})")
        sources[name] = ("experts", parts)
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def open_file(tensor: str):
            file = where[tensor]
            if file not in handles:
                if not file.is_file():
                    raise CheckpointError(f"checkpoint {directory}: {file.name} (listed in {INDEX_FILE}) is missing")
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt",
                                                              device=_safetensors_device(device)))
            if tensor not in handles[file].keys():
                raise CheckpointError(f"checkpoint {directory}: tensor {tensor!r} is missing from {file.name}")
            return handles[file]

        def read(tensor: str) -> torch.Tensor:
            value = open_file(tensor).get_tensor(tensor)
            return value.to(dtype) if value.is_floating_point() else value  # MXFP4 codes and scales stay bytes

        for name, (kind, what) in sources.items():
            expected = tuple(needed[name].shape)
            if kind == "tensor":
                value = read(name)
            else:  # expert by expert: row e of the stack
                value = torch.empty(expected, device=device, dtype=dtype)
                for e in range(expected[0]):
                    if kind == "mxfp4":  # [rows, G, 16] codes + [rows, G] exponents -> [rows, in] -> [in, rows]
                        blocks, scales = (open_file(t).get_slice(t)[e] for t in what)
                        row = dequantize_mxfp4(blocks, scales, dtype).transpose(0, 1)
                    else:  # its tensors concatenated along their output dim (gate, then up)
                        row = torch.cat([read(p) for p in what[e]]) if len(what[e]) > 1 else read(what[e][0])
                    if tuple(row.shape) != expected[1:]:
                        source = what if kind == "mxfp4" else what[e]
                        raise CheckpointError(f"checkpoint tensors {list(source)} (expert {e} of {name!r}) give "
                                              f"shape {list(row.shape)}, the config needs {list(expected[1:])}")
                    value[e] = row
            if tuple(value.shape) != expected:
                raise CheckpointError(f"checkpoint tensor {name!r} in {where[name].name} has shape "
                                      f"{list(value.shape)}, the config needs {list(expected)}")
            _set_parameter(model, name, keep(name, value))
            del value  # before the next read, as init_random does (a streamed model keeps only a placeholder)
    model.tie_weights()


_STACKED_EXPERTS = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<which>gate_up_proj|down_proj)$")


def _per_expert_sources(name: str, num_experts: int) -> list[list[str]] | None:
    """The per-expert tensor names that stack into the stacked expert parameter `name` (None: not one)."""
    m = _STACKED_EXPERTS.match(name)
    if m is None:
        return None
    prefix = m["prefix"]
    if m["which"] == "gate_up_proj":
        return [[f"{prefix}.{e}.gate_proj.weight", f"{prefix}.{e}.up_proj.weight"] for e in range(num_experts)]
    return [[f"{prefix}.{e}.down_proj.weight"] for e in range(num_experts)]


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """kernels/mxfp4.py's dequantization; a bad pairing of blocks and scales is a CheckpointError (one line)."""
    try:
        return mxfp4.dequantize_mxfp4(blocks, scales, dtype)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def init_random(model: CausalLM, device: torch.device, dtype: torch.dtype, seed: int = 0,
                rng_device: torch.device | None = None, keep: Keep | None = None) -> None:
    """Fill every parameter of a meta `model` on `device` in `dtype`: projections and embeddings ~ N(0, 0.02),
    biases 0, norm weights 1 (transformers' initialisation), from a generator seeded with `seed` on `rng_device`
    (default `device`). The engine draws on its compute device even when a streaming policy keeps the weights on
    the host: CPU and CUDA generators give different numbers for one seed, and the streamed model must be the
    resident one (seen on the H200: logits 1.9 apart when the host drew them). keep(name, value): what the model
    keeps for each parameter just drawn (default: value on `device`; a prefetch policy's `keep_weight`)."""
    rng_device = device if rng_device is None else rng_device
    keep = keep or (lambda name, value: value.to(device))
    gen = torch.Generator(device=rng_device).manual_seed(seed)
    for name, param in list(model.named_parameters()):
        if not param.dtype.is_floating_point:  # MXFP4 experts (engine/moe.py): random codes, each group's scale 2^-7
            if name.endswith("_blocks"):  # magnitudes 0-6 x 2^-7: RMS 0.023, near the others' 0.02
                value = torch.randint(0, 256, param.shape, device=rng_device, dtype=param.dtype, generator=gen)
            else:
                value = torch.full(param.shape, 120, device=rng_device, dtype=param.dtype)
            _set_parameter(model, name, keep(name, value))
            del value
            continue
        value = torch.empty(param.shape, device=rng_device, dtype=dtype)
        if name.endswith("norm.weight"):  # 1, or 0 for a zero-centred norm (x * (1 + w): qwen3_next)
            value.fill_(getattr(model.get_submodule(name.rpartition(".")[0]), "init_value", 1.0))
        elif name.endswith(".bias"):
            value.zero_()
        else:
            value.normal_(0.0, INIT_STD, generator=gen)
        _set_parameter(model, name, keep(name, value))
        # freed before the next draw, not after it: a streamed model keeps a placeholder, and the next tensor would
        # otherwise be allocated beside this one (Qwen3-Next-80B: a layer's two expert tensors, 3.2 GB, at once)
        del value
    model.tie_weights()


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


def _safetensors_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)
