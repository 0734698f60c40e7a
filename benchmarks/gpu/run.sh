#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step functions are called indirectly, as step_<name>
# ringattn's GPU check: ONE command on a machine with an NVIDIA GPU, finishing in under 7 minutes.
#
#     bash benchmarks/gpu/run.sh [--out DIR] [--dry-run] [--assume-no-gpu] [--fetch-wheels] [--help]
#
# Written for the offline GPU test machine (see DESIGN.md, "The GPU test machine"): its python3 has
# torch, cupy, mpi4py, numpy, pytest, pybind11, scikit-build-core, cmake and ninja, nvcc is installed,
# but there is no MPI library and nothing can be downloaded. So this script installs nothing from an
# index: it makes a venv with --system-site-packages (the machine's packages stay visible), installs
# the carried wheels into it with `pip --no-index`, and builds this checkout into it.
#
# Bring the wheels. On a machine WITH network, from the repository root:
#     bash benchmarks/gpu/run.sh --fetch-wheels
# which runs (wheels/ is $RINGATTN_WHEELS):
#     pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 mpich mpi4py ml_dtypes -d wheels/
# The manylinux_2_28 platform matters: with manylinux2014 alone pip picks mpich 0.0.0, an empty
# placeholder without libmpi (this script refuses it). Then carry wheels/ to the GPU machine with the
# checkout. What each wheel is for:
#   mpich      libmpi and mpiexec (required: the machine has no MPI).
#   mpi4py     used when present, installed into the venv ahead of the machine's mpi4py: a PyPI mpi4py
#              wheel finds libmpi at import time (it dlopens libmpi.so.12 from the venv's lib/, or
#              $MPI4PY_LIBMPI), but an mpi4py built from source is tied to the MPI it was built with,
#              which that machine does not have. Without the wheel the machine's mpi4py is tried.
#   ml_dtypes  bfloat16 for CuPy arrays; installed only when the machine lacks it.
#
# Steps, in order; each has its own timeout (the TIMEOUT table below), a step never gets more than
# what is left of the total budget, and a failed step does not stop the next ones (only those that
# need it, see NEEDS):
#   preflight        the GPU (nvidia-smi), nvcc, the machine's Python packages; no GPU: stop here
#   mma-probe        tests/cute/mma_probe.cu built with nvcc and run: which lane holds which element
#                    after a real ldmatrix, what a real mma.sync computes; compared with the same probe
#                    built on the host with -DRA_EMULATE (the warp emulator's tables, checked against
#                    CuTe in CI): any difference fails (mma_probe.py; exit 3)
#   venv             the venv (build/gpu-venv, or $RINGATTN_GPU_VENV) over the machine's packages
#   mpi              mpich (+ mpi4py, ml_dtypes) wheels from $RINGATTN_WHEELS; mpiexec ring test on 2 ranks
#   build            pip install --no-build-isolation --no-index . for sm_90 only ($RINGATTN_GPU_ARCH)
#   gpu-tests        pytest -m gpu on the test files that use the marker; a skipped test is a failure
#   memcheck         compute-sanitizer memcheck on small awkward cases, CuPy's memory pools off
#                    (skipped, with the tool's message, where it refuses the device)
#   racecheck        compute-sanitizer racecheck on tiny cases (same rule)
#   ring-2-staged    ringattn.Ring over CuPy arrays on 2 ranks sharing the GPU, staged transport,
#   ring-3-staged    ... on 3 ranks; every layout x causal x GQA x dtype on an uneven length, against
#                    single-process attention on the GPU and the float64 reference (ring_check.py)
#   ring-cuda-aware  the same on 3 ranks with CUDA-aware MPI; skipped when the MPI library is not
#   train-2-ranks    `ringattn train --device cuda` for 20 steps on 2 ranks, and the same run on the
#                    CPU: the loss curves must agree (train_check.py)
#   bench            one timing row per kernel (attention forward/backward, FFN forward/backward;
#                    bfloat16 and float16; head dims 64 and 128) against torch SDPA / torch FFN
#
# Output, in benchmarks/results/gpu-<card>/ (the card's name from nvidia-smi, e.g. gpu-nvidia-h200;
# runs/gpu-no-gpu/ without a GPU; --out DIR replaces it):
#   summary.json     per step: status (passed / failed / skipped), rc, seconds, timeout, note, and
#                    the key numbers the step printed (lines "RESULT {json}"); total seconds; ok
#   run.log          everything printed;  steps/<step>.log  each step's own output
#   mma-probe-gpu.txt  the GPU probe's output
#   bench.json       the timing rows;  train-cuda.jsonl / train-cpu.jsonl  the two training runs' metrics
# Exit status: 0 when no step failed, 1 otherwise (2: bad usage).
#
# --dry-run lists the steps with their timeouts and writes a summary with every step skipped;
# --assume-no-gpu behaves as on a machine without a GPU (tests use it); --fetch-wheels: see above.
# Environment: RINGATTN_WHEELS (default wheels/), RINGATTN_GPU_VENV, RINGATTN_GPU_ARCH (default 90),
# RINGATTN_GPU_PYTHON (the machine's python, default python3), RINGATTN_GPU_BUDGET_S (total budget).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
G=benchmarks/gpu

