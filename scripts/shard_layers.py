"""Write a checkpoint's decoder layers as one safetensors file per layer (the disk tier of the prefetch policies).

    python scripts/shard_layers.py CHECKPOINT_DIR [--dtype bfloat16] [--out DIR] [--workers 4]

Reads the checkpoint one layer at a time (never the whole model in memory, never pickle), converts to `--dtype`
exactly as load_engine does, and writes layer_NNN.safetensors + manifest.json into `--out` (default: the cache
directory a streaming policy would use for this model, ~/.cache/ollm_triton/<model hash>, so a later
`+prefetch=lookahead prefetch.tier=disk` run finds it and writes nothing). Prints the directory.

The files go into a temporary directory first; the model hash is known only once every layer has been read, and
the directory is renamed to it at the end, so an interrupted run leaves nothing a policy would pick up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ollm_triton.engine.checkpoint import empty_model, read_config, resolve_source, weight_files  # noqa: E402
from ollm_triton.engine.config import ModelConfig  # noqa: E402
from ollm_triton.engine.placement import DTYPES  # noqa: E402
from ollm_triton.prefetch.layer_file import LayerLayout, WeightStoreError  # noqa: E402
from ollm_triton.prefetch.store import (  # noqa: E402
    LAYER_PREFIX,
    MANIFEST,
    ModelHasher,
    cache_root,
    write_layer_cache,
)
from ollm_triton.progress import progress  # noqa: E402


def shard(source: str, dtype: torch.dtype, out: str | None = None, workers: int = 4) -> Path:
    directory = resolve_source(source)
    cfg = ModelConfig.from_hf(read_config(directory))
    model = empty_model(cfg)  # meta: only for the layer layouts
    layouts = [LayerLayout.of_module(layer) for layer in model.model.layers]
    where = weight_files(directory)
    hasher = ModelHasher(cfg, dtype)
    root = Path(out).expanduser() if out else cache_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = (root.parent if out else root) / f".shard-{int(time.time())}-{id(hasher):x}"

    def layers():
        for i, layout in progress(enumerate(layouts), total=len(layouts), desc="shard", unit="layer"):
            prefix = LAYER_PREFIX.format(i)
            tensors = {}
            for e in layout.entries:
                name = prefix + e.name
                if name not in where:
                    raise WeightStoreError(f"checkpoint {directory}: tensor {name!r} is missing")
                with safe_open(str(where[name]), framework="pt") as f:
                    t = f.get_tensor(name).to(dtype)
                if tuple(t.shape) != e.shape:
                    raise WeightStoreError(f"checkpoint tensor {name!r} has shape {list(t.shape)}, the config needs "
                                           f"{list(e.shape)}")
                tensors[e.name] = t
            hasher.add_layer(i, tensors)
            yield i, layout, tensors

    try:
        # the hash is known only after the last layer: write under a temporary name, then rename
        write_layer_cache(staging, layers(), layouts, model_hash="pending", config=cfg, dtype=dtype, workers=workers)
        model_hash = hasher.hexdigest()
        manifest = staging / MANIFEST
        record = json.loads(manifest.read_text())
        record["model_hash"] = model_hash
        manifest.write_text(json.dumps(record, indent=1))
        final = root if out else root / model_hash
        if (final / MANIFEST).is_file():
            print(f"{final} already holds this model; keeping it", file=sys.stderr)
            shutil.rmtree(staging)
            return final
        if final.exists():
            shutil.rmtree(final)  # an incomplete earlier attempt (no manifest)
        staging.rename(final)
        return final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint directory (config.json + *.safetensors) or hub id")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--out", default=None, help="output directory (default: the policies' cache directory)")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        path = shard(args.checkpoint, DTYPES[args.dtype], args.out, args.workers)
    except (WeightStoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
