#!/usr/bin/env bash
# Issue 17 in one device call (~7 min on one H200): bench.decode's rows (ours at batch 1/16, bf16
# and fp32 compute; speculative; transformers eager), a per-token profile of ours at batch 1, and
# the batch-1 bf16 row again under other command-buffer settings (XLA_FLAGS is read once a process).
#   run(command="BENCH_COMMIT=<sha> bash bench/run_decode_gpu.sh", carry=[".whl"])
# Results under $OUT: decode.json/.log, decode-<flags>.json/.log, prof-*/summary.txt.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 260 python3 -m bench.decode --deadline_s=200 --profile_dir="$OUT/prof-base" \
  --out="$OUT/decode.json" > "$OUT/decode.log" 2>&1
grep -v "^[IW][0-9]" "$OUT/decode.log" | tail -40
run_flags() {  # name, XLA_FLAGS
  XLA_FLAGS="$2" timeout 110 python3 -m bench.decode --only_ours --dtypes=bfloat16 --deadline_s=60 \
    --profile_dir="$OUT/prof-$1" --out="$OUT/decode-$1.json" > "$OUT/decode-$1.log" 2>&1
  echo "== $1 ($2)"; grep -v "^[IW][0-9]" "$OUT/decode-$1.log" | grep -A3 "^row\|ms a step traced" | head -12
}
run_flags cb-while "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
run_flags cb-off "--xla_gpu_enable_command_buffer="
nvidia-smi --query-gpu=name,driver_version --format=csv >> "$OUT/decode.log" 2>&1