# ---- the plan: one place for the steps, their timeouts (seconds) and what each needs --------------
STEPS=(preflight mma-probe venv mpi build gpu-tests memcheck racecheck ring-2-staged ring-3-staged ring-cuda-aware
       train-2-ranks bench)
declare -A TIMEOUT=([preflight]=18 [mma-probe]=25 [venv]=15 [mpi]=20 [build]=65 [gpu-tests]=50 [memcheck]=35 [racecheck]=20
                    [ring-2-staged]=25 [ring-3-staged]=25 [ring-cuda-aware]=25 [train-2-ranks]=55 [bench]=42)
declare -A NEEDS=([preflight]="" [mma-probe]="preflight" [venv]="preflight" [mpi]="venv" [build]="venv" [gpu-tests]="build"
                  [memcheck]="build" [racecheck]="build" [ring-2-staged]="build mpi" [ring-3-staged]="build mpi"
                  [ring-cuda-aware]="build mpi" [train-2-ranks]="build mpi" [bench]="build")
BUDGET_S=${RINGATTN_GPU_BUDGET_S:-410}  # all steps together, kill grace included; under 7 minutes
KILL_S=3                                # grace between a timeout's TERM and its KILL
SKIP_RC=77                              # a step function returns this to say "skipped" (with a note)

VENV=${RINGATTN_GPU_VENV:-$ROOT/build/gpu-venv}
WHEELS=${RINGATTN_WHEELS:-$ROOT/wheels}
ARCH=${RINGATTN_GPU_ARCH:-90}
BOX_PY=${RINGATTN_GPU_PYTHON:-python3}
PY=$VENV/bin/python
MPIEXEC=$VENV/bin/mpiexec
# Where the PyPI mpi4py wheel looks for libmpi when none is loaded yet: the mpich wheel's, in the venv.
export MPI4PY_LIBMPI=${MPI4PY_LIBMPI:-$VENV/lib/libmpi.so.12}

