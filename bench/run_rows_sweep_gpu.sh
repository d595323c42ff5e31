#!/usr/bin/env bash
# On one H200 (run from anywhere; results in $OUT, default bench/results), under ~2.5 minutes:
#   1. the gpu-marked tests of the row kernels (Triton lowering, NaN-poisoned outputs), capped
#      at 100 s (the RoPE/SwiGLU case alone takes ~37 s on the H200);
#   2. the row-op sweep (bench/rows_sweep.py): XLA vs Pallas for rms_norm,
#      add_rms_norm and rope_qk over (rows per program, warps), forward and forward+backward, with
#      the copy ceiling measured in the run; the table comes last, JSON in $OUT/rows_sweep.json.
# `--quick` (CPU is fine): tiny shapes, Pallas interpreted, the gpu tests only collected.
# Exit non-zero if the tests or the sweep fail; each step has a wall-clock cap so a hang still
# leaves the other's results and the partial JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
PY=${PYTHON:-python3}
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
TESTS="tests/kernels/test_rms_norm_kernel.py tests/kernels/test_rope_swiglu_kernels.py"

if [ "$QUICK" -eq 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
$PY -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"

if [ "$QUICK" -eq 1 ]; then
  timeout 60 $PY -m pytest -m gpu $TESTS -q --collect-only -p no:cacheprovider 2>&1 \
    | tee "$OUT/rows-gpu-tests.txt"
else
  timeout "${TEST_TIMEOUT:-100}" $PY -m pytest -m gpu $TESTS -v -rA -p no:cacheprovider 2>&1 \
    | tee "$OUT/rows-gpu-tests.txt"
fi
tests_rc=${PIPESTATUS[0]}

if [ "$QUICK" -eq 1 ]; then
  SWEEP_ARGS="--quick --budget 120"
else
  SWEEP_ARGS="--budget ${SWEEP_BUDGET:-72}"
fi
# The budget stops new configs; the timeout is the hard cap behind it (compiles run ~1 s each).
timeout "${SWEEP_TIMEOUT:-92}" $PY -m bench.rows_sweep --out "$OUT/rows_sweep.json" \
  $SWEEP_ARGS 2>&1 | tee "$OUT/rows-sweep.txt"
sweep_rc=${PIPESTATUS[0]}

echo "gpu tests exit $tests_rc, sweep exit $sweep_rc"
[ "$tests_rc" -eq 0 ] && [ "$sweep_rc" -eq 0 ]
