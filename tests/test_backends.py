"""The backend contract: backends.cpu and backends.cuda expose the same names with the same
signatures, backend_for is the one host/device decision (a mix is one TypeError naming each
argument's kind), the emulation is selected only explicitly, and the CUDA backend's kernels on the
emulated device equal the float64 reference."""
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import emu_device as emu
from ringattn import backends, reference
from ringattn.backends import cpu, cuda
from test_cuda_emulated import ffn_ref, naive_same_precision, qkv, rounded

rng = np.random.default_rng()
TESTS = Path(__file__).resolve().parent
FUNCTIONS = ["is_mine", "check_dtype", "lse_dtype", "acc_dtype", "empty", "zeros", "asarray", "to_host",
             "ascontiguous", "last_axis_contiguous", "scatter_add", "forward", "delta", "backward", "ffn_forward", "ffn_backward",
             "layernorm_forward", "add_layernorm_forward", "layernorm_backward", "rope", "softmax_xent", "sum_squares",
             "adamw_update", "linear_forward", "linear_backward", "embedding_backward"]


@pytest.fixture(scope="module")
def dev():
    """backends.cuda on the emulated device for this module; the real modules afterwards."""
    emu.kernels()  # builds (or skips without CUDA headers) before anything is installed
    emu.install()
    yield cuda
    emu.uninstall()


# ---- the contract -----------------------------------------------------------------------------------
def test_same_public_names(dev):
    assert set(cpu.__all__) == set(cuda.__all__)
    for name in cpu.__all__:
        assert hasattr(cpu, name) and hasattr(cuda, name), name
    assert (cpu.name, cuda.name) == ("cpu", "cuda")
    assert cpu.xp is np and cuda.xp is emu.xp


@pytest.mark.parametrize("name", FUNCTIONS)
def test_same_signatures(name):
    assert inspect.signature(getattr(cpu, name)) == inspect.signature(getattr(cuda, name)), name


def test_make_transport_signature_extends_cpu():
    """The Ring calls make_transport(comm, src, dst, progress=...) on either; cuda adds cuda_aware."""
    a = list(inspect.signature(cpu.make_transport).parameters)
    b = list(inspect.signature(cuda.make_transport).parameters)
    assert b[:len(a)] == a and b[len(a):] == ["cuda_aware"]


def test_dtypes():
    assert cpu.acc_dtype(np.float32) == np.float32 and cpu.acc_dtype("float64") == np.float64
    assert cpu.lse_dtype(np.float64) == np.float64 and cpu.lse_dtype(np.float32) == np.float32
    for dt in ("float16", "bfloat16", "float32", emu.bfloat16, np.float16):
        assert cuda.acc_dtype(dt) == np.float32 and cuda.lse_dtype(dt) == np.float32
    assert cuda.check_dtype("bfloat16") == emu.bfloat16
    with pytest.raises(TypeError, match="float64 on the GPU"):
        cuda.acc_dtype(np.float64)
    with pytest.raises(TypeError, match="float16 on the CPU"):
        cpu.acc_dtype(np.float16)


# ---- backend_for ------------------------------------------------------------------------------------
def test_backend_for_decides(dev):
    h = np.zeros(3, np.float32)
    d = emu.xp.zeros(3, np.float32)
    assert backends.backend_for(h, None, h) is cpu
    assert backends.backend_for() is cpu and backends.backend_for(None) is cpu
    assert backends.backend_for(d, None, d) is cuda
    assert backends.backend_for(q=d, k=d) is cuda
    assert cuda.is_mine(d) and not cuda.is_mine(h) and cpu.is_mine(h) and not cpu.is_mine(d)


def test_backend_for_mix_is_one_type_error(dev):
    h = np.zeros(3, np.float32)
    d = emu.xp.zeros(3, np.float32)
    with pytest.raises(TypeError) as e:
        backends.backend_for(q=d, k=h, v=d, bias=None)
    msg = str(e.value)
    assert "device (CuPy) q, v" in msg and "host (NumPy) k" in msg and "bias" not in msg
    with pytest.raises(TypeError, match=r"device \(CuPy\) argument 1; host \(NumPy\) argument 0"):
        backends.backend_for(h, d)


