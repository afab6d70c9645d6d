"""Compile the fused quantized-KV decode kernel for sm_90 without a GPU (Triton's bundled ptxas) and count what one
compiled kernel does: registers, spills, shared memory, and SASS instructions by kind, per bit width and block
size. A cheap look at where the per-element work goes before spending device time on a profile.

    python experiments/kv_cache/aot_compile_quant.py

Counts are static (instructions in the kernel's code, not executed instructions); the loop body dominates them.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "attention"))

from aot_compile import compile_one, resources  # noqa: E402

from ollm_triton.kernels.kv_quant_decode import _quant_decode_kernel  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
KINDS = ("HMMA", "HGMMA", "FFMA", "FMUL", "FADD", "HFMA2", "HADD2", "LOP3", "SHF", "I2F", "F2F", "F2FP", "LDS", "STS",
         "LDSM", "LDG", "SHFL", "MUFU", "PRMT", "IMAD")


def sass_counts(kernel) -> collections.Counter:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([str(BIN / "cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    ops = collections.Counter()
    for line in out.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,6}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)", line)  # kernels past 64 KB too
        if m:
            ops[m.group(1)] += 1
    return ops


def quant(bits: int, block_k: int = 64, warps: int = 4, d: int = 128, gq: int = 4):
    p = 8 // bits
    least = 16  # tl.dot's minimum, as the launcher pads
    types = {"Q": "*bf16", "KC": "*u8", "VC": "*u8", "KS": "*bf16", "KZ": "*bf16", "VS": "*bf16", "VZ": "*bf16",
             "KR": "*bf16", "VR": "*bf16", "BLOCK_IDS": "*i32", "O_PART": "*fp32", "L_PART": "*fp32",
             "qk_scale": "fp32"}
    const = dict(H_KV=8, GQ=gq, T=1, D=d, BLOCK_D=max(least, d), BLOCK_J=max(least, d // p),
                 BLOCK_M=max(least, triton.next_power_of_2(gq)), BLOCK_K=block_k, KEY_GROUP=128, V_GROUPS=1,
                 V_GROUP=d, BITS=bits, SYMMETRIC=False, HAS_BLOCK_IDS=False, HAS_WINDOW=False,
                 MAGIC=True, DOT=tl.float16)
    return compile_one(_quant_decode_kernel, types, const, warps, 2)


def main():
    print(f"triton {triton.__version__}, target sm_90")
    for bits in (8, 4, 2):
        for block_k in (32, 64, 128):
            tag = f"int{bits} block_k={block_k}"
            try:
                k = quant(bits, block_k)
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a finding
                print(f"{tag:24s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            ops = sass_counts(k)
            top = " ".join(f"{o}={ops[o]}" for o in KINDS if ops[o])
            print(f"{tag:24s} smem={k.metadata.shared:6d} {resources(k)[:60]}\n{'':24s} {top}", flush=True)


if __name__ == "__main__":
    main()
