"""Small awkward cases for compute-sanitizer (memcheck: out-of-bounds/misaligned accesses; racecheck:
shared-memory hazards). Also checks the results, so a run that is clean but wrong still fails.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/gpu/sanitize_case.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/gpu/sanitize_case.py --tiny
"""
import sys

import numpy as np

import cupy as cp
from common import empty, to_device
from ringattn import cuda, reference

rng = np.random.default_rng(1)
tiny = "--tiny" in sys.argv
cases = [(1, 37, 45, 2, 1, 59, True), (1, 5, 3, 2, 2, 128, True), (1, 9, 17, 1, 1, 200, False)]
if not tiny:
    cases += [(2, 97, 97, 4, 2, 64, True), (1, 1, 1, 1, 1, 1, False)]
worst = 0.0
for b, sq, sk, h, hkv, d, causal in cases:
    for dtype in ("float32",) if tiny else ("float32", "bfloat16", "float16"):
        q, k, v = (rng.standard_normal(s) for s in ((b, sq, h, d), (b, sk, hkv, d), (b, sk, hkv, d)))
        dout = rng.standard_normal(q.shape)
        Q, K, V, dO = (to_device(x, dtype) for x in (q, k, v, dout))
        out, lse = empty(q.shape, dtype), cp.full((b, h, sq), np.nan, cp.float32)
        pos = (sk - sq, 1)
        cuda.forward(Q, K, V, out, lse, q_pos=pos, causal=causal)
        dlt = cuda.delta(dO, out)
        g = [cp.zeros(x.shape, cp.float32) for x in (q, k, v)]
        cuda.backward(dO, Q, K, V, lse, dlt, *g, q_pos=pos, causal=causal)
        if dtype == "float32":
            worst = max(worst, reference.rel_error(out.get(), reference.attention_forward(q, k, v, causal=causal)[0]))
            for got, ref in zip(g, reference.attention_backward(dout, q, k, v, causal=causal)):
                worst = max(worst, reference.rel_error(got.get(), ref))
x = to_device(rng.standard_normal((70, 24)), "float32")
w1, b1 = to_device(rng.standard_normal((24, 40)), "float32"), to_device(rng.standard_normal(40), "float32")
w2, b2 = to_device(rng.standard_normal((40, 24)), "float32"), to_device(rng.standard_normal(24), "float32")
y = cuda.ffn_forward(x, w1, b1, w2, b2, chunk=32)
grads = [cp.zeros(a.shape, cp.float32) for a in (w1, b1, w2, b2)]
cuda.ffn_backward(x, w1, b1, w2, b2, y, *grads, chunk=32)
cp.cuda.Device().synchronize()
print(f"sanitize cases done; worst float32 relative error {worst:.2e}")
sys.exit(0 if worst < 1e-5 else 1)