# ---- selection of the emulation ---------------------------------------------------------------------
def _fresh_python(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=TESTS, env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_emulation_is_never_selected_by_default():
    """A fresh process (with the emulated build on disk and the test helpers importable) is on the
    real backend: nothing but an explicit use_emulation() selects the emulation."""
    out = _fresh_python(
        "import importlib.util\n"
        "from ringattn.backends import cuda\n"
        "assert not cuda.is_emulated()\n"
        "if importlib.util.find_spec('cupy') is None:\n"
        "    try:\n"
        "        cuda.xp\n"
        "        raise SystemExit('cuda.xp did not raise without CuPy')\n"
        "    except RuntimeError as e:\n"
        "        assert 'CuPy is required' in str(e), e\n"
        "print('real')\n")
    assert out.strip() == "real"


def test_uninstall_restores_the_real_modules(dev):
    """ringattn.cuda (the layer over the kernels) asks the backend for its modules on every call, so
    install / uninstall switch it with no patching of its own."""
    from ringattn import cuda as layer

    assert cuda.is_emulated() and cuda.module() is emu.kernels() and layer._mod() is emu.kernels()
    assert layer._xp() is emu.xp
    emu.uninstall()
    try:
        assert not cuda.is_emulated()
        assert getattr(cuda.module(), "emulated", False) is False  # the real ringattn._cuda again
        assert layer._mod() is cuda.module()
    finally:
        emu.install()


def test_emulation_without_the_compiled_module():
    """CPU-only CI may have no ringattn._cuda: install() still works, and leaves no emulated module
    registered as ringattn._cuda behind."""
    emu.kernels()  # build in this process so the child only loads the cached module
    out = _fresh_python(
        "import sys\n"
        "sys.modules['ringattn._cuda'] = None  # as in a build without nvcc\n"
        "import numpy as np, emu_device as emu\n"
        "from ringattn.backends import cuda\n"
        "emu.install()\n"
        "x = cuda.asarray(np.ones((1, 3, 1, 4)), 'float32')\n"
        "out, lse = cuda.empty(x.shape, 'float32'), cuda.empty((1, 1, 3), 'float32')\n"
        "cuda.forward(x, x, x, out, lse)\n"
        "assert np.allclose(cuda.to_host(out), 1)\n"
        "assert sys.modules['ringattn._cuda'] is None\n"
        "print('ok')\n")
    assert out.strip() == "ok"


# ---- allocation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_allocation(dev, dtype):
    e = dev.empty((3, 4), dtype)
    assert dev.is_mine(e) and dev.to_host(e).dtype == dev.check_dtype(dtype)
    assert np.isnan(dev.to_host(e).astype(np.float32)).all()  # poisoned
    assert not dev.to_host(dev.zeros((2,), dtype)).astype(np.float32).any()
    x = rounded(rng.standard_normal((5, 3)), dtype)
    d = dev.asarray(x, dtype)
    h = dev.to_host(d)
    assert isinstance(h, np.ndarray) and not dev.is_mine(h) and np.array_equal(h.astype(np.float64), x)
    h[...] = 0  # a copy: the device array is unchanged
    assert np.array_equal(dev.to_host(d).astype(np.float64), x)
    t = dev.ascontiguous(d.T)
    assert t.flags.c_contiguous and np.array_equal(dev.to_host(t).astype(np.float64), x.T)


def test_scatter_add_accumulates_repeats(dev):
    for be in (cpu, dev):
        dst = be.zeros((4, 2), "float32")
        idx = be.asarray(np.array([1, 3, 1]))
        be.scatter_add(dst, idx, be.asarray(np.ones((3, 2)), "float32"))
        assert np.array_equal(be.to_host(dst)[:, 0], [0, 2, 0, 1]), be.name


# ---- kernels through the backend (the same code on both backends) ------------------------------------
def attend(be, q, k, v, dout, causal, dtype):
    """Forward and backward written once against the contract: what the Ring will do."""
    q, k, v, dout = (be.asarray(x, dtype) for x in (q, k, v, dout))
    b, sq, h, _ = q.shape
    out = be.empty(q.shape, be.acc_dtype(dtype))
    lse = be.empty((b, h, sq), be.lse_dtype(dtype))
    be.forward(q, k, v, out, lse, q_pos=(k.shape[1] - sq, 1), causal=causal)
    dq, dk, dv = (be.zeros(a.shape, be.acc_dtype(dtype)) for a in (q, k, v))
    out_in = out.astype(q.dtype)
    dlt = be.delta(dout, out_in)
    be.backward(dout, q, k, v, lse, dlt, dq, dk, dv, q_pos=(k.shape[1] - sq, 1), causal=causal)
    return [be.to_host(a).astype(np.float64) for a in (out, lse, dq, dk, dv)]


@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal", [
    (2, 97, 97, 4, 2, 59, True),   # GQA, awkward sizes
    (1, 33, 70, 2, 1, 64, True),   # seq_q < seq_k, MQA
    (1, 1, 40, 3, 3, 8, False),    # seq 1 (head dim 1 cancels too much for a fixed bound: test_cuda_emulated)
])
@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_kernels_float32_match_reference(dev, backend, b, sq, sk, h, hkv, d, causal):
    be = cpu if backend == "cpu" else dev
    q, k, v = qkv(b, sq, sk, h, hkv, d)
    dout = rng.standard_normal(q.shape)
    out, lse, dq, dk, dv = attend(be, q, k, v, dout, causal, "float32")
    ro, rl = reference.attention_forward(q, k, v, causal=causal)
    rq, rk, rv = reference.attention_backward(dout, q, k, v, causal=causal)
    for got, ref in ((out, ro), (lse, rl), (dq, rq), (dk, rk), (dv, rv)):
        assert reference.rel_error(got, ref) < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_kernels_16bit_within_2x_of_naive(dev, dtype):
    """16-bit inputs with float32 accumulators (out, dq, dk, dv): the error stays within 2x that of
    attention computed naively in the same precision."""
    b, s, h, hkv, d = 1, 61, 2, 1, 32
    q, k, v = (rounded(x, dtype) for x in qkv(b, s, s, h, hkv, d))
    dout = rounded(rng.standard_normal(q.shape), dtype)
    out, _, dq, dk, dv = attend(dev, q, k, v, dout, True, dtype)
    refs = [reference.attention_forward(q, k, v, causal=True)[0],
            *reference.attention_backward(dout, q, k, v, causal=True)]
    naive = naive_same_precision(q, k, v, True, dtype, dout)
    for got, ref, nv in zip((out, dq, dk, dv), refs, naive):
        err, err_naive = reference.rel_error(got, ref), reference.rel_error(nv, ref)
        assert err <= 2 * err_naive, (err, err_naive)


