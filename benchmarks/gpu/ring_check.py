"""Ring attention with several MPI ranks sharing one GPU, built from the CUDA block kernels:
forward (accumulate mode) and backward (dK/dV travel with K/V), compared with the float64 reference.

    mpiexec -n 3 python -m mpi4py benchmarks/gpu/ring_check.py [--seq 1536] [--dtype bfloat16]

This checks exactness of the kernels in ring use (positions, the LSE merge, accumulation) and
ringattn.transport_cuda.DeviceTransport on a real GPU (--transport staged|aware), or a plain blocking
host Sendrecv (--transport blocking). The time printed is one forward+backward pass, not an overlap
measurement.
"""
import argparse
import time

import numpy as np

import cupy as cp
from common import BF16, empty, to_device
from mpi4py import MPI
from ringattn import cuda, reference


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=1536)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--transport", default="staged", choices=("staged", "aware", "blocking"),
                   help="ringattn.transport_cuda.DeviceTransport (pinned staging or CUDA-aware MPI), "
                        "or a blocking host Sendrecv")
    a = p.parse_args()
    comm = MPI.COMM_WORLD
    r, n = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(0)  # same full inputs on every rank
    S, H, D = a.seq - a.seq % n, a.heads, a.dim
    q, k, v, dout = (rng.standard_normal((1, S, H, D)) for _ in range(4))
    if a.dtype == "bfloat16":  # exact bf16 values so the reference sees the kernel's inputs
        q, k, v, dout = (device_round(x) for x in (q, k, v, dout))
    # striped layout: rank r holds rows r, r + n, r + 2n, ...
    mine = lambda x: np.ascontiguousarray(x[:, r::n])  # noqa: E731
    Q, dO = to_device(mine(q), a.dtype), to_device(mine(dout), a.dtype)
    kv_host = np.stack([mine(k), mine(v)])  # one buffer, one message per step
    t0 = time.perf_counter()
    if a.transport == "blocking":
        out, lse, dq, dkv = blocking_ring(comm, Q, dO, kv_host, a.dtype)
    else:
        out, lse, dq, dkv = transport_ring(comm, Q, dO, kv_host, a.dtype, a.transport == "aware")
    cp.cuda.Device().synchronize()
    elapsed = time.perf_counter() - t0
    ro, _ = reference.attention_forward(q, k, v, causal=True)
    rq, rk, rv = reference.attention_backward(dout, q, k, v, causal=True)
    errs = {}
    for name, local, ref in (("out", out.get(), ro), ("dq", dq.get(), rq), ("dk", dkv[0], rk), ("dv", dkv[1], rv)):
        got = np.empty_like(ref)
        for rank, part in enumerate(comm.allgather(local)):
            got[:, rank::n] = part
        errs[name] = reference.rel_error(got, ref)
    if r == 0:
        print(f"# ring check: {n} ranks on one GPU, seq {S}, heads {H}, dim {D}, {a.dtype}, causal, striped; "
              f"transport {a.transport}: {elapsed * 1e3:.1f} ms")
        print("  relative errors vs float64 reference: " + ", ".join(f"{k_} {e:.2e}" for k_, e in errs.items()))
        tol = 1e-5 if a.dtype == "float32" else 1e-4  # exact bf16 inputs, float32 math
        ok = max(errs.values()) < tol
        print("  PASS" if ok else f"  FAIL (tolerance {tol})")
        if not ok:
            raise SystemExit(1)


