"""The blockwise feed-forward on device arrays with its matrix products in cuBLAS.

    y = gelu_tanh(x @ w1 + b1) @ w2 + b2          over chunks of `chunk` tokens

Same signatures and contract as ringattn.cuda.ffn_forward / ffn_backward (the hand-written GEMM
kernels of cuda/ffn.cu, kept as the reference): x (tokens, width), w1 (width, hidden), b1 (hidden,),
w2 (hidden, width), b2 (width,), all one dtype (float16, bfloat16 or float32); the backward returns
dx and adds (+=) into dw1, db1, dw2, db2 (x's dtype or float32). Only one chunk's (chunk, hidden)
activation exists at a time.

Precision: every product accumulates in float32 into a float32 result (cuBLAS gemmEx with
CUBLAS_COMPUTE_32F: no TF32, no 16-bit accumulation); the biases, GELU and its gradient are float32;
the weight and bias gradients are summed over all chunks in float32 and added to the caller's
arrays once. The operands of a product share one dtype (cuBLAS takes no mixed inputs), so for
16-bit inputs the activation g and its gradient are rounded to that dtype before the products that
take them, as mixed-precision training does; float32 inputs stay float32 throughout.

Where the products run: with CuPy, cupy.cuda.cublas.gemmEx on CuPy's current stream (CuPy's own
matmul would round 16-bit results to 16 bits before the GELU). With any other array module (the
test-only emulated device: NumPy over host memory) the same products as xp.matmul on float32
copies, which is the same arithmetic: a product of two 16-bit values is exact in float32.
The elementwise steps (bias, GELU, casts) are array-module operations.
"""
import math

import numpy as np

from . import cuda as _layer
from . import device
from .backends import cuda as _backend

GELU_C, GELU_A = math.sqrt(2.0 / math.pi), 0.044715
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
_CUDA_TYPE = {"float16": "CUDA_R_16F", "bfloat16": "CUDA_R_16BF", "float32": "CUDA_R_32F"}
F32 = np.float32


# ---- the matrix product ---------------------------------------------------------------------------
def _is_cupy(xp):
    return getattr(xp, "__name__", "") == "cupy"


def _row_stride(a):
    """Elements between rows of a 2-D array whose last axis is contiguous (cuBLAS's leading dimension)."""
    return a.strides[0] // a.itemsize if a.shape[0] > 1 else max(a.shape[1], 1)


def _gemm_cublas(a, b, c, trans_a, trans_b, accumulate):
    from cupy.cuda import cublas, device, runtime  # noqa: PLC0415 - CuPy only

    # Row-major C (M, N) = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS gets the
    # operands swapped, each with its own transpose flag, and (n, m) for (m, n).
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    op = lambda t: cublas.CUBLAS_OP_T if t else cublas.CUBLAS_OP_N  # noqa: E731
    kind = lambda x: getattr(runtime, _CUDA_TYPE[x.dtype.name])  # noqa: E731
    alpha = np.ones(1, F32)
    beta = np.full(1, 1.0 if accumulate else 0.0, F32)  # host scalars, read during the call
    cublas.gemmEx(device.get_cublas_handle(), op(trans_b), op(trans_a), n, m, k, alpha.ctypes.data,
                  b.data.ptr, kind(b), _row_stride(b), a.data.ptr, kind(a), _row_stride(a), beta.ctypes.data,
                  c.data.ptr, kind(c), _row_stride(c), cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)


def _gemm_xp(xp, a, b, c, trans_a, trans_b, accumulate):
    a32, b32 = a.astype(F32), b.astype(F32)
    r = xp.matmul(a32.T if trans_a else a32, b32.T if trans_b else b32)
    if accumulate:
        xp.add(c, r, out=c)
    else:
        c[...] = r


def gemm(a, b, c, trans_a=False, trans_b=False, accumulate=False):
    """c = op(a) @ op(b), or c += it (accumulate): a, b one dtype, c float32 (M, N); float32 accumulate.

    op(a) is a.T when trans_a. Every operand's last axis must be contiguous (rows may be strided)."""
    if min(c.shape) == 0:
        return c
    if (a.shape[1] if not trans_a else a.shape[0]) == 0:  # an empty reduction: the product is 0
        if not accumulate:
            c[...] = 0
        return c
    xp = _backend.array_module()
    if _is_cupy(xp):
        _gemm_cublas(a, b, c, trans_a, trans_b, accumulate)
    else:
        _gemm_xp(xp, a, b, c, trans_a, trans_b, accumulate)
    return c


# ---- GELU (tanh form, as cuda/ffn.cu and cpp/ffn.cpp; tanh keeps it finite for every finite x) ---
def _gelu_parts(xp, pre):
    """(gelu(pre), t) with t = tanh(sqrt(2/pi) (pre + 0.044715 pre^3)), float32."""
    t = xp.tanh(GELU_C * (pre + GELU_A * pre * pre * pre))
    return 0.5 * pre * (1.0 + t), t


def _gelu_grad(pre, t):
    """d gelu / d pre from pre and its t."""
    return 0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * pre * pre)


