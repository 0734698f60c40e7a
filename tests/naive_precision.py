"""The error budget of cancellation-prone cases: attention computed naively in the kernel's own
precision (NumPy, every step in that dtype), compared with the float64 reference.

Some gradients are sums that cancel: the dq of one query over a few keys is sum_j dS_j k_j with
sum_j dS_j = 0, so its float32 rounding error is bounded by eps * sum_j |dS_j k_j|, not by
eps * |dq|, and a fixed relative bound fails on a fraction of random draws (about 1% for one query
over three keys) without any fault in the kernel. Such results are held to the rule already used
for fp16/bf16: an error at most 2x that of the naive same-precision computation on the same
inputs, with a floor of a few rounding errors of the summed terms (the naive error itself can be
small by luck on one draw), and never more than the fixed bound where both are below it (`bound`).
"""
import numpy as np


def naive_attention(q, k, v, dout, causal, dtype):
    """(out, dq, dk, dv) computed in `dtype` step by step (scores, softmax, P V, the backward's dP,
    delta, dS and the three products); causal bottom-right aligned, as ringattn.attention_*."""
    q, k, v, dout = (np.asarray(a, dtype) for a in (q, k, v, dout))
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    scale = dtype(1.0 / np.sqrt(d))
    ke, ve = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, ke) * scale
    visible = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)
    if causal:
        s = np.where(visible, s, dtype(-np.inf))
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, dtype(0))
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(l > 0, e / l, dtype(0)).astype(dtype)
    out = np.einsum("bhij,bjhd->bihd", p, ve)
    dv = np.einsum("bhij,bihd->bjhd", p, dout)
    dp = np.einsum("bihd,bjhd->bhij", dout, ve)
    delta = np.einsum("bihd,bihd->bhi", dout, out)
    ds = p * (dp - delta[..., None]) * scale
    dq = np.einsum("bhij,bjhd->bihd", ds, ke)
    dk = np.einsum("bhij,bihd->bjhd", ds, q)
    fold = lambda x: x.reshape(b, sk, hk, g, d).sum(axis=3, dtype=dtype)  # noqa: E731
    return out, dq, fold(dk), fold(dv)


# Rounding errors of the kernels, measured in units of eps * ||term_scales|| / ||ref|| over 3000
# draws of the worst-conditioned tiny cases, stay below 8; the floor takes twice that.
FLOOR_ROUNDINGS = 16


def term_floor(terms, ref, dtype):
    """FLOOR_ROUNDINGS rounding errors of a sum whose terms have magnitudes `terms`, relative to ||ref||."""
    den = np.linalg.norm(np.asarray(ref, np.float64))
    return FLOOR_ROUNDINGS * float(np.finfo(dtype).eps) * float(np.linalg.norm(terms)) / (den if den > 0 else 1.0)


def bound(tol, err_naive, floor=0.0):
    """Largest relative error accepted: the fixed bound `tol`, or, where the problem itself is worse
    conditioned than that, 2x the naive same-precision error or the rounding floor of its sums."""
    return max(tol, 2.0 * err_naive, floor)


def term_scales(q, k, v, dout, causal):
    """Float64 magnitudes of the terms each result sums, (|out|, |dq|, |dk|, |dv|)-shaped:
    sum_j p |v_j|, sum_j p (|dP| + |delta|) scale |k_j|, the same over queries times |q_i|, and
    sum_i p |dout_i|. Rounding errors of a sum are bounded by eps times these, however much the sum
    itself cancels."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    scale = 1.0 / np.sqrt(d)
    ke, ve = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, ke) * scale
    if causal:
        s = np.where(np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(l > 0, e / l, 0.0)
    out = np.einsum("bhij,bjhd->bihd", p, ve)
    dp = np.einsum("bihd,bjhd->bhij", dout, ve)
    delta = np.einsum("bihd,bihd->bhi", dout, out)
    w = p * (np.abs(dp) + np.abs(delta)[..., None]) * scale
    fold = lambda x: x.reshape(b, sk, hk, g, d).sum(axis=3)  # noqa: E731
    return (np.einsum("bhij,bjhd->bihd", p, np.abs(ve)), np.einsum("bhij,bjhd->bihd", w, np.abs(ke)),
            fold(np.einsum("bhij,bihd->bjhd", w, np.abs(q))), fold(np.einsum("bhij,bihd->bjhd", p, np.abs(dout))))
