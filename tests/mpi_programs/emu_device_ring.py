"""DeviceTransport over the emulated device: a ring pass of packed K/V blocks sent as bytes, each
step's compute a real (emulated) CUDA kernel reading the block in hand, as the Ring's forward does.

    PYTHONPATH=tests mpiexec -n P python -m mpi4py tests/mpi_programs/emu_device_ring.py MODE DTYPE [--break HOOK]

MODE: aware (device buffers straight to Isend/Irecv) or staged (pinned host copies on a side stream).
DTYPE: float32, float16 or bfloat16 (the bytes travel as uint8, so MPI never infers a type).
Checks on every rank: the bytes that arrive each step are exactly those of the rank the block started
on; a suffix-only exchange (the backward's gradient planes) lands at the right offset; the merged
attention equals the float64 reference; staging copies run on the transport's side stream only.
Every access is checked for ordering by the emulator (HazardError on a missing wait).
With --break HOOK, the transport's ordering call HOOK (e.g. _compute_after_copy) is disabled and
the emulator must catch the race: prints "hazard caught RANK". Otherwise prints "ok RANK".
"""
import os
import sys

if "__file__" in globals():  # run by hand: find tests/emu_device.py
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import emu_device as emu  # noqa: E402
from ringattn import backends, reference  # noqa: E402


def values(seed, shape, dtype):
    """Random values exactly representable in dtype, as float64."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype).astype(np.float64)


def main(mode, dtype_name, broken=None):
    emu.install()
    be = backends.cuda
    comm = MPI.COMM_WORLD
    r, n = comm.Get_rank(), comm.Get_size()
    src, dst = (r - 1) % n, (r + 1) % n
    dtype = be.check_dtype(dtype_name)
    b, s, h, d = 1, 13, 2, 8
    kv_shape = (2, b, s, h, d)
    kv_of = lambda owner: values(1000 + owner, kv_shape, dtype)  # noqa: E731
    as_bytes = lambda x: np.ascontiguousarray(x.astype(dtype)).view(np.uint8).ravel()  # noqa: E731

    t = be.make_transport(emu.CheckedComm(comm), src, dst, cuda_aware=(mode == "aware"))
    if broken:
        setattr(t, broken, lambda: None)
    nbytes = int(np.prod(kv_shape)) * dtype.itemsize
    cur, nxt = t.alloc((nbytes,), np.uint8)
    typed = lambda buf: buf.view(dtype).reshape(kv_shape)  # noqa: E731
    typed(cur)[...] = be.asarray(kv_of(r), dtype)  # produced on the compute stream
    q_host = values(r, (b, s, h, d), dtype)
    q = be.asarray(q_host, dtype)
    out = be.empty((b, s, h, d), be.acc_dtype(dtype))
    lse = be.empty((b, h, s), be.lse_dtype(dtype))
    owner = r
    try:
        for step in range(n):
            kv = typed(cur)
            if step < n - 1:
                t.start(cur, nxt)
            t.overlap(lambda: be.forward(q, kv[0], kv[1], out, lse, accumulate=step > 0))
            if step < n - 1:
                t.wait()
                owner = (owner - 1) % n
                got = be.to_host(nxt)
                assert np.array_equal(got, as_bytes(kv_of(owner))), (mode, step, "wrong bytes arrived")
                cur, nxt = nxt, cur
        # the backward's second message: a suffix of the buffer only (the gradient planes)
        half = nbytes // 2
        mine = be.to_host(cur)
        t.start(cur[half:], nxt[half:])
        t.wait()
        left = np.asarray(comm.sendrecv(mine[half:], dest=dst, source=src))
        assert np.array_equal(be.to_host(nxt[half:]), left), (mode, "suffix exchange")
    except emu.HazardError as e:
        if not broken:
            raise
        sys.stdout.write(f"hazard caught {r}: {e}\n")
        sys.stdout.flush()
        comm.Barrier()  # every rank stops at the same point: leave together, before any is killed
        os._exit(0)  # skip finalising MPI with this step's messages still posted
    if broken:
        raise SystemExit(f"--break {broken}: the emulator did not detect the missing ordering")

    k_all = np.concatenate([kv_of(o)[0] for o in range(n)], axis=1)
    v_all = np.concatenate([kv_of(o)[1] for o in range(n)], axis=1)
    ref_out, ref_lse = reference.attention_forward(q_host, k_all, v_all)
    err = reference.rel_error(be.to_host(out), ref_out)
    assert err < 1e-5, (mode, dtype_name, err)
    assert reference.rel_error(be.to_host(lse), ref_lse) < 1e-5
    copy_streams = {label for label, what in emu.timeline.log if what.startswith("memcpyAsync")}
    side = f"stream {t._copy_stream.ptr:#x}"
    assert copy_streams == (set() if mode == "aware" else {side}), copy_streams
    sys.stdout.write(f"ok {r} err {err:.2e}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    args = sys.argv[1:]
    hook = None
    if "--break" in args:
        i = args.index("--break")
        hook = args[i + 1]
        del args[i:i + 2]
    main(args[0], args[1], hook)
