"""ringattn.cuda_ffn (the blockwise FFN with its products in cuBLAS) on the emulated device
(tests/emu_device.py: EmuArrays, NumPy float32 products standing in for cuBLAS gemmEx): against the
float64 reference (float32 < 1e-5; float16 / bfloat16 within 2x the error of a same-precision naive
computation), against the hand-written kernels of cuda/ffn.cu on the same inputs, with awkward
sizes, chunks that do not divide the tokens, poisoned outputs and accumulation into given gradients.

Emulated only: the cuBLAS call itself (operand swap, leading dimensions, gemmEx types) runs on a GPU
(benchmarks/gpu/run.sh); here the same products run through xp.matmul.
"""
import numpy as np
import pytest

import emu_device as emu
from ringattn import cuda as cu
from ringattn import cuda_ffn, reference
from test_cuda_emulated import ffn_ref, rng, rounded

xp = emu.xp


@pytest.fixture(scope="module", autouse=True)
def emulated():
    emu.kernels()
    emu.install()
    yield
    emu.uninstall()


def np_dtype(dtype):
    return emu.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


def dev(a, dtype):
    return xp.asarray(np.asarray(a, np.float64).astype(np_dtype(dtype)))


def host(a):
    return a.get().astype(np.float64)


def weights(tokens, width, hidden, dtype):
    """x, w1, b1, w2, b2, dy as float64 values exactly representable in dtype."""
    r = lambda a: rounded(a, dtype)  # noqa: E731
    return (r(rng.standard_normal((tokens, width))), r(rng.standard_normal((width, hidden)) / np.sqrt(width)),
            r(rng.standard_normal(hidden)), r(rng.standard_normal((hidden, width)) / np.sqrt(hidden)),
            r(rng.standard_normal(width)), r(rng.standard_normal((tokens, width))))


def ffn_naive_same_precision(x, w1, b1, w2, b2, dy, dtype):
    """The FFN and its gradients computed in `dtype` step by step (every intermediate rounded): the
    error budget a 16-bit implementation is held to."""
    r = lambda a: rounded(a, dtype)  # noqa: E731
    pre = r(r(x @ w1) + b1)
    t = r(np.tanh(r(cuda_ffn.GELU_C * r(pre + r(cuda_ffn.GELU_A * r(pre**3))))))
    g = r(0.5 * r(pre * r(1 + t)))
    y = r(r(g @ w2) + b2)
    dg = r(r(0.5 * r(1 + t)) + r(r(0.5 * pre) * r(r(1 - r(t * t)) * r(cuda_ffn.GELU_C * r(1 + r(3 * cuda_ffn.GELU_A * r(pre**2)))))))
    dpre = r(r(dy @ w2.T) * dg)
    return y, r(dpre @ w1.T), r(x.T @ dpre), r(dpre.sum(0)), r(g.T @ dy), r(dy.sum(0))


@pytest.mark.parametrize("tokens,width,hidden,chunk", [(97, 24, 70, 32), (1, 5, 3, 256), (130, 64, 130, 130)])
def test_float32_matches_reference_and_the_hand_written_kernels(tokens, width, hidden, chunk):
    x, w1, b1, w2, b2, dy = (a.astype(np.float32).astype(np.float64) for a in weights(tokens, width, hidden, "float32"))
    args = [dev(a, "float32") for a in (x, w1, b1, w2, b2)]
    refs = ffn_ref(x, w1, b1, w2, b2, dy)
    out = xp.empty((tokens, width), dtype=np.float32)  # poisoned (NaN): every element must be written
    y = cuda_ffn.ffn_forward(*args, chunk=chunk, out=out)
    assert y is out and reference.rel_error(host(y), refs[0]) < 1e-5
    g0 = [rng.standard_normal(a.shape) for a in (w1, b1, w2, b2)]  # backward adds to these
    grads = [dev(a, "float32") for a in g0]
    dx = cuda_ffn.ffn_backward(*args, dev(dy, "float32"), *grads, chunk=chunk)
    assert reference.rel_error(host(dx), refs[1]) < 1e-5
    for got, start, ref in zip(grads, g0, refs[2:]):
        assert reference.rel_error(host(got) - start, ref) < 1e-5
    # the cuda/ffn.cu kernels on the same device arrays agree to float32 rounding
    assert reference.rel_error(host(cu.ffn_forward(*args, chunk=chunk)), host(y)) < 1e-5
    kgrads = [dev(a, "float32") for a in g0]
    kdx = cu.ffn_backward(*args, dev(dy, "float32"), *kgrads, chunk=chunk)
    assert reference.rel_error(host(kdx), host(dx)) < 1e-5
    for a, b in zip(kgrads, grads):
        assert reference.rel_error(host(a), host(b)) < 1e-5


