"""ringattn.Ring over device arrays on the emulated device (tests/emu_device.py), many cases per launch.

    PYTHONPATH=tests mpiexec -n P python -m mpi4py tests/mpi_programs/ring_device.py [--modes aware,staged]
        [--alternate] [--quick]

For each transport mode (CUDA-aware: device buffers straight to MPI; staged: pinned host copies on a
side stream; chosen through RINGATTN_CUDA_AWARE_MPI, the production override) and each case (layout x
causal x GQA, an uneven total length, float32 / float16 / bfloat16): shard the full device arrays,
run attention_forward and attention_backward, unshard, and compare on every rank with the float64
reference: float32 < 1e-5 relative error; 16-bit within 2x the error of the same computation done
naively in that precision (test_cuda_emulated.naive_same_precision). Results must be device arrays
(shard and unshard included) of the input dtype, lse float32. Every MPI read/write of the Ring's
device transport is reported to the emulator, whose streams and events raise HazardError on any
missing wait; in the staged mode the device -> host copies are counted (a forwarded block is sent
from the pinned memory it arrived in, never copied back). Then the cross-rank agreement: rank 0 with NumPy arrays (or another dtype) while the
others pass device arrays is the same ValueError on every rank.
--alternate runs each case in one mode only, the modes taking turns (to keep the largest P fast);
--quick runs every fifth case. Prints "case ok RANK MODE ..." per case, "agree ok RANK", and "done RANK" at the end.
"""
import os
import sys

if "__file__" in globals():  # run by hand: find tests/emu_device.py
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import emu_device as emu  # noqa: E402
from ringattn import Ring, backends, reference  # noqa: E402
from ringattn import layout as L  # noqa: E402
from ringattn.info import ENV_CUDA_AWARE  # noqa: E402
from test_cuda_emulated import naive_same_precision, rounded  # noqa: E402

comm = MPI.COMM_WORLD
R, P = comm.Get_rank(), comm.Get_size()
be = backends.cuda


def device_ring(layout, aware):
    """A Ring whose device transport is in the given mode and reports MPI's accesses."""
    os.environ[ENV_CUDA_AWARE] = "1" if aware else "0"
    ring = Ring(comm, layout=layout)
    t = ring._transport(be)
    assert t.cuda_aware is aware
    t.comm = emu.CheckedComm(t.comm)
    ring.d2h = []  # sizes of the transport's device -> host copies
    copy = t._memcpy

    def counted(dst, src, nbytes, kind):
        if kind == 2:
            ring.d2h.append(nbytes)
        return copy(dst, src, nbytes, kind)

    t._memcpy = counted
    return ring


def cases(quick):
    """(layout, causal, heads, heads_kv, dtype) covering every layout x causal x GQA in float32 and
    every layout in each 16-bit dtype (causal or not, GQA or not, alternating)."""
    out = []
    for layout in ("contiguous", "zigzag", "striped"):
        for causal in (False, True):
            for hkv in (2, 1):
                out.append((layout, causal, 2, hkv, "float32"))
    for i, layout in enumerate(("contiguous", "zigzag", "striped")):
        for j, dtype in enumerate(("float16", "bfloat16")):
            out.append((layout, (i + j) % 2 == 0, 2, 1 + (i + j + 1) % 2, dtype))
    return out[::5] if quick else out


def check(name, got, ref, dtype, naive=None, what=""):
    err = reference.rel_error(got, ref)
    if dtype == "float32" or naive is None:
        ok = err < 1e-5
        bound = 1e-5
    else:
        bound = 2 * reference.rel_error(naive, ref)
        ok = err <= bound
    assert ok, f"rank {R} {what} {name}: relative error {err:.3e} > {bound:.3e}"
    return err


