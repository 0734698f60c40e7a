"""Blockwise attention kernels (cpp/attention.cpp) against the float64 reference.

Every kernel call writes into outputs poisoned with NaN (or, for the accumulating backward, into
known random arrays whose surroundings are NaN), so an unwritten or overwritten element fails.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ringattn
from ringattn import _cpu
from ringattn import kernels as K
from ringattn import reference as R

TOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]

# (batch, seq_q, seq_k, heads, heads_kv, dim): awkward sizes, seq_q != seq_k both ways, GQA, MQA.
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (1, 97, 97, 2, 1, 59),       # GQA, odd dim
    (3, 40, 97, 2, 2, 128),      # seq_q < seq_k, batch 3
    (2, 130, 70, 4, 2, 64),      # seq_q > seq_k: causal leaves fully masked rows
    (1, 33, 65, 4, 1, 256),      # MQA, largest head dim
    (1, 1025, 31, 1, 1, 16),     # long query side, short key side
    (1, 17, 1025, 3, 1, 5),      # long key side
]


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def inputs(rng, shape, dtype):
    b, sq, sk, h, hk, d = shape
    return rand(rng, (b, sq, h, d), dtype), rand(rng, (b, sk, hk, d), dtype), rand(rng, (b, sk, hk, d), dtype)


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)


def embedded(start):
    """A view equal to `start` inside a NaN-filled buffer with padding after the last axis
    (the padding must stay NaN: the kernel may only touch the view)."""
    buf = np.full(start.shape[:-1] + (start.shape[-1] + 3,), np.nan, dtype=start.dtype)
    view = buf[..., : start.shape[-1]]
    view[...] = start
    return buf, view


def check_lse(lse, ref, tol):
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    assert np.all(lse[~fin] == -np.inf)
    if fin.any():
        assert R.rel_error(lse[fin], ref[fin]) < tol


def kernel_forward(q, k, v, causal, **kw):
    b, sq, h, _ = q.shape
    out = poisoned(q.shape, q.dtype)
    lse = poisoned((b, h, sq), K.lse_dtype(q.dtype))
    kw.setdefault("q_pos", (k.shape[1] - sq, 1))
    K.forward(q, k, v, out, lse, causal=causal, **kw)
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape, causal, dtype):
    rng = np.random.default_rng()
    q, k, v = inputs(rng, shape, dtype)
    out, lse = kernel_forward(q, k, v, causal)
    ref_out, ref_lse = R.attention_forward(q, k, v, causal=causal)
    assert out.dtype == dtype and lse.dtype == K.lse_dtype(dtype)
    assert R.rel_error(out, ref_out) < TOL[dtype]
    check_lse(lse, ref_lse, TOL[dtype])
    masked = ~np.isfinite(ref_lse)  # fully masked rows: out exactly 0
    assert np.all(np.moveaxis(out, 1, 2)[masked] == 0)
    if causal and shape[1] > shape[2]:
        assert masked.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(shape, causal, dtype):
    rng = np.random.default_rng()
    q, k, v = inputs(rng, shape, dtype)
    dout = rand(rng, q.shape, dtype)
    out, lse = ringattn.attention_forward(q, k, v, causal=causal)
    delta = K.delta(dout, out, into=poisoned(lse.shape, lse.dtype))
    np.testing.assert_allclose(delta, np.einsum("bshd,bshd->bhs", dout.astype(np.float64), out), rtol=TOL[dtype] * 10,
                               atol=TOL[dtype] * 10)
    # backward accumulates (+=): start from known random arrays living inside NaN padding, at the
    # gradient's scale (a start much larger than the gradient would round the sum start + grad to
    # eps * |start|, which is no fault of the kernel but can exceed the bound relative to |grad|).
    refs = R.attention_backward(dout, q, k, v, causal=causal)
    starts = [(rand(rng, a.shape, dtype) * (np.sqrt(np.mean(r**2)) or 1.0)).astype(dtype) for a, r in zip((q, k, v), refs)]
    bufs, views = zip(*(embedded(s) for s in starts))
    K.backward(dout, q, k, v, lse, delta, *views, q_pos=(k.shape[1] - q.shape[1], 1), causal=causal)
    for name, buf, view, start, ref in zip("qkv", bufs, views, starts, refs):
        assert np.isnan(buf[..., -3:]).all(), f"d{name}: wrote outside its view"
        err = R.rel_error(view.astype(np.float64) - start, ref)
        assert err < TOL[dtype], f"d{name}: rel error {err:.2e}"
    # the public API (zeroed gradients) agrees
    for name, g, ref in zip("qkv", ringattn.attention_backward(dout, q, k, v, out, lse, causal=causal), refs):
        assert R.rel_error(g, ref) < TOL[dtype], f"d{name}"


@pytest.mark.parametrize("causal", [False, True])
def test_backward_finite_differences(causal):
    rng = np.random.default_rng()
    q, k, v = inputs(rng, (1, 4, 5, 2, 1, 3), np.float64)
    w = rng.standard_normal(q.shape)  # loss = sum(out * w), so dout = w

    def loss(q_, k_, v_):
        return float(np.sum(ringattn.attention_forward(q_, k_, v_, causal=causal)[0] * w))

    out, lse = ringattn.attention_forward(q, k, v, causal=causal)
    grads = ringattn.attention_backward(w, q, k, v, out, lse, causal=causal)
    eps = 1e-6
    for x, g in zip((q, k, v), grads):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + eps
            up = loss(q, k, v)
            x[idx] = old - eps
            down = loss(q, k, v)
            x[idx] = old
            num[idx] = (up - down) / (2 * eps)
        assert R.rel_error(g, num) < 1e-7


@pytest.mark.parametrize("dtype", DTYPES)
def test_positions_and_accumulate_merge_key_halves(dtype):
    """Striped layout: queries at r + P*i, key halves at s + P*j. Forward over one half, then
    accumulate=True with the other, equals attention over all keys; backward sums likewise."""
    rng = np.random.default_rng()
    b, h, hk, d, P = 2, 4, 2, 24, 3
    sq, sk = 70, 45
    q = rand(rng, (b, sq, h, d), dtype)
    k = rand(rng, (b, 2 * sk, hk, d), dtype)
    v = rand(rng, (b, 2 * sk, hk, d), dtype)
    qp = (0, P)  # query 0 (position 0) sees no key: a fully masked row
    halves = [(slice(0, sk), (1, P)), (slice(sk, 2 * sk), (1 + P * sk, P))]  # second half strictly later
    for causal in (False, True):
        for order in (halves, halves[::-1]):
            out = poisoned(q.shape, dtype)
            lse = poisoned((b, h, sq), K.lse_dtype(dtype))
            (s0, kp0), (s1, kp1) = order
            K.forward(q, k[:, s0], v[:, s0], out, lse, q_pos=qp, k_pos=kp0, causal=causal)
            K.forward(q, k[:, s1], v[:, s1], out, lse, q_pos=qp, k_pos=kp1, causal=causal, accumulate=True)
            qpos = R.positions(sq, *qp)
            kpos = np.concatenate([R.positions(sk, *halves[0][1]), R.positions(sk, *halves[1][1])])
            ref_out, ref_lse = R.attention_forward(q, k, v, causal=causal, q_pos=qpos, k_pos=kpos)
            assert R.rel_error(out, ref_out) < TOL[dtype]
            check_lse(lse, ref_lse, TOL[dtype])
            if causal:
                assert (~np.isfinite(ref_lse)).any() and np.isfinite(ref_lse).any()  # the mask matters here

        # backward over the two halves accumulates into the full gradient
        dout = rand(rng, q.shape, dtype)
        out = np.ascontiguousarray(ref_out, dtype=dtype)
        lse = np.ascontiguousarray(ref_lse, dtype=K.lse_dtype(dtype))
        dlt = K.delta(dout, out)
        dq = np.zeros_like(q)
        dk = np.zeros_like(k)
        dv = np.zeros_like(v)
        for s, kp in halves:
            K.backward(dout, q, k[:, s], v[:, s], lse, dlt, dq, dk[:, s], dv[:, s], q_pos=qp, k_pos=kp, causal=causal)
        refs = R.attention_backward(dout, q, k, v, causal=causal, q_pos=qpos, k_pos=kpos)
        for g, ref in zip((dq, dk, dv), refs):
            assert R.rel_error(g, ref) < TOL[dtype]


def test_accumulate_with_fully_masked_block_leaves_result_unchanged():
    rng = np.random.default_rng()
    q, k, v = inputs(rng, (1, 50, 30, 2, 1, 8), np.float32)
    out, lse = kernel_forward(q, k, v, True, q_pos=(0, 1), k_pos=(20, 1))  # rows 0..19 see nothing
    assert np.all(lse[:, :, :20] == -np.inf) and np.all(out[:, :20] == 0)
    before = out.copy(), lse.copy()
    K.forward(q, k, v, out, lse, q_pos=(0, 1), k_pos=(1000, 1), causal=True, accumulate=True)  # all keys later
    np.testing.assert_array_equal(out, before[0])
    np.testing.assert_array_equal(lse, before[1])


def test_non_contiguous_inputs():
    rng = np.random.default_rng()
    b, s, h, d = 2, 77, 4, 32
    qt = rand(rng, (b, h, s, d), np.float32)       # (batch, heads, seq, dim) storage
    q = qt.transpose(0, 2, 1, 3)                   # strided view, last axis contiguous
    kv = rand(rng, (b, s, 2, 2, d), np.float32)    # k and v interleaved in one buffer
    k, v = kv[:, :, 0], kv[:, :, 1]
    for causal in (False, True):
        ref_out, ref_lse = R.attention_forward(q, k, v, causal=causal)
        out, lse = kernel_forward(q, k, v, causal)
        assert R.rel_error(out, ref_out) < 1e-5
        out_t = poisoned((b, h, s, d), np.float32).transpose(0, 2, 1, 3)  # strided output view
        K.forward(q, k, v, out_t, poisoned((b, h, s), np.float32), q_pos=(0, 1), causal=causal)
        assert R.rel_error(out_t, ref_out) < 1e-5
        # last axis not contiguous: the public API copies (its one documented rule)
        q2 = np.asfortranarray(q)
        out2, _ = ringattn.attention_forward(q2, k, v, causal=causal)
        assert R.rel_error(out2, ref_out) < 1e-5
        dout = rand(rng, q.shape, np.float32)
        grads = ringattn.attention_backward(dout, q, k, v, out, lse, causal=causal)
        for g, ref in zip(grads, R.attention_backward(dout, q, k, v, causal=causal)):
            assert R.rel_error(g, ref) < 1e-5


def test_long_causal_block_skipping_matches_reference():
    """Several query and key blocks with zigzag-like offsets: blocks past the diagonal are skipped."""
    rng = np.random.default_rng()
    q, k, v = inputs(rng, (1, 300, 520, 1, 1, 16), np.float32)
    qp, kp = (333, 1), (17, 1)
    out, lse = kernel_forward(q, k, v, True, q_pos=qp, k_pos=kp)
    ref_out, ref_lse = R.attention_forward(q, k, v, causal=True, q_pos=R.positions(300, *qp), k_pos=R.positions(520, *kp))
    assert R.rel_error(out, ref_out) < 1e-5
    check_lse(lse, ref_lse, 1e-5)


ISA_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import numpy as np, ringattn
    from ringattn import _cpu, reference as R, kernels as K
    from naive_precision import bound, naive_attention, term_floor, term_scales
    assert _cpu.active_isa() == {isa!r}, _cpu.active_isa()
    rng = np.random.default_rng()
    for dt, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        for (b, sq, sk, h, hk, d) in ((2, 97, 70, 4, 2, 59), (1, 33, 130, 2, 1, 128), (1, 1, 3, 1, 1, 1)):
            q = rng.standard_normal((b, sq, h, d)).astype(dt)
            k = rng.standard_normal((b, sk, hk, d)).astype(dt)
            v = rng.standard_normal((b, sk, hk, d)).astype(dt)
            dout = rng.standard_normal(q.shape).astype(dt)
            for causal in (False, True):
                out = np.full(q.shape, np.nan, dt)
                lse = np.full((b, h, sq), np.nan, K.lse_dtype(dt))
                K.forward(q, k, v, out, lse, q_pos=(sk - sq, 1), causal=causal)
                ro, rl = R.attention_forward(q, k, v, causal=causal)
                err_lse = R.rel_error(np.nan_to_num(lse, neginf=0), np.nan_to_num(rl, neginf=0))
                assert err_lse < tol, (dt, b, sq, sk, h, hk, d, causal, err_lse)
                # out, dq, dk, dv are sums that can cancel (one query over three keys): each is held
                # to the fixed bound, or to 2x the same-precision naive error / the rounding floor.
                got = (out, *ringattn.attention_backward(dout, q, k, v, out, lse, causal=causal))
                refs = (ro, *R.attention_backward(dout, q, k, v, causal=causal))
                naive = naive_attention(q, k, v, dout, causal, dt)
                terms = term_scales(q, k, v, dout, causal)
                for name, x, r, n, t in zip(("out", "dq", "dk", "dv"), got, refs, naive, terms):
                    err, lim = R.rel_error(x, r), bound(tol, R.rel_error(n, r), term_floor(t, r, dt))
                    assert err < lim, (name, dt, b, sq, sk, h, hk, d, causal, err, lim)
    print("ok")
    """
)


