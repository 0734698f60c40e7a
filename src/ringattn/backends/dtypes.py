"""dtype names shared by the backends: one spelling ("float32", "bfloat16", ...) for NumPy dtypes,
ml_dtypes' bfloat16 (what CuPy uses), strings, and the old ringattn.device.bfloat16 stand-in."""
import numpy as np


def dtype_name(dtype):
    """The dtype's name; bfloat16 is recognised without importing ml_dtypes."""
    if isinstance(dtype, str):
        return dtype
    try:
        return np.dtype(dtype).name
    except TypeError:  # not a NumPy dtype (e.g. ringattn.device.BFloat16): trust its name
        return str(getattr(dtype, "name", dtype))


def checked(dtype, supported, where):
    """dtype's name if the backend `where` supports it, else a TypeError naming both."""
    name = dtype_name(dtype)
    if name not in supported:
        raise TypeError(f"unsupported dtype {name} on the {where}: use {', '.join(supported)}")
    return name


def numpy_dtype(dtype):
    """A NumPy dtype object; "bfloat16" becomes ml_dtypes' (imported only then), as CuPy uses."""
    if dtype_name(dtype) == "bfloat16":
        import ml_dtypes  # noqa: PLC0415 - only for bfloat16; CuPy itself depends on it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)