@pytest.mark.parametrize("dtype,grad_dtype", [("bfloat16", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16")])
def test_16bit_within_2x_of_naive(dtype, grad_dtype):
    tokens, width, hidden, chunk = 70, 40, 96, 32
    x, w1, b1, w2, b2, dy = weights(tokens, width, hidden, dtype)
    args = [dev(a, dtype) for a in (x, w1, b1, w2, b2)]
    refs = ffn_ref(x, w1, b1, w2, b2, dy)
    naive = ffn_naive_same_precision(x, w1, b1, w2, b2, dy, dtype)
    y = cuda_ffn.ffn_forward(*args, chunk=chunk)
    assert y.dtype == np_dtype(dtype)
    grads = [xp.zeros(a.shape, dtype=np_dtype(grad_dtype)) for a in (w1, b1, w2, b2)]
    dx = cuda_ffn.ffn_backward(*args, dev(dy, dtype), *grads, chunk=chunk)
    for name, got, ref, nv in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), (y, dx, *grads), refs, naive):
        err, err_naive = reference.rel_error(host(got), ref), reference.rel_error(nv, ref)
        assert err <= 2 * err_naive, (name, err, err_naive)
    # the hand-written kernels (float32 activation) are held to the same budget on the same inputs
    ky = cu.ffn_forward(*args, chunk=chunk)
    assert reference.rel_error(host(ky), refs[0]) <= 2 * reference.rel_error(naive[0], refs[0])


def test_matmul_operands_and_accumulate():
    """gemm: both transpose flags, row-strided operands (a view of every other row), accumulate."""
    a, b = rng.standard_normal((9, 5)), rng.standard_normal((5, 7))
    big = dev(np.repeat(a, 2, axis=0), "float32")
    av = big[::2]  # rows 2 elements apart: a strided view
    c = xp.empty((9, 7), dtype=np.float32)
    cuda_ffn.gemm(av, dev(b, "float32"), c)
    assert reference.rel_error(host(c), a @ b) < 1e-6
    cuda_ffn.gemm(dev(a.T.copy(), "float32"), dev(b.T.copy(), "float32"), c, trans_a=True, trans_b=True,
                  accumulate=True)
    assert reference.rel_error(host(c), 2 * (a @ b)) < 1e-6
    z = xp.empty((3, 4), dtype=np.float32)
    cuda_ffn.gemm(xp.zeros((3, 0), dtype=np.float32), xp.zeros((0, 4), dtype=np.float32), z)  # empty reduction
    assert (host(z) == 0).all()


def test_bad_input_is_refused_with_its_name():
    x, w1, b1, w2, b2, _ = weights(4, 6, 8, "float32")
    args = [dev(a, "float32") for a in (x, w1, b1, w2, b2)]
    with pytest.raises(ValueError, match=r"w2: expected shape \(8, 6\)"):
        cuda_ffn.ffn_forward(*args[:3], dev(w2.T, "float32"), args[4])
    with pytest.raises(TypeError, match="b1: dtype float16 but x has float32"):
        cuda_ffn.ffn_forward(args[0], args[1], dev(b1, "float16"), *args[3:])
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        cuda_ffn.ffn_forward(*args, chunk=0)
    with pytest.raises(TypeError, match="dw1: dtype float16 but expected float32$"):
        cuda_ffn.ffn_backward(*args, dev(x, "float32"), dev(w1, "float16"), *[dev(a, "float32") for a in (b1, w2, b2)])
