"""Flat buffers of a training step (ringattn.flat, optim.FlatAdamW, GradientReducer.flat): the layout
(views alias one buffer per dtype, the decayed arrays one contiguous span, a dict round-trips), the
flat AdamW step equal to the per-array update of before (clipping folded into grad_scale), the
global norm from the flat buffer, and the reducer sending the flat gradient buffer itself (host,
and the emulated device in both modes) on one rank; tests/test_flat_reducer.py runs it on several."""
import math

import numpy as np
import pytest

import emu_device as emu
from ringattn import backends, flat, gradients
from ringattn import optim as O
from ringattn.model import ModelConfig, init_params, is_decayed, param_shapes


def awkward_params(rng, dtype=np.float64):
    """Odd sizes, decayed and other names interleaved (the layout must regroup them)."""
    shapes = {"embed.w": (7, 3), "blocks.0.attn.wqkv": (3, 11), "blocks.0.attn.bqkv": (11,),
              "blocks.0.ln1.g": (3,), "blocks.0.ffn.w1": (3, 13), "blocks.0.ffn.b1": (13,), "head.b": (1,),
              "head.w": (3, 1)}
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


# ---- layout ---------------------------------------------------------------------------------------
def test_views_alias_the_buffer_and_the_dict_round_trips():
    rng = np.random.default_rng()
    src = awkward_params(rng)
    fa = flat.FlatArrays(flat.plan_like(src, is_decayed), backends.cpu, tail=3).assign(src)
    (buf,) = fa.buffers.values()
    assert buf.size == sum(a.size for a in src.values()) + 3
    assert list(fa.arrays) == list(src)  # the model's order, for checkpoints and callers
    for k, a in src.items():
        v = fa.arrays[k]
        assert v.shape == a.shape and v.dtype == a.dtype and v.flags.c_contiguous
        assert np.shares_memory(v, buf) and np.array_equal(v, a)
        v[...] = -1.0 - np.arange(v.size).reshape(v.shape)  # writes through the view land in the buffer
        s = fa.layout.slots[k]
        assert np.array_equal(buf[s.offset:s.offset + s.size], v.ravel())
    back = {k: v.copy() for k, v in fa.arrays.items()}
    again = flat.FlatArrays(fa.layout, backends.cpu, tail=3).assign(back)
    assert np.array_equal(next(iter(again.buffers.values()))[:-3], buf[:-3])
    assert np.array_equal(fa.tail_view(), np.zeros(3)) and not any(np.shares_memory(fa.tail_view(), v)
                                                                    for v in fa.arrays.values())


def test_decayed_arrays_form_one_contiguous_span_first():
    cfg = ModelConfig.for_task("needle", width=16, layers=3, heads=2)
    layout = flat.plan_like(init_params(cfg), is_decayed)
    (dt,) = layout.sizes
    dec, rest = layout.spans
    assert (dec.decayed, rest.decayed) == (True, False) and dec.start == 0 and dec.stop == rest.start
    assert rest.stop == layout.sizes[dt] == sum(int(np.prod(s)) for s in param_shapes(cfg).values())
    for name, s in layout.slots.items():
        span = dec if is_decayed(name) else rest
        assert span.start <= s.offset and s.offset + s.size <= span.stop, name
    ends = sorted((s.offset, s.offset + s.size) for s in layout.slots.values())
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))  # no gap, no overlap


def test_one_buffer_per_dtype_and_bad_input():
    rng = np.random.default_rng()
    src = {"a.w": rng.standard_normal((2, 3)), "b.b": rng.standard_normal(5).astype(np.float32),
           "c.w": rng.standard_normal(4).astype(np.float32)}
    fa = flat.FlatArrays(flat.plan_like(src, is_decayed), backends.cpu, tail=2).assign(src)
    assert {str(d): b.size for d, b in fa.buffers.items()} == {"float64": 6 + 2, "float32": 9}  # tail: widest
    assert [(str(s.dtype), s.decayed, s.stop - s.start) for s in fa.layout.spans] == \
        [("float64", True, 6), ("float32", True, 4), ("float32", False, 5)]
    with pytest.raises(ValueError, match=r"missing \['c.w'\]"):
        fa.assign({"a.w": src["a.w"], "b.b": src["b.b"]})
    with pytest.raises(ValueError, match="'b.b' has shape"):
        fa.assign({**src, "b.b": np.zeros(4)})
    with pytest.raises(ValueError, match="no arrays"):
        flat.plan({}, is_decayed)


