#!/usr/bin/env bash
# Session 7 (each call <= 9.5 min on one H200):
#   run(command="BENCH_COMMIT=<sha> PARTS='...' bash bench/run_session7_gpu.sh", carry=[".whl"])
# Parts (each capped; the tarball is rewritten after each, so a killed call keeps what finished):
#   mgpu    issue 16: our Mosaic GPU attention's GPU tests, then bench.attention_mgpu (cuDNN, ours
#           fwd / fwd+bwd with the Mosaic or the Triton backward, jax's example)
#   decode  issue 17: flash-decoding's GPU test, ours at batch 1/16 for attention_cache in
#           DECODE_CACHES x the --kernels sets in KERNELS (the last one's batch-1 kernel profile),
#           and the loop body's ops on the GPU (--count_ops) for COUNT_CACHES with COUNT_KERNELS
#   fused   issue 17: the fused decode kernels' GPU tests and the decode table with them
#   pair    issue 17: a 1b target and a 4-layer d1024 draft trained on the stdlib text, then
#           speculative K=4 and K=6 at batch 1 (run_spec_gpu.sh without its table)
#   step    the 1b step rows in STEP_VARIANTS
# Everything lands in $OUT/session7.tgz (the device returns at most 8 files).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; R=/tmp/s7; rm -rf "$R"; mkdir -p "$R"
PARTS=${PARTS:-"mgpu decode"}
has() { [[ " $PARTS " == *" $1 "* ]]; }
quiet() { grep -v "^[IW][0-9]\|^WARNING"; }
pack() { tar -czf "$OUT/session7.tgz" -C "$R" . ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/device.txt" 2>&1
echo "commit ${BENCH_COMMIT:-?}" >> "$R/device.txt"

if has mgpu; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
  timeout ${MGPU_TESTS_S:-110} python3 -m pytest -q -p no:cacheprovider -m gpu -x \
    tests/kernels/test_flash_mgpu.py tests/kernels/test_flash_mgpu_bwd.py \
    > "$R/mgpu-gpu-tests.txt" 2>&1; echo "mgpu gpu tests: exit $?"
  grep -E "passed|failed|FAILED|Error" "$R/mgpu-gpu-tests.txt" | cut -c1-300 | tail -8
  pack
  timeout ${MGPU_BENCH_S:-110} python3 -m bench.attention_mgpu --budget_s=${MGPU_BUDGET_S:-70} \
    --out="$R/attention-mgpu.json" > "$R/attention-mgpu.log" 2>&1; echo "attention mgpu: exit $?"
  quiet < "$R/attention-mgpu.log" | cut -c1-200 | tail -16
  pack
fi

if has decode; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
  timeout 50 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_decode_attention.py \
    > "$R/decode-attention-gpu-test.txt" 2>&1; echo "decode attention gpu test: exit $?"
  tail -2 "$R/decode-attention-gpu-test.txt"
  timeout ${DECODE_S:-120} python3 -m bench.decode --only_ours --batches=1,16 --dtypes=bfloat16 \
    --attention_cache=${DECODE_CACHES:-xla,pallas} --kernels="${KERNELS:-}" \
    --deadline_s=${DECODE_DEADLINE_S:-85} --profile_dir="$R/prof" \
    --out="$R/decode.json" > "$R/decode.log" 2>&1; echo "decode table: exit $?"
  quiet < "$R/decode.log" | grep -v "^ " | tail -${DECODE_TAIL:-14}; find "$R/prof" -type f ! -name summary.txt -delete 2>/dev/null
  pack
  if [[ -n "${COUNT_CACHES-xla pallas}" ]]; then
    for ac in ${COUNT_CACHES-xla pallas}; do
      timeout 40 python3 -m bench.decode --only_ours --batches=1 --dtypes=bfloat16 --attention_cache=$ac \
        --kernels="${COUNT_KERNELS:-}" --count_ops --deadline_s=25 --out="$R/count-ops-$ac.json" \
        > "$R/count-ops-$ac.log" 2>&1
      echo "count ops $ac: exit $?"; quiet < "$R/count-ops-$ac.log" | head -${COUNT_TAIL:-30} | cut -c1-200
    done
  fi
  pack
fi

if has fused; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
  timeout ${FUSED_TESTS_S:-80} python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_decode_fused.py \
    > "$R/fused-gpu-tests.txt" 2>&1; echo "fused gpu tests: exit $?"
  grep -E "passed|failed|FAILED|Error" "$R/fused-gpu-tests.txt" | cut -c1-300 | tail -6
  timeout ${FUSED_S:-120} python3 -m bench.decode --only_ours --batches=1,16 --dtypes=bfloat16 \
    --attention_cache=${FUSED_CACHES:-xla,pallas,fused} --deadline_s=85 --profile_dir="$R/prof-fused" \
    --out="$R/decode-fused.json" > "$R/decode-fused.log" 2>&1; echo "decode fused table: exit $?"
  quiet < "$R/decode-fused.log" | grep -v "^ " | tail -8; find "$R/prof-fused" -type f ! -name summary.txt -delete 2>/dev/null
  pack
fi

if has pair; then
  OUT="$R" TABLE=0 STEPS_T=${STEPS_T:-600} TRAIN_T_S=${TRAIN_T_S:-100} STEPS_D=${STEPS_D:-1500} \
    TRAIN_D_S=${TRAIN_D_S:-55} SPEC_S=${SPEC_S:-130} SPEC_DEADLINE_S=${SPEC_DEADLINE_S:-95} \
    DRAFT_FLAGS="--config.model.n_layers=4 --config.model.d_model=1024 --config.model.n_heads=16
      --config.model.n_kv_heads=4 --config.model.ffn_dim=2816" bash bench/run_spec_gpu.sh 2>&1 \
    | grep -v "^WARNING: Target" | tail -30
  rm -rf /tmp/spec-runs
  pack
fi

if has step; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout ${STEP_S:-170} python3 -m bench --config=configs/1b.py \
    --config.train.seq_len=2048 --config.train.micro_batch_per_device=8 \
    --variants="${STEP_VARIANTS:-base;mgpu:model.kernels.attention=mgpu}" --plain= --peer= \
    --steps=12 --warmup=3 --window=5 --worker_timeout_s=${STEP_WORKER_S:-110} --deadline_s=${STEP_DEADLINE_S:-140} \
    --out="$R/step.json" > "$R/step.log" 2>&1; echo "step: exit $?"
  quiet < "$R/step.log" | tail -6
  pack
fi
ls -la "$R"
