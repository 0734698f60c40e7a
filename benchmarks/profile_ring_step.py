"""Where one rank's training step goes in the ring (the trainer's step: model, flat allreduce, AdamW).

    OMP_NUM_THREADS=1 mpiexec -n 4 python -m mpi4py benchmarks/profile_ring_step.py [--seq-len 2048] [--batch 16]
        [--steps 5] [--profile]

Per rank: wall time per step, the process's CPU time per step (CPU / wall < 1 means the rank waited or
was descheduled), and the ring transport's exposed wait. With --profile, rank 0's cProfile table.
"""
import argparse
import cProfile
import pstats
import time
import types

from mpi4py import MPI

from ringattn.bench.train import _ringattn_step, _sleep_barrier


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layout", default="zigzag")
    ap.add_argument("--sp", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    world = MPI.COMM_WORLD
    step, _, _ = _ringattn_step(a, world)
    step()  # warm-up: buffers, pools, first-touch
    ring_t = None
    import gc
    from ringattn import transport
    transports = [o for o in gc.get_objects() if isinstance(o, transport.HostTransport)]
    for t in transports:
        t.wait_s = t.compute_cpu_s = 0.0
    _sleep_barrier(world)
    prof = cProfile.Profile(time.process_time) if a.profile and world.Get_rank() == 0 else None
    w0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    for _ in range(a.steps):
        step()
    if prof:
        prof.disable()
    wall, cpu = (time.perf_counter() - w0) / a.steps, (time.process_time() - c0) / a.steps
    wait = sum(t.wait_s for t in transports) / a.steps
    comp = sum(t.compute_cpu_s for t in transports) / a.steps
    rows = world.gather((world.Get_rank(), wall, cpu, wait, comp), root=0)
    _sleep_barrier(world)
    if world.Get_rank() == 0:
        print(f"seq {a.seq_len} x batch {a.batch}, {world.Get_size()} ranks, {a.steps} steps")
        print("rank  wall s/step  cpu s/step  ring wait s  ring compute cpu s")
        for r, w, c, wt, cp in rows:
            print(f"{r:4d}  {w:11.3f}  {c:10.3f}  {wt:11.3f}  {cp:18.3f}")
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
