"""Helpers shared by the GPU scripts: bfloat16 device arrays over uint16 CuPy storage, timing."""
import numpy as np

import cupy as cp
from ringattn import device

BF16 = device.BFloat16Array


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
