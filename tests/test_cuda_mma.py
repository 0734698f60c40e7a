"""The tensor-core forward (cuda/attention_mma.cu) under the warp emulation: 16-bit inputs with head
dim 64 or 128 take it (checked through the emulated build's launch counts); it is held to the rule
of the 16-bit SIMT kernels: within 2x the error of a same-precision naive computation against the
float64 reference, with outputs poisoned (NaN) before the call, awkward lengths, GQA, causal with
(start, stride) positions and the ring's accumulate over several key blocks.

Emulated only: this checks the fragment bookkeeping, masking, softmax and merge logic, and the
cp.async / barrier discipline (a missing wait reads poison); not speed (benchmarks/gpu/run.sh).
"""
import numpy as np
import pytest

from ringattn import reference
from ringattn.device import FakeDeviceArray, bfloat16
from test_cuda_emulated import cuda, monkeypatch_module, naive_same_precision, qkv, rounded, to_dev  # noqa: F401

MMA = "attn_fwd_mma_kernel"


def launches():
    from ringattn.backends import cuda as backend

    return dict(backend._state.module.emulated_launches())


def mma_launches():
    return launches().get(MMA, 0)


def poisoned(shape, dtype):
    if dtype == "bfloat16":
        return FakeDeviceArray(np.full(shape, 0x7FC0, np.uint16), dtype=bfloat16)
    return FakeDeviceArray(np.full(shape, np.nan, dtype))


@pytest.mark.parametrize("dtype,b,sq,sk,h,hkv,d,causal", [
    ("bfloat16", 1, 130, 130, 2, 1, 64, True),    # GQA, a partial last tile of queries and keys
    ("float16", 1, 97, 130, 4, 2, 128, False),    # seq_q != seq_k, D 128
    ("bfloat16", 2, 1, 97, 2, 2, 128, True),      # one query (sees every key), batch 2
    ("float16", 1, 130, 97, 2, 1, 64, True),      # seq_q > seq_k: leading rows see no key
])
def test_forward_within_2x_of_naive(cuda, dtype, b, sq, sk, h, hkv, d, causal):
    q, k, v = (rounded(x, dtype) for x in qkv(b, sq, sk, h, hkv, d))
    before = mma_launches()
    out, lse = cuda.attention_forward(to_dev(q, dtype), to_dev(k, dtype), to_dev(v, dtype), causal=causal)
    assert mma_launches() == before + 1
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=causal)
    got = out.get().astype(np.float64)
    fin = np.isfinite(ref_lse)
    rows = np.moveaxis(fin, 1, 2)  # (b, sq, h): rows with a visible key (the naive one is NaN elsewhere)
    err = reference.rel_error(got[rows], ref_out[rows])
    with np.errstate(invalid="ignore"):
        naive = naive_same_precision(q, k, v, causal, dtype)
    err_naive = reference.rel_error(naive[rows], ref_out[rows])
    assert err <= 2 * err_naive, (err, err_naive)
    assert np.array_equal(np.isfinite(lse.get()), fin)
    assert reference.rel_error(lse.get()[fin], ref_lse[fin]) < 1e-5  # float32 scores of exact 16-bit inputs
    if not fin.all():  # rows with no visible key: out 0, lse -inf
        assert np.all(got[np.moveaxis(~fin, 1, 2)] == 0)


def test_other_calls_stay_on_the_simt_kernel(cuda):
    """float32, or a head dim other than 64 / 128, or rows not 16-byte aligned: the general path."""
    q, k, v = qkv(1, 20, 20, 2, 2, 64)
    before = mma_launches()
    cuda.attention_forward(to_dev(q, "float32"), to_dev(k, "float32"), to_dev(v, "float32"))
    q2, k2, v2 = qkv(1, 20, 20, 2, 2, 59)
    cuda.attention_forward(to_dev(q2, "float16"), to_dev(k2, "float16"), to_dev(v2, "float16"))
    assert mma_launches() == before


