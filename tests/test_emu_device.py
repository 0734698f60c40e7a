"""The emulated device itself (tests/emu_device.py): its arrays refuse host/device mixes as CuPy
does, its streams and events catch missing waits, and DeviceTransport runs a ring over it under
mpiexec in both modes (CUDA-aware: device buffers to MPI; staged: pinned copies on a side stream),
with each ordering call of the transport shown to be necessary."""
import re
from pathlib import Path

import numpy as np
import pytest

import emu_device as emu
from mpi_util import run_file
from ringattn import device, kernels

PROGRAM = Path(__file__).resolve().parent / "mpi_programs" / "emu_device_ring.py"

xp = emu.xp


def dev(*shape, dtype=np.float32):
    return xp.asarray(np.random.default_rng().standard_normal(shape), dtype)


# ---- EmuArray refuses what CuPy refuses -----------------------------------------------------------
def test_refuses_host_arrays_in_operations():
    d, h = dev(3), np.ones(3, np.float32)
    for op in (lambda: d + h, lambda: h + d, lambda: d * h, lambda: xp.exp(h), lambda: np.add(d, h),
               lambda: xp.concatenate([d, h]), lambda: np.concatenate([h, d]), lambda: d[np.array([0, 1])]):
        with pytest.raises(TypeError, match="NumPy \\(host\\) array was mixed"):
            op()
    with pytest.raises(TypeError, match="mixed"):
        d[...] = h
    d += 1  # device with device / scalars is fine
    assert isinstance(d + d, emu.EmuArray) and isinstance(xp.exp(d), emu.EmuArray)


def test_refuses_implicit_conversion_and_the_cpu_kernels():
    """np.asarray(device array) raises, so the C++ CPU kernels cannot silently take device arrays."""
    d = dev(1, 4, 1, 8)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(d)
    out, lse = xp.empty(d.shape, np.float32), xp.empty((1, 1, 4), np.float32)
    with pytest.raises(TypeError):
        kernels.forward(d, d, d, out, lse)
    assert not hasattr(d, "__array_interface__") and not hasattr(d, "__dlpack__")


def test_views_share_memory_and_get_copies():
    d = xp.zeros((4, 6), np.float32)
    v = d[1:3, ::2]
    v[...] = 5
    h = d.get()
    assert isinstance(h, np.ndarray) and h[1:3, ::2].sum() == 30 and h.sum() == 30
    h[...] = 0
    assert float(d.sum()) == 30  # get() was a copy
    pinned = np.frombuffer(xp.cuda.alloc_pinned_memory(96), np.float32).reshape(4, 6)
    assert d.get(out=pinned) is pinned and pinned.sum() == 30
    assert d.reshape(24).data.ptr == d.data.ptr and v.data.ptr == d.data.ptr + 6 * 4


@pytest.mark.parametrize("dtype", [np.float16, emu.bfloat16, np.float32, np.float64])
def test_empty_and_pinned_are_poisoned(dtype):
    assert np.isnan(xp.empty((3, 5), dtype).get().astype(np.float64)).all()
    mem = xp.cuda.alloc_pinned_memory(64)
    assert np.all(np.frombuffer(mem, np.uint8) == emu.POISON)


def test_cuda_array_interface():
    d = dev(4, 6)
    cai = d.__cuda_array_interface__
    assert cai["version"] == 3 and cai["data"][0] == d.data.ptr and cai["strides"] is None
    assert cai["stream"] == 1  # the legacy default stream
    s = xp.cuda.Stream(non_blocking=True)
    with s:
        assert d.__cuda_array_interface__["stream"] == s.ptr
    desc = device.describe(d[:, ::2], "x")
    assert desc.strides == (24, 8) and desc.shape == (4, 3) and desc.dtype == "float32"
    assert device.describe(xp.zeros(3, emu.bfloat16), "b").dtype == "bfloat16"


# ---- streams and events: ordering is checked ----------------------------------------------------------
def test_missing_wait_between_streams_is_a_hazard():
    side = xp.cuda.Stream(non_blocking=True)
    d = xp.zeros(8, np.float32)
    with side, pytest.raises(emu.HazardError, match="setitem on stream .* writes .* write by zeros on null"):
        d[...] = 1  # the zeros on the null stream are not ordered before this write
    side.wait_event(xp.cuda.get_current_stream().record())
    with side:
        d[...] = 1  # written on the side stream
    with pytest.raises(emu.HazardError, match="add on null stream reads .* write by setitem on stream"):
        d + 1
    xp.cuda.get_current_stream().wait_event(side.record())
    assert float((d + 1).sum()) == 16


