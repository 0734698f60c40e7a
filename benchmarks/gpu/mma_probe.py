"""The GPU probe of benchmarks/gpu/run.sh: which lane holds which element after a real ldmatrix, and
what a real mma.sync computes, compared with the warp emulator the tensor-core kernels are tested
under on the CPU.

tests/cute/mma_probe.cu is built twice from the same source: with nvcc for the GPU (the real
instructions) and with the host compiler and -DRA_EMULATE (cuda/emulate.hpp's warp, the tables
tests/test_mma_fragments.py checks against CuTe in CI). Both outputs list the mma operand layouts,
every ldmatrix variant's lane map and the mma.sync results; compare() says where they differ. The
GPU machine needs no CUTLASS headers: the emulated tables stand for CuTe's, checked against them
in CI.

    python3 benchmarks/gpu/mma_probe.py --nvcc PATH [--arch 90] [--workdir DIR] [--save FILE]
    python3 benchmarks/gpu/mma_probe.py --nvcc PATH --probe-exe EXE   # EXE instead of the nvcc build (tests)

Prints the mismatches (at most 5 per kind) and a line RESULT {json}; exit status 0 when the outputs
agree, 3 when they differ, 1 when a build or a run failed. Standard library only.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "cute" / "mma_probe.cu"
# (kind in the probe's output, kind in the reference's): the probe prints its layouts as mma-layout,
# CuTe's table (tests/cute/mma_layouts.cpp) as mma; the ldmatrix lane maps are ldsm in both.
CUTE_KINDS = (("mma-layout", "mma"), ("ldsm", "ldsm"))
# Two probe outputs: layouts, lane maps and the mma.sync results.
PROBE_KINDS = (("mma-layout", "mma-layout"), ("ldsm", "ldsm"), ("mma", "mma"))


def lines(text, kind):
    return sorted(tuple(line.split()[1:]) for line in text.splitlines() if line.split() and line.split()[0] == kind)


def compare(probe, reference, kinds=CUTE_KINDS):
    """Mismatches between a probe's output (emulated or from a GPU) and a reference: CuTe's tables
    (the default kinds) or another probe's output (PROBE_KINDS). Empty when they agree."""
    bad = []
    for kind_probe, kind_ref in kinds:
        got, want = lines(probe, kind_probe), lines(reference, kind_ref)
        if not want:
            bad.append(f"no {kind_ref} lines in the reference")
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        bad += [f"{kind_probe}: the reference has {m}, the probe does not" for m in missing[:5]]
        bad += [f"{kind_probe}: the probe has {e}, the reference does not" for e in extra[:5]]
    return bad


def cuda_include(nvcc):
    """The toolkit's include folder (cuda_fp16.h): next to nvcc's bin/ (nvcc may be a wrapper
    script elsewhere), else the usual toolkit folders."""
    near = Path(nvcc).resolve().parents[1] / "include"
    for inc in (near, Path("/usr/local/cuda/include"), *sorted(Path("/usr/local").glob("cuda-*/include"))):
        if (inc / "cuda_fp16.h").exists():
            return inc
    return None


def build_emulated(nvcc, out):
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = cuda_include(nvcc)
    if cxx is None or inc is None:
        raise RuntimeError(f"the emulated probe needs g++ and the CUDA headers (found {cxx}, {inc})")
    return run([cxx, "-std=c++20", "-O1", "-DRA_EMULATE", "-pthread", f"-I{inc}", f"-I{inc / 'cccl'}", "-x", "c++",
                str(PROBE), "-o", str(out)], "emulated build")


def build_gpu(nvcc, arch, out):
    return run([nvcc, "-std=c++17", "-O1", f"-arch=sm_{arch}", str(PROBE), "-o", str(out)], "nvcc build")


def run(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nvcc", required=True, help="nvcc (also locates the CUDA headers for the emulated build)")
    ap.add_argument("--arch", default="90", help="GPU architecture for nvcc (default 90)")
    ap.add_argument("--workdir", default=str(ROOT / "build" / "gpu-probe"))
    ap.add_argument("--probe-exe", help="an already built probe to run instead of the nvcc build")
    ap.add_argument("--save", help="write the GPU probe's output here")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        emu_exe, gpu_exe = work / "mma_probe_emulated", Path(a.probe_exe) if a.probe_exe else work / "mma_probe_gpu"
        build_emulated(a.nvcc, emu_exe)
        if not a.probe_exe:
            build_gpu(a.nvcc, a.arch, gpu_exe)
        emulated = run([str(emu_exe)], "the emulated probe")
        gpu = run([str(gpu_exe)], "the GPU probe")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"FAIL {e}")
        print("RESULT " + json.dumps({"probe_ok": False, "probe_error": str(e).splitlines()[0][:200]}))
        return 1
    if a.save:
        Path(a.save).write_text(gpu)
    bad = compare(gpu, emulated, PROBE_KINDS)
    counts = {k: len(lines(gpu, k)) for k, _ in PROBE_KINDS}
    for b in bad:
        print("MISMATCH " + b)
    print(f"probe: {counts} lines from the GPU; {len(bad)} mismatches with the emulator")
    print("RESULT " + json.dumps({"probe_ok": not bad, "probe_mismatches": len(bad), "probe_lines": counts}))
    return 3 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