@pytest.mark.parametrize("isa,threads", [("avx512", 1), ("avx2", 2), ("generic", 3)])
def test_every_isa_build_and_thread_count(isa, threads):
    """The ISA is chosen once per process, so each build runs in its own subprocess (also covers
    the single-thread backward, which writes dq directly, and an odd thread count)."""
    if isa not in _cpu.built_isas().split(","):
        pytest.skip(f"{isa} not built")
    env = dict(os.environ, RINGATTN_ISA=isa, OMP_NUM_THREADS=str(threads))
    script = ISA_SCRIPT.format(isa=isa, tests=os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=120)
    if r.returncode and "not supported by this CPU" in r.stderr:
        pytest.skip(f"{isa} not supported by this CPU")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_bench_kernel_quick_smoke():
    from ringattn.bench import kernel as bench_kernel

    rows = bench_kernel.bench([(1, 2, 1, 64, 16, True)], threads=_cpu.max_threads(), repeats=1, use_torch=False, gap=0,
                              progress=None)
    assert {(r["pass"], r["impl"]) for r in rows} == {(p, i) for p in ("fwd", "fwd+bwd") for i in ("ringattn", "numpy")}
    assert all(r["time_s"] > 0 and np.isfinite(r["gflops"]) for r in rows)
    assert "x numpy" in bench_kernel.format_table(rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_query_row_propagates(dtype):
    """A NaN in a query row gives NaN for that row (as the reference), never a silent 'empty' row."""
    rng = np.random.default_rng()
    q, k, v = inputs(rng, (1, 70, 90, 2, 1, 16), dtype)
    q[0, 5, 1, 3] = np.nan
    out, lse = kernel_forward(q, k, v, False)
    assert np.isnan(out[0, 5, 1]).all() and np.isnan(lse[0, 1, 5])
    good = np.ones(out.shape, bool)
    good[0, 5, 1] = False
    ref_out, _ = R.attention_forward(q, k, v)
    assert R.rel_error(out[good], ref_out[good]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_hidden_keys_are_never_read(dtype):
    """Causal: keys after every query position are skipped, not computed and discarded. NaN in
    them (K and V) must not reach out, lse or dq, and their dk, dv stay exactly as they were."""
    rng = np.random.default_rng()
    sq, sk, seen = 150, 400, 150
    q, k, v = inputs(rng, (1, sq, sk, 2, 1, 24), dtype)
    k[:, seen:] = np.nan
    v[:, seen:] = np.nan
    out, lse = kernel_forward(q, k, v, True, q_pos=(0, 1))
    ref_out, ref_lse = R.attention_forward(q, k[:, :seen], v[:, :seen], causal=True)
    assert R.rel_error(out, ref_out) < TOL[dtype]
    check_lse(lse, ref_lse, TOL[dtype])
    dout = rand(rng, q.shape, dtype)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    K.backward(dout, q, k, v, lse, K.delta(dout, out), dq, dk, dv, q_pos=(0, 1), causal=True)
    refs = R.attention_backward(dout, q, k[:, :seen], v[:, :seen], causal=True)
    assert R.rel_error(dq, refs[0]) < TOL[dtype]
    assert R.rel_error(dk[:, :seen], refs[1]) < TOL[dtype] and R.rel_error(dv[:, :seen], refs[2]) < TOL[dtype]
    assert np.all(dk[:, seen:] == 0) and np.all(dv[:, seen:] == 0)


OOM_SCRIPT = textwrap.dedent(
    """
    import resource
    import numpy as np
    from ringattn import _cpu, kernels as K

    def problem(sq, d=64):
        # One head and one key: the inputs are O(seq_q x dim), and so is each thread's dq scratch
        # in the multithreaded backward, which therefore needs `threads` times one input's memory.
        q = np.zeros((1, sq, 1, d), np.float32)
        k = np.zeros((1, 1, 1, d), np.float32)
        lse = np.zeros((1, 1, sq), np.float32)
        return (q, q, k, k, lse, lse, np.zeros_like(q), np.zeros_like(k), np.zeros_like(k))

    def vm_bytes():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

    threads = _cpu.max_threads()
    assert threads >= 4, threads
    K.backward(*problem(1000))  # starts the OpenMP threads (their stacks) before the limit
    big = problem(1 << 18)      # 64 MiB per array; the scratch is threads x 64 MiB
    scratch = threads * big[0].nbytes
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # Room for half the scratch: every allocation of the call fits except the scratch itself.
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + scratch // 2, hard))
    try:
        K.backward(*big)
        print("no error")
    except MemoryError as e:
        print("MemoryError", e)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    K.backward(*problem(1000))  # the process is healthy afterwards
    print("ok")
    """
)


def test_backward_out_of_memory_raises_memory_error():
    """The multithreaded backward's per-thread scratch is allocated outside the OpenMP region:
    running out of memory is a MemoryError in Python, not std::terminate (SIGABRT) in a thread."""
    env = dict(os.environ, OMP_NUM_THREADS="8")
    r = subprocess.run([sys.executable, "-c", OOM_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert r.stdout.split("\n")[0].startswith("MemoryError") and r.stdout.split()[-1] == "ok", r.stdout
