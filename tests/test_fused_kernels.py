"""The fused step operations of issue 16 (LayerNorm, residual + LayerNorm, RoPE in place, softmax
cross-entropy, Linear, embedding gradient, sum of squares, AdamW) on both backends against the float64 references in
ringattn.reference: relative error, awkward sizes, poisoned outputs, fresh random inputs. The CPU
backend runs the C++ kernels (cpp/), the CUDA backend the CuPy expressions on the emulated device."""
import numpy as np
import pytest

import emu_device as emu
from ringattn import reference
from ringattn.backends import cpu, cuda

rng = np.random.default_rng()
TOL = {"float32": 1e-5, "float64": 1e-12}
CASES = [("cpu", "float32"), ("cpu", "float64"), ("cuda", "float32")]


@pytest.fixture(scope="module")
def emulated():
    emu.kernels()  # builds (or skips without CUDA headers) before anything is installed
    emu.install()
    yield cuda
    emu.uninstall()


@pytest.fixture(params=CASES, ids=[f"{b}-{d}" for b, d in CASES])
def case(request):
    backend, dtype = request.param
    if backend == "cuda":
        request.getfixturevalue("emulated")
    return (cpu if backend == "cpu" else cuda), dtype


def put(be, a, dtype=None):
    """A fresh copy of host data on the backend (float64 inputs are not aliased by the in-place calls)."""
    return be.asarray(np.array(a, copy=True), dtype)


def poisoned(be, shape, dtype):
    return put(be, np.full(shape, np.nan), dtype)


def host(be, a):
    return be.to_host(a).astype(np.float64)


# ---- LayerNorm -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,w", [(1, 3), (7, 65), (1000, 64), (5, 1)])
def test_layernorm_forward(case, n, w):
    be, dt = case
    x, g, b = rng.standard_normal((n, w)) * 3 + 1.5, rng.standard_normal(w), rng.standard_normal(w)
    out = poisoned(be, (n, w), dt)
    y, mean, rstd = be.layernorm_forward(put(be, x, dt), put(be, g, dt), put(be, b, dt), 1e-5, out=out)
    ry, rm, rr = reference.layernorm(be.to_host(put(be, x, dt)), be.to_host(put(be, g, dt)),
                                     be.to_host(put(be, b, dt)), 1e-5)
    assert y is out
    for got, ref in ((y, ry), (mean, rm), (rstd, rr)):
        assert be.to_host(got).dtype == np.dtype(dt) and be.to_host(got).shape == ref.shape
        assert reference.rel_error(host(be, got), ref) < TOL[dt]


@pytest.mark.parametrize("n,w", [(1, 3), (7, 65), (300, 64)])
def test_add_layernorm_forward_adds_residual_in_place(case, n, w):
    be, dt = case
    h0, a, g, b = (rng.standard_normal(s) for s in ((n, w), (n, w), w, w))
    h = put(be, h0, dt)
    y, mean, rstd = be.add_layernorm_forward(h, put(be, a, dt), put(be, g, dt), put(be, b, dt), 1e-5)
    hsum = be.to_host(put(be, h0, dt)).astype(np.float64) + be.to_host(put(be, a, dt))
    assert reference.rel_error(host(be, h), hsum) < TOL[dt]
    # LN of the h the kernel stored: a tiny row's variance can be far below the rounding of h itself,
    # which would otherwise be amplified by rstd into the comparison
    ry, rm, rr = reference.layernorm(be.to_host(h), be.to_host(put(be, g, dt)), be.to_host(put(be, b, dt)), 1e-5)
    for got, ref in ((y, ry), (mean, rm), (rstd, rr)):
        assert reference.rel_error(host(be, got), ref) < TOL[dt] * 2