# ---- the update ---------------------------------------------------------------------------------
def old_global_norm(grads):
    """optim.global_norm before the flat buffers (per-array float64 sums added in order)."""
    tot = 0.0
    for g in grads.values():
        g64 = g.astype(np.float64)
        tot += float((g64 * g64).sum())
    return math.sqrt(tot)


def old_step(params, grads, m, v, t, lr, hp):
    """The trainer's clip_grads + optim.adamw_update before the flat buffers, array by array."""
    norm = old_global_norm(grads)
    if hp.clip > 0 and norm > hp.clip:
        for g in grads.values():
            g *= g.dtype.type(hp.clip / (norm + 1e-6))
    b1, b2 = hp.betas
    c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    for k, p in params.items():
        g = grads[k]
        m[k] *= b1
        m[k] += (1.0 - b1) * g
        v[k] *= b2
        v[k] += (1.0 - b2) * (g * g)
        if hp.weight_decay and is_decayed(k):
            p *= p.dtype.type(1.0 - lr * hp.weight_decay)
        p -= (lr / c1) * m[k] / (np.sqrt(v[k] / c2) + hp.eps)
    return norm


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 1e-6)])
@pytest.mark.parametrize("clip", [0.5, 0.0, 1e9])  # clipping, off, never reached
def test_flat_update_equals_the_per_array_update(dtype, tol, clip):
    rng = np.random.default_rng()
    hp = O.AdamWConfig(lr=3e-2, weight_decay=0.3, clip=clip)
    ref = awkward_params(rng, dtype)
    m = {k: np.zeros_like(a) for k, a in ref.items()}
    v = {k: np.zeros_like(a) for k, a in ref.items()}
    layout = flat.plan_like(ref, is_decayed)
    params = flat.FlatArrays(layout, backends.cpu).assign(ref)
    grads = flat.FlatArrays(layout, backends.cpu, tail=3)
    grads.tail_view()[:] = np.nan  # the statistics' slots: outside the norm and the update
    opt = O.FlatAdamW(params)
    for t in range(1, 5):
        g = {k: (rng.standard_normal(a.shape) * 2.0).astype(dtype) for k, a in ref.items()}
        grads.assign(g)
        before = {k: a.copy() for k, a in grads.arrays.items()}
        lr = O.lr_at(t - 1, O.AdamWConfig(lr=hp.lr, warmup=2, total_steps=5))
        norm = O.flat_global_norm(grads)
        opt.update(params, grads, lr, hp, grad_scale=O.clip_scale(norm, hp.clip))
        want_norm = old_step(ref, g, m, v, t, lr, hp)
        assert abs(norm - want_norm) <= 1e-14 * want_norm
        assert all(np.array_equal(grads.arrays[k], before[k]) for k in g)  # the gradients are not modified
    assert opt.step == 4 and opt.state()["step"] == 4
    for k in ref:
        assert rel(params.arrays[k], ref[k]) < tol, k
        assert rel(opt.m.arrays[k], m[k]) < tol and rel(opt.v.arrays[k], v[k]) < tol, k
    assert np.isnan(grads.tail_view()).all()