def blocking_ring(comm, Q, dO, kv_host, dtype):
    """K/V through host memory with blocking sendrecv: the simplest possible exchange."""
    r, n = comm.Get_rank(), comm.Get_size()
    src, dst = (r - 1) % n, (r + 1) % n
    _, b, s, H, D = kv_host.shape
    out, lse = empty((b, s, H, D), "float32"), cp.full((b, H, s), np.nan, cp.float32)
    blk, owner = kv_host.copy(), r
    for step in range(n):
        K, V = to_device(blk[0], dtype), to_device(blk[1], dtype)
        cuda.forward(Q, K, V, out, lse, q_pos=(r, n), k_pos=(owner, n), causal=True, accumulate=step > 0)
        if step < n - 1:
            blk = comm.sendrecv(blk, dest=dst, source=src)
            owner = (owner - 1) % n
    dlt = cuda.delta(dO, out)
    dq = cp.zeros((b, s, H, D), cp.float32)
    blk, owner = kv_host.copy(), r
    dkv = np.zeros_like(blk)
    for step in range(n):
        K, V = to_device(blk[0], dtype), to_device(blk[1], dtype)
        dk, dv = cp.asarray(dkv[0], cp.float32), cp.asarray(dkv[1], cp.float32)
        cuda.backward(dO, Q, K, V, lse, dlt, dq, dk, dv, q_pos=(r, n), k_pos=(owner, n), causal=True)
        dkv = np.stack([dk.get(), dv.get()])
        # K/V and their gradient accumulators travel together; after n steps dK/dV are home.
        blk, dkv = comm.sendrecv((blk, dkv), dest=dst, source=src)
        owner = (owner - 1) % n
    return out, lse, dq, dkv


def transport_ring(comm, Q, dO, kv_host, dtype, aware):
    """K/V (input dtype) and dK/dV (float32) in DeviceTransport double buffers, messages in flight
    while the kernels run, as ring.py would do with device arrays."""
    from ringattn.transport_cuda import DeviceTransport

    r, n = comm.Get_rank(), comm.Get_size()
    src, dst = (r - 1) % n, (r + 1) % n
    _, b, s, H, D = kv_host.shape
    store = "uint16" if dtype == "bfloat16" else dtype  # device storage dtype of K/V planes
    wrap = (lambda x: BF16(x)) if dtype == "bfloat16" else (lambda x: x)  # noqa: E731
    tkv, tg = DeviceTransport(comm, src, dst, cuda_aware=aware), DeviceTransport(comm, src, dst, cuda_aware=aware)
    cur, nxt = tkv.alloc((2, b, s, H, D), store)
    kv_dev = to_device(kv_host, dtype)
    cur[...] = kv_dev.a if dtype == "bfloat16" else kv_dev
    out, lse = empty((b, s, H, D), "float32"), cp.full((b, H, s), np.nan, cp.float32)
    owner = r
    for step in range(n):
        if step < n - 1:
            tkv.start(cur, nxt)
        tkv.overlap(lambda: cuda.forward(Q, wrap(cur[0]), wrap(cur[1]), out, lse, q_pos=(r, n), k_pos=(owner, n),
                                         causal=True, accumulate=step > 0))
        if step < n - 1:
            tkv.wait()
            cur, nxt = nxt, cur
            owner = (owner - 1) % n
    dlt = cuda.delta(dO, out)
    dq = cp.zeros((b, s, H, D), cp.float32)
    cur[...] = kv_dev.a if dtype == "bfloat16" else kv_dev
    gcur, gnxt = tg.alloc((2, b, s, H, D), np.float32)
    gcur[...] = 0
    owner = r
    for step in range(n):
        if step < n - 1:
            tkv.start(cur, nxt)  # the next K/V moves while this block's gradients are computed
        tkv.overlap(lambda: cuda.backward(dO, Q, wrap(cur[0]), wrap(cur[1]), lse, dlt, dq, gcur[0], gcur[1],
                                          q_pos=(r, n), k_pos=(owner, n), causal=True))
        if step < n - 1:
            tkv.wait()
        tg.start(gcur, gnxt)  # dK/dV follow their K/V (n moves bring them home)
        tg.wait()
        cur, nxt, gcur, gnxt = nxt, cur, gnxt, gcur
        owner = (owner - 1) % n
    return out, lse, dq, gcur.get()


def device_round(x):
    from ringattn import device

    return device.from_bfloat16_bits(device.to_bfloat16_bits(x)).astype(np.float64)


if __name__ == "__main__":
    main()