@pytest.mark.parametrize("n,w", [(1, 3), (7, 65), (1000, 64)])
@pytest.mark.parametrize("into", ["new", "dx", "residual"])
def test_layernorm_backward(case, n, w, into):
    be, dt = case
    x, g, b, dy = rng.standard_normal((n, w)) + 0.5, rng.standard_normal(w), rng.standard_normal(w), rng.standard_normal((n, w))
    xd, gd = put(be, x, dt), put(be, g, dt)
    _, mean, rstd = be.layernorm_forward(xd, gd, put(be, b, dt), 1e-5)
    dg, db = poisoned(be, (w,), dt), poisoned(be, (w,), dt)
    res0 = rng.standard_normal((n, w))
    kw = {"dx": poisoned(be, (n, w), dt)} if into == "dx" else {"residual": put(be, res0, dt)} if into == "residual" else {}
    dx = be.layernorm_backward(put(be, dy, dt), xd, gd, mean, rstd, dg, db, **kw)
    if into != "new":
        assert dx is kw[into]
    _, _, _, rdx, rdg, rdb = reference.layernorm(be.to_host(xd), be.to_host(gd), b, 1e-5, dy=be.to_host(put(be, dy, dt)))
    if into == "residual":
        rdx = rdx + be.to_host(put(be, res0, dt))
    for got, ref in ((dx, rdx), (dg, rdg), (db, rdb)):
        assert reference.rel_error(host(be, got), ref) < TOL[dt] * 2


@pytest.mark.parametrize("n,w", [(1, 3), (7, 65), (5000, 64)])
def test_layernorm_backward_dx_may_alias_dy(case, n, w):
    """dx=dy (the gradient written over the incoming one, row by row) gives the same dx, dg, db as
    separate arrays: each row reads dy fully before its dx is written (5000 x 64 runs a team of 2
    where threads are available)."""
    be, dt = case
    x, g, b, dy0 = rng.standard_normal((n, w)) + 0.5, rng.standard_normal(w), rng.standard_normal(w), rng.standard_normal((n, w))
    xd, gd = put(be, x, dt), put(be, g, dt)
    _, mean, rstd = be.layernorm_forward(xd, gd, put(be, b, dt), 1e-5)
    dy = put(be, dy0, dt)
    dg, db = poisoned(be, (w,), dt), poisoned(be, (w,), dt)
    dx = be.layernorm_backward(dy, xd, gd, mean, rstd, dg, db, dx=dy)
    assert dx is dy
    _, _, _, rdx, rdg, rdb = reference.layernorm(be.to_host(xd), be.to_host(gd), b, 1e-5, dy=be.to_host(put(be, dy0, dt)))
    for got, ref in ((dx, rdx), (dg, rdg), (db, rdb)):
        assert reference.rel_error(host(be, got), ref) < TOL[dt] * 2


# ---- RoPE ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,s,h,hk,d", [(1, 1, 1, 1, 2), (2, 7, 4, 2, 34), (3, 65, 2, 1, 64), (1, 5, 3, 3, 6)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_in_place_on_q_and_k(case, b, s, h, hk, d, inverse):
    be, dt = case
    x = put(be, rng.standard_normal((b, s, (h + 2 * hk) * d)), dt)
    x0 = be.to_host(x)
    pos = rng.integers(0, 100_000, s)
    cos, sin = reference.rope_angles(pos, d)
    got = be.rope(x, put(be, cos, dt), put(be, sin, dt), h, hk, d, inverse=inverse)
    assert got is x
    after = be.to_host(x).reshape(b, s, h + 2 * hk, d)
    planes = x0.reshape(b, s, h + 2 * hk, d)
    ref = reference.rope(planes[:, :, : h + hk], be.to_host(put(be, cos, dt)), be.to_host(put(be, sin, dt)),
                         inverse=inverse)
    assert reference.rel_error(after[:, :, : h + hk], ref) < TOL[dt]
    assert np.array_equal(after[:, :, h + hk :], planes[:, :, h + hk :])  # v untouched


def test_rope_inverse_undoes_forward(case):
    be, dt = case
    x = put(be, rng.standard_normal((2, 9, 5 * 8)), dt)
    x0 = be.to_host(x)
    cos, sin = (put(be, t, dt) for t in reference.rope_angles(np.arange(9) * 7, 8))
    be.rope(x, cos, sin, 3, 1, 8)
    be.rope(x, cos, sin, 3, 1, 8, inverse=True)
    assert reference.rel_error(be.to_host(x), x0) < TOL[dt] * 3


