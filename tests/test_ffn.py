"""Blockwise feed-forward kernels (cpp/ffn.cpp) against a float64 NumPy reference.

y = gelu_tanh(x @ w1 + b1) @ w2 + b2, processed in chunks of tokens; backward overwrites dx and
accumulates (+=) dw1, db1, dw2, db2 (or overwrites them: accumulate=False).
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ringattn import _cpu, kernels, reference

TOL = {np.float32: 1e-5, np.float64: 1e-12}
GELU_C, GELU_A = reference.GELU_C, reference.GELU_A


ffn_reference = reference.ffn  # the one float64 FFN reference


def gradient_term_scales(x, w1, b1, w2, b2, dy):
    """The weight and bias gradients are sums over tokens; the float32 rounding error of such a sum is
    bounded by eps * (sum of |terms|), not eps * |sum|. For tiny widths (1 element per gradient) the
    sum can cancel to far below its terms, so those outputs are compared relative to the norm of
    the summed magnitudes: |x|^T |dpre|, sum |dpre|, |h|^T |dy|, sum |dy|."""
    x, w1, b1, w2, b2, dy = (np.asarray(a, np.float64) for a in (x, w1, b1, w2, b2, dy))
    pre = x @ w1 + b1
    t = np.tanh(GELU_C * (pre + GELU_A * pre**3))
    h = 0.5 * pre * (1.0 + t)
    dgelu = 0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * pre**2)
    dpre = np.abs((dy @ w2.T) * dgelu)
    return np.abs(x).T @ dpre, dpre.sum(0), np.abs(h).T @ np.abs(dy), np.abs(dy).sum(0)


def rel_err(got, ref):
    ref = np.asarray(ref, np.float64)
    scale = np.linalg.norm(ref)
    return np.linalg.norm(np.asarray(got, np.float64) - ref) / (scale if scale > 0 else 1.0)


def make(rng, tokens, width, hidden, dtype, x_scale=1.0):
    x = (x_scale * rng.standard_normal((tokens, width))).astype(dtype)
    w1 = (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(dtype)
    b1 = (0.5 * rng.standard_normal(hidden)).astype(dtype)
    w2 = (rng.standard_normal((hidden, width)) / np.sqrt(hidden)).astype(dtype)
    b2 = (0.5 * rng.standard_normal(width)).astype(dtype)
    dy = rng.standard_normal((tokens, width)).astype(dtype)
    return x, w1, b1, w2, b2, dy


def run_kernels(x, w1, b1, w2, b2, dy, chunk, grads0):
    """Calls the bindings directly with NaN-poisoned outputs; returns y, dx, dw1, db1, dw2, db2."""
    y = np.full(x.shape, np.nan, x.dtype)
    _cpu.ffn_forward(x, w1, b1, w2, b2, y, chunk)
    dx = np.full(x.shape, np.nan, x.dtype)
    grads = [g.copy() for g in grads0]
    _cpu.ffn_backward(x, w1, b1, w2, b2, dy, dx, *grads, chunk)
    return [y, dx] + grads


def random_grads(rng, w1, b1, w2, b2):
    return [rng.standard_normal(a.shape).astype(a.dtype) for a in (w1, b1, w2, b2)]


SHAPES = [  # (tokens, width, hidden)
    (97, 59, 130),
    (97, 130, 59),
    (1, 3, 12),
    (97, 1, 4),
    (33, 3, 1),
]
CHUNKS = [1, 7, "tokens", 1000]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_matches_reference(dtype, shape, chunk):
    tokens, width, hidden = shape
    chunk = tokens if chunk == "tokens" else chunk
    rng = np.random.default_rng()
    x, w1, b1, w2, b2, dy = make(rng, tokens, width, hidden, dtype)
    grads0 = random_grads(rng, w1, b1, w2, b2)  # accumulate semantics: start from random arrays
    got = run_kernels(x, w1, b1, w2, b2, dy, chunk, grads0)
    ref = list(ffn_reference(x, w1, b1, w2, b2, dy))
    terms = gradient_term_scales(x, w1, b1, w2, b2, dy)
    scales = [np.linalg.norm(ref[0]), np.linalg.norm(ref[1])]
    for i, g0 in enumerate(grads0):
        ref[2 + i] = ref[2 + i] + g0.astype(np.float64)
        scales.append(np.linalg.norm(np.abs(g0.astype(np.float64)) + terms[i]))
    names = ["y", "dx", "dw1", "db1", "dw2", "db2"]
    for name, g, r, scale in zip(names, got, ref, scales):
        assert g.dtype == dtype, name
        assert np.isfinite(g).all(), f"{name}: unwritten (NaN) or non-finite elements"
        err = np.linalg.norm(g.astype(np.float64) - r) / scale  # y, dx: plain relative error
        assert err < TOL[dtype], f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_gradients_are_increments(dtype):
    """The accumulated part alone matches the reference gradient (not hidden by a large start value)."""
    rng = np.random.default_rng()
    x, w1, b1, w2, b2, dy = make(rng, 97, 59, 130, dtype)
    grads0 = random_grads(rng, w1, b1, w2, b2)
    got = run_kernels(x, w1, b1, w2, b2, dy, 16, grads0)
    ref = ffn_reference(x, w1, b1, w2, b2, dy)
    for g, g0, r in zip(got[2:], grads0, ref[2:]):
        inc = g.astype(np.float64) - g0.astype(np.float64)
        assert rel_err(inc, r) < (1e-5 if dtype == np.float32 else 1e-12) * 10  # difference of two sums
    # two calls sum: grads0 + 2 * grad
    again = [g.copy() for g in got[2:]]
    _cpu.ffn_backward(x, w1, b1, w2, b2, dy, np.empty_like(x), *again, 5)
    for g, g0, r in zip(again, grads0, ref[2:]):
        assert rel_err(g, g0.astype(np.float64) + 2 * r) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tokens,chunk", [(97, 16), (3, 256), (0, 8)])
def test_backward_overwrites_gradients_into_given_dx(dtype, tokens, chunk):
    """accumulate=False: NaN-poisoned dw1, db1, dw2, db2 come back as exactly this call's gradients
    (zeros for no tokens); dx= is the output written and returned."""
    rng = np.random.default_rng()
    x, w1, b1, w2, b2, dy = make(rng, tokens, 59, 130, dtype)
    grads = [np.full(a.shape, np.nan, dtype) for a in (w1, b1, w2, b2)]
    dx_in = np.full(x.shape, np.nan, dtype)
    dx = kernels.ffn_backward(x, w1, b1, w2, b2, dy, *grads, chunk=chunk, dx=dx_in, accumulate=False)
    assert dx is dx_in
    ref = ffn_reference(x, w1, b1, w2, b2, dy)
    for name, g, r in zip(["dx", "dw1", "db1", "dw2", "db2"], [dx] + grads, ref[1:]):
        assert np.isfinite(g).all() and rel_err(g, r) < TOL[dtype], name
    if tokens == 0:
        assert all(not g.any() for g in grads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_strided_inputs_and_outputs(dtype):
    """x, dy, y, dx as column-slice views (row stride > width), through the Python wrappers too."""
    rng = np.random.default_rng()
    tokens, width, hidden = 97, 59, 130
    _, w1, b1, w2, b2, _ = make(rng, tokens, width, hidden, dtype)
    xbig = rng.standard_normal((tokens, width + 9)).astype(dtype)
    dybig = rng.standard_normal((tokens, width + 4)).astype(dtype)
    x, dy = xbig[:, 5 : 5 + width], dybig[:, 3 : 3 + width]
    assert x.strides[0] == (width + 9) * x.itemsize
    ybig = np.full((tokens, width + 7), np.nan, dtype)
    dxbig = np.full((tokens, width + 3), np.nan, dtype)
    y, dx = ybig[:, 2 : 2 + width], dxbig[:, 1 : 1 + width]
    _cpu.ffn_forward(x, w1, b1, w2, b2, y, 13)
    grads = [np.zeros_like(a) for a in (w1, b1, w2, b2)]
    _cpu.ffn_backward(x, w1, b1, w2, b2, dy, dx, *grads, 13)
    ref = ffn_reference(x, w1, b1, w2, b2, dy)
    for name, g, r in zip(["y", "dx", "dw1", "db1", "dw2", "db2"], [y, dx] + grads, ref):
        assert rel_err(g, r) < TOL[dtype], name
    # Elements outside the views are untouched.
    assert np.isnan(ybig[:, :2]).all() and np.isnan(ybig[:, 2 + width :]).all()
    assert np.isnan(dxbig[:, :1]).all() and np.isnan(dxbig[:, 1 + width :]).all()
    # The Python wrappers give the same result on views.
    assert rel_err(kernels.ffn_forward(x, w1, b1, w2, b2, chunk=13), ref[0]) < TOL[dtype]
    grads = [np.zeros_like(a) for a in (w1, b1, w2, b2)]
    dx2 = kernels.ffn_backward(x, w1, b1, w2, b2, dy, *grads, chunk=13)
    assert rel_err(dx2, ref[1]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_gelu(dtype):
    """Pre-activations far into both tails (exp clamp path) stay finite and exact."""
    rng = np.random.default_rng()
    x, w1, b1, w2, b2, dy = make(rng, 64, 16, 64, dtype, x_scale=40.0)
    got = run_kernels(x, w1, b1, w2, b2, dy, 9, [np.zeros_like(a) for a in (w1, b1, w2, b2)])
    ref = ffn_reference(x, w1, b1, w2, b2, dy)
    for name, g, r in zip(["y", "dx", "dw1", "db1", "dw2", "db2"], got, ref):
        assert np.isfinite(g).all(), name
        assert rel_err(g, r) < TOL[dtype], f"{name}: rel err {rel_err(g, r):.2e}"


def test_backward_finite_differences():
    """Gradients of L = sum(y * r) by central differences on a tiny float64 case."""
    rng = np.random.default_rng()
    x, w1, b1, w2, b2, r = make(rng, 5, 3, 7, np.float64)
    params = [x, w1, b1, w2, b2]

    def loss():
        return float(np.sum(kernels.ffn_forward(*params, chunk=2) * r))

    grads = [np.zeros_like(a) for a in (w1, b1, w2, b2)]
    dx = kernels.ffn_backward(*params, r, *grads, chunk=2)
    eps = 1e-6
    for name, arr, g in zip(["x", "w1", "b1", "w2", "b2"], params, [dx] + grads):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            keep = arr[idx]
            arr[idx] = keep + eps
            lp = loss()
            arr[idx] = keep - eps
            lm = loss()
            arr[idx] = keep
            num[idx] = (lp - lm) / (2 * eps)
        assert rel_err(g, num) < 1e-7, f"{name}: rel err {rel_err(g, num):.2e}"


def test_bad_inputs_raise():
    rng = np.random.default_rng()
    x, w1, b1, w2, b2, dy = make(rng, 10, 6, 12, np.float32)
    y = np.empty_like(x)
    grads = [np.zeros_like(a) for a in (w1, b1, w2, b2)]
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        _cpu.ffn_forward(x, w1, b1, w2, b2, y, 0)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        _cpu.ffn_backward(x, w1, b1, w2, b2, dy, np.empty_like(x), *grads, -3)
    with pytest.raises(ValueError, match="w1"):
        _cpu.ffn_forward(x, w1[:5], b1, w2, b2, y, 4)
    with pytest.raises(ValueError, match="b1"):
        _cpu.ffn_forward(x, w1, b1[:3], w2, b2, y, 4)
    with pytest.raises(ValueError, match="w2"):
        _cpu.ffn_forward(x, w1, b1, w2.T.copy(), b2, y, 4)
    with pytest.raises(ValueError, match="y"):
        _cpu.ffn_forward(x, w1, b1, w2, b2, y[:9], 4)
    with pytest.raises(ValueError, match="dy"):
        _cpu.ffn_backward(x, w1, b1, w2, b2, dy[:, :5], np.empty_like(x), *grads, 4)
    with pytest.raises(ValueError, match="dw2"):
        _cpu.ffn_backward(x, w1, b1, w2, b2, dy, np.empty_like(x), grads[0], grads[1], grads[2][:, :2], grads[3], 4)
    with pytest.raises(ValueError, match="differs from the other inputs"):
        _cpu.ffn_forward(x, w1.astype(np.float64), b1, w2, b2, y, 4)
    with pytest.raises(ValueError, match="differs from the other inputs"):
        _cpu.ffn_backward(x, w1, b1, w2, b2, dy.astype(np.float64), np.empty_like(x), *grads, 4)
    with pytest.raises(ValueError, match="unsupported dtype"):
        _cpu.ffn_forward(x.astype(np.float16), w1, b1, w2, b2, y, 4)
    with pytest.raises(ValueError, match="read-only"):
        y.flags.writeable = False
        _cpu.ffn_forward(x, w1, b1, w2, b2, y, 4)


THREAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from ringattn import _cpu, kernels, reference
    assert _cpu.max_threads() == int(sys.argv[2]), _cpu.max_threads()
    rng = np.random.default_rng(1234)
    out = {}
    # Big enough that the kernels use both threads (they shrink the team for tiny work); the first
    # case has fewer chunks than threads, so chunks are split below `chunk`. With 2 threads the
    # weight gradients are summed in two per-thread partial sums, with 1 thread in one.
    for tokens, width, hidden, chunk in [(200, 96, 384, 256), (1025, 64, 256, 100), (999, 33, 130, 128)]:
        x = rng.standard_normal((tokens, width)).astype(np.float32)
        w1 = (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32)
        b1 = rng.standard_normal(hidden).astype(np.float32)
        w2 = (rng.standard_normal((hidden, width)) / np.sqrt(hidden)).astype(np.float32)
        b2 = rng.standard_normal(width).astype(np.float32)
        dy = rng.standard_normal((tokens, width)).astype(np.float32)
        grads = [np.zeros_like(a) for a in (w1, b1, w2, b2)]
        key = f"{tokens}_{width}_{hidden}_{chunk}"
        out[key + "_y"] = kernels.ffn_forward(x, w1, b1, w2, b2, chunk=chunk)
        out[key + "_dx"] = kernels.ffn_backward(x, w1, b1, w2, b2, dy, *grads, chunk=chunk)
        for name, g in zip(["dw1", "db1", "dw2", "db2"], grads):
            out[key + "_" + name] = g
    np.savez(sys.argv[1], **out)
    """
)


def test_independent_of_thread_count(tmp_path):
    script = tmp_path / "ffn_threads.py"
    script.write_text(THREAD_SCRIPT)
    results = {}
    for threads in (1, 2):
        path = tmp_path / f"out{threads}.npz"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        subprocess.run([sys.executable, str(script), str(path), str(threads)], env=env, check=True, timeout=120)
        results[threads] = np.load(path)
    assert len(results[1].files) == 18
    for key in results[1].files:
        assert rel_err(results[2][key], results[1][key]) < 1e-6, key
