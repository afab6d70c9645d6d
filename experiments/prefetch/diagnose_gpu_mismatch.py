"""Why do streamed bf16 logits differ from resident on the H200? (tests/test_prefetch_gpu.py failed there)
Compares resident with on_demand (cpu tier) under: as is; both on the eager torch path; a full device sync after
each layer load. Prints max |diff| per setting."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ollm_triton.engine import load_engine  # noqa: E402
from ollm_triton.prefetch import streaming  # noqa: E402
from ollm_triton.registry import registry  # noqa: E402

CFG = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)
PROMPT = torch.arange(3, 40).reshape(1, -1) % 500


def run(prefetch, fused):
    eng = load_engine(CFG, prefetch=prefetch, device="cuda", dtype=torch.bfloat16)
    eng.model.fused_kernels = fused
    cache = eng.new_cache(1, 64)
    outs = [eng.forward(PROMPT, cache)]
    for _ in range(3):
        outs.append(eng.forward(outs[-1][:, -1:].argmax(-1), cache))
    eng.close()
    return outs


def diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


for fused in (None, False):
    ref = run(None, fused)
    again = run(None, fused)
    got = run(registry.build("prefetch", "on_demand", {"tier": "cpu"}), fused)
    print(f"fused={fused}: resident vs resident {diff(ref, again):.3g}, on_demand vs resident {diff(ref, got):.3g}")

orig = streaming.StreamingPolicy._acquire if hasattr(streaming, "StreamingPolicy") else None
cls = next(c for c in vars(streaming).values() if isinstance(c, type) and hasattr(c, "_acquire"))
orig = cls._acquire


def synced(self, index):
    alloc = orig(self, index)
    torch.cuda.synchronize()
    return alloc


cls._acquire = synced
ref = run(None, None)
got = run(registry.build("prefetch", "on_demand", {"tier": "cpu"}), None)
print(f"with a device sync after each load: on_demand vs resident {diff(ref, got):.3g}")
