"""The real ringattn.Ring over CuPy arrays, on several MPI ranks sharing one GPU, against single-process
attention.

    mpiexec -n 3 python -m mpi4py benchmarks/gpu/ring_check.py [--expect-transport staged|aware] [--quick]

For every layout x causal x (GQA or not) x dtype (float32, bfloat16, float16), on a sequence length
that no layout splits evenly: the same full inputs on every rank (one seed), Ring.shard (CuPy in),
Ring.attention_forward / attention_backward on the device shards, Ring.unshard (CuPy out). Checked:
- kinds: every result is a device array of the module the inputs came from; out and dq/dk/dv keep
  the input dtype, lse is float32;
- float32: out, lse, dq, dk, dv within 1e-5 relative error of the float64 reference;
- float16 / bfloat16 (inputs exactly representable, so the reference sees the kernel's inputs): the
  ring's error is at most 2x that of single-process ringattn.attention_forward / attention_backward
  on the whole sequence on the same GPU, and lse within 1e-5;
- the transport the Ring used for device arrays (CUDA-aware or staged) is the one expected.
The verdict is agreed by all ranks (same exit status everywhere). Rank 0 prints one line per case
and a RESULT line with the worst numbers.

The array module is CuPy; tests drive the same code over their emulated device (main(argv, xp)).
"""
import argparse
import itertools
import json
import sys
import time

import numpy as np

import ringattn
from ringattn import reference

LAYOUTS = ("contiguous", "zigzag", "striped")
DTYPES = ("float32", "bfloat16", "float16")
F32_TOL = 1e-5   # float32 against float64 (the project's bound)
RATIO_16 = 2.0   # 16-bit: at most 2x the error of the same-precision single-process result


def host_dtype(name):
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415 - CuPy's bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def rounded(x, dtype):
    """x rounded to `dtype` and back to float64: inputs the 16-bit kernels see exactly."""
    return np.asarray(x, host_dtype(dtype)).astype(np.float64)


def to_host(a):
    return np.asarray(a.get(), dtype=np.float64)


def transport_mode(ring):
    """'aware' / 'staged' for the transport the Ring made for device arrays; None if it does not say."""
    t = getattr(ring, "_transports", {}).get("cuda") if isinstance(getattr(ring, "_transports", None), dict) else None
    t = t if t is not None else getattr(ring, "transport", None)
    aware = getattr(t, "cuda_aware", None)
    return None if aware is None else ("aware" if aware else "staged")


def cases(quick, size, layouts=LAYOUTS):
    """(layout, causal, heads, kv_heads, dim, seq) for each case; seq is uneven for every layout."""
    seq = 4 * size * (7 if quick else 40) + 3  # not a multiple of 2 * size: every layout splits it unevenly
    dims = (8,) if quick else (64, 128)
    out = []
    for i, (layout, causal, gqa) in enumerate(itertools.product(layouts, (False, True), (False, True))):
        out.append((layout, causal, 4, 2 if gqa else 4, dims[i % len(dims)], seq))
    return out


def check_case(xp, ring, dtype, layout, causal, h, hkv, d, seq, rng):
    """Errors of one case: {name: float}, and a list of problems (empty when it passes)."""
    q, k, v, dout = (rounded(rng.standard_normal(s), dtype)
                     for s in ((1, seq, h, d), (1, seq, hkv, d), (1, seq, hkv, d), (1, seq, h, d)))
    hd = host_dtype(dtype)
    full = {n: xp.asarray(a.astype(hd)) for n, a in dict(q=q, k=k, v=v, dout=dout).items()}
    loc = {n: ring.shard(a) for n, a in full.items()}
    problems = []
    for n, a in loc.items():
        if type(a) is not type(full[n]) or a.dtype != full[n].dtype:
            problems.append(f"shard({n}) gave {type(a).__name__} {a.dtype}, not {type(full[n]).__name__} {full[n].dtype}")
    out, lse = ring.attention_forward(loc["q"], loc["k"], loc["v"], causal=causal)
    dq, dk, dv = ring.attention_backward(loc["dout"], loc["q"], loc["k"], loc["v"], out, lse, causal=causal)
    got = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    want_dtype = {"lse": np.dtype(np.float32)}
    for n, a in got.items():
        if type(a) is not type(full["q"]):
            problems.append(f"{n} is {type(a).__name__}, not a device array like the inputs")
        if a.dtype != want_dtype.get(n, full["q"].dtype):
            problems.append(f"{n} dtype {a.dtype}, expected {want_dtype.get(n, full['q'].dtype)}")
    axis = {"lse": 2}  # lse is (batch, heads, seq)
    ring_full = {}
    for n, a in got.items():
        u = ring.unshard(a, axis=axis.get(n, 1))
        if type(u) is not type(full["q"]):
            problems.append(f"unshard({n}) gave {type(u).__name__}, not a device array")
        ring_full[n] = to_host(u)
    ro, rl = reference.attention_forward(q, k, v, causal=causal)
    ref = dict(zip(("dq", "dk", "dv"), reference.attention_backward(dout, q, k, v, causal=causal)), out=ro, lse=rl)
    errs = {n: reference.rel_error(ring_full[n], ref[n]) for n in ref}
    if dtype == "float32":
        problems += [f"{n} error {e:.2e} > {F32_TOL:.0e}" for n, e in errs.items() if not e < F32_TOL]
        return errs, {}, problems
    # Single-process attention on the whole sequence, same GPU, same precision.
    so, sl = ringattn.attention_forward(full["q"], full["k"], full["v"], causal=causal)
    sg = ringattn.attention_backward(full["dout"], full["q"], full["k"], full["v"], so, sl, causal=causal)
    single = dict(zip(("dq", "dk", "dv"), (to_host(g) for g in sg)), out=to_host(so))
    ratios = {}
    for n, s in single.items():
        base = reference.rel_error(s, ref[n])
        ratios[n] = errs[n] / base if base > 0 else (0.0 if errs[n] == 0 else np.inf)
        if not errs[n] <= RATIO_16 * base:
            problems.append(f"{n} error {errs[n]:.2e} > {RATIO_16:g} x single-process {base:.2e}")
    if not errs["lse"] < F32_TOL:
        problems.append(f"lse error {errs['lse']:.2e} > {F32_TOL:.0e}")
    return errs, ratios, problems


