"""Device-array code paths in CPU-only CI: dispatch, __cuda_array_interface__ parsing, stream
handling, binding validation, and the no-GPU errors. Uses FakeDeviceArray (host memory)."""
import importlib.util

import numpy as np
import pytest

import ringattn
from ringattn import device
from ringattn.device import bfloat16
from fake_device import FakeDeviceArray

try:
    from ringattn import _cuda
except ImportError:
    _cuda = None

needs_module = pytest.mark.skipif(_cuda is None, reason="ringattn._cuda not built (no nvcc at build time)")
no_gpu = _cuda is None or _cuda.device_count() == 0
needs_no_gpu = pytest.mark.skipif(not no_gpu, reason="a GPU is present: the no-device errors cannot happen")
# What a device array meets first on a machine without a GPU: allocation needs CuPy (absent in CPU-only CI);
# with CuPy, the kernels' device check.
HAS_CUPY = importlib.util.find_spec("cupy") is not None
NO_DEVICE = "no CUDA device available" if HAS_CUPY else "CuPy is required for device arrays"

rng = np.random.default_rng()


def fake(shape, dtype=np.float32, **kw):
    return FakeDeviceArray(rng.standard_normal(shape).astype(dtype), **kw)


# ---- dispatch ---------------------------------------------------------------------------------------
@needs_no_gpu
def test_forward_routes_device_arrays_to_cuda_and_raises_clearly():
    q = fake((1, 5, 2, 8))
    with pytest.raises(RuntimeError, match=NO_DEVICE):
        ringattn.attention_forward(q, fake((1, 5, 2, 8)), fake((1, 5, 2, 8)), causal=True)


@needs_no_gpu
def test_backward_routes_device_arrays_to_cuda_and_raises_clearly():
    q = fake((1, 5, 2, 8))
    lse = FakeDeviceArray(np.zeros((1, 2, 5), np.float32))
    with pytest.raises(RuntimeError, match=NO_DEVICE):
        ringattn.attention_backward(q, q, q, q, q, lse)


def test_mixed_host_and_device_arrays_rejected():
    q = np.zeros((1, 5, 2, 8), np.float32)
    with pytest.raises(TypeError, match=r"mixed host and device arrays: device \(CuPy\) k; host \(NumPy\) q, v"):
        ringattn.attention_forward(q, fake((1, 5, 2, 8)), q)


def test_numpy_arrays_still_use_the_cpu_kernels():
    q = rng.standard_normal((1, 7, 2, 8)).astype(np.float32)
    out, _ = ringattn.attention_forward(q, q, q)
    assert isinstance(out, np.ndarray)
    assert ringattn.reference.rel_error(out, ringattn.reference.attention_forward(q, q, q)[0]) < 1e-5


@needs_module
def test_module_imports_without_gpu_and_reports_itself():
    assert _cuda.archs() == ["80", "90"] or all(a.isdigit() or a.endswith("a") for a in _cuda.archs())
    assert _cuda.emulated is False
    if no_gpu:
        assert _cuda.device_count() == 0
        assert _cuda.device_error() != ""
        with pytest.raises(RuntimeError, match="no CUDA device available"):
            _cuda.synchronize(0)


@needs_module
@needs_no_gpu
def test_cuda_module_has_clear_errors_without_device():
    from ringattn import cuda

    assert cuda.device_count() == 0
    assert cuda.lse_dtype(np.float16) is np.float32 and cuda.lse_dtype(np.float32) is np.float32
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        cuda.require_device()
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        cuda.ffn_forward(fake((4, 3)), fake((3, 5)), fake((5,)), fake((5, 3)), fake((3,)))


# ---- interface parsing ------------------------------------------------------------------------------
def test_describe_contiguous_and_strided():
    host = np.zeros((3, 4, 5), np.float16)
    d = device.describe(FakeDeviceArray(host), "x")
    assert (d.shape, d.strides, d.dtype, d.readonly) == ((3, 4, 5), (40, 10, 2), "float16", False)
    assert d.ptr == host.ctypes.data
    view = host[:, ::2, 1:]
    d = device.describe(FakeDeviceArray(view), "x")
    assert d.strides == view.strides == (40, 20, 2) and d.ptr == view.ctypes.data


