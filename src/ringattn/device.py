"""Device arrays without importing CuPy: __cuda_array_interface__ parsing and a host-backed fake.

`describe(a, name)` turns any object exposing __cuda_array_interface__ (CuPy, Numba, PyTorch ...;
versions 0-3) into a plain `Desc`: data pointer, shape, strides in bytes, dtype name, read-only flag
and the producer's stream. The CUDA bindings (ringattn._cuda) take those descriptors.

`FakeDeviceArray` exposes that interface over host NumPy memory, so CPU-only CI can exercise the
device-array code paths (dispatch, parsing, stream handling, staging). Its pointers are host memory:
real kernels refuse them ("data pointer is not CUDA device memory").
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


class FakeDeviceArray:
    """__cuda_array_interface__ (v3) over a host NumPy array: shape/dtype/strides like CuPy's.

    dtype=ringattn.device.bfloat16 marks uint16 host data as bfloat16 (exported as typestr '<V2').
    `stream` is what the interface reports; `version` and `typestr` can be overridden for tests.
    """

    def __init__(self, host, stream=None, version=3, dtype=None, typestr=None, readonly=False):
        self.host = host
        self.dtype = host.dtype if dtype is None else dtype
        self._typestr = typestr or ("<V2" if dtype is bfloat16 else host.dtype.str)
        self._stream, self._version, self._readonly = stream, version, readonly

    @property
    def shape(self):
        return self.host.shape

    @property
    def ndim(self):
        return self.host.ndim

    @property
    def strides(self):
        return self.host.strides

    @property
    def size(self):
        return self.host.size

    @property
    def __cuda_array_interface__(self):
        cai = {"shape": self.host.shape, "typestr": self._typestr,
               "data": (self.host.__array_interface__["data"][0], self._readonly),
               "strides": None if self.host.flags.c_contiguous else self.host.strides,
               "version": self._version}
        if self._version >= 3:
            cai["stream"] = self._stream
        return cai

    def get(self):
        """Host copy as float (bfloat16 decoded), like cupy.ndarray.get()."""
        return from_bfloat16_bits(self.host) if self.dtype is bfloat16 else self.host.copy()

    def astype(self, dtype, copy=True):
        if dtype is self.dtype or (dtype is not bfloat16 and self.dtype is not bfloat16 and
                                   np.dtype(dtype) == self.host.dtype and not copy):
            return self
        vals = self.get().astype(np.float32) if self.dtype is bfloat16 else self.host
        if dtype is bfloat16:
            return FakeDeviceArray(to_bfloat16_bits(vals), dtype=bfloat16)
        return FakeDeviceArray(np.asarray(vals).astype(dtype))

    def __getitem__(self, idx):
        return FakeDeviceArray(self.host[idx], self._stream, self._version,
                               self.dtype if self.dtype is bfloat16 else None)

    def __repr__(self):
        return f"FakeDeviceArray(shape={self.shape}, dtype={self.dtype})"


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
