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
from mpi_util import run_mpi

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
    res = run_mpi(ranks, PROGRAM.read_text(), args=args, timeout=300, env={"PYTHONPATH": str(TESTS)})
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