def test_describe_typestrs_and_bfloat16():
    assert device.describe(FakeDeviceArray(np.zeros(2, np.float32))).dtype == "float32"
    assert device.describe(FakeDeviceArray(np.zeros(2, np.float64))).dtype == "float64"
    bf = FakeDeviceArray(np.zeros(2, np.uint16), dtype=bfloat16)
    assert bf.__cuda_array_interface__["typestr"] == "<V2"
    assert device.describe(bf).dtype == "bfloat16"
    assert device.describe(FakeDeviceArray(np.zeros(2, np.int32))).dtype == "int32"
    with pytest.raises(ValueError, match="big-endian"):
        device.describe(FakeDeviceArray(np.zeros(2, ">f4")), "x")


def test_describe_stream_field_by_version():
    a = np.zeros(3, np.float32)
    assert device.describe(FakeDeviceArray(a, stream=None)).stream is None
    assert device.describe(FakeDeviceArray(a, stream=1)).stream == 1
    assert device.describe(FakeDeviceArray(a, stream=0xABC0)).stream == 0xABC0
    assert device.describe(FakeDeviceArray(a, stream=7, version=2)).stream is None  # v2 has no stream
    with pytest.raises(ValueError, match="stream 0 is disallowed"):
        device.describe(FakeDeviceArray(a, stream=0), "q")
    with pytest.raises(ValueError, match="version 9"):
        device.describe(FakeDeviceArray(a, version=9), "q")


def test_describe_rejects_non_device_objects():
    with pytest.raises(TypeError, match="q: expected a device array"):
        device.describe(np.zeros(3), "q")

    class Masked(FakeDeviceArray):
        @property
        def __cuda_array_interface__(self):
            return dict(super().__cuda_array_interface__, mask=object())

    with pytest.raises(ValueError, match="masked"):
        device.describe(Masked(np.zeros(3, np.float32)), "q")


def test_producer_streams():
    d = lambda s: device.Desc(1, (1,), (4,), "float32", False, s)  # noqa: E731
    # None: nothing to wait for; 1 and 0 are the same legacy default stream; duplicates once.
    assert device.producer_streams([d(None), d(1), d(0)], current=0) == []
    assert device.producer_streams([d(5), d(None), d(5), d(1)], current=0) == [5]
    assert device.producer_streams([d(5), d(1), d(7)], current=5) == [1, 7]


def test_fake_array_roundtrip_bfloat16():
    x = rng.standard_normal(100).astype(np.float32)
    bits = device.to_bfloat16_bits(x)
    back = device.from_bfloat16_bits(bits)
    assert np.max(np.abs(back - x) / np.abs(x)) <= 2.0**-8  # round to nearest: half an ulp of 8 bits
    # exactly representable values survive; ties round to even
    assert np.array_equal(device.from_bfloat16_bits(device.to_bfloat16_bits(back)), back)
    assert device.from_bfloat16_bits(device.to_bfloat16_bits(np.float32(1 + 2.0**-8)))[()] == 1.0


# ---- binding validation (runs before the device check, so it works without a GPU) -------------------
def desc(a):
    return device.describe(a).binding()


def fwd_args(q=None, k=None, v=None, out=None, lse=None):
    q = q or fake((2, 6, 4, 8))
    k = k or fake((2, 9, 2, 8))
    v = v or fake((2, 9, 2, 8))
    out = out or FakeDeviceArray(np.zeros((2, 6, 4, 8), np.float32))
    lse = lse or FakeDeviceArray(np.zeros((2, 4, 6), np.float32))
    return [desc(a) for a in (q, k, v, out, lse)] + [0, 1, 0, 1, True, 0.3, False, 0]


