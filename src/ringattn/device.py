"""Device arrays without importing CuPy: __cuda_array_interface__ parsing and bfloat16 helpers.

`describe(a, name)` turns any object exposing __cuda_array_interface__ (CuPy, Numba, PyTorch ...;
versions 0-3) into a plain `Desc`: data pointer, shape, strides in bytes, dtype name, read-only flag
and the producer's stream. The CUDA bindings (ringattn._cuda) take those descriptors.

`bfloat16` marks host bfloat16 data stored as uint16 bit patterns (NumPy has no bfloat16);
`BFloat16Array` exports such CuPy storage as a bfloat16 device array. The host-backed test double,
FakeDeviceArray, lives in tests/fake_device.py.
"""
from collections import namedtuple

import numpy as np

# typestr -> dtype name for the types the kernels know; others get a message naming them.
_TYPESTRS = {"<f2": "float16", "<f4": "float32", "<f8": "float64", "|b1": "bool"}

Desc = namedtuple("Desc", "ptr shape strides dtype readonly stream")
Desc.binding = lambda d: (d.ptr, d.shape, d.strides, d.dtype, d.readonly)  # what _cuda takes

# Stream values of interface v3: None (no synchronisation needed), 1 (legacy default stream),
# 2 (per-thread default stream), or a cudaStream_t handle. 0 is disallowed by the protocol.
LEGACY_DEFAULT_STREAM = 1
PER_THREAD_DEFAULT_STREAM = 2


def dtype_name(a, typestr):
    """Name of the element type: from the typestr, or (bfloat16, which has no typestr of its own and
    is exported as raw 2-byte void '<V2') from the array's dtype."""
    name = _TYPESTRS.get(typestr)
    if name is not None:
        return name
    dt = getattr(a, "dtype", None)
    dname = str(getattr(dt, "name", dt))
    if typestr.endswith("V2") and dname == "bfloat16":
        return "bfloat16"
    return dname if dt is not None else typestr


def c_strides(shape, itemsize):
    """Byte strides of a C-contiguous array (what a missing/None `strides` entry means)."""
    out, step = [], itemsize
    for n in reversed(shape):
        out.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(out))


def describe(a, name="array"):
    """Parse a.__cuda_array_interface__ into a Desc; raises TypeError/ValueError naming `name`."""
    try:
        cai = a.__cuda_array_interface__
    except AttributeError:
        raise TypeError(f"{name}: expected a device array (with __cuda_array_interface__), "
                        f"got {type(a).__name__}") from None
    if not isinstance(cai, dict):
        raise TypeError(f"{name}: __cuda_array_interface__ must be a dict, got {type(cai).__name__}")
    version = cai.get("version", 0)
    if not isinstance(version, int) or not 0 <= version <= 3:
        raise ValueError(f"{name}: unsupported __cuda_array_interface__ version {version!r} (0..3)")
    for key in ("shape", "typestr", "data"):
        if key not in cai:
            raise ValueError(f"{name}: __cuda_array_interface__ has no '{key}'")
    if cai.get("mask") is not None:
        raise ValueError(f"{name}: masked device arrays are not supported")
    shape = tuple(int(n) for n in cai["shape"])
    typestr = str(cai["typestr"])
    try:
        itemsize = int(typestr[2:])
    except ValueError:
        raise ValueError(f"{name}: malformed typestr {typestr!r}") from None
    if typestr[0] == ">" and itemsize > 1:
        raise ValueError(f"{name}: big-endian data ({typestr!r}) is not supported")
    data = cai["data"]
    if not (isinstance(data, tuple) and len(data) == 2):
        raise ValueError(f"{name}: 'data' must be a (pointer, read_only) tuple, got {data!r}")
    ptr, readonly = int(data[0]), bool(data[1])
    strides = cai.get("strides")
    strides = c_strides(shape, itemsize) if strides is None else tuple(int(s) for s in strides)
    if len(strides) != len(shape):
        raise ValueError(f"{name}: strides {strides} do not match shape {shape}")
    stream = cai.get("stream") if version >= 3 else None
    if stream is not None:
        stream = int(stream)
        if stream == 0:
            raise ValueError(f"{name}: __cuda_array_interface__ stream 0 is disallowed by the protocol "
                             "(use 1 for the legacy default stream)")
    return Desc(ptr, shape, strides, dtype_name(a, typestr), readonly, stream)


def same_stream(a, b):
    """Whether two stream handles name the same stream (0 and 1 both mean the legacy default)."""
    norm = lambda s: 0 if s in (0, LEGACY_DEFAULT_STREAM) else s  # noqa: E731
    return norm(a) == norm(b)


def producer_streams(descs, current):
    """Streams (in first-seen order) the consumer on `current` must wait for before reading descs."""
    out = []
    for d in descs:
        if d.stream is not None and not same_stream(d.stream, current) and d.stream not in out:
            out.append(d.stream)
    return out


class BFloat16:
    """Stand-in dtype for host-side bfloat16 data (NumPy has none): stored as uint16 bit patterns."""
    name = "bfloat16"
    itemsize = 2

    def __repr__(self):
        return "bfloat16"


bfloat16 = BFloat16()


def to_bfloat16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bfloat16_bits(b):
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class BFloat16Array:
    """A bfloat16 device array over uint16 CuPy storage, exported with typestr '<V2' (as ml_dtypes
    does), for CuPy builds without a bfloat16 dtype. get() returns float32 host values."""

    def __init__(self, u16):
        self.a, self.dtype, self.shape, self.ndim = u16, bfloat16, u16.shape, u16.ndim

    @property
    def __cuda_array_interface__(self):
        return dict(self.a.__cuda_array_interface__, typestr="<V2", descr=[("", "<V2")])

    def get(self):
        return from_bfloat16_bits(np.asarray(self.a.get()).view(np.uint16))
