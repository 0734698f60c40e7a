"""benchmarks/gpu/ring_check.py (the GPU machine's Ring check) over the test-only emulated device, so
the script itself is exercised where there is no GPU.

    mpiexec -n 2 python -m mpi4py tests/mpi_programs/gpu_ring_check_emulated.py --quick [ring_check args]
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks", "gpu")]

import emu_device as emu  # noqa: E402
import ring_check  # noqa: E402

emu.install()
sys.exit(ring_check.main(sys.argv[1:], xp=emu.xp))
