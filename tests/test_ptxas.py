"""Registers, spills, stack and shared memory of every CUDA kernel, from ptxas, for sm_80 and sm_90.

Each cuda/*.cu that defines a kernel is compiled by nvcc for both architectures at once
(`-gencode` twice, `-fatbin --resource-usage`: device code only, no host object, which was the
quickest of `-c`, `-cubin` per arch and `-fatbin` here), two files at a time, with the build's
flags (CMakeLists.txt: -O3 --expt-relaxed-constexpr). The logs are cached in build/ptxas/<hash of
the sources, nvcc's version and the flags>/, so a rerun on unchanged sources only parses; the
first run costs about 30-60 s of compiler time on 2 cores. Reading the resource usage of the module
the build made (`cuobjdump --dump-resource-usage`) was not chosen: the CPU build of this repository
leaves CUDA off, so that module may be absent or stale; compiling the sources is the truth about them.

The test fails on any spill (stores or loads, in a kernel or a device function), any stack frame
(an array the compiler put in local memory, e.g. an accumulator under register pressure), more than 255
registers, static shared memory over 48 KiB, or static + dynamic shared memory over the per-block
opt-in limit of the architecture. The dynamic bytes each kernel launches with come from
cuda/mma_config.hpp (the launch code's own constants), printed by tests/ptxas/launch_smem.cpp built
with the host compiler. The table is printed (pytest -s) and written to build/ptxas/report.txt;
benchmarks/results/ptxas_sm80_sm90.txt is `python tests/test_ptxas.py` on the committed sources.
Skips when nvcc is absent. The parser and the rules are tested on captured logs
(tests/ptxas/sample_ok.txt, tests/ptxas/sample_spill.txt from tests/ptxas/spill.cu).
"""
import hashlib
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).resolve().parent / "ptxas"
ARCHS = ("sm_80", "sm_90")
FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-fatbin", "--resource-usage",
         *[f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]]
MAX_REGISTERS = 255
# Per-block shared memory (CUDA C++ Programming Guide, technical specifications per compute
# capability): static at most 48 KiB everywhere; static + dynamic at most the opt-in maximum.
STATIC_SMEM_LIMIT = 48 * 1024
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
PROPS = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