MODE=run OUT="" ASSUME_NO_GPU=0
usage() { awk 'NR > 2 && /^#/ { sub(/^# ?/, ""); print; next } NR > 2 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry-run ;;
    --assume-no-gpu) ASSUME_NO_GPU=1 ;;
    --fetch-wheels) MODE=fetch-wheels ;;
    --out) [ $# -ge 2 ] || { echo "run.sh: --out needs a directory" >&2; exit 2; }; OUT=$2; shift ;;
    --out=*) OUT=${1#--out=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [ "$MODE" = fetch-wheels ]; then
  mkdir -p "$WHEELS" || exit 1
  exec "$BOX_PY" -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 mpich mpi4py ml_dtypes -d "$WHEELS"
fi

now() { date +%s; }

# The card, once: it names the output folder. Empty when there is no GPU (or --assume-no-gpu).
card_name() {
  [ "$ASSUME_NO_GPU" = 1 ] && return 0
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1
}
CARD=$(card_name)
slug() { tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//'; }
if [ -z "$OUT" ]; then
  if [ -n "$CARD" ]; then OUT=benchmarks/results/gpu-$(printf %s "$CARD" | slug); else OUT=runs/gpu-no-gpu; fi
fi
mkdir -p "$OUT/steps" || exit 1
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/steps.tsv" "$OUT"/steps/*.log "$OUT"/steps/*.note
exec > >(tee "$OUT/run.log") 2>&1
START=$(now)
STARTED=$(date -u +%FT%TZ)

# ---- helpers used inside steps ----------------------------------------------------------------------
# t_run CMD...: run CMD, killed at the current step's deadline (STEP_DEADLINE, epoch seconds).
t_run() {
  local left=$((STEP_DEADLINE - $(now)))
  if [ "$left" -le 0 ]; then echo "[gpu] step deadline reached before: $*"; return 124; fi
  timeout -k "$KILL_S" "$left" "$@"
}
# t_cap FILE CMD...: t_run with the output also kept in FILE; returns CMD's status.
t_cap() {
  local f=$1; shift
  t_run "$@" 2>&1 | tee "$f"
  return "${PIPESTATUS[0]}"
}
note() { echo "$*" >> "$STEP_NOTE"; echo "[gpu] note: $*"; }
fail() { note "$*"; return 1; }
skip() { note "$*"; return "$SKIP_RC"; }
have_py_module() { "$1" -c "import $2" >/dev/null 2>&1; }
find_tool() {  # a CUDA tool on PATH or in the usual toolkit folders
  local t
  t=$(command -v "$1" 2>/dev/null) && { echo "$t"; return 0; }
  for t in /usr/local/cuda/bin/"$1" /usr/local/cuda/compute-sanitizer/"$1" /usr/local/cuda-*/bin/"$1"; do
    [ -x "$t" ] && { echo "$t"; return 0; }
  done
  return 1
}
mpiexec_flags() { cat "$OUT/steps/.mpiexec-flags" 2>/dev/null; }

# ---- the steps ------------------------------------------------------------------------------------
step_preflight() {
  if [ "$ASSUME_NO_GPU" = 1 ]; then fail "no GPU (--assume-no-gpu): every GPU step is not run"; return; fi
  command -v nvidia-smi >/dev/null 2>&1 || { fail "no GPU: nvidia-smi not found"; return; }
  [ -n "$CARD" ] || { fail "no GPU: nvidia-smi lists no device"; return; }
  t_run nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
  local nvcc
  nvcc=$(find_tool nvcc) || { fail "nvcc not found (PATH, /usr/local/cuda/bin): cannot build the CUDA module"; return; }
  echo "nvcc: $nvcc"; "$nvcc" --version | tail -2
  echo "compute-sanitizer: $(find_tool compute-sanitizer || echo 'not found')"
  command -v "$BOX_PY" >/dev/null 2>&1 || { fail "no $BOX_PY (set RINGATTN_GPU_PYTHON)"; return; }
  local f=$OUT/steps/preflight.txt
  t_cap "$f" "$BOX_PY" "$G/preflight.py" --card "$CARD" \
    || { fail "the machine's Python lacks: $(grep '^MISSING' "$f" | cut -d: -f1 | cut -c9- | paste -sd, -)"; return; }
}

step_mma_probe() {
  local nvcc rc
  nvcc=$(find_tool nvcc) || { fail "nvcc not found"; return; }
  t_run "$BOX_PY" "$G/mma_probe.py" --nvcc "$nvcc" --arch "$ARCH" --workdir "$ROOT/build/gpu-probe" \
    --save "$OUT/mma-probe-gpu.txt"; rc=$?
  case "$rc" in
    0) return 0 ;;
    3) fail "the GPU's ldmatrix / mma.sync differ from the emulator's tables (MISMATCH lines in steps/mma-probe.log)" ;;
    *) fail "the probe did not build or run (exit $rc)" ;;
  esac
}

step_venv() {
  if [ ! -x "$PY" ]; then
    # Without pip first: the machine's pip (visible through --system-site-packages) installs into the venv.
    t_run "$BOX_PY" -m venv --system-site-packages --without-pip "$VENV" || return 1
  fi
  if ! "$PY" -m pip --version >/dev/null 2>&1; then
    rm -rf "$VENV"
    t_run "$BOX_PY" -m venv --system-site-packages "$VENV" || fail "python3 -m venv failed (no ensurepip?)" || return
  fi
  local site
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
  # The machine's site folders after the venv's own: --system-site-packages alone misses them when
  # the machine's python3 is itself a venv (a venv's base is the interpreter it was made from).
  "$BOX_PY" -c 'import os, site
for p in site.getsitepackages() + [site.getusersitepackages()]:
    if os.path.isdir(p):
        print(p)' > "$site/_ringattn_machine_site.pth" || return 1
  t_run "$PY" -c 'import sys, numpy, cupy; print(sys.executable, sys.version.split()[0], "numpy", numpy.__version__, "cupy", cupy.__version__)' \
    || fail "the venv does not see the machine's numpy/cupy"
}

