"""Backends: the ONE place that decides host (NumPy, C++ kernels) vs device (CuPy, CUDA kernels).

    be = backends.backend_for(q, k, v)        # backends.cpu or backends.cuda
    out = be.empty(q.shape, be.acc_dtype(q.dtype))
    be.forward(q, k, v, out, lse, ...)

Both backends expose the same names (their __all__): name, xp (the array module), supported_dtypes,
is_mine(a), check_dtype, lse_dtype, acc_dtype, empty, zeros, asarray, to_host (a host NumPy copy),
ascontiguous, last_axis_contiguous (the one copy rule), scatter_add, the block kernels forward / delta / backward, ffn_forward / ffn_backward,
make_transport(comm, src, dst, progress=None) (HostTransport / DeviceTransport), and the fused step
operations layernorm_forward / add_layernorm_forward / layernorm_backward / rope / softmax_xent /
sum_squares / adamw_update / linear_forward / linear_backward / embedding_backward (C++ kernels on the CPU, CuPy expressions of backends/xp_fused.py on the GPU).

A device array is anything exposing __cuda_array_interface__; everything else is a host array.
"""
from . import cpu, cuda

BACKENDS = (cpu, cuda)


def is_device_array(a):
    return hasattr(a, "__cuda_array_interface__")


def backend_for(*arrays, **named):
    """The backend of the given arrays (None entries are ignored; no arrays at all means cpu).

    Keyword arguments name the arrays in the error; positional ones are named by position. Host
    and device arrays together are one TypeError saying which argument is which kind.
    """
    items = [(f"argument {i}", a) for i, a in enumerate(arrays)] + list(named.items())
    items = [(n, a) for n, a in items if a is not None]
    device = [n for n, a in items if is_device_array(a)]
    if not device:
        return cpu
    if len(device) < len(items):
        host = [n for n, a in items if not is_device_array(a)]
        raise TypeError(f"mixed host and device arrays: device (CuPy) {', '.join(device)}; host (NumPy) "
                        f"{', '.join(host)}: pass all of one kind (cupy.asarray / .get() to move them)")
    return cuda
