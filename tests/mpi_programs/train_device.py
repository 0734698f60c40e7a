"""`ringattn train --device cuda` on the emulated device (tests/emu_device.py), as a real MPI job.

    mpiexec -n P python -m mpi4py tests/mpi_programs/train_device.py [MODE] -- TRAIN FLAGS...

MODE (before `--`):
  emulated        install the emulated device, then run the trainer with --device cuda (the default)
  no-emulation    do not install it, and make `import cupy` fail: what a machine without CuPy sees
  no-cuda-module  emulated CuPy, but the compiled CUDA module missing (a build without nvcc)
  no-gpu          emulated CuPy and kernels, but no visible GPU (device count 0)
The trainer's exit status is this program's; the run's output is the trainer's own.
"""
import os
import sys

if "__file__" in globals():  # find tests/emu_device.py (and test_cuda_emulated.py, which builds its kernels)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODES = ("emulated", "no-emulation", "no-cuda-module", "no-gpu")


def prepare(mode):
    if mode == "no-emulation":
        sys.modules["cupy"] = None  # `import cupy` raises ImportError, as where CuPy is not installed
        return
    import emu_device as emu
    emu.install()
    if mode == "no-cuda-module":
        from ringattn.backends import cuda

        def missing():
            raise RuntimeError("ringattn was built without its CUDA module (emulated: no ringattn._cuda); "
                               "rebuild with nvcc on PATH")
        cuda.module = missing
    elif mode == "no-gpu":
        emu.runtime.getDeviceCount = lambda: 0


def main(argv):
    mode = "emulated"
    if "--" in argv:
        i = argv.index("--")
        (mode,), argv = argv[:i] or ["emulated"], argv[i + 1:]
    if mode not in MODES:
        raise SystemExit(f"train_device.py: unknown mode {mode!r}: use one of {', '.join(MODES)}")
    prepare(mode)
    from ringattn import cli
    return cli.main(["train", "--device", "cuda", *argv])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