step_mpi() {
  export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
  local pipi=("$PY" -m pip install --no-index --no-deps --find-links "$WHEELS")
  if [ ! -e "$VENV/lib/libmpi.so.12" ]; then
    compgen -G "$WHEELS/mpich-*.whl" >/dev/null \
      || { fail "no mpich wheel in $WHEELS (RINGATTN_WHEELS): bring it, see the header of $0"; return; }
    t_run "${pipi[@]}" mpich || return 1
  fi
  if [ ! -e "$VENV/lib/libmpi.so.12" ] || [ ! -x "$MPIEXEC" ]; then
    fail "the mpich wheel installed no libmpi/mpiexec (mpich 0.0.0 is an empty placeholder: fetch with --fetch-wheels)"; return
  fi
  if compgen -G "$WHEELS/mpi4py-*.whl" >/dev/null; then
    t_run "${pipi[@]}" --ignore-installed mpi4py || note "the carried mpi4py wheel does not fit this Python: using the machine's mpi4py"
  else
    note "no mpi4py wheel carried: using the machine's mpi4py"
  fi
  if ! have_py_module "$PY" ml_dtypes; then
    if compgen -G "$WHEELS/ml_dtypes-*.whl" >/dev/null; then t_run "${pipi[@]}" ml_dtypes || return 1
    else note "ml_dtypes missing and not carried: bfloat16 CuPy arrays will fail"; fi
  fi
  t_run "$PY" -c 'import mpi4py; from mpi4py import MPI
print("mpi4py", mpi4py.__version__, mpi4py.__file__); print(MPI.Get_library_version().splitlines()[0])' \
    || { fail "mpi4py cannot load the MPI library of the mpich wheel (MPI4PY_LIBMPI=$MPI4PY_LIBMPI): carry the mpi4py wheel"; return; }
  : > "$OUT/steps/.mpiexec-flags"
  if ! t_run "$MPIEXEC" -n 2 "$PY" -m mpi4py.bench ringtest; then
    echo "[gpu] retrying with -launcher fork"
    t_run "$MPIEXEC" -launcher fork -n 2 "$PY" -m mpi4py.bench ringtest || fail "mpiexec -n 2 does not run" || return
    echo "-launcher fork" > "$OUT/steps/.mpiexec-flags"
    note "mpiexec needs -launcher fork here"
  fi
}

step_build() {
  local nvcc
  nvcc=$(find_tool nvcc) || { fail "nvcc not found"; return; }
  PATH="$(dirname "$nvcc"):$PATH"
  export PATH CUDACXX="$nvcc"
  local bdir=build/gpu-sm$ARCH
  # A cache from another checkout path (a fresh machine, a moved tree) makes CMake refuse the folder.
  if [ -f "$bdir/CMakeCache.txt" ] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$ROOT" "$bdir/CMakeCache.txt"; then
    rm -rf "$bdir"
  fi
  RINGATTN_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    t_run "$PY" -m pip install --no-index --no-deps --no-build-isolation --config-settings=build-dir="$bdir" . \
    || return 1
  t_run "$PY" "$G/preflight.py" --built "$ARCH"
}

step_gpu_tests() {
  local files f=$OUT/steps/pytest.txt rc
  mapfile -t files < <(grep -l 'pytest.mark.gpu' tests/test_*.py)
  [ "${#files[@]}" -gt 0 ] || { fail "no test file uses pytest.mark.gpu"; return; }
  t_cap "$f" "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider "${files[@]}"; rc=$?
  if grep -Eq '[0-9]+ skipped' "$f"; then fail "tests were skipped (a skip counts as a failure on a GPU machine)"; return; fi
  [ "$rc" = 0 ] || fail "pytest exit status $rc"
}

sanitize() {  # sanitize TOOL [case args]: pass, refused by the tool (skip), or fail
  local tool=$1 san f=$OUT/steps/$1.txt rc; shift
  san=$(find_tool compute-sanitizer) || { fail "compute-sanitizer not found (PATH, /usr/local/cuda)"; return; }
  t_cap "$f" "$san" --tool "$tool" --error-exitcode 1 --print-limit 20 "$PY" "$G/sanitize_case.py" "$@"; rc=$?
  # A clean run both finishes the cases (their RESULT line) and prints the tool's summary: a sanitizer
  # that exits 0 without running the program is not a pass.
  if [ "$rc" = 0 ] && grep -q '^RESULT ' "$f" && grep -q 'ERROR SUMMARY: 0 errors' "$f"; then return 0; fi
  if ! grep -q 'ERROR SUMMARY' "$f" && grep -Eq '^========= (Error|ERROR)' "$f"; then
    skip "compute-sanitizer $tool refused: $(grep -Em1 '^========= (Error|ERROR)' "$f" | cut -c1-200)"; return
  fi
  fail "compute-sanitizer $tool: exit status $rc (see steps/$tool.txt)"
}
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck --tiny; }

