"""Every input check of the public API (api.py) and the kernel bindings (bindings.cpp) raises a
clear error that names the problem."""
import numpy as np
import pytest

import ringattn
from ringattn import _cpu
from ringattn import kernels as K
from ringattn import reference as R


def arrays(b=1, sq=5, sk=6, h=4, hk=2, d=8, dtype=np.float32):
    rng = np.random.default_rng()
    return (rng.standard_normal((b, sq, h, d)).astype(dtype), rng.standard_normal((b, sk, hk, d)).astype(dtype),
            rng.standard_normal((b, sk, hk, d)).astype(dtype))


def fwd(q, k, v, **kw):
    return ringattn.attention_forward(q, k, v, **kw)


# ---- api.py ------------------------------------------------------------------------------------
def test_wrong_ndim():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=r"q: expected 4 dimensions"):
        fwd(q[0], k, v)
    with pytest.raises(ValueError, match=r"k: expected 4 dimensions"):
        fwd(q, k[..., None], v)


def test_not_an_array():
    q, k, v = arrays()
    with pytest.raises(TypeError, match=r"v: expected an array \(NumPy, CuPy, .*\), got list"):
        fwd(q, k, [[1.0]])
    with pytest.raises(TypeError, match=r"lse: expected an array .*got str"):
        ringattn.attention_backward(q, q, k, v, q, "lse")


class _Exported:
    """An array known only through a protocol: __dlpack__ or __array_interface__ (no NumPy type)."""

    def __init__(self, a, protocol):
        self._a = a
        if protocol == "dlpack":
            self.__dlpack__ = a.__dlpack__
            self.__dlpack_device__ = a.__dlpack_device__
        else:
            self.__array_interface__ = a.__array_interface__


@pytest.mark.parametrize("protocol", ["dlpack", "array_interface"])
def test_protocol_objects_work_in_the_plain_api(protocol):
    """api.attention_forward / attention_backward take what ringattn.interop.as_array takes."""
    q, k, v = arrays()
    out, lse = fwd(q, k, v, causal=True)
    wrap = lambda a: _Exported(a, protocol)  # noqa: E731
    got_out, got_lse = fwd(wrap(q), wrap(k), wrap(v), causal=True)
    np.testing.assert_array_equal(got_out, out)
    np.testing.assert_array_equal(got_lse, lse)
    dout = np.ones_like(q)
    want = ringattn.attention_backward(dout, q, k, v, out, lse, causal=True)
    got = ringattn.attention_backward(*(wrap(a) for a in (dout, q, k, v, out, lse)), causal=True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_batch_and_dim_mismatch():
    q, k, v = arrays()
    k2, v2 = arrays(b=2)[1:]
    with pytest.raises(ValueError, match=r"batch mismatch: q 1, k 2"):
        fwd(q, k2, v2)
    k3, v3 = arrays(d=9)[1:]
    with pytest.raises(ValueError, match=r"head dim mismatch: q 8, k/v 9"):
        fwd(q, k3, v3)


def test_heads_not_divisible():
    q, _, _ = arrays(h=4)
    _, k, v = arrays(hk=3)
    with pytest.raises(ValueError, match=r"heads \(4\) must be a multiple of heads_kv \(3\)"):
        fwd(q, k, v)


def test_kv_shape_mismatch():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=r"k and v shapes differ"):
        fwd(q, k, v[:, :3])


def test_mixed_dtypes():
    q, k, v = arrays()
    with pytest.raises(TypeError, match=r"mixed dtypes: q float32, k float64"):
        fwd(q, k.astype(np.float64), v)


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.complex64])
def test_unsupported_dtype(dtype):
    q, k, v = (a.astype(dtype) for a in arrays())
    with pytest.raises(TypeError, match=rf"unsupported dtype {np.dtype(dtype).name} on the CPU"):
        fwd(q, k, v)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale(scale):
    with pytest.raises(ValueError, match=r"softmax_scale must be finite"):
        fwd(*arrays(), softmax_scale=scale)


def test_scale_not_a_number():
    with pytest.raises(TypeError, match=r"softmax_scale must be a number"):
        fwd(*arrays(), softmax_scale="big")


def test_empty_arrays():
    q, k, v = arrays()
    with pytest.raises(ValueError, match=r"q: empty array"):
        fwd(q[:, :0], k, v)
    with pytest.raises(ValueError, match=r"k: empty array"):
        fwd(q, k[:, :0], v[:, :0])


def test_head_dim_too_large():
    q, k, v = arrays(d=257)
    with pytest.raises(ValueError, match=r"head dim 257 is not supported \(1..256\)"):
        fwd(q, k, v)


@pytest.mark.parametrize("kw", [{"dropout_p": 0.1}, {"attn_mask": np.ones((5, 6), bool)}])
def test_unsupported_features_raise(kw):
    with pytest.raises(NotImplementedError, match=rf"(?s){next(iter(kw))}=.* is not supported"):
        fwd(*arrays(), **kw)


