"""Whether the MPI library takes CUDA device pointers: what the device transport and the
gradient reducer ask before handing device memory to MPI (`ringattn info` reports it).

RINGATTN_CUDA_AWARE_MPI=1/0 overrides; otherwise MPIX_Query_cuda_support() of the MPI library
mpi4py loaded (Open MPI and MPICH export it); None when neither can tell.
"""
import ctypes
import functools
import os

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