def run_case(ring, case, seed):
    layout, causal, h, hkv, dtype = case
    rng = np.random.default_rng(seed)  # the same full arrays on every rank
    total = 3 * P + 2  # uneven: not a multiple of P (nor of 2P for zigzag)
    b, d = 1, 8
    q, k, v, dout = (rounded(rng.standard_normal(s), dtype) for s in
                     ((b, total, h, d), (b, total, hkv, d), (b, total, hkv, d), (b, total, h, d)))
    dev = [be.asarray(x, dtype) for x in (q, k, v, dout)]
    ql, kl, vl, gl = (ring.shard(x) for x in dev)
    for x in (ql, kl, vl, gl):
        assert be.is_mine(x) and x.dtype == be.check_dtype(dtype) and x.shape[1] == ring.local_len(total)
    ring.d2h.clear()
    out, lse = ring.attention_forward(ql, kl, vl, causal=causal)
    fwd_copies = list(ring.d2h)
    dq, dk, dv = ring.attention_backward(gl, ql, kl, vl, out, lse, causal=causal)
    bwd_copies = ring.d2h[len(fwd_copies):]
    if not ring._transport(be).cuda_aware and P > 1:
        # staged: the forward copies only its own block to the host (later blocks are forwarded from
        # the pinned memory they arrived in); the backward its K/V once, then only gradient planes
        planes = 2 * b * max(L.local_len(total, P, r, ring.layout) for r in range(P)) * hkv * d
        kv, grad = planes * be.check_dtype(dtype).itemsize, planes * 4  # K/V in dtype, dK/dV in float32
        assert fwd_copies == [kv], (fwd_copies, kv)
        pad = -kv % 16
        assert bwd_copies == [kv] + [pad + grad] * (P - 2) + [grad, grad], (bwd_copies, kv, grad)
    for x in (out, dq, dk, dv):
        assert be.is_mine(x) and x.dtype == be.check_dtype(dtype), (type(x), x.dtype)
    assert be.is_mine(lse) and lse.dtype == np.float32
    full = [ring.unshard(x) for x in (out, dq, dk, dv)]
    lse_full = ring.unshard(lse, axis=2)
    assert all(be.is_mine(x) for x in full + [lse_full]), "unshard: device in, device out"
    got = [be.to_host(x).astype(np.float64) for x in full]
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=causal)
    refs = [ref_out, *reference.attention_backward(dout, q, k, v, causal=causal)]
    naive = naive_same_precision(q, k, v, causal, dtype, dout) if dtype != "float32" else [None] * 4
    errs = [check(n, g, r, dtype, nv, str(case)) for n, g, r, nv in zip(("out", "dq", "dk", "dv"), got, refs, naive)]
    check("lse", be.to_host(lse_full).astype(np.float64), ref_lse, "float32", what=str(case))
    return errs


def agreement(ring):
    """A rank whose arrays are of another kind, or another dtype: the same ValueError on every rank."""
    rng = np.random.default_rng(7)
    n = ring.local_len(2 * P)
    host = rng.standard_normal((1, n, 2, 8)).astype(np.float32)
    for what, arr, key in (("kind", host if R == 0 else be.asarray(host), "array kind"),
                           ("dtype", be.asarray(host, "bfloat16" if R == 0 else "float32"), "dtype")):
        try:
            ring.attention_forward(arr, arr, arr)
        except ValueError as e:
            msg = str(e)
            assert "arguments differ across ranks" in msg and key in msg, msg
            if what == "kind":
                assert "ranks [0] 'cpu'" in msg and "'cuda'" in msg, msg
        else:
            raise AssertionError(f"rank {R}: differing {what} across ranks was not refused")
    sys.stdout.write(f"agree ok {R}\n")


def main(modes, alternate, quick):
    emu.kernels()
    emu.install()
    rings = {}
    runs = [(m, c) for m in modes for c in cases(quick)]
    if alternate:
        runs = [(modes[i % len(modes)], c) for i, c in enumerate(cases(quick))]
    for i, (mode, case) in enumerate(runs):
        key = (case[0], mode)
        if key not in rings:
            rings[key] = device_ring(case[0], mode == "aware")
        errs = run_case(rings[key], case, seed=1000 + i)
        sys.stdout.write(f"case ok {R} {mode} {' '.join(map(str, case))} "
                         f"errs {' '.join(f'{e:.1e}' for e in errs)}\n")
    if P > 1:
        agreement(next(iter(rings.values())))
    sys.stdout.write(f"done {R}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="aware,staged")
    ap.add_argument("--alternate", action="store_true")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    modes = a.modes.split(",")
    assert set(modes) <= {"aware", "staged"}, modes
    main(modes, a.alternate, a.quick)
