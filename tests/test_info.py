"""`ringattn info`: runs, names the key facts, JSON parses, RINGATTN_CUDA_AWARE_MPI is honoured."""
import json
import subprocess
import sys

import numpy
import pytest

import ringattn
from ringattn import cli, info


def test_text_has_key_fields(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("ringattn", ringattn.__version__, "python", "numpy", numpy.__version__, "mpi4py",
                   "MPI library", "MPI standard", "CUDA-aware MPI", "cupy", "OMP_NUM_THREADS",
                   "cpu kernels", "cuda kernels", "cpu "):
        assert needle in out, needle


def test_json_parses_and_matches_the_modules(capsys):
    from mpi4py import MPI
    from ringattn import _cpu
    assert cli.main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ringattn"]["version"] == ringattn.__version__
    assert d["numpy"] == numpy.__version__
    assert d["mpi"]["library"] == MPI.Get_library_version().strip()
    assert d["mpi"]["standard"] == "%d.%d" % MPI.Get_version()
    built = _cpu.built_isas()
    assert d["build"]["cpu_isas_built"] == (built.split(",") if isinstance(built, str) else list(built))
    assert d["build"]["cpu_isa_active"] == _cpu.active_isa()
    assert d["build"]["kernel_threads"] == _cpu.max_threads()
    assert d["cpu"]["logical_cores"] >= 1
    assert d["mpi"]["cuda_aware"] in (True, False, "unknown")
    assert isinstance(d["cupy"]["available"], bool)


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), ("yes", True), ("off", False)])
def test_env_override(monkeypatch, value, expected):
    monkeypatch.setenv(info.ENV_CUDA_AWARE, value)
    assert info.mpi_cuda_aware() is expected
    d = info.collect()
    assert d["mpi"]["cuda_aware"] is expected and info.ENV_CUDA_AWARE in d["mpi"]["cuda_aware_source"]


def test_env_override_rejects_garbage(monkeypatch):
    monkeypatch.setenv(info.ENV_CUDA_AWARE, "maybe")
    with pytest.raises(ValueError, match="RINGATTN_CUDA_AWARE_MPI"):
        info.mpi_cuda_aware()
    assert "use 1 or 0" in info.collect()["mpi"]["cuda_aware_source"]  # info itself still runs


def _independent_query():
    """MPIX_Query_cuda_support() of a loaded libmpi, asked here without mpi_info; None if absent."""
    import ctypes
    import os
    from mpi4py import MPI  # noqa: F401  (loads libmpi)
    with open("/proc/self/maps") as f:
        libs = sorted({ln.split()[-1] for ln in f if "libmpi" in os.path.basename(ln.split()[-1])})
    for path in [None] + libs:
        fn = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        if fn is not None:
            fn.restype, fn.argtypes = ctypes.c_int, []
            return bool(fn())
    return None


def test_library_query_without_override(monkeypatch):
    monkeypatch.delenv(info.ENV_CUDA_AWARE, raising=False)
    value, how = info.cuda_aware_mpi_detail()
    assert value is _independent_query()
    assert ("MPIX_Query_cuda_support in" in how) if value is not None else ("no MPIX_Query_cuda_support" in how)
    from mpi4py import MPI
    if "pypi.org/p/mpich" in MPI.Get_library_version():
        assert value is False  # the PyPI MPICH wheel is not CUDA-aware


def test_cuda_archs_are_the_modules_own():
    cu = pytest.importorskip("ringattn._cuda")
    d = info.collect()["build"]
    assert d["cuda_module"] is True and d["cuda_archs"] == cu.archs() and d["cuda_archs"]


def test_command_line_in_a_fresh_process():
    env_run = subprocess.run([sys.executable, "-m", "ringattn", "info", "--json"], capture_output=True,
                             text=True, timeout=60, env={**__import__("os").environ,
                                                         "RINGATTN_CUDA_AWARE_MPI": "0"})
    assert env_run.returncode == 0, env_run.stderr
    d = json.loads(env_run.stdout)
    assert d["mpi"]["cuda_aware"] is False and d["env"]["RINGATTN_CUDA_AWARE_MPI"] == "0"