def test_dict_update_and_clip_keep_their_arithmetic():
    """optim.adamw_update / clip_grads (the dict API, now one backend call per array) equal the old code."""
    rng = np.random.default_rng()
    hp = O.AdamWConfig(lr=1e-2, weight_decay=0.2, clip=0.7)
    params = awkward_params(rng, np.float32)
    ref = {k: a.copy() for k, a in params.items()}
    m = {k: np.zeros_like(a) for k, a in ref.items()}
    v = {k: np.zeros_like(a) for k, a in ref.items()}
    state = O.init_state(params)
    for t in range(1, 4):
        g = {k: rng.standard_normal(a.shape).astype(np.float32) for k, a in ref.items()}
        g2 = {k: a.copy() for k, a in g.items()}
        norm = O.clip_grads(g, hp.clip)
        O.adamw_update(params, g, state, 1e-2, hp)
        assert abs(norm - old_step(ref, g2, m, v, t, 1e-2, hp)) <= 1e-14 * norm
    for k in ref:
        assert rel(params[k], ref[k]) < 1e-6 and rel(state["v"][k], v[k]) < 1e-6, k
    with pytest.raises(ValueError, match="not contiguous"):
        O.adamw_update({"x.w": np.zeros((4, 4))[:, ::2]}, {"x.w": np.zeros((4, 2))}, O.init_state(
            {"x.w": np.zeros((4, 2))}), 1e-3, hp)


def test_flat_state_is_the_checkpoint_dict_and_loads_back():
    rng = np.random.default_rng()
    src = awkward_params(rng, np.float32)
    params = flat.FlatArrays(flat.plan_like(src, is_decayed), backends.cpu).assign(src)
    opt = O.FlatAdamW(params)
    saved = {"step": 7, "m": {k: rng.standard_normal(a.shape).astype(np.float32) for k, a in src.items()},
             "v": {k: rng.random(a.shape).astype(np.float32) for k, a in src.items()}}
    opt.load(O.unflatten_state({k: np.asarray(a) for k, a in O.flatten_state(saved).items()}))
    assert opt.step == 7
    flat_now = O.flatten_state(opt.state())
    assert set(flat_now) == set(O.flatten_state(O.init_state(src)))  # the checkpoint's names, unchanged
    for k, a in O.flatten_state(saved).items():
        assert np.array_equal(flat_now[k], a), k
    assert np.shares_memory(opt.state()["m"]["head.w"], opt.m.buffers[np.dtype(np.float32)])


# ---- the reducer on the flat buffer, one rank -------------------------------------------------------


def pointer(a):
    return a.data.ptr if hasattr(a, "__cuda_array_interface__") else a.ctypes.data


@pytest.fixture
def emulated():
    backends.cuda.use_emulation(emu.xp, None)  # arrays and copies only: no kernels are launched here
    yield backends.cuda
    backends.cuda.use_real()


@pytest.mark.parametrize("poll_s", [None, 1e-4])  # blocking Allreduce, or Iallreduce with sleeping polls
@pytest.mark.parametrize("where", ["host", "staged", "aware"])
def test_reducer_sends_the_flat_gradient_buffer_itself(request, where, poll_s):
    be = backends.cpu if where == "host" else request.getfixturevalue("emulated")
    rng = np.random.default_rng()
    host = awkward_params(rng, np.float32)
    grads = flat.FlatArrays(flat.plan_like(host, is_decayed), be, tail=3)
    comm = emu.ReducingComm()
    reduce = gradients.GradientReducer(comm, cuda_aware=where == "aware", poll_s=poll_s)
    for step in range(2):  # the second step reuses the first step's buffers
        grads.assign({k: v * (step + 1) for k, v in host.items()})
        extras = reduce.flat(grads, 2, extra=[1.5, 3.0, 4.0], step=step)
        assert len(comm.calls) == step + 1
        assert extras.dtype == np.float64 and extras.tolist() == [1.5, 3.0, 4.0]
        for k, v in host.items():
            assert be.is_mine(grads.arrays[k])
            np.testing.assert_array_equal(be.to_host(grads.arrays[k]), v * (step + 1) / np.float32(2))
    first, second = comm.calls
    (buf,) = grads.buffers.values()
    assert first.size == buf.size == sum(a.size for a in host.values()) + 3
    if where == "staged":  # a pinned host mirror, kept across steps
        assert first is second and isinstance(first, np.ndarray) and not be.is_mine(first)
    else:  # the gradient buffer itself: no packing copy
        assert pointer(first) == pointer(second) == pointer(buf)
    with pytest.raises(ValueError, match="room for 3"):
        reduce.flat(grads, 1, extra=[1.0, 2.0, 3.0, 4.0])