def test_write_after_read_needs_a_wait_too():
    side = xp.cuda.Stream(non_blocking=True)
    d = xp.ones(8, np.float32)
    xp.cuda.get_current_stream().synchronize()
    d * 2  # read on the null stream
    with side, pytest.raises(emu.HazardError, match="writes .* read by multiply on null stream"):
        d[...] = 0
    side.wait_event(xp.cuda.get_current_stream().record())
    with side:
        d[...] = 0


def test_event_done_after_polling_orders_the_host():
    side = xp.cuda.Stream(non_blocking=True)
    pinned = np.frombuffer(xp.cuda.alloc_pinned_memory(32), np.float32)
    d = xp.arange(8, dtype=np.float32)
    side.wait_event(xp.cuda.get_current_stream().record())
    xp.cuda.runtime.memcpyAsync(pinned.ctypes.data, d.data.ptr, 32, 2, side.ptr)
    with pytest.raises(emu.HazardError, match="host reads pinned .* memcpyAsync"):
        emu.host_reads(pinned, "MPI Isend")
    ev = side.record()
    assert not ev.done  # still "running" on the first poll
    assert ev.done
    emu.host_reads(pinned, "MPI Isend")
    assert np.array_equal(pinned, np.arange(8))


def test_memcpy_kind_must_match_the_memory():
    d = xp.zeros(4, np.float32)
    pinned = np.frombuffer(xp.cuda.alloc_pinned_memory(16), np.uint8)
    with pytest.raises(ValueError, match="kind 2: src should be device memory but is host"):
        xp.cuda.runtime.memcpyAsync(d.data.ptr, pinned.ctypes.data, 16, 2, 0)
    with pytest.raises(ValueError, match="src should be host memory but is device"):
        xp.cuda.runtime.memcpyAsync(d.data.ptr, d.data.ptr, 16, 1, 0)


def test_kernel_launch_is_checked_on_its_stream():
    """An emulated kernel reading an input that another stream wrote, without a wait, is a hazard
    naming the kernel; after the wait it runs."""
    from ringattn.backends import cuda

    emu.kernels()
    emu.install()
    try:
        q = dev(1, 5, 1, 4)
        side = xp.cuda.Stream(non_blocking=True)
        side.wait_event(xp.cuda.get_current_stream().record())
        with side:
            k = q * 1
        out, lse = cuda.empty(q.shape, "float32"), cuda.empty((1, 1, 5), "float32")
        with pytest.raises(emu.HazardError, match="attention_forward on null stream reads"):
            cuda.forward(q, k, k, out, lse)
        xp.cuda.get_current_stream().wait_event(side.record())
        cuda.forward(q, k, k, out, lse)
        assert np.isfinite(out.get()).all()
    finally:
        emu.uninstall()


# ---- DeviceTransport over the emulated device, under mpiexec ---------------------------------------
pytest_mpi = pytest.mark.mpi


def _run(ranks, *args):
    emu.kernels()  # build once here, not concurrently on every rank
    return run_file(ranks, str(PROGRAM), args=args, timeout=180, env={"PYTHONPATH": str(PROGRAM.parents[1])})


@pytest_mpi
@pytest.mark.parametrize("ranks,mode,dtype", [(2, "aware", "float32"), (2, "staged", "bfloat16"),
                                              (3, "aware", "bfloat16"), (3, "staged", "float32")])
def test_device_transport_ring(ranks, mode, dtype):
    res = _run(ranks, mode, dtype)
    assert sorted(re.findall(r"ok (\d+)", res.stdout)) == [str(i) for i in range(ranks)], res.stdout


@pytest_mpi
@pytest.mark.parametrize("mode,hook", [("staged", "_copy_after_compute"), ("staged", "_sync_copy"),
                                       ("staged", "_compute_after_copy"), ("aware", "_sync_compute")])
def test_each_transport_ordering_call_is_needed(mode, hook):
    """Disabling any one of the transport's waits makes the emulator raise HazardError on every rank."""
    res = _run(2, mode, "float32", "--break", hook)
    assert sorted(re.findall(r"hazard caught (\d+)", res.stdout)) == ["0", "1"], res.stdout + res.stderr