# ---- parsing and rules (pure functions) ----------------------------------------------------------
def parse(text):
    """ptxas -v / --resource-usage output -> one dict per (function, arch): name (mangled), arch,
    entry (a kernel, or a device function ptxas reports separately), registers, stack,
    spill_stores, spill_loads, smem (static bytes)."""
    rows, arch, entry, cur = [], None, None, None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            entry, arch = m.group(1), m.group(2)
        elif m := PROPS.search(line):
            cur = {"name": m.group(1), "arch": arch, "entry": m.group(1) == entry, "registers": None,
                   "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}
            rows.append(cur)
        elif cur is not None and (m := FRAME.search(line)):
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        elif cur is not None and cur["entry"] and (m := USED.search(line)):
            cur["registers"] = int(m.group(1))
            if s := SMEM.search(line):
                cur["smem"] = int(s.group(1))
            cur = None
    return rows


def demangle(names):
    """{mangled: readable} through c++filt (cu++filt) when present; names unchanged otherwise."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout.split("\n")
    return {n: (d or n) for n, d in zip(names, out)}


def short_name(readable):
    """'ringattn::gpu::(anonymous namespace)::attn_fwd_mma_kernel<64, __half>(ringattn::gpu::AttnParams)'
    -> ('attn_fwd_mma_kernel<64, __half>', 'attn_fwd_mma_kernel', 64)."""
    m = re.search(r"(\w+)(<[^()]*>)?\(", readable)
    if not m:
        return readable, readable, None
    dim = re.match(r"<(\d+)", m.group(2) or "")
    return m.group(1) + (m.group(2) or ""), m.group(1), int(dim.group(1)) if dim else None


def annotate(rows, dynamic):
    """Adds kernel (short name), dynamic (bytes launched with: dynamic[(base name, dim)], else 0)."""
    names = demangle(sorted({r["name"] for r in rows}))
    for r in rows:
        r["kernel"], base, dim = short_name(names[r["name"]])
        r["dynamic"] = dynamic.get((base, dim), 0) if r["entry"] else 0
    return rows


def problems(rows):
    """Every broken rule, one line each (empty: all fine)."""
    out = []
    for r in rows:
        what = f"{r['kernel']} ({r['arch']})"
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"{what}: spills ({r['spill_stores']} bytes stored, {r['spill_loads']} loaded)")
        if r["stack"]:  # no spill but a stack frame: an array the compiler put in local memory
            out.append(f"{what}: {r['stack']} bytes of stack frame (local memory)")
        if not r["entry"]:
            continue
        if r["registers"] is None:
            out.append(f"{what}: no register count in the ptxas output")
        elif r["registers"] > MAX_REGISTERS:
            out.append(f"{what}: {r['registers']} registers > {MAX_REGISTERS}")
        if r["smem"] > STATIC_SMEM_LIMIT:
            out.append(f"{what}: {r['smem']} bytes of static shared memory > {STATIC_SMEM_LIMIT}")
        limit = SMEM_LIMIT.get(r["arch"].rstrip("a"))
        if limit is None:
            out.append(f"{what}: no shared memory limit known for {r['arch']}")
        elif r["smem"] + r["dynamic"] > limit:
            out.append(f"{what}: {r['smem']} static + {r['dynamic']} dynamic bytes of shared memory > {limit}")
    return out


def table(rows):
    head = ("kernel", "arch", "regs", "stack", "spill st", "spill ld", "smem static", "smem dynamic")
    body = [(r["kernel"] if r["entry"] else f"{r['kernel']} (device function)", r["arch"],
             "-" if r["registers"] is None else str(r["registers"]), str(r["stack"]), str(r["spill_stores"]),
             str(r["spill_loads"]), str(r["smem"]), str(r["dynamic"])) for r in rows]
    body.sort(key=lambda x: (x[0], x[1]))
    w = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    fmt = lambda x: "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(x)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), *map(fmt, body)]) + "\n"


# ---- compiling -----------------------------------------------------------------------------------
def kernel_sources():
    return [p for p in sorted((ROOT / "cuda").glob("*.cu")) if "__global__" in p.read_text()]


def nvcc():
    default = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(default) if default.exists() else None)


def ptxas_logs(nvcc_path):
    """{source name: nvcc's output}, compiled (2 at a time) or read from the cache."""
    version = subprocess.run([nvcc_path, "--version"], capture_output=True, text=True, timeout=60).stdout
    h = hashlib.sha256(version.encode() + " ".join(FLAGS).encode())
    for p in sorted((ROOT / "cuda").iterdir()) + sorted((ROOT / "cpp").glob("*.hpp")):
        h.update(p.name.encode() + p.read_bytes())
    cache = ROOT / "build" / "ptxas" / h.hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)

    def one(src):
        log = cache / f"{src.stem}.log"
        if not log.exists():
            cmd = [nvcc_path, *FLAGS, str(src), "-o", str(cache / f"{src.stem}.fatbin")]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-4000:]}"
            tmp = cache / f"{src.stem}.log.tmp"
            tmp.write_text(r.stdout + r.stderr)
            tmp.rename(log)
        return src.name, log.read_text()

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, kernel_sources()))


