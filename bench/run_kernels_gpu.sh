#!/usr/bin/env bash
# On the GPU machine: the gpu-marked kernel tests (Triton lowering, poisoned outputs), then the
# kernel benchmark. Everything lands in $OUT (default bench/results). Exit non-zero if either fails.
# Each part has a wall-clock cap so a hang still leaves the other's results and the partial JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"

timeout "${TEST_TIMEOUT:-120}" $PY -m pytest -m gpu ${TESTS:-tests/kernels} -q -rA -p no:cacheprovider \
  2>&1 | tee "$OUT/kernels-gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT:-200}" $PY -m bench.kernels \
  --out "$OUT/kernels-$(date +%F).json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/kernels-bench.txt"
bench_rc=${PIPESTATUS[0]}

echo "gpu tests exit $tests_rc, benchmark exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
