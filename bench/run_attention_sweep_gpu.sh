#!/usr/bin/env bash
# On one H200: the flash-attention sweep (bench/attention_sweep.py) in < 4 min wall.
#   bash bench/run_attention_sweep_gpu.sh            # results under $OUT (default bench/results)
#   bash bench/run_attention_sweep_gpu.sh --quick    # CPU check: tiny shapes, Pallas interpreted
# Part 1: the gpu-marked flash-attention tests, one pytest process per test, run side by side,
#   each capped at PER_TEST_S (60): a hung or slow case cannot eat the others' time.
# Part 2: the sweep: cuDNN and our configs at B8 T2048 32/4 heads d64 bf16 causal, with and
#   without packed-document ids, then the best two (and the old tiles) at d128 16/2 heads; every
#   row checked against XLA fp32. JSON: $OUT/attention_sweep.json; the table is printed last
#   (also when the sweep is killed at its cap). SWEEP_ARGS passes options (e.g. --only a,b).
# Run from the repo root (the copy there has no .git: BENCH_COMMIT=... names the commit).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=2
PY=${PYTHON:-python3}
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
START=$(date +%s)
if [ -z "$QUICK" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
fi
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"

# Part 1. Correctness only, so sharing the GPU is fine (no preallocation, so the processes fit
# together); the wall time is the slowest test's. --quick runs a few interpret-mode tests instead.
PER_TEST_S=${PER_TEST_S:-100}  # fp32 cases take ~35 s alone on the H200, ~60+ side by side
SEL=(-m gpu); [ -n "$QUICK" ] && SEL=(-m "not gpu" -k "split_ranges or legacy")
TEST_LOG="$OUT/attention-gpu-tests.txt"; : > "$TEST_LOG"
mapfile -t IDS < <($PY -m pytest "${SEL[@]}" tests/kernels/test_flash_attention.py --collect-only \
  -q -p no:cacheprovider 2>/dev/null | grep '::')
TMPD=$(mktemp -d); PIDS=()
for n in "${!IDS[@]}"; do
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$PER_TEST_S" $PY -m pytest "${SEL[@]}" \
    "${IDS[$n]}" -q -p no:cacheprovider > "$TMPD/$n.log" 2>&1 &
  PIDS+=($!)
done
tests_rc=0
for n in "${!IDS[@]}"; do
  wait "${PIDS[$n]}"; rc=$?
  case $rc in 0) s=PASSED;; 124|137) s="TIMEOUT (${PER_TEST_S}s)";; *) s="FAILED (rc $rc)";; esac
  if [ "$rc" -ne 0 ]; then tests_rc=1; cat "$TMPD/$n.log" >> "$TEST_LOG"; fi
  echo "$s ${IDS[$n]}" | tee -a "$TEST_LOG"
done
rm -rf "$TMPD"
if [ "${#IDS[@]}" -eq 0 ]; then echo "no tests collected" | tee -a "$TEST_LOG"; tests_rc=1; fi
echo "tests done at $(( $(date +%s) - START ))s"

# Part 2, under what is left of the 4 minutes; rows stop starting 40 s before the cap.
TOTAL_S=${TOTAL_S:-235}
left=$(( TOTAL_S - ($(date +%s) - START) ))
[ -n "$QUICK" ] && left=600  # CPU interpret mode: a script check, not capped to the GPU budget
deadline=$(( left - 40 )); [ "$deadline" -lt 20 ] && deadline=20
JSON="$OUT/attention_sweep.json"
timeout "$left" $PY -m bench.attention_sweep $QUICK --out "$JSON" \
  --deadline_s "$deadline" ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/attention-sweep.txt"
sweep_rc=${PIPESTATUS[0]}
if [ "$sweep_rc" -eq 124 ] || [ "$sweep_rc" -eq 137 ]; then  # killed: print what the JSON holds
  echo "sweep killed at its ${left}s cap; the rows so far:"
  [ -f "$JSON" ] && $PY -m bench.attention_sweep --table "$JSON"
fi
echo "gpu tests exit $tests_rc, sweep exit $sweep_rc, wall $(( $(date +%s) - START ))s"
[ "$tests_rc" -eq 0 ] && [ "$sweep_rc" -eq 0 ]
