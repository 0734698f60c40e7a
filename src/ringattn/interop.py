"""Array interop for the plain API: anything exporting an array protocol, as the arrays the backends take.

Torch-free (ringattn.torch re-exports it), so ringattn.api can call it without importing torch.
"""
import numpy as np

from . import backends

_DLPACK_CPU, _DLPACK_CUDA = 1, 2  # DLDeviceType codes


def as_array(x, name="array"):
    """An array ringattn's plain API takes, from anything exporting an array protocol (no copy).

    NumPy arrays and device arrays (__cuda_array_interface__) come back as they are; objects with
    __dlpack__ become NumPy arrays (CPU memory) or arrays of the CUDA backend (CUDA memory); objects
    with __array_interface__ / __array_struct__ become NumPy arrays. Anything else, or a DLPack export
    that fails (e.g. a torch tensor that requires grad, a dtype NumPy lacks), is a TypeError naming
    the argument and its type."""
    if isinstance(x, np.ndarray) or hasattr(x, "__cuda_array_interface__"):
        return x
    kind = type(x).__name__
    if hasattr(x, "__dlpack__"):
        dev = int(x.__dlpack_device__()[0])
        if dev not in (_DLPACK_CPU, _DLPACK_CUDA):
            raise TypeError(f"{name}: {kind} lives on DLPack device type {dev}; only CPU (1) and CUDA (2) "
                            f"memory is supported")
        take = np.from_dlpack if dev == _DLPACK_CPU else backends.cuda.array_module().from_dlpack
        try:
            return take(x)
        except (BufferError, RuntimeError, TypeError, ValueError) as e:
            raise TypeError(f"{name}: cannot take {kind} through DLPack: {e}") from None
    if hasattr(x, "__array_interface__") or hasattr(x, "__array_struct__"):
        return np.asarray(x)
    raise TypeError(f"{name}: expected an array (NumPy, CuPy, or an object with __dlpack__, "
                    f"__array_interface__ or __cuda_array_interface__), got {kind}")
