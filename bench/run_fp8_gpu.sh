#!/usr/bin/env bash
# Issue 19, FP8 on Hopper (model.matmul_dtype=fp8), in one device call (<= 8 min on one H200):
#   run(command="BENCH_COMMIT=<sha> bash bench/run_fp8_gpu.sh", carry=[".whl"])
# Time caps in s: STEP_S=180 CHECK_S=60 BF16_S=150 FP8_S=120, + 15 = 525; raise one with its
# variable when running fewer parts. PARTS picks the parts (default "step check parity"):
#   step    the 1b step: base, fp8, fp8 with bf16 GEMM outputs              -> $OUT/fp8-step.json/.log
#   check   one fp8 GEMM at [16384,2048]x[2048,5632] vs bf16 (ms, TFLOP/s) and one 1b layer's
#           fwd+bwd: the GEMM custom calls in the optimized HLO (__cublas$lt$matmul$f8 = FP8)
#                                                                          -> $OUT/fp8-check.json/.log,
#                                                                             fp8-layer-hlo.txt
#   parity  120m on the stdlib corpus, one 32k tokenizer (trained once, by the bf16 run), 400 steps
#           of 16 x 2048 tokens, bf16 then fp8 from the same seed; held-out loss every 100 steps
#                                                                          -> $OUT/fp8-parity.json,
#                                                                             parity-{bf16,fp8}.log,
#                                                                             metrics-{bf16,fp8}.jsonl
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PARTS=${PARTS:-"step check parity"}
has() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1

if has step; then  # ~2 x 35 s: a worker was 30-36 s in session 4 (start, 14 s compile, 23 steps)
  timeout ${STEP_S:-180} python3 -m bench --config=configs/1b.py --config.train.seq_len=2048 \
    --config.train.micro_batch_per_device=8 --variants='base;fp8:model.matmul_dtype=fp8;fp8_bf16out:model.matmul_dtype=fp8,model.fp8_gemm_output=bfloat16' \
    --plain= --peer= --steps=15 --warmup=3 --window=5 --worker_timeout_s=${WORKER_S:-75} --deadline_s=${DEADLINE_S:-130} \
    --out="$OUT/fp8-step.json" 2>&1 | grep -v "^I[0-9]\|^W[0-9]" | tail -40 > "$OUT/fp8-step.log"
  cat "$OUT/fp8-step.log"
fi

if has check; then  # ~30 s
  timeout ${CHECK_S:-60} python3 -m bench.fp8_check --out="$OUT/fp8-check.json" > "$OUT/fp8-check.log" 2>&1
  echo "check exit $?"; grep -E '"(bf16|fp8|speedup|fwd_ms|fwd_bwd_ms|__cublas|mentions)' "$OUT/fp8-check.log" | tr -s ' ' | head -60
fi

if has parity; then  # ~2 x 80 s: tokenizer (bf16 only), compile, 400 steps at ~15/s (est.), 4 evals
  W=/dev/shm/fp8-parity; rm -rf "$W"; mkdir -p "$W"
  common="--config=configs/120m.py --config.data.source=stdlib --config.data.tokenizer_train_bytes=2000000
    --config.data.num_workers=4 --config.train.steps=400 --config.train.seq_len=2048
    --config.train.global_batch=16 --config.train.micro_batch_per_device=16 --config.train.log_every=10
    --config.train.eval_every=100 --config.train.eval_batches=8 --config.train.checkpoint_every=0
    --config.train.async_checkpoint=false --config.optim.warmup_steps=40 --config.optim.decay_steps=400
    --config.seed=0"
  timeout ${BF16_S:-150} python3 -m tinyllama_jax.train $common --config.model.matmul_dtype=bf16 --workdir="$W/bf16" \
    > "$OUT/parity-bf16.log" 2>&1; echo "bf16 run exit $?"
  TOK="$W/bf16/tokenizer/tokenizer.model"  # the same tokenizer, so the same token stream
  timeout ${FP8_S:-120} python3 -m tinyllama_jax.train $common --config.model.matmul_dtype=fp8 \
    --config.data.tokenizer="$TOK" --workdir="$W/fp8" > "$OUT/parity-fp8.log" 2>&1; echo "fp8 run exit $?"
  for r in bf16 fp8; do
    cp "$W/$r/metrics.jsonl" "$OUT/metrics-$r.jsonl" 2>/dev/null
    grep -E "step +[0-9]+/|eval|rror" "$OUT/parity-$r.log" | tail -8
  done
  timeout 15 python3 -m bench.fp8_parity --bf16="$W/bf16" --fp8="$W/fp8" --out="$OUT/fp8-parity.json"
  rm -rf "$W"
fi
