#!/usr/bin/env bash
# The two commands of the README, and a few more for developers.
#   bash run.sh main [train flags]   train a Blockwise Transformer with ring attention on 4 MPI ranks
#   bash run.sh test [pytest args]   run the test suite
#   bash run.sh bench [kernel|ring|train|all]
# Each sets up what it needs: a venv (.venv, or $RINGATTN_VENV), the build, MPI from the mpich wheel.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${RINGATTN_VENV:-.venv}
RANKS=${RANKS:-4}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[run.sh] creating venv $VENV" >&2
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # Build tools in the venv so rebuilds reuse build/ (no isolated build env each time).
  python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
  echo "[run.sh] building and installing ringattn (C++ kernels; CUDA module when nvcc is present)" >&2
  python -m pip install -q --no-build-isolation -e ".[mpich,test,progress${EXTRA:-}]"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  main)
    setup
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    exec mpiexec -n "$RANKS" python -m mpi4py -m ringattn train --time-limit 900 "$@"
    ;;
  test)
    setup
    # PyTorch only for the optional integration tests (tests/test_torch.py skips without it);
    # RINGATTN_TEST_TORCH=0 leaves it out.
    if [ "${RINGATTN_TEST_TORCH:-1}" != 0 ] && ! python -c "import torch" 2>/dev/null; then
      python -m pip install -q "torch==2.13.0" ||
        echo "[run.sh] could not install torch 2.13.0: tests/test_torch.py will skip" >&2
    fi
    # CuTe's headers (nvidia-cutlass, headers only: --no-deps) are the independent source the
    # tensor-core fragment layouts are checked against (tests/test_mma_fragments.py skips without).
    python -m pip show -q nvidia-cutlass >/dev/null 2>&1 ||
      python -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0" ||
      echo "[run.sh] could not install nvidia-cutlass: the CuTe layout tests will skip" >&2
    exec python -m pytest -q "$@"
    ;;
  bench)
    EXTRA=,bench setup
    exec python -m ringattn bench "$@"
    ;;
  setup)
    setup
    ;;
  *)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