# ---- softmax cross-entropy -----------------------------------------------------------------------
@pytest.mark.parametrize("n,c", [(1, 1), (1, 7), (7, 3), (1000, 65)])
@pytest.mark.parametrize("given_out", [False, True])
def test_softmax_xent(case, n, c, given_out):
    be, dt = case
    logits = rng.standard_normal((n, c)) * 4
    labels = rng.integers(0, c, n)
    labels[: n // 3] = logits[: n // 3].argmax(-1)  # some hits for sure
    z = put(be, logits, dt)
    out = poisoned(be, (n, c), dt) if given_out else None
    loss, correct, d = be.softmax_xent(z, put(be, labels), 0.37, **({"out": out} if given_out else {}))
    rl, rc, rd = reference.softmax_xent(be.to_host(z), labels, 0.37)
    assert isinstance(loss, float) and isinstance(correct, int)
    assert abs(loss - rl) <= TOL[dt] * max(abs(rl), 1.0)
    assert correct == rc
    assert be.to_host(d).dtype == np.dtype(dt) and (d is out or not given_out)
    assert reference.rel_error(host(be, d), rd) < TOL[dt]


def test_softmax_xent_no_rows(case):
    be, dt = case
    loss, correct, d = be.softmax_xent(put(be, np.zeros((0, 5)), dt), put(be, np.zeros(0, np.int64)), 1.0)
    assert (loss, correct) == (0.0, 0) and be.to_host(d).shape == (0, 5)


# ---- Linear --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,m", [(1, 1, 1), (7, 3, 65), (1000, 64, 192), (300, 34, 7)])
@pytest.mark.parametrize("into", ["new", "given", "no_dx"])
def test_linear(case, n, k, m, into):
    be, dt = case
    x, w, b, dy = (put(be, rng.standard_normal(s), dt) for s in ((n, k), (k, m), m, (n, m)))
    out = poisoned(be, (n, m), dt) if into == "given" else None
    y = be.linear_forward(x, w, b, out=out)
    xh, wh, bh, dyh = (be.to_host(a).astype(np.float64) for a in (x, w, b, dy))
    assert (y is out or into != "given") and reference.rel_error(host(be, y), xh @ wh + bh) < TOL[dt]
    dw, db = poisoned(be, (k, m), dt), poisoned(be, (m,), dt)
    dx_in = poisoned(be, (n, k), dt) if into == "given" else None
    dx = be.linear_backward(dy, x, w, dw, db, dx=dx_in, need_dx=into != "no_dx")
    if into == "no_dx":
        assert dx is None
    else:
        assert (dx is dx_in or into != "given") and reference.rel_error(host(be, dx), dyh @ wh.T) < TOL[dt]
    assert reference.rel_error(host(be, dw), xh.T @ dyh) < TOL[dt]
    assert reference.rel_error(host(be, db), dyh.sum(0)) < TOL[dt]


# ---- embedding gradient ----------------------------------------------------------------------------
@pytest.mark.parametrize("n,vocab,w", [(1, 1, 1), (7, 5, 3), (1000, 224, 64), (300, 50, 17), (0, 4, 3)])
def test_embedding_backward(case, n, vocab, w):
    """dw overwritten (poisoned before) with the per-id row sums: repeated ids add up, ids that never
    occur (the upper half of the vocabulary here) give exact zero rows."""
    be, dt = case
    ids = rng.integers(0, max(1, vocab // 2), n)
    ids[: n // 4] = 0  # one frequent id
    dy = put(be, rng.standard_normal((n, w)), dt)
    dw = poisoned(be, (vocab, w), dt)
    got = be.embedding_backward(put(be, ids), dy, dw)
    assert got is dw
    ref = reference.embedding_backward(ids, be.to_host(dy), vocab)
    assert reference.rel_error(host(be, dw), ref) < TOL[dt]
    unseen = np.setdiff1d(np.arange(vocab), ids)
    assert (host(be, dw)[unseen] == 0).all()


# ---- optimizer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 1000, 100_003])
def test_sum_squares(case, n):
    be, dt = case
    a = put(be, rng.standard_normal(n) * 3, dt)
    h = be.to_host(a).astype(np.float64)
    got = be.sum_squares(a)
    assert isinstance(got, float) and abs(got - float(h @ h)) <= 1e-12 * float(h @ h)


@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
@pytest.mark.parametrize("wd,scale", [(0.0, 1.0), (0.1, 0.3)])
def test_adamw_update(case, n, wd, scale):
    be, dt = case
    p0, g0 = rng.standard_normal(n), rng.standard_normal(n) * 0.1
    m0, v0 = rng.standard_normal(n) * 0.01, rng.random(n) * 1e-3
    p, g, m, v = (put(be, a, dt) for a in (p0, g0, m0, v0))
    hp = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=wd, step=5, grad_scale=scale)
    be.adamw_update(p, g, m, v, **hp)
    rp, rm, rv = reference.adamw(*(be.to_host(put(be, a, dt)) for a in (p0, g0, m0, v0)), **hp)
    assert np.array_equal(be.to_host(g), be.to_host(put(be, g0, dt)))  # the gradient is not modified
    # within a few roundings of p itself (the step is far smaller than p, so a relative bound on p
    # alone would not see a wrong step)
    assert np.abs(host(be, p) - rp).max() <= 4 * np.finfo(dt).eps * np.abs(rp).max()
    assert reference.rel_error(host(be, m), rm) < TOL[dt]
    assert reference.rel_error(host(be, v), rv) < TOL[dt]


# ---- the C++ kernels' own contract (CPU backend) ---------------------------------------------------
def _f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("call,match", [
    (lambda: cpu.layernorm_forward(_f32(4, 3).astype(np.float16), _f32(3), _f32(3), 1e-5), "x: unsupported dtype float16"),
    (lambda: cpu.layernorm_forward(_f32(4, 3), _f32(3).astype(np.float64), _f32(3), 1e-5), "g: dtype float64 differs"),
    (lambda: cpu.layernorm_forward(_f32(4, 3), _f32(4), _f32(3), 1e-5), r"g: shape \(4,\) but expected \(3,\)"),
    (lambda: cpu.layernorm_forward(_f32(4, 6)[:, ::2], _f32(3), _f32(3), 1e-5), "x: the last axis must be contiguous"),
    (lambda: cpu.layernorm_forward(_f32(8, 3)[::2], _f32(3), _f32(3), 1e-5), "x: must be C-contiguous"),
    (lambda: cpu.layernorm_forward(_f32(2, 4, 3), _f32(3), _f32(3), 1e-5), "x: expected 2 dimensions, got 3"),
    (lambda: cpu.add_layernorm_forward(_f32(4, 3), _f32(4, 2), _f32(3), _f32(3), 1e-5), r"a: shape \(4, 2\)"),
    (lambda: cpu.layernorm_backward(_f32(4, 3), _f32(4, 3), _f32(3), _f32(4), _f32(4), _f32(3), _f32(2)), r"db: shape"),
    (lambda: cpu.layernorm_backward(_f32(4, 3), _f32(4, 3), _f32(3), _f32(4), _f32(5), _f32(3), _f32(3)), r"rstd: shape"),
    (lambda: cpu.layernorm_backward(*(_f32(4, 3),) * 2, _f32(3), _f32(4), _f32(4), _f32(3), _f32(3), dx=_f32(4, 3),
                                    residual=_f32(4, 3)), "dx or residual, not both"),
    (lambda: cpu.rope(_f32(2, 5, 4 * 6), _f32(5, 3), _f32(5, 3), 2, 2, 6), r"qkv: shape \(2, 5, 24\) but expected \(2, 5, 36\)"),
    (lambda: cpu.rope(_f32(2, 5, 4 * 5), _f32(5, 2), _f32(5, 2), 2, 1, 5), "even head_dim"),
    (lambda: cpu.rope(_f32(2, 5, 4 * 6), _f32(5, 3), _f32(4, 3), 2, 1, 6), r"sin: shape \(4, 3\) but expected \(5, 3\)"),
    (lambda: cpu.rope(_f32(2, 5, 4 * 6), _f32(5, 1, 3), _f32(5, 3), 2, 1, 6), "cos: expected 2 dimensions"),
    (lambda: cpu.softmax_xent(_f32(3, 4), np.array([0, 4, 1]), 1.0), r"labels must be in \[0, 4\), got 4 at row 1"),
    (lambda: cpu.softmax_xent(_f32(3, 4), np.array([0, -1, 1]), 1.0), r"labels must be in \[0, 4\), got -1"),
    (lambda: cpu.softmax_xent(_f32(3, 4), np.array([0.0, 1.0, 1.0]), 1.0), "labels: expected an integer dtype"),
    (lambda: cpu.softmax_xent(_f32(3, 4), np.array([0, 1]), 1.0), r"labels: expected shape \(3,\)"),
    (lambda: cpu.softmax_xent(_f32(3, 4), np.array([0, 1, 2]), 1.0, out=_f32(3, 5)), r"out: shape \(3, 5\)"),
    (lambda: cpu.adamw_update(*(_f32(5),) * 3, _f32(4), 1e-3, 0.9, 0.95, 1e-8, 0.1, 1), r"v: shape \(4,\) but expected \(5,\)"),
    (lambda: cpu.adamw_update(*(_f32(5),) * 4, 1e-3, 0.9, 0.95, 1e-8, 0.1, 0), "step must be >= 1"),
    (lambda: cpu.adamw_update(_f32(5, 1), *(_f32(5),) * 3, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1), "p: expected 1 dimensions"),
    (lambda: cpu.sum_squares(_f32(6, 4)[:, :3]), "a: must be C-contiguous"),
    (lambda: cpu.sum_squares(np.arange(4)), "a: unsupported dtype int64"),
    (lambda: cpu.linear_forward(_f32(4, 3), _f32(2, 5), _f32(5)), r"w: shape \(2, 5\) but expected \(3, 5\)"),
    (lambda: cpu.linear_forward(_f32(4, 3), _f32(3, 5), _f32(4)), r"b: shape \(4,\) but expected \(5,\)"),
    (lambda: cpu.linear_forward(_f32(3, 4).T, _f32(3, 5), _f32(5)), "x: the last axis must be contiguous"),
    (lambda: cpu.linear_backward(_f32(4, 6), _f32(4, 3), _f32(3, 5), _f32(3, 5), _f32(5)), r"dy: shape \(4, 6\)"),
    (lambda: cpu.linear_backward(_f32(4, 5), _f32(4, 3), _f32(3, 5), _f32(5, 3), _f32(5)), r"dw: shape \(5, 3\)"),
    (lambda: cpu.embedding_backward(np.array([0, 6, 1]), _f32(3, 4), _f32(6, 4)),
     r"ids must be in \[0, 6\) \(the rows of dw\), got 6 at position 1"),
    (lambda: cpu.embedding_backward(np.array([0, -1, 1]), _f32(3, 4), _f32(6, 4)), r"ids must be in \[0, 6\).*got -1"),
    (lambda: cpu.embedding_backward(np.array([0.0, 1.0, 1.0]), _f32(3, 4), _f32(6, 4)), "ids: expected an integer dtype"),
    (lambda: cpu.embedding_backward(np.array([[0, 1, 1]]), _f32(3, 4), _f32(6, 4)), r"ids: expected shape \(3,\)"),
    (lambda: cpu.embedding_backward(np.array([0, 1, 1]), _f32(3, 4), _f32(6, 5)), r"dw: shape \(6, 5\) but expected \(6, 4\)"),
    (lambda: cpu.embedding_backward(np.array([0, 1, 1]), _f32(3, 4), _f32(6, 4).astype(np.float64)), "dw: dtype float64 differs"),
    (lambda: cpu.embedding_backward(np.array([0, 1, 1]), _f32(3, 8)[:, ::2], _f32(6, 4)), "dy: the last axis must be contiguous"),
])
def test_cpu_kernels_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cpu_kernels_refuse_read_only_outputs():
    p = _f32(5)
    p.flags.writeable = False
    with pytest.raises(ValueError, match="p: output array is read-only"):
        cpu.adamw_update(p, *(_f32(5),) * 3, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1)
    dw = _f32(3, 2)
    dw.flags.writeable = False
    with pytest.raises(ValueError, match="dw: output array is read-only"):
        cpu.embedding_backward(np.array([0, 2]), _f32(2, 2), dw)
    q = _f32(1, 2, 3 * 4)
    q.flags.writeable = False
    with pytest.raises(ValueError, match="qkv: output array is read-only"):
        cpu.rope(q, _f32(2, 2), _f32(2, 2), 1, 1, 4)


@pytest.fixture
def two_threads():
    from ringattn import _cpu
    from ringattn.threads import set_threads

    before = _cpu.max_threads()
    set_threads(2)
    yield
    set_threads(before)


def test_results_do_not_depend_on_the_thread_count(two_threads):
    """sum_squares (every rank clips by it) is bitwise the same with 1 and 2 threads; the row
    kernels too (rows are independent); sizes are above the kernels' threshold for a team."""
    from ringattn.threads import set_threads

    a = rng.standard_normal(1_000_003).astype(np.float32)
    x, g, b = _f32(4096, 64), _f32(64), _f32(64)
    qkv = _f32(2, 1024, 5 * 64)
    cos, sin = (t.astype(np.float32) for t in reference.rope_angles(np.arange(1024), 64))
    runs = []
    for n in (2, 1):
        set_threads(n)
        q = qkv.copy()
        runs.append((cpu.sum_squares(a), cpu.layernorm_forward(x, g, b, 1e-5)[0], cpu.rope(q, cos, sin, 3, 1, 64)))
    assert runs[0][0] == runs[1][0]
    assert np.array_equal(runs[0][1], runs[1][1]) and np.array_equal(runs[0][2], runs[1][2])


@pytest.mark.parametrize("dt", ["float32", "float64"])
@pytest.mark.parametrize("w", [64, 20])
def test_embedding_backward_does_not_depend_on_the_thread_count(two_threads, dt, w):
    """Threads split the width (blocks of 16 columns: 64 -> 4 blocks, 20 -> an uneven 16 + 4): 1 and 2
    threads give bitwise the same dw, equal to the float64 reference; skewed ids (half the tokens on
    one id) and int32 ids included."""
    from ringattn.threads import set_threads

    n, vocab = 16384, 224
    ids = rng.integers(0, vocab, n).astype(np.int32)
    ids[rng.random(n) < 0.5] = 7
    dy = rng.standard_normal((n, w)).astype(dt)
    runs = []
    for t in (2, 1):
        set_threads(t)
        runs.append(cpu.embedding_backward(ids, dy, np.full((vocab, w), np.nan, dt)))
    assert np.array_equal(runs[0], runs[1])
    assert reference.rel_error(runs[0], reference.embedding_backward(ids, dy, vocab)) < TOL[dt]


def test_two_thread_reductions_match_reference(two_threads):
    """The per-thread accumulators (LayerNorm dg/db, Linear dw/db, the cross-entropy sums) summed
    over a team of 2 (sizes above the team threshold) equal the float64 reference."""
    n, w, m = 5000, 64, 192
    x, g, b, dy = _f32(n, w), _f32(w), _f32(w), _f32(n, w)
    _, mean, rstd = cpu.layernorm_forward(x, g, b, 1e-5)
    dg, db = np.full(w, np.nan, np.float32), np.full(w, np.nan, np.float32)
    dx = cpu.layernorm_backward(dy, x, g, mean, rstd, dg, db)
    _, _, _, rdx, rdg, rdb = reference.layernorm(x, g, b, 1e-5, dy=dy)
    for got, ref in ((dx, rdx), (dg, rdg), (db, rdb)):
        assert reference.rel_error(got, ref) < 2e-5
    wl, dyl = _f32(w, m), _f32(n, m)
    dwl, dbl = np.full((w, m), np.nan, np.float32), np.full(m, np.nan, np.float32)
    dxl = cpu.linear_backward(dyl, x, wl, dwl, dbl)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, wl, dyl))
    for got, ref in ((dxl, dy64 @ w64.T), (dwl, x64.T @ dy64), (dbl, dy64.sum(0))):
        assert reference.rel_error(got, ref) < 1e-5
    logits, labels = _f32(20000, 40), rng.integers(0, 40, 20000)
    loss, correct, d = cpu.softmax_xent(logits, labels, 0.5)
    rl, rc, rd = reference.softmax_xent(logits, labels, 0.5)
    assert abs(loss - rl) < 1e-5 * rl and correct == rc and reference.rel_error(d, rd) < 1e-5
