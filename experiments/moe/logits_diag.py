"""Diagnostics for two GPU disagreements (experiments/moe/README.md section 2): who departs from a float32 reference
at gpt-oss-20b shapes in bf16 (the eager engine, transformers with its default and its eager experts), and how the
int4 captured step's per-step logits error against the eager engine compares with int4's own error against dense.

    python experiments/moe/logits_diag.py hf [LAYERS ...]     # default 1 4
    python experiments/moe/logits_diag.py int4
"""
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def hf(layers):
    spec = importlib.util.spec_from_file_location("bench_moe", ROOT / "scripts" / "bench_moe.py")
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    from ollm_triton.engine import load_engine

    for n in layers:
        args = type("A", (), dict(small=DEV == "cpu", layers=n))()  # on the CPU: the tiny stand-in (plumbing)
        arch = b.preset_arch("gpt_oss_20b", args)
        ids = b.hf_prompt(arch, 512)
        e16 = load_engine(arch, device=DEV, dtype=torch.bfloat16, seed=0, fast_decode="off")
        e32 = load_engine(arch, device=DEV, dtype=torch.float32, seed=0, fast_decode="off")
        with torch.no_grad():
            e32.model.load_state_dict({k: v.float() for k, v in e16.model.state_dict().items()})
        with torch.inference_mode():
            r32, tok, _ = b.eager_first_steps(e32, ids)
            r16, tok16, _ = b.eager_first_steps(e16, ids)
            out = {"engine eager bf16": r16}
            m = b.hf_from_engine(e16, arch)
            out["transformers bf16 default (" + str(getattr(m.config, "_experts_implementation", None)) + ")"] = \
                b.hf_first_steps(m, ids, tok)[0]
            for impl in ("eager", "grouped_mm", "batched_mm"):
                try:
                    m.set_experts_implementation(impl)
                    out[f"transformers bf16 experts={impl}"] = b.hf_first_steps(m, ids, tok)[0]
                except Exception as exc:  # noqa: BLE001 - an implementation this version lacks is a line
                    print(f"  experts={impl}: {type(exc).__name__}: {str(exc)[:100]}")
            del m
            m32 = b.hf_from_engine(e32, arch)
            h32 = b.hf_first_steps(m32, ids, tok)[0]
            print(f"layers {n}: engine fp32 vs transformers fp32 rel L2 {rel(r32, h32):.2e}; argmax bf16 engine "
                  f"{tok16.item()} fp32 {tok.item()}")
            for k, v in out.items():
                print(f"  {k:45s} vs fp32 engine {rel(v, r32):.3e}   vs fp32 transformers {rel(v, h32):.3e}")
        del e16, e32, m32
        if DEV == "cuda":
            torch.cuda.empty_cache()


def int4():
    from test_kernels_quant_window_sinks import PARAMS
    from test_static_window_sinks import gpt_oss_on_gpu as on_gpu
    from test_static_window_sinks import recording

    from ollm_triton.decoding.greedy import decode_loop
    from ollm_triton.registry import registry

    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0)).cuda()
    runs = {}
    for name, codec, more in (("int4 graph", lambda: registry.build("cache", "int4", PARAMS), {}),
                              ("int4 eager", lambda: registry.build("cache", "int4", PARAMS), {"fast_decode": "off"}),
                              ("dense eager", lambda: registry.build("cache", "dense"), {"fast_decode": "off"}),
                              ("dense graph", lambda: registry.build("cache", "dense"), {})):
        e, store = on_gpu(codec, **more), []
        if more:
            decode_loop(e, ids, 30, recording(store), None)
        else:
            e.fast_decoder().generate(ids, 30, recording(store))
        runs[name] = store
    print("step | row | int4 graph vs int4 eager | int4 eager vs dense eager | dense graph vs dense eager"
          " | same argmax")
    for s in range(30):
        for r in range(2):
            same = all(runs[n][t][r].argmax() == runs["int4 eager"][t][r].argmax() for t in range(s)
                       for n in ("int4 graph",))
            print(f"{s:4d} | {r} | {rel(runs['int4 graph'][s][r], runs['int4 eager'][s][r]):.3e} | "
                  f"{rel(runs['int4 eager'][s][r], runs['dense eager'][s][r]):.3e} | "
                  f"{rel(runs['dense graph'][s][r], runs['dense eager'][s][r]):.3e} | {same}")


if __name__ == "__main__":
    what = sys.argv[1]
    hf([int(x) for x in sys.argv[2:]] or [1, 4]) if what == "hf" else int4()