def test_backward_shape_and_dtype_checks():
    q, k, v = arrays()
    out, lse = fwd(q, k, v)
    with pytest.raises(ValueError, match=r"dout .* and out .* must have q's shape"):
        ringattn.attention_backward(out[:, :2], q, k, v, out, lse)
    with pytest.raises(TypeError, match=r"mixed dtypes: dout float64"):
        ringattn.attention_backward(out.astype(np.float64), q, k, v, out, lse)
    with pytest.raises(ValueError, match=r"lse: shape \(1, 4, 4\) but expected \(1, 4, 5\)"):
        ringattn.attention_backward(out, q, k, v, out, lse[..., :4])


class FakeCudaArray:
    """Host memory exposed through __cuda_array_interface__ (what CuPy arrays look like)."""

    def __init__(self, a):
        self._a = a
        self.shape, self.dtype, self.ndim = a.shape, a.dtype, a.ndim
        self.__cuda_array_interface__ = {"shape": a.shape, "typestr": a.dtype.str,
                                         "data": (a.ctypes.data, False), "version": 3, "strides": None}


def test_device_arrays_without_cupy_give_clear_error():
    """A __cuda_array_interface__ object on a machine without CuPy: a RuntimeError saying CuPy is
    needed (never a crash, never a CPU run); a host/device mix names each argument's kind."""
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: host memory must not be passed as device memory")
    q, k, v = (FakeCudaArray(a) for a in arrays())
    with pytest.raises(RuntimeError, match=r"CuPy is required for device arrays"):
        fwd(q, k, v)
    with pytest.raises(TypeError, match=r"mixed host and device arrays: device \(CuPy\) q; host \(NumPy\) k, v"):
        fwd(q, *arrays()[1:])
    with pytest.raises(TypeError, match=r"mixed host and device arrays: device \(CuPy\) q, k, v; host \(NumPy\) "
                                        r"dout, out, lse"):
        ringattn.attention_backward(*(np.zeros((1, 5, 4, 8), np.float32),), q, k, v,
                                    np.zeros((1, 5, 4, 8), np.float32), np.zeros((1, 4, 5), np.float32))


def test_device_arrays_when_cuda_module_missing(monkeypatch):
    """With CuPy (here: the emulated device's stand-in) but a build without ringattn._cuda, the first
    kernel call says the CUDA module was not built."""
    import sys

    import emu_device as emu
    from ringattn.backends import cuda as backend

    monkeypatch.setitem(sys.modules, "ringattn._cuda", None)  # import now fails as in a CPU-only build
    monkeypatch.delattr(ringattn, "_cuda", raising=False)  # (an earlier import left it on the package)
    monkeypatch.setattr(backend._state, "xp", emu.xp)
    monkeypatch.setattr(backend._state, "module", None)
    q, k, v = (emu.xp.asarray(a) for a in arrays())
    with pytest.raises(RuntimeError, match=r"built without its CUDA module"):
        fwd(q, k, v)
    with pytest.raises(RuntimeError, match=r"built without its CUDA module"):
        ringattn.attention_backward(q, q, k, v, q, emu.xp.zeros((1, 4, 5), np.float32))


# ---- bindings.cpp (kernel level) ---------------------------------------------------------------
def outputs(q):
    b, sq, h, _ = q.shape
    return np.empty_like(q), np.empty((b, h, sq), K.lse_dtype(q.dtype))


def test_binding_read_only_output():
    q, k, v = arrays()
    out, lse = outputs(q)
    out.flags.writeable = False
    with pytest.raises(ValueError, match=r"out: output array is read-only"):
        K.forward(q, k, v, out, lse)


def test_binding_shape_checks():
    q, k, v = arrays()
    out, lse = outputs(q)
    with pytest.raises(ValueError, match=r"out: shape \(1, 5, 4, 7\) but expected \(1, 5, 4, 8\)"):
        K.forward(q, k, v, out[..., :7], lse)
    with pytest.raises(ValueError, match=r"lse: shape"):
        K.forward(q, k, v, out, lse[:, :2])
    with pytest.raises(ValueError, match=r"lse: dtype float64 differs"):
        K.forward(q, k, v, out, lse.astype(np.float64))
    with pytest.raises(ValueError, match=r"v: shape"):
        K.forward(q, k, v[:, :2], out, lse)
    with pytest.raises(ValueError, match=r"k: batch 2 differs from q's 1"):
        K.forward(q, *arrays(b=2)[1:], out, lse)
    with pytest.raises(ValueError, match=r"k: head dim 9 differs from q's 8"):
        K.forward(q, *arrays(d=9)[1:], out, lse)
    with pytest.raises(ValueError, match=r"heads \(4\) must be a multiple of heads_kv \(3\)"):
        K.forward(q, *arrays(hk=3)[1:], out, lse)
    with pytest.raises(ValueError, match=r"q: expected 4 dimensions, got 3"):
        K.forward(q[0], k, v, out, lse)