def test_striped_positions_and_accumulate_over_key_blocks(cuda):
    """Queries at (1, 2) against keys at (0, 2) is plain causal attention (key j visible iff j <= i),
    computed the ring's way: three key blocks folded into a float32 running (out, lse) that starts
    poisoned, the first call overwriting it; then a block entirely in the future leaves it as it is."""
    dtype, b, s, h, hkv, d = "bfloat16", 1, 97, 2, 1, 64
    q, k, v = (rounded(x, dtype) for x in qkv(b, s, s, h, hkv, d))
    out = poisoned((b, s, h, d), np.float32)
    lse = poisoned((b, h, s), np.float32)
    cuts = [0, 30, 70, s]
    before = mma_launches()
    for n, (j0, j1) in enumerate(zip(cuts, cuts[1:])):
        cuda.forward(to_dev(q, dtype), to_dev(k[:, j0:j1], dtype), to_dev(v[:, j0:j1], dtype), out, lse,
                     q_pos=(1, 2), k_pos=(2 * j0, 2), causal=True, accumulate=n > 0)
    assert mma_launches() == before + 3
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=True)
    err = reference.rel_error(out.get(), ref_out)
    err_naive = reference.rel_error(naive_same_precision(q, k, v, True, dtype), ref_out)
    assert err <= 2 * err_naive, (err, err_naive)
    assert reference.rel_error(lse.get(), ref_lse) < 1e-5
    kept = out.get(), lse.get()
    cuda.forward(to_dev(q, dtype), to_dev(k, dtype), to_dev(v, dtype), out, lse, q_pos=(1, 2), k_pos=(10**6, 1),
                 causal=True, accumulate=True)
    assert np.array_equal(out.get(), kept[0]) and np.array_equal(lse.get(), kept[1])


def test_accumulate_matches_simt_kernel(cuda):
    """The same contiguous-position ring merge through the mma kernel (16-bit) and the SIMT kernel
    (the same data in float32): the float32 results agree to the 16-bit rounding of P."""
    b, s, h, d = 1, 70, 2, 128
    q, k, v = (rounded(x, "float16") for x in qkv(b, s, 2 * s, h, h, d))
    res = {}
    for dtype in ("float16", "float32"):
        out = poisoned((b, s, h, d), np.float32)
        lse = poisoned((b, h, s), np.float32)
        for n, j0 in enumerate((0, s)):
            cuda.forward(to_dev(q, dtype), to_dev(k[:, j0:j0 + s], dtype), to_dev(v[:, j0:j0 + s], dtype), out, lse,
                         q_pos=(s, 1), k_pos=(j0, 1), causal=True, accumulate=n > 0)
        res[dtype] = out.get(), lse.get()
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=True)
    assert reference.rel_error(res["float32"][0], ref_out) < 1e-5
    assert reference.rel_error(res["float16"][0], ref_out) < 2e-3
    assert reference.rel_error(res["float16"][1], ref_lse) < 1e-5


def test_nan_reaches_the_rows_that_see_it(cuda):
    """A NaN key is seen by the queries at and after its position (causal): their out and lse are
    NaN; the rows before it stay finite; a NaN query row is NaN only in its own row."""
    dtype, b, s, h, d = "float16", 1, 97, 2, 64
    q, k, v = (rounded(x, dtype) for x in qkv(b, s, s, h, h, d))
    k[0, 50, 1, 3] = np.nan
    q[0, 20, 0, 7] = np.nan
    out, lse = cuda.attention_forward(to_dev(q, dtype), to_dev(k, dtype), to_dev(v, dtype), causal=True)
    o, l = out.get().astype(np.float64), lse.get()
    assert np.isnan(l[0, 1, 50:]).all() and np.isfinite(l[0, 1, :50]).all()
    assert np.isnan(o[0, 50:, 1]).all() and np.isfinite(o[0, :50, 1]).all()
    assert np.isnan(l[0, 0, 20]) and np.isnan(o[0, 20, 0]).all()
    assert np.isfinite(np.delete(l[0, 0], 20)).all() and np.isfinite(np.delete(o[0, :, 0], 20, axis=0)).all()
