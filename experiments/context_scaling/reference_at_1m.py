"""How far is `quant_decode_varlen_ref` (K/V dequantized to bf16, attention in float32: the reference of
bench_engine.py's attention check above 32k keys) from exact float64 attention over the same int4 codes, as the
number of random keys grows to 1M? One KV head of 128 with four query heads, random bf16 K/V as bench_engine fills
the cache, int4 with groups of 128 (the codec's defaults). About 25 s and ~6 GB of host memory on the CPU.

    python experiments/context_scaling/reference_at_1m.py
"""

import math
import time

import torch

from ollm_triton.kernels import quant as Q
from ollm_triton.kernels.kv_quant_decode import quant_decode_varlen_ref

torch.manual_seed(0)
d, hkv, hq, G = 128, 1, 4, 128
for n in [8192, 131072, 1048576]:
    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, hkv, n, d, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(1, hkv, n, d, generator=gen, dtype=torch.bfloat16)
    sd = Q.scale_dtype_for(torch.bfloat16)
    kc, ks, kz = Q.quantize_keys_ref(k, 4, G, False, sd)
    vg = Q.value_group_size(G, d)
    vc, vs, vz = Q.quantize_values_ref(v, 4, vg, False, sd)
    q = torch.randn(1, hq, 1, d, generator=gen, dtype=torch.bfloat16)
    empty = torch.empty(1, hkv, 0, d, dtype=torch.bfloat16)
    kw = dict(bits=4, key_group=G, value_group=vg)
    ref32 = quant_decode_varlen_ref(q, kc, ks, kz, vc, vs, vz, empty, empty, [n], [n], **kw)
    # exact: dequantize in float64 from the same codes, attend in float64
    kd = Q.dequantize_keys_ref(kc, ks, kz, 4, G, d, False, torch.float64)
    vd = Q.dequantize_values_ref(vc, vs, vz, 4, vg, d, False, torch.float64)
    qg = q.double().view(1, hkv, hq // hkv, d)
    s = qg @ kd.transpose(-1, -2) / math.sqrt(d)
    p = torch.softmax(s, -1)
    exact = (p @ vd).view(1, hq, 1, d)
    rel = ((ref32.double() - exact).norm() / exact.norm()).item()
    rel_f32 = ((exact.float().to(torch.bfloat16).double() - exact).norm() / exact.norm()).item()
    print(f"n={n:>8}  |out| {exact.norm().item():.3e}  ref(bf16 dequant, fp32) vs exact: {rel:.2e}   "
          f"bf16 rounding of the exact output alone: {rel_f32:.2e}   ({time.time()-t0:.0f} s)", flush=True)
    del k, v, kc, vc, kd, vd, s, p
