"""Helpers shared by the GPU scripts: device arrays for the block-level kernels (bfloat16 as uint16
CuPy storage behind ringattn.device.BFloat16Array, so they do not depend on CuPy's own bfloat16),
CUDA-event timing, and the RESULT lines benchmarks/gpu/summary.py collects."""
import json
import statistics

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
    """A device array filled with NaN (poison) or, with fill=0, zeros."""
    if dtype == "bfloat16":
        return BF16(cp.full(shape, 0x7FC0 if fill != 0 else 0, cp.uint16))
    return cp.full(shape, fill, dtype=dtype)


def host(a):
    """float64 host copy of a CuPy array or BF16."""
    if isinstance(a, BF16):
        return device.from_bfloat16_bits(a.get()).astype(np.float64)
    return cp.asnumpy(a).astype(np.float64)


def gpu_time(fn, stream=None):
    """Milliseconds of fn() on the current stream, measured with CUDA events."""
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    fn()
    stop.record(stream)
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop)


def median_ms(fn, reps, timer=gpu_time):
    return statistics.median(timer(fn) for _ in range(reps))


def result(**numbers):
    """One RESULT line: numbers for summary.json (benchmarks/gpu/summary.py)."""
    print("RESULT " + json.dumps(numbers), flush=True)