def test_binding_dtype_and_layout_checks():
    q, k, v = arrays()
    out, lse = outputs(q)
    with pytest.raises(ValueError, match=r"q: unsupported dtype float16"):
        K.forward(q.astype(np.float16), k, v, out, lse)
    with pytest.raises(ValueError, match=r"k: dtype float64 differs from the other inputs"):
        K.forward(q, k.astype(np.float64), v, out, lse)
    with pytest.raises(ValueError, match=r"q: the last axis must be contiguous"):
        K.forward(np.asfortranarray(q), k, v, out, lse)
    qd, kd, vd = arrays(d=300)
    o2, l2 = outputs(qd)
    with pytest.raises(ValueError, match=r"head dim must be in 1..256, got 300"):
        K.forward(qd, kd, vd, o2, l2)


def test_binding_scale_and_positions():
    q, k, v = arrays()
    out, lse = outputs(q)
    with pytest.raises(ValueError, match=r"softmax_scale must be finite"):
        K.forward(q, k, v, out, lse, scale=float("nan"))
    with pytest.raises(ValueError, match=r"position strides must be >= 1"):
        K.forward(q, k, v, out, lse, q_pos=(0, 0))
    with pytest.raises(ValueError, match=r"position strides must be >= 1"):
        K.forward(q, k, v, out, lse, k_pos=(0, -1))


def test_binding_backward_checks():
    q, k, v = arrays()
    out, lse = fwd(q, k, v)
    dlt = K.delta(out, out)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    with pytest.raises(ValueError, match=r"dk: shape"):
        K.backward(out, q, k, v, lse, dlt, dq, dk[:, :1], dv)
    with pytest.raises(ValueError, match=r"dout: shape"):
        K.backward(out[:, :1], q, k, v, lse, dlt, dq, dk, dv)
    with pytest.raises(ValueError, match=r"delta: shape"):
        K.backward(out, q, k, v, lse, dlt[..., :1], dq, dk, dv)
    dv.flags.writeable = False
    with pytest.raises(ValueError, match=r"dv: output array is read-only"):
        K.backward(out, q, k, v, lse, dlt, dq, dk, dv)
    with pytest.raises(ValueError, match=r"dout: shape"):
        K.delta(out[:, :2], out)
    with pytest.raises(ValueError, match=r"delta: dtype float64 differs"):
        K.delta(out, out, into=np.empty(dlt.shape, np.float64))


def test_active_isa_is_built():
    assert _cpu.active_isa() in _cpu.built_isas().split(",")
    assert _cpu.max_threads() >= 1


# ---- issue 11, point 10: arguments that used to be accepted or gave an AttributeError ------------------
@pytest.mark.parametrize("scale", ["0.5", b"0.5", True, False, np.bool_(True), [0.5], np.array([0.5])])
def test_scale_must_be_a_real_number(scale):
    q, k, v = arrays()
    with pytest.raises(TypeError, match=r"softmax_scale must be a number \(int or float\), got"):
        fwd(q, k, v, softmax_scale=scale)
    out, lse = fwd(q, k, v)
    with pytest.raises(TypeError, match=r"softmax_scale must be a number \(int or float\), got"):
        ringattn.attention_backward(out, q, k, v, out, lse, softmax_scale=scale)


@pytest.mark.parametrize("scale", [2, 0.25, np.float32(0.25), np.float64(0.5), np.int64(1)])
def test_scale_numbers_accepted(scale):
    q, k, v = arrays()
    out, _ = fwd(q, k, v, softmax_scale=scale)
    ref, _ = R.attention_forward(q, k, v, False, float(scale))
    assert R.rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_lse_dtype_must_match_forward(dtype):
    q, k, v = arrays(dtype=dtype)
    out, lse = fwd(q, k, v)
    want = "float64" if dtype == np.float64 else "float32"
    for bad in (np.int32, np.int64, np.float16, np.float64 if dtype == np.float32 else np.float32):
        with pytest.raises(TypeError, match=rf"lse: dtype {np.dtype(bad).name} but expected {want} for "
                                            rf"{np.dtype(dtype).name} inputs"):
            ringattn.attention_backward(out, q, k, v, out, lse.astype(bad))


@pytest.mark.parametrize("name", ["dout", "out", "lse"])
@pytest.mark.parametrize("kind", [list, tuple, float])
def test_backward_non_array_arguments_named(name, kind):
    q, k, v = arrays()
    out, lse = fwd(q, k, v)
    args = {"dout": out.copy(), "out": out, "lse": lse}
    args[name] = kind(args[name].ravel()[0]) if kind is float else kind(args[name].tolist())
    with pytest.raises(TypeError, match=rf"^{name}: expected an array \(.*\), got {kind.__name__}$"):
        ringattn.attention_backward(args["dout"], q, k, v, args["out"], args["lse"])

