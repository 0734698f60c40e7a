"""Helpers shared by the GPU scripts: bfloat16 device arrays over uint16 CuPy storage, timing."""
import numpy as np

import cupy as cp
from ringattn import device


class BF16:
    """A bfloat16 device array over 2-byte CuPy storage, exported with typestr '<V2' (like ml_dtypes)."""

    def __init__(self, u16):
        self.a, self.dtype, self.shape, self.ndim = u16, device.bfloat16, u16.shape, u16.ndim

    @property
    def __cuda_array_interface__(self):
        return dict(self.a.__cuda_array_interface__, typestr="<V2", descr=[("", "<V2")])

    def get(self):
        return device.from_bfloat16_bits(self.a.get().view(np.uint16))


def to_device(x, dtype):
    """Host float array -> CuPy array (float16/float32) or BF16."""
    if dtype == "bfloat16":
        return BF16(cp.asarray(device.to_bfloat16_bits(x)))
    return cp.asarray(np.ascontiguousarray(x, dtype=dtype))


def empty(shape, dtype, fill=np.nan):
    if dtype == "bfloat16":
        return BF16(cp.full(shape, 0x7FC0 if fill != 0 else 0, cp.uint16))
    return cp.full(shape, fill, dtype=dtype)


def gpu_time(fn, stream=None):
    """Milliseconds of fn() on the current stream, measured with CUDA events."""
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    fn()
    stop.record(stream)
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop)
