"""`ringattn info`: what a user pastes into a bug report. Versions, MPI library and whether it is
CUDA-aware, CuPy and GPUs, threads, and what was compiled. Nothing here may fail: every probe
reports 'absent' or 'unknown' instead of raising.

mpi_cuda_aware() is also what the CUDA transport asks before handing device pointers to MPI.
"""
import ctypes
import functools
import importlib
import json
import os
import platform
import sys

ENV_CUDA_AWARE = "RINGATTN_CUDA_AWARE_MPI"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _env_cuda_aware():
    """The override: None when unset or empty; raises on a value that is neither yes nor no."""
    raw = os.environ.get(ENV_CUDA_AWARE, "").strip().lower()
    if not raw:
        return None
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{ENV_CUDA_AWARE}={os.environ[ENV_CUDA_AWARE]!r}: use 1 or 0")


def _loaded_libraries(fragment):
    """Paths of shared libraries loaded into this process whose file name contains fragment."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:  # not Linux: nothing to scan, the global namespace is still tried
        return []
    return sorted(p for p in paths if fragment in os.path.basename(p))


@functools.lru_cache(maxsize=None)
def _query_mpi_library():
    """(answer, how) from MPIX_Query_cuda_support in the MPI library mpi4py loaded."""
    try:
        from mpi4py import MPI  # noqa: F401  (loads libmpi into the process)
    except Exception as e:  # mpi4py missing or MPI failed to load
        return None, f"mpi4py unavailable ({type(e).__name__})"
    # mpi4py loads libmpi privately (RTLD_LOCAL), so look in the loaded libmpi files as well as the
    # global namespace. Open MPI and MPICH both export MPIX_Query_cuda_support() -> int.
    for path in [None] + _loaded_libraries("libmpi"):
        try:
            fn = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        except OSError:
            continue
        if fn is not None:
            fn.restype, fn.argtypes = ctypes.c_int, []
            return bool(fn()), f"MPIX_Query_cuda_support in {path or 'the process'}"
    return None, "the MPI library has no MPIX_Query_cuda_support"


def cuda_aware_mpi_detail():
    """(True | False | None, how it was decided). The environment variable wins."""
    env = _env_cuda_aware()
    if env is not None:
        return env, f"{ENV_CUDA_AWARE}={os.environ[ENV_CUDA_AWARE]}"
    return _query_mpi_library()


def mpi_cuda_aware():
    """True/False when known (RINGATTN_CUDA_AWARE_MPI=0/1 overrides), None when it can't be told.
    Callers should treat None as False: staging through host memory is always correct."""
    return cuda_aware_mpi_detail()[0]


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
        from . import _cpu
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
        for name in ("cuda_archs", "built_archs", "archs", "CUDA_ARCHS"):
            value = getattr(_cuda, name, None)
            if value is not None:
                out["cuda_archs"] = value() if callable(value) else value
                break
        else:
            out["cuda_archs"] = "unknown"
    return out


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        cpu=dict(model=_cpu_model(), logical_cores=os.cpu_count(), usable_cores=usable),
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