def launch_smem():
    """{(kernel, dim): dynamic bytes} from cuda/mma_config.hpp, through tests/ptxas/launch_smem.cpp."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a host C++ compiler for tests/ptxas/launch_smem.cpp")
    exe = ROOT / "build" / "ptxas" / "launch_smem"
    exe.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([cxx, "-std=c++17", str(SAMPLES / "launch_smem.cpp"), "-o", str(exe)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout
    return {(k, int(d)): int(b) for k, d, b in (line.split() for line in out.splitlines())}


def report():
    """(rows, table text) for the sources as they are."""
    path = nvcc()
    if path is None:
        pytest.skip("nvcc not found: the ptxas report needs the CUDA toolkit")
    dynamic = launch_smem()
    rows = []
    for text in ptxas_logs(path).values():
        rows += parse(text)
    annotate(rows, dynamic)
    return rows, dynamic, table(rows)


# ---- tests ---------------------------------------------------------------------------------------
def test_parser_reads_a_captured_log():
    rows = annotate(parse((SAMPLES / "sample_ok.txt").read_text()), {("attn_fwd_mma_kernel", 128): 81920})
    got = {(r["kernel"], r["arch"]): (r["registers"], r["smem"], r["dynamic"], r["stack"], r["spill_stores"]) for r in rows}
    assert got == {
        ("attn_fwd_kernel<64>", "sm_80"): (146, 41600, 0, 0, 0),
        ("attn_fwd_kernel<64>", "sm_90"): (128, 41600, 0, 0, 0),
        ("attn_delta_kernel", "sm_80"): (32, 0, 0, 0, 0),
        ("attn_delta_kernel", "sm_90"): (32, 0, 0, 0, 0),
        ("attn_fwd_mma_kernel<128, __half>", "sm_80"): (212, 0, 81920, 0, 0),
        ("attn_fwd_mma_kernel<128, __half>", "sm_90"): (227, 0, 81920, 0, 0),
    }
    assert problems(rows) == []


def test_spills_fail():
    """A kernel and a device function that spill (sample_spill.txt): every one is named, and the
    kernel's stack frame too."""
    rows = annotate(parse((SAMPLES / "sample_spill.txt").read_text()), {})
    found = problems(rows)
    assert len(found) == 6, found
    assert "spilly (sm_90): 2160 bytes of stack frame (local memory)" in found
    assert any("spilly (sm_80): spills (1292 bytes stored, 1544 loaded)" in p for p in found)
    assert any("helper (sm_90): spills" in p for p in found)


def test_limits_fail():
    base = {"kernel": "k", "entry": True, "registers": 255, "stack": 0, "spill_stores": 0, "spill_loads": 0,
            "smem": 48 * 1024}
    assert problems([dict(base, arch="sm_80", dynamic=115 * 1024)]) == []
    assert problems([dict(base, arch="sm_90", dynamic=179 * 1024)]) == []
    assert len(problems([dict(base, arch="sm_80", dynamic=115 * 1024 + 1)])) == 1
    assert len(problems([dict(base, arch="sm_90", dynamic=179 * 1024 + 1)])) == 1
    assert "256 registers" in problems([dict(base, arch="sm_80", dynamic=0, registers=256)])[0]
    assert "static" in problems([dict(base, arch="sm_90", dynamic=0, smem=48 * 1024 + 4)])[0]


def test_kernels_fit_without_spills():
    rows, dynamic, text = report()
    out = ROOT / "build" / "ptxas" / "report.txt"
    out.write_text(text)
    print("\n" + text)
    kernels = {(r["kernel"].split("<")[0], r["arch"]) for r in rows if r["entry"]}
    for name in ("attn_fwd_kernel", "attn_bwd_kernel", "attn_delta_kernel", "attn_fwd_mma_kernel", "attn_bwd_mma_kernel"):
        assert {(name, a) for a in ARCHS} <= kernels, f"{name} missing from the ptxas output"
    # every kernel that launches with dynamic shared memory was found and charged with it
    charged = {(r["kernel"].split("<")[0], r["arch"]) for r in rows if r["dynamic"]}
    assert {(k, a) for k, _ in dynamic for a in ARCHS} <= charged
    assert problems(rows) == [], "\n".join(problems(rows))


if __name__ == "__main__":  # the committed report: python tests/test_ptxas.py > benchmarks/results/ptxas_sm80_sm90.txt
    rows, _, text = report()
    version = subprocess.run([nvcc(), "--version"], capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[-1]
    print(f"# ptxas resource usage ({version}), nvcc {' '.join(FLAGS)} cuda/<file>.cu")
    print(f"# problems: {problems(rows) or 'none'}")
    sys.stdout.write(text)