ring() {  # ring RANKS staged|aware
  local aware=0; [ "$2" = aware ] && aware=1
  # shellcheck disable=SC2046
  RINGATTN_CUDA_AWARE_MPI=$aware OMP_NUM_THREADS=2 \
    t_run "$MPIEXEC" $(mpiexec_flags) -n "$1" "$PY" -m mpi4py "$G/ring_check.py" --expect-transport "$2"
}
step_ring_2_staged() { ring 2 staged; }
step_ring_3_staged() { ring 3 staged; }
step_ring_cuda_aware() {
  local how rc
  how=$(env -u RINGATTN_CUDA_AWARE_MPI "$PY" -c 'from ringattn.info import cuda_aware_mpi_detail as d
aware, how = d(); print(how); raise SystemExit(0 if aware else 3)'); rc=$?
  [ "$rc" = 0 ] || { skip "the MPI library is not CUDA-aware ($how)"; return; }
  ring 3 aware
}

step_train_2_ranks() {
  t_run "$PY" "$G/train_check.py" --mpiexec "$MPIEXEC" --mpiexec-flags="$(mpiexec_flags)" \
    --ranks 2 --steps 20 --out "$OUT" --time-left $((STEP_DEADLINE - $(now)))
}

step_bench() { t_run "$PY" "$G/bench_attention.py" --json "$OUT/bench.json"; }

# ---- the runner -----------------------------------------------------------------------------------
declare -A STATUS=()
record() {  # record NAME STATUS RC SECONDS TIMEOUT NOTE
  STATUS[$1]=$2
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(printf %s "$6" | tr '\t\n' '  ')" >> "$OUT/steps.tsv"
  printf '[gpu] %-16s %-7s rc %-3s %4s s / %3s s  %s\n' "$1" "$2" "$3" "$4" "$5" "$6"
}

run_step() {
  local name=$1 t=${TIMEOUT[$1]} fn=step_${1//-/_} log=$OUT/steps/$1.log need left rc t0 status
  STEP_NOTE=$OUT/steps/$1.note
  : > "$STEP_NOTE"
  echo; echo "## $name (timeout $t s)"
  for need in ${NEEDS[$name]}; do
    if [ "${STATUS[$need]:-}" != passed ]; then
      record "$name" failed - 0 "$t" "not run: needs $need (${STATUS[$need]:-not run})"; return
    fi
  done
  left=$((BUDGET_S - ($(now) - START) - KILL_S))
  [ "$left" -lt "$t" ] && t=$left
  if [ "$t" -lt 5 ]; then record "$name" failed - 0 "${TIMEOUT[$name]}" "not run: total budget of $BUDGET_S s spent"; return; fi
  t0=$(now)
  STEP_DEADLINE=$((t0 + t))
  ( "$fn" ) 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) status=passed ;;
    "$SKIP_RC") status=skipped ;;
    *) status=failed ;;
  esac
  if [ "$status" = failed ] && [ $(($(now) - t0)) -ge "$t" ]; then note "timed out after $t s"; fi
  record "$name" "$status" "$rc" $(($(now) - t0)) "$t" "$(paste -sd ';' "$STEP_NOTE")"
}

echo "# ringattn GPU check ($MODE) $STARTED, git $(git rev-parse --short HEAD 2>/dev/null || echo unknown), card: ${CARD:-none}"
echo "# output: $OUT; total budget $BUDGET_S s"
total=0
for s in "${STEPS[@]}"; do total=$((total + TIMEOUT[$s])); done
if [ "$MODE" = dry-run ]; then
  for s in "${STEPS[@]}"; do
    printf 'step %-16s timeout %3s s  needs: %s\n' "$s" "${TIMEOUT[$s]}" "${NEEDS[$s]:-nothing}"
    record "$s" skipped - 0 "${TIMEOUT[$s]}" "dry run"
  done
  echo "total of the step timeouts: $total s (budget $BUDGET_S s)"
else
  for s in "${STEPS[@]}"; do run_step "$s"; done
fi

"$BOX_PY" "$G/summary.py" "$OUT" --mode "$MODE" --card "${CARD:-}" --started "$STARTED" --budget "$BUDGET_S" \
  --timeouts-total "$total" --seconds $(($(now) - START)) --git "$(git rev-parse HEAD 2>/dev/null || echo unknown)"
rc=$?
echo "[gpu] summary: $OUT/summary.json"
exit "$rc"