def _ffn_inputs(tokens, width, hidden):
    """Fresh float64 (x, w1, b1, w2, b2, dy) for an FFN test, scaled to keep the GELU in range."""
    x = rng.standard_normal((tokens, width))
    w1, w2 = rng.standard_normal((width, hidden)) / 4, rng.standard_normal((hidden, width)) / 6
    b1, b2, dy = rng.standard_normal(hidden), rng.standard_normal(width), rng.standard_normal((tokens, width))
    return x, w1, b1, w2, b2, dy


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_ffn_backward_into_dx_overwriting_gradients(dev, backend):
    """ffn_backward(dx=..., accumulate=False) on both backends: dx written into the given array,
    NaN-poisoned gradients overwritten (not added to)."""
    be = cpu if backend == "cpu" else dev
    tokens, width, hidden = 37, 12, 33
    x, w1, b1, w2, b2, dy = _ffn_inputs(tokens, width, hidden)
    f = lambda a: be.asarray(a, "float32")  # noqa: E731
    grads = [f(np.full(a.shape, np.nan)) for a in (w1, b1, w2, b2)]
    dx_in = f(np.full((tokens, width), np.nan))
    dx = be.ffn_backward(f(x), f(w1), f(b1), f(w2), f(b2), f(dy), *grads, chunk=16, dx=dx_in, accumulate=False)
    assert dx is dx_in
    _, rdx, *rg = ffn_ref(x, w1, b1, w2, b2, dy)
    assert reference.rel_error(be.to_host(dx), rdx) < 1e-5
    for got, ref in zip(grads, rg):
        assert reference.rel_error(be.to_host(got), ref) < 1e-5


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_ffn_float32_match_reference(dev, backend):
    be = cpu if backend == "cpu" else dev
    tokens, width, hidden = 45, 12, 33
    x, w1, b1, w2, b2, dy = _ffn_inputs(tokens, width, hidden)
    f = lambda a: be.asarray(a, "float32")  # noqa: E731
    y = be.ffn_forward(f(x), f(w1), f(b1), f(w2), f(b2), chunk=16)
    grads = [be.zeros(a.shape, "float32") for a in (w1, b1, w2, b2)]
    dx = be.ffn_backward(f(x), f(w1), f(b1), f(w2), f(b2), f(dy), *grads, chunk=16)
    ry, rdx, *rg = ffn_ref(x, w1, b1, w2, b2, dy)
    assert reference.rel_error(be.to_host(y), ry) < 1e-5
    assert reference.rel_error(be.to_host(dx), rdx) < 1e-5
    for got, ref in zip(grads, rg):
        assert reference.rel_error(be.to_host(got), ref) < 1e-5
