"""What benchmarks/gpu/run.sh checks before and after building: the machine's Python packages and GPU,
then (--built ARCH) the installed ringattn and its CUDA module. Prints a RESULT line; exit 1 when
something the run needs is missing, naming it.

    python3 benchmarks/gpu/preflight.py --card "NVIDIA H200"     # the machine's python, before the venv
    build/gpu-venv/bin/python benchmarks/gpu/preflight.py --built 90
"""
import argparse
import importlib
import json
import os
import shutil
import sys

REQUIRED = ("numpy", "cupy", "pytest", "scikit_build_core", "pybind11")
OPTIONAL = ("torch", "mpi4py", "ml_dtypes")  # torch: the bench baseline; the others can come as wheels


def version(name):
    """(version or None, error text or None) of an importable module."""
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure is a finding to report
        return None, f"{type(e).__name__}: {e}"
    return str(getattr(mod, "__version__", "present")), None


def machine(card):
    found, missing = {"python": sys.version.split()[0], "card": card}, []
    for name in REQUIRED + OPTIONAL:
        v, err = version(name)
        found[name] = v
        if v is None:
            print(f"{'MISSING' if name in REQUIRED else 'absent '} {name}: {err}")
            if name in REQUIRED:
                missing.append(name)
    found["cmake"], found["ninja"] = shutil.which("cmake"), shutil.which("ninja")
    if found["cupy"]:
        import cupy

        try:
            n = cupy.cuda.runtime.getDeviceCount()
            props = cupy.cuda.runtime.getDeviceProperties(0)
            found.update(devices=n, device=props["name"].decode(), compute_capability=f"{props['major']}{props['minor']}",
                         cuda_runtime=cupy.cuda.runtime.runtimeGetVersion())
        except Exception as e:  # noqa: BLE001
            print(f"MISSING a CUDA device visible to CuPy: {type(e).__name__}: {e}")
            missing.append("cuda device")
    if found.get("torch"):
        import torch

        found["torch_cuda"] = bool(torch.cuda.is_available())
    for k, v in found.items():
        print(f"  {k}: {v}")
    print("RESULT " + json.dumps({"machine": found}))
    return 1 if missing else 0


def built(arch):
    import ringattn
    from ringattn import cuda

    archs, n = [str(a) for a in cuda.archs()], cuda.device_count()
    where = os.path.dirname(ringattn.__file__)
    print(f"ringattn {ringattn.__file__}; CUDA archs {archs}; devices {n}")
    print("RESULT " + json.dumps({"built_archs": archs, "devices": n, "installed_at": where}))
    problems = []
    if arch not in archs:
        problems.append(f"built for {archs}, not {arch}")
    if n < 1:
        problems.append("the CUDA module sees no device")
    if os.path.abspath(where).startswith(os.path.abspath("src")):
        problems.append("ringattn imports from the source tree, not the venv install")
    for p in problems:
        print(f"FAILED: {p}")
    return 1 if problems else 0


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--card", default="")
    p.add_argument("--built", metavar="ARCH", help="check the installed package instead")
    a = p.parse_args(argv)
    return built(a.built) if a.built else machine(a.card)


if __name__ == "__main__":
    sys.exit(main())