def main(argv=None, xp=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--expect-transport", choices=("staged", "aware"), default=None,
                   help="fail unless the Ring's device transport is this one")
    p.add_argument("--quick", action="store_true", help="small cases (the emulated device in tests)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    a = p.parse_args(argv)
    if xp is None:
        import cupy as xp  # noqa: PLC0415
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(2024)  # the same inputs on every rank
    layouts = a.layouts.split(",")
    rings = {layout: ringattn.Ring(comm, layout=layout) for layout in layouts}
    worst = {"f32_rel": 0.0, "ratio_16bit": 0.0, "lse_rel": 0.0}
    failures, n_cases, t0 = 0, 0, time.perf_counter()
    for dtype in a.dtypes.split(","):
        for layout, causal, h, hkv, d, seq in cases(a.quick, size, layouts):
            try:
                errs, ratios, problems = check_case(xp, rings[layout], dtype, layout, causal, h, hkv, d, seq, rng)
            except Exception as e:  # noqa: BLE001 - reported as this case's failure, on every rank
                errs, ratios, problems = {}, {}, [f"{type(e).__name__}: {e}"]
            n_cases += 1
            failures += bool(problems)
            worst["lse_rel"] = max(worst["lse_rel"], errs.get("lse", 0.0))
            if dtype == "float32":
                worst["f32_rel"] = max([worst["f32_rel"]] + [e for n, e in errs.items() if n != "lse"])
            else:
                worst["ratio_16bit"] = max([worst["ratio_16bit"]] + list(ratios.values()))
            if rank == 0:
                shown = " ".join(f"{n} {e:.1e}" for n, e in errs.items())
                print(f"{'FAIL' if problems else 'ok  '} {dtype:<8} {layout:<10} causal={causal!s:<5} h{h}/{hkv} d{d} "
                      f"s{seq}: {shown}" + ("" if not problems else "\n      " + "; ".join(problems)), flush=True)
    mode = transport_mode(rings[layouts[0]])
    mode_problem = None
    if a.expect_transport and mode is not None and mode != a.expect_transport:
        mode_problem = f"the Ring used the {mode} transport, expected {a.expect_transport}"
    failed_anywhere = comm.allreduce(int(bool(failures or mode_problem)), op=MPI.MAX)
    if rank == 0:
        if mode_problem:
            print("FAIL " + mode_problem)
        print(f"# ring check: {size} ranks, {n_cases} cases, {failures} failed, transport "
              f"{mode or 'not reported by the Ring'}, {time.perf_counter() - t0:.1f} s")
        print("RESULT " + json.dumps({
            f"ring{size}_cases": n_cases, f"ring{size}_failed": failures, f"ring{size}_transport": mode,
            f"ring{size}_worst_f32_rel": worst["f32_rel"], f"ring{size}_worst_16bit_ratio": worst["ratio_16bit"],
            f"ring{size}_worst_lse_rel": worst["lse_rel"]}))
    return 1 if failed_anywhere else 0


if __name__ == "__main__":
    sys.exit(main())