# ---- validation --------------------------------------------------------------------------------
def _check(named, chunk):
    """Descriptors of the operands (after waiting for their producer streams); clear errors otherwise."""
    d = _layer._prepare(named, _layer.current_stream())
    x = d["x"]
    if len(x.shape) != 2:
        raise ValueError(f"x: expected (tokens, width), got shape {x.shape}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: unsupported dtype {x.dtype} on the GPU: use float16, bfloat16 or float32")
    tokens, width = x.shape
    hidden = d["w1"].shape[-1] if len(d["w1"].shape) == 2 else -1
    if width < 1 or hidden < 1:
        raise ValueError(f"width and hidden must be >= 1 (x {x.shape}, w1 {d['w1'].shape})")
    want = {"w1": (width, hidden), "b1": (hidden,), "w2": (hidden, width), "b2": (width,), "dy": (tokens, width)}
    for name, shape in want.items():
        if name in d:
            if d[name].shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {d[name].shape}")
            if d[name].dtype != x.dtype:
                raise TypeError(f"{name}: dtype {d[name].dtype} but x has {x.dtype}")
    for name, a in d.items():
        if len(a.shape) == 2 and a.shape[1] > 1 and a.strides[1] != _ITEMSIZE.get(a.dtype):
            raise ValueError(f"{name}: the last axis must be contiguous")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return tokens, width, hidden, x.dtype


def _check_out(a, name, shape, dtypes):
    got = device.describe(a, name)
    if got.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {got.shape}")
    if got.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {got.dtype} but expected {' or '.join(dtypes)}")


def _chunks(tokens, chunk):
    rows = max(1, min(int(chunk), tokens))
    return rows, [(r0, min(r0 + rows, tokens)) for r0 in range(0, tokens, rows)]


# ---- forward / backward ------------------------------------------------------------------------
def ffn_forward(x, w1, b1, w2, b2, chunk=256, out=None):
    """y = gelu_tanh(x @ w1 + b1) @ w2 + b2 over chunks of `chunk` tokens (written into `out` if given)."""
    tokens, width, hidden, dname = _check(dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2), chunk)
    xp = _backend.array_module()
    y = xp.empty(x.shape, dtype=x.dtype) if out is None else out
    _check_out(y, "out", (tokens, width), (dname,))
    rows, spans = _chunks(tokens, chunk)
    b1f, b2f = b1.astype(F32), b2.astype(F32)
    pre, yc = xp.empty((rows, hidden), dtype=F32), xp.empty((rows, width), dtype=F32)
    for r0, r1 in spans:
        n = r1 - r0
        h, o = pre[:n], yc[:n]
        h[...] = b1f  # the bias is the product's starting value (beta = 1)
        gemm(x[r0:r1], w1, h, accumulate=True)
        g, _ = _gelu_parts(xp, h)
        o[...] = b2f
        gemm(g.astype(x.dtype), w2, o, accumulate=True)
        y[r0:r1] = o.astype(y.dtype)
    return y


def ffn_backward(x, w1, b1, w2, b2, dy, dw1, db1, dw2, db2, chunk=256, dx=None):
    """Returns dx (written into `dx` if given); adds (+=) into dw1, db1, dw2, db2 (x's dtype or float32)."""
    tokens, width, hidden, dname = _check(dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, dy=dy), chunk)
    xp = _backend.array_module()
    dx = xp.empty(x.shape, dtype=x.dtype) if dx is None else dx
    _check_out(dx, "dx", (tokens, width), (dname,))
    grads = dict(dw1=dw1, db1=db1, dw2=dw2, db2=db2)
    shapes = dict(dw1=(width, hidden), db1=(hidden,), dw2=(hidden, width), db2=(width,))
    gdt = device.describe(dw1, "dw1").dtype
    for name, g in grads.items():
        _check_out(g, name, shapes[name], (gdt,) if gdt in (dname, "float32") else tuple(dict.fromkeys((dname, "float32"))))
    acc = {name: xp.zeros(shapes[name], dtype=F32) for name in grads}  # float32 sums over the chunks
    rows, spans = _chunks(tokens, chunk)
    b1f = b1.astype(F32)
    pre, dh, dxc = (xp.empty((rows, n), dtype=F32) for n in (hidden, hidden, width))
    for r0, r1 in spans:
        n = r1 - r0
        xc, dyc, h = x[r0:r1], dy[r0:r1], pre[:n]
        h[...] = b1f
        gemm(xc, w1, h, accumulate=True)                              # pre-activation, recomputed
        g, t = _gelu_parts(xp, h)
        gemm(g.astype(x.dtype), dyc, acc["dw2"], trans_a=True, accumulate=True)
        xp.add(acc["db2"], dyc.astype(F32).sum(axis=0), out=acc["db2"])
        gemm(dyc, w2, dh[:n], trans_b=True)                           # d g
        dpre = dh[:n] * _gelu_grad(h, t)                              # d pre, float32
        dp = dpre.astype(x.dtype)
        gemm(xc, dp, acc["dw1"], trans_a=True, accumulate=True)
        xp.add(acc["db1"], dpre.sum(axis=0), out=acc["db1"])
        gemm(dp, w1, dxc[:n], trans_b=True)
        dx[r0:r1] = dxc[:n].astype(dx.dtype)
    for name, g in grads.items():
        g[...] = (g.astype(F32) + acc[name]).astype(g.dtype)
    return dx