@needs_module
@pytest.mark.parametrize("change,message", [
    (dict(q=fake((2, 6, 4, 8), np.float64)), "q: unsupported dtype float64"),
    (dict(k=fake((2, 9, 2, 8), np.float16)), "k: dtype float16 but q has float32"),
    (dict(v=fake((2, 9, 2, 7))), r"v: shape \(2, 9, 2, 7\) but expected \(2, 9, 2, 8\)"),
    (dict(k=fake((2, 9, 3, 8)), v=fake((2, 9, 3, 8))), r"heads \(4\) must be a multiple of heads_kv \(3\)"),
    (dict(q=fake((2, 6, 4, 300)), k=fake((2, 9, 2, 300)), v=fake((2, 9, 2, 300))), "head dim must be in 1..256"),
    (dict(k=fake((3, 9, 2, 8))), "k: batch 3 differs from q's 2"),
    (dict(q=fake((2, 6, 4))), "q: expected 4 dimensions"),
    (dict(out=FakeDeviceArray(np.zeros((2, 6, 4, 8), np.float16))), "out: dtype float16 but expected float32$"),
    (dict(lse=FakeDeviceArray(np.zeros((2, 4, 6), np.float16))), "lse: dtype float16 but the kernels keep it in float32"),
    (dict(lse=FakeDeviceArray(np.zeros((2, 6, 4), np.float32))), r"lse: shape \(2, 6, 4\) but expected \(2, 4, 6\)"),
    (dict(out=FakeDeviceArray(np.zeros((2, 6, 4, 8), np.float32), readonly=True)), "out: output array is read-only"),
    (dict(q=FakeDeviceArray(np.zeros((2, 6, 4, 16), np.float32)[..., ::2])), "q: the last axis must be contiguous"),
])
def test_forward_validation_messages(change, message):
    with pytest.raises(ValueError, match=message):
        _cuda.attention_forward(*fwd_args(**change))


@needs_module
def test_validation_of_scalars_and_descriptors():
    args = fwd_args()
    bad_scale = args[:10] + [float("nan")] + args[11:]
    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        _cuda.attention_forward(*bad_scale)
    bad_pos = args[:6] + [0] + args[7:]
    with pytest.raises(ValueError, match="position strides must be >= 1"):
        _cuda.attention_forward(*bad_pos)
    with pytest.raises(ValueError, match="q: expected an array descriptor"):
        _cuda.attention_forward(*([123] + args[1:]))


@needs_module
def test_backward_validation_wants_float32_grads():
    q, k = fake((1, 6, 2, 8), np.float16), fake((1, 9, 2, 8), np.float16)
    st = FakeDeviceArray(np.zeros((1, 2, 6), np.float32))
    f32 = lambda a: FakeDeviceArray(np.zeros(a.shape, np.float32))  # noqa: E731
    f16 = lambda a: FakeDeviceArray(np.zeros(a.shape, np.float16))  # noqa: E731
    tail = [0, 1, 0, 1, False, 0.3, 0]
    with pytest.raises(ValueError, match="dq: the CUDA backward accumulates into float32"):
        _cuda.attention_backward(*[desc(a) for a in (q, q, k, k, st, st, f16(q), f32(k), f32(k))], *tail)
    with pytest.raises(ValueError, match=r"dk: shape \(1, 6, 2, 8\) but expected \(1, 9, 2, 8\)"):
        _cuda.attention_backward(*[desc(a) for a in (q, q, k, k, st, st, f32(q), f32(q), f32(k))], *tail)
    if no_gpu:  # everything valid: only now the missing device is reported
        with pytest.raises(RuntimeError, match="no CUDA device available"):
            _cuda.attention_backward(*[desc(a) for a in (q, q, k, k, st, st, f32(q), f32(k), f32(k))], *tail)


@needs_module
def test_ffn_validation_messages():
    x, w1, b1, w2, b2 = fake((10, 4)), fake((4, 6)), fake((6,)), fake((6, 4)), fake((4,))
    y, work = fake((10, 4)), FakeDeviceArray(np.zeros(6 * 5, np.float32))
    d = lambda *a: [desc(t) for t in a]  # noqa: E731
    with pytest.raises(ValueError, match=r"w2: shape \(4, 6\) but expected \(6, 4\)"):
        _cuda.ffn_forward(*d(x, w1, b1, fake((4, 6)), b2, y, work), 5, 0)
    with pytest.raises(ValueError, match="work: 30 elements but the kernels need 36"):
        _cuda.ffn_forward(*d(x, w1, b1, w2, b2, y, work), 6, 0)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        _cuda.ffn_forward(*d(x, w1, b1, w2, b2, y, work), 0, 0)
    with pytest.raises(ValueError, match="b1: dtype float16 but x has float32"):
        _cuda.ffn_forward(*d(x, w1, fake((6,), np.float16), w2, b2, y, work), 5, 0)
    if no_gpu:
        with pytest.raises(RuntimeError, match="no CUDA device available"):
            _cuda.ffn_forward(*d(x, w1, b1, w2, b2, y, work), 5, 0)


@needs_module
@needs_no_gpu
def test_host_pointer_never_reaches_a_kernel():
    """A fully valid call on host memory raises cleanly (here: no device; with a GPU: not device memory)."""
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        _cuda.attention_forward(*fwd_args())
