"""Compile the attention kernels for sm_90 without a GPU (Triton's bundled ptxas) and print registers, spills and
shared memory per configuration: a cheap check before spending device time.

    python experiments/attention/aot_compile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ollm_triton.kernels.attention_decode import _attn_decode_split_kernel  # noqa: E402
from ollm_triton.kernels.attention_prefill import _attn_prefill_kernel  # noqa: E402
from ollm_triton.kernels.decode_merge import _merge_splits_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int):
    sig = {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in fn.arg_names}
    # What the JIT would see at run time: 16-byte aligned tensors and strides divisible by 16 (multiples of D).
    hinted = [i for i, name in enumerate(fn.arg_names) if name not in constexprs
              and (sig[name].startswith("*") or name.startswith("stride_") and name != "stride_tree")]
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in hinted})
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def report(tag, k):
    ttgir = k.asm["ttgir"]
    print(f"{tag:64s} smem={k.metadata.shared:6d} async_copies={ttgir.count('async_copy_global_to_local')} "
          f"wgmma={ttgir.count('warp_group_dot ')} {resources(k)[:32]}", flush=True)


def prefill(dt="bf16", d=128, bm=128, bn=128, warps=8, stages=2, **flags):
    types = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "KS", "VS")}
    types.update({"KV_BLOCKS": "*i32", "KV_FULL": "*i32", "KV_TOTAL": "*i32", "TREE": "*i8", "SUM_META": "*i32",
                  "qk_scale": "fp32"})
    const = dict(GROUP=4, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, HAS_WINDOW=False, HAS_TREE=False,
                 HAS_SUMMARY=False, DOT_PREC="tf32x3" if dt == "fp32" else "tf32")
    const.update(flags)
    return compile_one(_attn_prefill_kernel, types, const, warps, stages)


def decode(dt="bf16", d=128, rows=4, bn=64, warps=4, stages=4, **flags):
    types = {n: f"*{dt}" for n in ("Q", "K", "V")}
    types.update({"O_PART": "*fp32", "L_PART": "*fp32", "BLOCK_IDS": "*i32", "qk_scale": "fp32"})
    const = dict(GROUP=rows, HEAD_DIM=d, BLOCK_R=max(16, triton.next_power_of_2(rows)), BLOCK_N=bn, HAS_IDS=False,
                 HAS_WINDOW=False, DOT_PREC="tf32x3" if dt == "fp32" else "tf32")
    const.update(flags)
    return compile_one(_attn_decode_split_kernel, types, const, warps, stages)


def main():
    # The configurations the launchers pick (prefill_config; flash_decode's defaults), then alternatives.
    for cfg in [dict(), dict(HAS_WINDOW=True), dict(bm=64, bn=64, stages=3, HAS_TREE=True),
                dict(bn=64, stages=3, HAS_SUMMARY=True, HAS_WINDOW=True), dict(d=64), dict(dt="fp16"),
                dict(dt="fp32", bm=64, bn=32, warps=4), dict(d=16, bm=16, bn=64, warps=4, stages=3),
                dict(bn=64, stages=3), dict(stages=3)]:
        report(f"prefill {cfg}", prefill(**cfg))
    for cfg in [dict(), dict(rows=32, HAS_IDS=True, HAS_WINDOW=True), dict(rows=128, warps=8), dict(dt="fp32"),
                dict(stages=3), dict(bn=128)]:
        report(f"decode {cfg}", decode(**cfg))
    types = {"O_PART": "*fp32", "L_PART": "*fp32", "O": "*bf16"}
    merge = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_SPLIT=64)
    report("merge", compile_one(_merge_splits_kernel, types, merge, 4, 1))



def resources(kernel) -> str:
    """Registers / spills / stack from the cubin, through the cuobjdump that Triton's package carries."""
    import os
    import subprocess
    import tempfile

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([str(exe), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    line = [x for x in out.splitlines() if "REG" in x]
    return line[0].strip() if line else out[-200:]


if __name__ == "__main__":
    main()
