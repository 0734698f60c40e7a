"""`ringattn info`: what a user pastes into a bug report. Versions, MPI library and whether it is
CUDA-aware, CuPy and GPUs, threads, and what was compiled. Nothing here may fail: every probe
reports 'absent' or 'unknown' instead of raising.

Whether MPI is CUDA-aware is decided in mpi_info.py (the transport's question); this reports it.
"""
import importlib
import json
import os
import platform
import sys

from .machine import cpu_model
from .mpi_info import ENV_CUDA_AWARE, cuda_aware_mpi_detail, mpi_cuda_aware  # noqa: F401 (this module's API)

def _version(module):
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def _mpi():
    try:
        from mpi4py import MPI
    except Exception as e:
        return dict(available=False, error=f"{type(e).__name__}: {e}")
    try:
        aware, how = cuda_aware_mpi_detail()
    except ValueError as e:
        aware, how = None, str(e)
    return dict(available=True, library=MPI.Get_library_version().strip(),
                standard="%d.%d" % MPI.Get_version(), vendor=" ".join(map(str, MPI.get_vendor())),
                cuda_aware="unknown" if aware is None else aware, cuda_aware_source=how,
                thread_level=MPI.Query_thread())


def _cupy():
    try:
        import cupy
    except Exception as e:
        return dict(available=False, reason=f"{type(e).__name__}: {e}".splitlines()[0])
    out = dict(available=True, version=cupy.__version__, gpus=[])
    try:
        rt = cupy.cuda.runtime
        out["cuda_runtime"] = rt.runtimeGetVersion()
        out["cuda_driver"] = rt.driverGetVersion()
        for i in range(rt.getDeviceCount()):
            p = rt.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
            out["gpus"].append(dict(index=i, name=name, memory_gb=round(p["totalGlobalMem"] / 1e9, 1),
                                    compute_capability=f"{p['major']}.{p['minor']}"))
    except Exception as e:  # no driver / no device: CuPy imports fine but cannot talk to a GPU
        out["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    return out


def _build():
    out = {}
    try:
        from .kernels import _cpu  # through kernels: its OpenMP wait setting comes first
        isas = _cpu.built_isas()
        isas = isas.split(",") if isinstance(isas, str) else list(isas)
        out.update(cpu_isas_built=isas, cpu_isa_active=_cpu.active_isa(),
                   kernel_threads=_cpu.max_threads())
    except Exception as e:
        out["cpu_module"] = f"not loadable: {type(e).__name__}: {e}"
    try:
        from . import _cuda
    except ImportError:
        out["cuda_module"] = False
    except Exception as e:  # built, but e.g. no driver
        out["cuda_module"] = f"built but not loadable: {type(e).__name__}: {e}"
    else:
        out["cuda_module"] = True
        out["cuda_archs"] = _cuda.archs()
    return out


def collect():
    """Everything `ringattn info` prints, as a JSON-serialisable dict."""
    import ringattn
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = None
    return dict(
        ringattn=dict(version=ringattn.__version__, path=os.path.dirname(ringattn.__file__)),
        python=dict(version=sys.version.split()[0], executable=sys.executable,
                    implementation=platform.python_implementation()),
        platform=platform.platform(),
        cpu=dict(model=cpu_model(), logical_cores=os.cpu_count(), usable_cores=usable),
        numpy=_version("numpy"), mpi4py=_version("mpi4py"), mpi=_mpi(), cupy=_cupy(),
        threads=dict(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"),
                     OMP_PROC_BIND=os.environ.get("OMP_PROC_BIND"),
                     OMP_PLACES=os.environ.get("OMP_PLACES")),
        build=_build(),
        env={k: v for k, v in sorted(os.environ.items()) if k.startswith("RINGATTN_")},
    )


def format_info(d):
    m, c, b = d["mpi"], d["cupy"], d["build"]
    lines = [
        f"ringattn       {d['ringattn']['version']} ({d['ringattn']['path']})",
        f"python         {d['python']['version']} ({d['python']['executable']})",
        f"platform       {d['platform']}",
        f"cpu            {d['cpu']['model']}, {d['cpu']['logical_cores']} logical cores, "
        f"{d['cpu']['usable_cores']} usable",
        f"numpy          {d['numpy']}",
        f"mpi4py         {d['mpi4py']}",
    ]
    if m["available"]:
        lib = m["library"].splitlines()
        lines += [f"MPI library    {lib[0]}"] + [f"               {x.strip()}" for x in lib[1:4]]
        lines += [f"MPI standard   {m['standard']} (vendor {m['vendor']})",
                  f"CUDA-aware MPI {m['cuda_aware']} ({m['cuda_aware_source']})"]
    else:
        lines.append(f"MPI            unavailable: {m['error']}")
    if c["available"]:
        lines.append(f"cupy           {c['version']}" + (f" ({c['error']})" if "error" in c else ""))
        lines += [f"  gpu {g['index']}        {g['name']}, {g['memory_gb']} GB, sm {g['compute_capability']}"
                  for g in c["gpus"]]
    else:
        lines.append(f"cupy           not available ({c['reason']})")
    t = d["threads"]
    lines += [
        f"threads        OMP_NUM_THREADS={t['OMP_NUM_THREADS']}, kernels use {b.get('kernel_threads')}",
        f"cpu kernels    built {', '.join(b.get('cpu_isas_built', [])) or b.get('cpu_module')}; "
        f"active {b.get('cpu_isa_active')}",
        f"cuda kernels   " + (f"built, archs {b.get('cuda_archs')}" if b["cuda_module"] is True
                              else "not built" if b["cuda_module"] is False else b["cuda_module"]),
    ]
    if d["env"]:
        lines.append("environment    " + " ".join(f"{k}={v}" for k, v in d["env"].items()))
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args):
    d = collect()
    print(json.dumps(d, indent=2, default=str) if args.json else format_info(d))
    return 0
