"""Compile the Gluon MMA quant decode (kernels/kv_quant_decode_mma.py) for sm_90 without a GPU and print, per
configuration, its registers / spills (the occupancy they allow, one-warp programs an SM) and its SASS instruction
count by kind. The cheap check of session 2026-11-30d before each device call.

    python experiments/kv_cache/aot_compile_mma.py
    PYTHONPATH=/tmp/triton36 python experiments/kv_cache/aot_compile_mma.py   # the device's Triton

The H200 image has Triton 3.6; this machine's Triton (3.9) allocates registers differently (int4 at 64-key steps:
255 here, 222 under 3.6, which is what the device ran). For numbers that match the device, install 3.6 beside it:
`pip download triton==3.6.0 --no-deps -d /tmp/w && pip install --no-deps --target /tmp/triton36 /tmp/w/triton-*.whl`.
Counts are static; the loop body dominates them (the kernel's branch for the residual tail adds code, not work).
"""

from __future__ import annotations

import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "attention"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aot_compile import resources  # noqa: E402
from aot_compile_quant import KINDS, sass_counts  # noqa: E402

from ollm_triton.kernels import kv_quant_decode_mma as M  # noqa: E402

KINDS = KINDS + ("LDL", "STL", "LDGSTS", "BAR")


def build(bits: int, bn: int, d: int = 128, gq: int = 4, t: int = 1, schedule: bool = False, maxnreg=None,
          stages: int = 1, varlen: bool = False):
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = M._quant_decode_mma_kernel
    s = M.layout_sizes(bits, d)
    ptr = {"Q": "*bf16", "KW": "*i32", "KS": "*bf16", "KZ": "*bf16", "VW_": "*i32", "VS": "*bf16", "VZ": "*bf16",
           "KR": "*bf16", "VR": "*bf16", "BLOCK_IDS": "*i32", "RES_IDS": "*i32", "VCH": "*i32", "O_PART": "*fp32",
           "L_PART": "*fp32", "ROW_QUANT": "*i32", "ROW_LEN": "*i32", "qk_scale": "fp32"}
    const = dict(stride_vs_n=1, H_KV=8, GQ=gq, T=t, D=d, BLOCK_K=128, BN=bn, KEY_GROUP=128, BITS=bits,
                 SYMMETRIC=False, HAS_BLOCK_IDS=schedule, HAS_WINDOW=schedule, WK=s["WK"], UK=s["UK"], VW=s["VW"],
                 UV=s["UV"], K_ASM=M.key_unpack_asm(bits, M.KEYS_EXACT), K_CONS=",".join(["=r"] * s["UK"] + ["r"]),
                 V_ASM=M.value_unpack_asm(bits), V_CONS=",".join(["=r"] * s["UV"] + ["r", "r"]),
                 KEYS_EXACT=M.KEYS_EXACT, STAGES=stages, VARLEN=varlen)
    sig = {n: ("constexpr" if n in const else ptr.get(n, "i32")) for n in fn.arg_names}
    # what the JIT sees at run time: 16-byte aligned tensors and strides divisible by 16 (stride_vs_n is 1)
    hinted = [i for i, n in enumerate(fn.arg_names) if n not in const and (sig[n].startswith("*") or "stride" in n)]
    src = GluonASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                         attrs={(i,): [["tt.divisibility", 16]] for i in hinted})
    opts = {"num_warps": 1, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def main():
    print(f"triton {triton.__version__}, target sm_90, one-warp programs")
    for bits, bn, extra in ((4, 64, {}), (4, 32, {}), (4, 32, {"maxnreg": 168}), (8, 32, {}), (8, 64, {}),
                            (2, 64, {}), (4, 64, {"schedule": True, "t": 2}), (8, 32, {"d": 64, "gq": 8}),
                            (4, 64, {"stages": 2}), (4, 64, {"stages": 3}), (4, 32, {"stages": 3}),
                            (4, 32, {"stages": 4}), (8, 32, {"stages": 3}), (8, 64, {"stages": 2}),
                            (2, 64, {"stages": 3}), (4, 64, {"varlen": True}), (4, 64, {"varlen": True, "stages": 3})):
        tag = f"int{bits} step {bn} {extra or ''}"
        try:
            k = build(bits, bn, **extra)
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a finding
            print(f"{tag:44s} FAILED: {type(e).__name__}: {str(e).splitlines()[-1][:160]}")
            continue
        ops = sass_counts(k)
        top = " ".join(f"{o}={ops[o]}" for o in KINDS if ops[o])
        print(f"{tag:44s} {resources(k)[:60]}\n{'':44s} {top}", flush=True)


if __name__ == "__main__":
    main()
