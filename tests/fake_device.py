"""A host-backed device array for CPU-only tests: FakeDeviceArray exposes __cuda_array_interface__ (v3)
over host NumPy memory, so tests can exercise the device-array code paths (dispatch, parsing, stream
handling, staging) without a GPU. Its pointers are host memory: real kernels refuse them ("data pointer
is not CUDA device memory"); the kernels built as C++ for the CPU (tests/test_cuda_emulated.py) run on them.
"""
import numpy as np

from ringattn.device import bfloat16, from_bfloat16_bits, to_bfloat16_bits


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
