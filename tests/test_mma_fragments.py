"""The tensor-core register layouts of cuda/mma.cuh, checked against an independent source, and the
warp emulation (cuda/emulate.hpp) the tensor-core kernels are tested under.

Independent source: CuTe, from the headers of the `nvidia-cutlass` wheel (PyPI; installed with
`pip install --no-deps nvidia-cutlass`, the headers are all that is used). tests/cute/mma_layouts.cpp
evaluates CuTe's MMA traits of SM80_16x8x16_F32BF16BF16F32_TN / ..._F32F16F16F32_TN (ALayout,
BLayout, CLayout) and its ldmatrix copy traits (SM75_U32x{1,2,4}_LDSM_N, SM75_U16x{2,4,8}_LDSM_T)
on the host. tests/cute/mma_probe.cu prints cuda/mma.cuh's layout functions and, run through the
emulated warp, which lane holds which element after each ldmatrix and what mma.sync computes. The
same probe compiled with nvcc is the GPU probe (benchmarks/gpu/mma_probe.py, a step of
benchmarks/gpu/run.sh): its output is held to the emulated probe's with the same `compare()` that
holds the emulated probe to CuTe here, so the real instructions are checked against CuTe through the
emulator's tables.
"""
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_cuda_emulated import _cuda_include

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"))
import mma_probe  # noqa: E402  (benchmarks/gpu/mma_probe.py: the GPU probe's comparison, used here too)
from mma_probe import compare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUTE = ROOT / "tests" / "cute"


def _cutlass_include():
    try:
        inc = Path(importlib.metadata.distribution("nvidia-cutlass").locate_file("cutlass_library/source/include"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return inc if (inc / "cute" / "atom" / "mma_traits_sm80.hpp").exists() else None


def _build(src, out, flags):
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("needs g++ and the CUDA headers")
    out.parent.mkdir(parents=True, exist_ok=True)
    deps = [src, *(ROOT / "cuda").glob("*.cuh"), *(ROOT / "cuda").glob("*.hpp")]
    if out.exists() and out.stat().st_mtime > max(p.stat().st_mtime for p in deps):
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}")
    cmd = [cxx, "-std=c++20", "-O1", *flags, f"-I{inc}", f"-I{inc / 'cccl'}", "-x", "c++", str(src), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"build failed:\n{' '.join(cmd)}\n{r.stderr[-3000:]}"
    tmp.rename(out)
    return out


@pytest.fixture(scope="module")
def cute_table():
    inc = _cutlass_include()
    if inc is None:
        pytest.skip("needs the nvidia-cutlass wheel's CuTe headers: pip install --no-deps nvidia-cutlass")
    exe = _build(CUTE / "mma_layouts.cpp", ROOT / "build" / "cute" / "mma_layouts", [f"-I{inc}"])
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def probe_output():
    exe = _build(CUTE / "mma_probe.cu", ROOT / "build" / "cute" / "mma_probe", ["-DRA_EMULATE", "-pthread"])
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60).stdout


_lines = mma_probe.lines


def test_mma_layouts_match_cute(cute_table, probe_output):
    """a_elem / b_elem / c_elem of cuda/mma.cuh are CuTe's ALayout / BLayout / CLayout, lane by
    lane and value by value, for bf16 and fp16."""
    got, want = _lines(probe_output, "mma-layout"), _lines(cute_table, "mma")
    assert len(want) == 2 * 32 * (8 + 4 + 4)
    assert got == want


def test_emulated_ldmatrix_matches_cute(cute_table, probe_output):
    """The emulated ldmatrix x1/x2/x4, plain and .trans, puts every element in the lane and
    register CuTe's copy traits say."""
    got, want = _lines(probe_output, "ldsm"), _lines(cute_table, "ldsm")
    assert len(want) == 2 * 32 * 2 * (1 + 2 + 4)
    assert got == want
    assert compare(probe_output, cute_table) == []


def test_compare_reports_a_wrong_layout(cute_table, probe_output):
    """The comparison the GPU probe's output goes through fails on a single swapped element."""
    lines = probe_output.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("mma-layout bf16 A 5 2 "))
    f = lines[i].split()
    f[-1] = str(int(f[-1]) + 1)
    lines[i] = " ".join(f)
    assert compare("\n".join(lines), cute_table)


