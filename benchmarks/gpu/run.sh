#!/usr/bin/env bash
# GPU check of ringattn's CUDA path, one command on a machine with an NVIDIA GPU:
#     bash benchmarks/gpu/run.sh
# NOT YET RUN: this script was written on a machine without a GPU (CUDA build and host-emulated
# kernel tests only, see tests/test_cuda_emulated.py). Its first real run is the first GPU check.
#
# Steps (each one is logged; a failing step is reported and the next one still runs):
#   1. venv (.venv-gpu, or $RINGATTN_GPU_VENV) with CuPy ($CUPY, default cupy-cuda13x) and, unless
#      TORCH=0, PyTorch (the SDPA baseline); build with RINGATTN_CUDA=ON for $ARCHS (default "80;90")
#   2. pytest: the gpu-marked tests and the CPU-side CUDA tests
#   3. compute-sanitizer memcheck (small awkward cases) and racecheck (tiny cases)
#   4. benchmark forward/backward vs torch SDPA flash backend: bf16, head dim 128, seq 8192, non-causal
#      (issue 5 targets on H100: forward >= 0.8x, backward >= 0.7x), plus causal and fp16 rows
#   5. ring with 3 and 4 MPI ranks sharing the GPU: exactness with ringattn.transport_cuda.DeviceTransport
#      (pinned staging; CUDA-aware MPI too when detected) and with a blocking host exchange
# Output: benchmarks/results/gpu_<card>.txt (the card's name from nvidia-smi).
# Needs: nvcc (CUDA 13 toolkit by default, so a driver >= 580); with CUDA 12 use CUPY=cupy-cuda12x.
set -uo pipefail
cd "$(dirname "$0")/../.."
VENV=${RINGATTN_GPU_VENV:-.venv-gpu}
ARCHS=${ARCHS:-80;90}
CUPY=${CUPY:-cupy-cuda13x}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja numpy mpi4py mpich pytest "$CUPY" || exit 1
if [ "${TORCH:-1}" = 1 ]; then python -m pip install -q torch || echo "[gpu] torch not installed: no baseline"; fi
RINGATTN_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCHS" python -m pip install -q --no-build-isolation -e . || exit 1

card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '_' | sed 's/_*$//')
mkdir -p benchmarks/results
OUT=benchmarks/results/gpu_${card:-unknown}.txt
export PYTHONPATH="benchmarks/gpu${PYTHONPATH:+:$PYTHONPATH}"
G=benchmarks/gpu

step() {  # step "title" command...
  echo; echo "## $1"; echo "\$ ${*:2}"
  local t0=$SECONDS
  "${@:2}" 2>&1 || echo "[gpu] STEP FAILED (exit $?): $1"
  echo "[gpu] $1: $((SECONDS - t0)) s"
}

{
  echo "# ringattn GPU check: bash benchmarks/gpu/run.sh   ($(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python -c "import ringattn._cuda as c, cupy; print('archs', c.archs(), 'devices', c.device_count(), 'cupy', cupy.__version__)"
  step "gpu tests" python -m pytest -q -m gpu tests/test_cuda_gpu.py
  step "CPU-side CUDA tests" python -m pytest -q tests/test_cuda_dispatch.py tests/test_cuda_emulated.py
  step "memcheck" compute-sanitizer --tool memcheck --error-exitcode 1 python $G/sanitize_case.py
  step "racecheck" compute-sanitizer --tool racecheck --error-exitcode 1 python $G/sanitize_case.py --tiny
  step "bench bf16 d128 s8192 non-causal" python $G/bench_attention.py --seq 8192 --heads 16 --dim 128 --dtype bfloat16
  step "bench bf16 d128 s8192 causal" python $G/bench_attention.py --seq 8192 --heads 16 --dim 128 --dtype bfloat16 --causal
  step "bench fp16 d64 s8192 non-causal" python $G/bench_attention.py --seq 8192 --heads 16 --dim 64 --dtype float16
  step "ring 3 ranks bf16, staged DeviceTransport" mpiexec -n 3 python -m mpi4py $G/ring_check.py --dtype bfloat16
  step "ring 4 ranks float32, staged DeviceTransport" mpiexec -n 4 python -m mpi4py $G/ring_check.py --dtype float32 --seq 2048
  step "ring 3 ranks bf16, blocking host exchange" mpiexec -n 3 python -m mpi4py $G/ring_check.py --transport blocking
  if python -c "import sys; from ringattn.info import mpi_cuda_aware; sys.exit(0 if mpi_cuda_aware() else 1)" 2>/dev/null; then
    step "ring 3 ranks bf16, CUDA-aware MPI" mpiexec -n 3 python -m mpi4py $G/ring_check.py --transport aware
  fi
} 2>&1 | tee "$OUT"
echo "[gpu] results in $OUT"
