"""Small awkward cases for compute-sanitizer (memcheck: out-of-bounds/misaligned accesses; racecheck:
shared-memory hazards). Also checks the results, so a run that is clean but wrong still fails, and
prints a RESULT line at the end: a sanitizer run without it did not run the cases.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/gpu/sanitize_case.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/gpu/sanitize_case.py --tiny

CuPy's memory pools are switched off first: with them, a kernel reading past its array lands in
the pool's other blocks, which memcheck cannot tell from a valid access; without them every array
is its own cudaMalloc.
"""
import sys

import numpy as np

import cupy as cp

cp.cuda.set_allocator(None)
cp.cuda.set_pinned_memory_allocator(None)

import ringattn  # noqa: E402
from common import empty, host, result, to_device  # noqa: E402
from ringattn import cuda, reference  # noqa: E402

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
            worst = max(worst, reference.rel_error(host(out), reference.attention_forward(q, k, v, causal=causal)[0]))
            for got, ref in zip(g, reference.attention_backward(dout, q, k, v, causal=causal)):
                worst = max(worst, reference.rel_error(host(got), ref))
# The public API on CuPy arrays (its own allocations and casts).
q = rng.standard_normal((1, 33, 2, 64))
o, lse = ringattn.attention_forward(cp.asarray(q, cp.float32), cp.asarray(q, cp.float32), cp.asarray(q, cp.float32))
worst = max(worst, reference.rel_error(cp.asnumpy(o), reference.attention_forward(q, q, q)[0]))
x = to_device(rng.standard_normal((70, 24)), "float32")
w1, b1 = to_device(rng.standard_normal((24, 40)), "float32"), to_device(rng.standard_normal(40), "float32")
w2, b2 = to_device(rng.standard_normal((40, 24)), "float32"), to_device(rng.standard_normal(24), "float32")
y = cuda.ffn_forward(x, w1, b1, w2, b2, chunk=32)
grads = [cp.zeros(a.shape, cp.float32) for a in (w1, b1, w2, b2)]
cuda.ffn_backward(x, w1, b1, w2, b2, y, *grads, chunk=32)
cp.cuda.Device().synchronize()
ok = worst < 1e-5
print(f"sanitize cases {'done' if ok else 'WRONG'}; worst float32 relative error {worst:.2e}")
result(sanitize_cases=len(cases), sanitize_tiny=tiny, sanitize_worst_f32_rel=worst)
sys.exit(0 if ok else 1)