def test_emulated_mma_computes_a_times_b(probe_output):
    """mma.sync m16n8k16 through the emulated warp, operands loaded with a_elem / b_elem and the
    result read with c_elem: exactly A @ B (all values and sums are exact in float32)."""
    m, k, n = np.arange(16)[:, None], np.arange(16)[None, :], np.arange(8)[None, :]
    a = ((3 * m + 5 * k) % 7 - 3) / 4
    b = ((2 * np.arange(16)[:, None] + 3 * n) % 5 - 2) / 2
    assert np.abs(a @ b).max() > 1
    for atom in ("bf16", "f16"):
        d = np.zeros((16, 8))
        seen = np.zeros((16, 8), bool)
        for line in probe_output.splitlines():
            f = line.split()
            if f[0] == "mma" and f[1] == atom:
                d[int(f[2]), int(f[3])] = float(f[4])
                seen[int(f[2]), int(f[3])] = True
        assert seen.all()
        np.testing.assert_array_equal(d, a @ b)


# ---- the warp emulation itself --------------------------------------------------------------------
@pytest.fixture(scope="module")
def emu_checks():
    exe = _build(CUTE / "warp_emu_checks.cu", ROOT / "build" / "cute" / "warp_emu_checks", ["-DRA_EMULATE", "-pthread"])

    def run(mode):
        r = subprocess.run([str(exe), mode], capture_output=True, text=True, timeout=60)
        assert r.returncode in (0, 3), r.stderr
        return r.returncode, r.stdout.strip()
    return run


def test_shuffles(emu_checks):
    # warp 0: sum of lanes 0..31 = 496, lane 3 broadcasts 30; warp 1: 1520 and 350
    assert emu_checks("shfl") == (0, "496030 1520350")


def test_cp_async_lands_at_its_wait(emu_checks):
    assert emu_checks("wait") == (0, "0 248")
    # without the wait, the destination holds the poison bytes (0xFFFF: NaN in fp16 and bf16)
    assert emu_checks("nowait") == (0, "65535 65535")
    # wait_group 1 with two groups committed: the older one landed, the newer one did not
    assert emu_checks("wait1") == (0, "0 248 65535 65535")


def test_deadlock_is_reported_with_the_kernel(emu_checks):
    rc, msg = emu_checks("deadlock")
    assert rc == 3
    assert "deadlock in kernel deadlock_kernel" in msg
    assert "threads 0-47 at __syncthreads" in msg and "threads 48-63 in __syncwarp" in msg
    assert "RA_EMU_SEED=" in msg


def test_divergent_warp_operations_are_reported(emu_checks):
    rc, msg = emu_checks("diverge")
    assert rc == 3 and "diverged" in msg and "diverge_kernel" in msg


def test_dynamic_shared_memory_is_poisoned_per_block(emu_checks):
    # every block, in whatever order, finds poison, not the 7 an earlier block wrote
    assert emu_checks("poison") == (0, "ffffffff ffffffff ffffffff ffffffff")


def test_static_shared_of_kernel_templates_is_poisoned_per_block(emu_checks):
    # a template kernel's static __shared__ array (RA_POISON_SHARED), as the SIMT kernels have
    assert emu_checks("static_poison") == (0, "ffffffff ffffffff ffffffff ffffffff")


def test_ra_launch_reports_the_kernel_by_name(emu_checks):
    rc, msg = emu_checks("named")
    assert rc == 3 and "deadlock in kernel named_deadlock_kernel" in msg
