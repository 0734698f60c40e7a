"""Which outputs a NaN or Inf in q, k or v must reach, and the checks the non-finite tests share.

The expected values come from naive float64 softmax attention (the formulas of ringattn.reference)
applied row by row, each query row to exactly the keys it sees, so an output is non-finite exactly
when it depends on a bad value (or on an Inf - Inf, 0 * Inf that the bad value makes). It is not
ringattn.reference itself because the whole-sequence form multiplies hidden keys by a weight of 0
(0 * NaN = NaN), which would mark every row once any v is NaN. Both follow IEEE for a row whose
visible scores are all -inf (an infinite q against keys of the opposite sign): out = 0/0 = NaN,
lse = log 0 = -inf, and NaN gradients for the row and the keys it sees.

Used by tests/test_nonfinite.py and tests/mpi_programs/ring_nonfinite.py.
"""
import numpy as np

from ringattn import reference as R

BAD_VALUES = (np.nan, np.inf, -np.inf)


def visibility(q_pos, k_pos, causal):
    """(seq_q, seq_k) bool: key j visible to query i (k_pos[j] <= q_pos[i] when causal)."""
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    if not causal:
        return np.ones((q_pos.size, k_pos.size), bool)
    return k_pos[None, :] <= q_pos[:, None]


def row_reference(q, k, v, vis, scale, dout=None):
    """(out, lse) in float64, and (dq, dk, dv) if dout is given, each query row computed alone over
    the keys vis[i] marks (naive softmax attention, as ringattn.reference). Rows that see no key:
    out 0, lse -inf, no gradient; rows whose every visible score is -inf: out NaN (0/0), lse -inf, and
    NaN gradients for them and the keys they see."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, sq, h, d = q.shape
    g = h // k.shape[2]
    ke, ve = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # (b, sk, h, d)
    out = np.zeros(q.shape)
    lse = np.full((b, h, sq), -np.inf)
    dq, dke, dve = np.zeros(q.shape), np.zeros(ke.shape), np.zeros(ve.shape)
    with np.errstate(all="ignore"):
        for i in range(sq):
            js = np.flatnonzero(vis[i])
            if js.size == 0:
                continue
            qi, kj, vj = q[:, i], ke[:, js], ve[:, js]               # (b, h, d), (b, n, h, d)
            s = np.einsum("bhd,bnhd->bhn", qi, kj) * scale
            m = s.max(axis=-1, keepdims=True)                        # NaN if any score is NaN
            m = np.where(np.isfinite(m), m, 0.0)
            e = np.exp(s - m)
            l = e.sum(axis=-1, keepdims=True)
            # IEEE: l == 0 (every visible score -inf) gives p = 0/0 = NaN and lse = log 0 = -inf;
            # a NaN l stays NaN (not "no keys").
            p = e / l
            out[:, i] = np.einsum("bhn,bnhd->bhd", p, vj)
            lse[:, :, i] = m[..., 0] + np.log(l[..., 0])
            if dout is None:
                continue
            go = np.asarray(dout, np.float64)[:, i]                   # (b, h, d)
            dve[:, js] += np.einsum("bhn,bhd->bnhd", p, go)
            dp = np.einsum("bhd,bnhd->bhn", go, vj)
            delta = np.einsum("bhd,bhd->bh", go, out[:, i])[..., None]
            ds = p * (dp - delta) * scale
            dq[:, i] = np.einsum("bhn,bnhd->bhd", ds, kj)
            dke[:, js] += np.einsum("bhn,bhd->bnhd", ds, qi)
    if dout is None:
        return out, lse
    sk, hk = k.shape[1], k.shape[2]
    fold = lambda x: x.reshape(b, sk, hk, g, d).sum(axis=3)  # noqa: E731  (GQA: sum each group's heads)
    return out, lse, dq, fold(dke), fold(dve)


def poison(rng, arrays, names="qkv", count=None):
    """Writes NaN / +Inf / -Inf at 1-3 random positions of randomly chosen arrays (in place);
    returns the list of (name, index, value) for messages."""
    placed = []
    for _ in range(int(rng.integers(1, 4)) if count is None else count):
        a = int(rng.integers(len(arrays)))
        idx = tuple(int(rng.integers(n)) for n in arrays[a].shape)
        val = BAD_VALUES[int(rng.integers(len(BAD_VALUES)))]
        arrays[a][idx] = val
        placed.append((names[a], idx, float(val)))
    return placed


def rows_of(mask):
    """Rows of a (batch, seq, heads, dim) mask with at least one True element (elements otherwise)."""
    return int(mask.any(-1).sum()) if mask.ndim == 4 else int(mask.sum())


def missed(got, ref):
    """Elements the reference makes non-finite but `got` has finite (the silent wrong results)."""
    return ~np.isfinite(ref) & np.isfinite(np.asarray(got, np.float64))


def check(got, ref, tol, what, exact_set=False):
    """Every element the reference makes non-finite is non-finite in `got`; elements finite in both
    agree with the reference to `tol` (relative). exact_set: no extra non-finite elements either."""
    got = np.asarray(got, np.float64)
    miss = missed(got, ref)
    assert not miss.any(), (f"{what}: {int(miss.sum())} elements in {rows_of(miss)} rows are finite where the "
                            f"reference is not (a bad value vanished)")
    extra = ~np.isfinite(got) & np.isfinite(ref)
    if exact_set:
        assert not extra.any(), (f"{what}: {int(extra.sum())} elements in {rows_of(extra)} rows are non-finite "
                                 f"though they cannot see a bad value")
    both = np.isfinite(got) & np.isfinite(ref)
    if both.any():
        err = R.rel_error(got[both], ref[both])
        assert err < tol, f"{what}: rel error {err:.2e} on the finite elements"
