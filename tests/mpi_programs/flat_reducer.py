"""GradientReducer.flat over real ranks: the flat gradient buffer (and its statistics tail) summed
over the world and divided by dp, one Allreduce per step from that buffer itself (host, emulated
device with CUDA-aware MPI) or from one pinned mirror (emulated device, staged), identical on
every rank, equal to a float64 sum of every rank's gradients; then one flat AdamW step gives
bit-identical parameters everywhere; gradients.poll_interval sees whether ranks outnumber cores.

    mpiexec -n P python -m mpi4py tests/mpi_programs/flat_reducer.py

Prints "flat reducer ok: MODE ..." on rank 0 per mode; any failure raises (mpi4py then aborts the job).
"""
import os
import sys

if "__file__" in globals():  # find tests/emu_device.py
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np
from mpi4py import MPI

import emu_device as emu
from ringattn import backends, flat, gradients
from ringattn import optim as O
from ringattn.model import is_decayed

SHAPES = {"embed.w": (9, 5), "blocks.0.attn.wqkv": (5, 17), "blocks.0.attn.bqkv": (17,), "blocks.0.ln1.g": (5,),
          "head.w": (5, 3), "head.b": (3,)}




def rank_grads(r, step):
    """Rank r's gradients at `step` (every rank can make every rank's)."""
    rng = np.random.default_rng([r, step, 11])
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def pointer(a):
    return a.data.ptr if hasattr(a, "__cuda_array_interface__") else a.ctypes.data


def check(mode, world):
    rank, size = world.Get_rank(), world.Get_size()
    be = backends.cpu if mode == "host" else backends.cuda
    layout = flat.plan({k: (s, np.float32) for k, s in SHAPES.items()}, is_decayed)
    grads = flat.FlatArrays(layout, be, tail=3)
    params = flat.FlatArrays(layout, be).assign({k: np.ones(s, np.float32) for k, s in SHAPES.items()})
    opt = O.FlatAdamW(params)
    comm = emu.ReducingComm(world)
    reduce = gradients.GradientReducer(comm, cuda_aware=mode == "aware", poll_s=gradients.POLL_S)  # as the trainer
    dp = size
    for step in range(2):
        grads.assign(rank_grads(rank, step))
        extras = reduce.flat(grads, dp, extra=[rank + 0.5, rank, 2 * rank + 1], step=step)
        assert len(comm.calls) == step + 1, comm.calls
        want = [sum(q + 0.5 for q in range(size)), sum(range(size)), sum(2 * q + 1 for q in range(size))]
        assert extras.tolist() == want, (extras, want)
        for k in SHAPES:
            ref = sum(rank_grads(q, step)[k].astype(np.float64) for q in range(size)) / dp
            got = be.to_host(grads.arrays[k])
            err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert err < 1e-6, (mode, k, err)
        mine = be.to_host(grads.buffers[np.dtype(np.float32)][:layout.sizes[np.dtype(np.float32)]])
        assert all(np.array_equal(mine, o) for o in world.allgather(mine)), "reduced gradients differ across ranks"
        norm = O.flat_global_norm(grads)
        opt.update(params, grads, 1e-2, O.AdamWConfig(clip=0.5), grad_scale=O.clip_scale(norm, 0.5))
    first, second = comm.calls
    if mode == "staged":
        assert first is second and isinstance(first, np.ndarray), "staged: one pinned mirror kept across steps"
    else:
        assert pointer(first) == pointer(second) == pointer(grads.buffers[np.dtype(np.float32)]), \
            "the Allreduce must send the flat gradient buffer itself"
    p = be.to_host(params.buffers[np.dtype(np.float32)])
    assert all(np.array_equal(p, o) for o in world.allgather(p)), "parameters differ across ranks after the update"
    if rank == 0:
        print(f"flat reducer ok: {mode} on {size} ranks", flush=True)


def main():
    world = MPI.COMM_WORLD
    # mpiexec here does not bind ranks: each may use every core, so the node is oversubscribed
    # exactly when it runs more ranks than cores, and then (only) the reducer waits with sleeps.
    over = world.Get_size() > len(os.sched_getaffinity(0))
    assert gradients.poll_interval(world) == (gradients.POLL_S if over else None), "poll_interval"
    check("host", world)
    backends.cuda.use_emulation(emu.xp, None)  # arrays and copies only: no kernels are launched here
    try:
        check("staged", world)
        check("aware", world)
    finally:
        backends.cuda.use_real()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
