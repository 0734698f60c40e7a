"""ringattn.Ring over device arrays, on the emulated device (tests/emu_device.py), under mpiexec.

One launch per rank count runs tests/mpi_programs/ring_device.py, which covers every layout x causal x
GQA with an uneven total length in float32 (< 1e-5 against the float64 reference) and every layout in
float16 / bfloat16 (within 2x the error of a naive same-precision computation), forward and backward,
shard / unshard returning device arrays, in the CUDA-aware and the staged transport modes, with every
stream / MPI access ordering-checked; then the cross-rank agreement on array kind and dtype.
P = 1 sends no messages, so one mode suffices there; at P = 4 the modes take turns per case (time).
"""
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import emu_device as emu
from mpi_util import run_file

TESTS = Path(__file__).resolve().parent
PROGRAM = TESTS / "mpi_programs" / "ring_device.py"
sys.path.insert(0, str(PROGRAM.parent))
import ring_device  # noqa: E402  (for its case list)

N_CASES = len(ring_device.cases(False))


@pytest.mark.mpi
@pytest.mark.parametrize("ranks,args,runs", [
    (1, ["--modes", "staged"], N_CASES),
    (2, [], 2 * N_CASES),
    (3, [], 2 * N_CASES),
    (4, ["--alternate"], N_CASES),
])
def test_ring_on_device_arrays(ranks, args, runs):
    emu.kernels()  # build once here, not concurrently on every rank
    res = run_file(ranks, str(PROGRAM), args=args, timeout=300, env={"PYTHONPATH": str(TESTS)})
    out = res.stdout
    assert sorted(re.findall(r"done (\d+)", out)) == [str(r) for r in range(ranks)], out[-3000:] + res.stderr[-3000:]
    for r in range(ranks):
        assert len(re.findall(rf"case ok {r} ", out)) == runs, out[-3000:]
        if ranks > 1:
            assert f"agree ok {r}" in out
    modes = set(re.findall(r"case ok \d+ (\w+) ", out))
    assert modes == ({"staged"} if ranks == 1 else {"aware", "staged"}), modes


def test_explicit_backend_refuses_the_other_kind():
    """Ring(backend="cpu") given device arrays (and backend="cuda" given NumPy ones) is a TypeError
    naming the backend; an unknown backend name is a ValueError."""
    from ringattn import Ring

    emu.kernels()
    emu.install()
    try:
        x = np.zeros((1, 4, 2, 8), np.float32)
        with pytest.raises(TypeError, match=r"backend='cpu' but q, k, v are device \(CuPy\) arrays"):
            Ring(backend="cpu").attention_forward(*(emu.xp.asarray(x),) * 3)
        with pytest.raises(TypeError, match=r"backend='cuda' but q, k, v are host \(NumPy\) arrays"):
            Ring(backend="cuda").attention_forward(x, x, x)
        with pytest.raises(TypeError, match=r"mixed host and device arrays: device \(CuPy\) k; host \(NumPy\) q, v"):
            Ring().attention_forward(x, emu.xp.asarray(x), x)
        with pytest.raises(ValueError, match="unknown backend 'gpu'"):
            Ring(backend="gpu")
    finally:
        emu.uninstall()


def test_shard_and_unshard_keep_the_array_kind():
    """One rank: shard / unshard of device arrays are device arrays, of NumPy arrays NumPy arrays."""
    from ringattn import Ring
    from ringattn.backends import cuda

    emu.kernels()
    emu.install()
    try:
        ring = Ring(layout="zigzag")
        x = np.random.default_rng().standard_normal((2, 7, 3, 4)).astype(np.float32)
        d = ring.shard(emu.xp.asarray(x))
        assert cuda.is_mine(d) and np.array_equal(cuda.to_host(d), ring.shard(x))
        full = ring.unshard(d)
        assert cuda.is_mine(full) and np.array_equal(cuda.to_host(full), x)
        h = ring.unshard(ring.shard(x))
        assert isinstance(h, np.ndarray) and not cuda.is_mine(h) and np.array_equal(h, x)
    finally:
        emu.uninstall()


def test_staged_forwarding_sends_the_pinned_copy_and_refuses_bytes_that_did_not_arrive():
    """start(send, recv, unchanged=n) skips the device -> host copy of n bytes only when the last
    message brought them (their pinned copy mirrors the device bytes); otherwise a ValueError."""
    from mpi4py import MPI

    from ringattn.backends import cuda

    emu.kernels()
    emu.install()
    try:
        t = cuda.make_transport(MPI.COMM_SELF, 0, 0, cuda_aware=False)
        a, b = t.alloc((64,), np.uint8)
        a[...] = emu.xp.asarray(np.arange(64, dtype=np.uint8))
        with pytest.raises(ValueError, match="did not arrive with the last message"):
            t.start(a, b, unchanged=16)
        t.start(a, b)
        t.wait()
        copies = []
        real = t._memcpy
        t._memcpy = lambda dst, src, n, kind: (copies.append((kind, n)), real(dst, src, n, kind))
        b[32:] = emu.xp.asarray(np.full(32, 7, np.uint8))  # changed on the device after arriving
        t.start(b, a, unchanged=32)
        t.wait()
        assert copies == [(2, 32), (1, 64)]  # only the changed half went device -> host
        assert np.array_equal(cuda.to_host(a), np.r_[np.arange(32), np.full(32, 7)])
        with pytest.raises(ValueError, match="did not arrive"):
            t.start(b, a, unchanged=64)  # b's bytes were sent, not received, by the last message
    finally:
        emu.uninstall()
