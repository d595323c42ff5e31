#!/usr/bin/env bash
# Session 6, call 1 (<= 9.5 min on one H200): the measurements the last session's code waits for.
#   run(command="BENCH_COMMIT=<sha> bash bench/run_session6_gpu.sh", carry=[".whl"])
# Parts, in order of what they decide (each capped; the tarball is rewritten after each, so a
# killed call still brings back what finished):
#   fp8     issue 19: the 1b step base / fp8 / fp8 with bf16 GEMM outputs; one fp8 GEMM and layer
#   decode  issue 17: the Pallas cache-attention kernel's GPU test, then ours at batch 1/16 with
#           attention_cache=xla,pallas, a per-token kernel profile (batch 1), the verify pass
#           against the decode step (bench.spec_logits), the loop under WHILE command buffers
#   mgpu    issue 16: jax's Mosaic GPU attention forward (f16) against cuDNN
#   parity  issue 19: run_fp8_gpu.sh's parity part (120m, 400 steps, bf16 then fp8 at its defaults)
#   hf      issue 17: ours, the draft = target speculative row and transformers eager generate at
#           batch 1 (HF_BATCHES) in one process (the >= 10x eager target is a same-call ratio)
#   pair    issue 17: run_spec_gpu.sh without its table: a 1b target and a shallow draft (4 layers,
#           d 1024) trained on the stdlib text, then speculative K=4 and K=6 at batch 1
#   kernels issues 16/17: bench.attention_backends (every training attention backend, tokamax's
#           included, with and without stdlib documents), the attention kernels' GPU tests, the
#           decode table with attention_cache=xla,pallas
#   tokamax issue 16: bench.attention_backends (every training attention backend, tokamax's
#           included, with and without stdlib documents), tokamax's GPU test, the 1b step with
#           attention=tokamax beside base
#   logits  bench.spec_logits in fp32 (does the verify pass agree with the decode step there?)
# Everything lands in $OUT/session6.tgz (the device returns at most 8 files).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; R=/tmp/s6; rm -rf "$R"; mkdir -p "$R"
PARTS=${PARTS:-"fp8 decode mgpu"}
has() { [[ " $PARTS " == *" $1 "* ]]; }
quiet() { grep -v "^[IW][0-9]\|^WARNING"; }
pack() { tar -czf "$OUT/session6.tgz" -C "$R" . ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/device.txt" 2>&1

if has fp8; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout 170 python3 -m bench --config=configs/1b.py \
    --config.train.seq_len=2048 --config.train.micro_batch_per_device=8 \
    --variants='base;fp8:model.matmul_dtype=fp8;fp8_bf16out:model.matmul_dtype=fp8,model.fp8_gemm_output=bfloat16' \
    --plain= --peer= --steps=15 --warmup=3 --window=5 --worker_timeout_s=75 --deadline_s=125 \
    --out="$R/fp8-step.json" > "$R/fp8-step.log" 2>&1; echo "fp8 step: exit $?"
  quiet < "$R/fp8-step.log" | tail -12
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 60 python3 -m bench.fp8_check --out="$R/fp8-check.json" \
    > "$R/fp8-check.log" 2>&1; echo "fp8 check: exit $?"
  grep -E '"(speedup|fwd_ms|fwd_bwd_ms|mentions)' "$R/fp8-check.log" | tr -s ' ' | head -20
  pack
fi

if has decode; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
  timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_decode_attention.py \
    > "$R/decode-attention-gpu-test.txt" 2>&1; echo "decode attention gpu test: exit $?"
  tail -3 "$R/decode-attention-gpu-test.txt"
  timeout 130 python3 -m bench.decode --only_ours --batches=1,16 --dtypes=bfloat16 \
    --attention_cache=xla,pallas --deadline_s=90 --profile_dir="$R/prof" --out="$R/decode.json" \
    > "$R/decode.log" 2>&1; echo "decode table: exit $?"
  quiet < "$R/decode.log" | grep -v "^ " | tail -8; find "$R/prof" -type f ! -name summary.txt -delete 2>/dev/null
  pack
  timeout 70 python3 -m bench.spec_logits --out="$R/spec-logits.json" > "$R/spec-logits.log" 2>&1
  echo "spec logits: exit $?"; quiet < "$R/spec-logits.log" | cut -c1-400 | tail -5
  XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
    timeout 70 python3 -m bench.decode --only_ours --batches=1,16 --dtypes=bfloat16 --deadline_s=40 \
    --out="$R/decode-cb-while.json" > "$R/decode-cb-while.log" 2>&1; echo "cb-while: exit $?"
  quiet < "$R/decode-cb-while.log" | tail -3
  pack
fi

if has mgpu; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 80 python3 -m bench.attention_mgpu --out="$R/attention-mgpu.json" \
    > "$R/attention-mgpu.log" 2>&1; echo "attention mgpu: exit $?"
  quiet < "$R/attention-mgpu.log" | tail -14
  pack
fi
if has parity; then
  OUT="$R" PARTS=parity bash bench/run_fp8_gpu.sh 2>&1 | grep -v "^[IW][0-9]" | tail -24
  pack
fi

if has hf; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout ${HF_S:-170} python3 -m bench.decode --batches=${HF_BATCHES:-1} \
    --dtypes=bfloat16 --draft_tokens=4 --deadline_s=${HF_DEADLINE_S:-110} --out="$R/decode-hf.json" \
    > "$R/decode-hf.log" 2>&1; echo "decode with hf: exit $?"
  quiet < "$R/decode-hf.log" | tail -10
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

if has tokamax; then  # ~7 min: attention backends, the kernels' GPU tests, decode, step rows
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
  python3 -c "import tokamax; print('tokamax', tokamax.__version__)" 2>&1 | tail -2
  timeout ${ATT_S:-170} python3 -m bench.attention_backends --out="$R/attention-backends.json" --write_table="$R/attention_auto.json" \
    > "$R/attention-backends.log" 2>&1; echo "attention backends: exit $?"
  grep -E "^(attention|auto)" "$R/attention-backends.log" | cut -c1-150
  pack
  GPU_TESTS=$(ls tests/kernels/test_tokamax_attention.py tests/kernels/test_flash_mgpu*.py \
    tests/kernels/test_decode_attention.py tests/kernels/test_rope_swiglu_kernels.py 2>/dev/null)
  timeout ${TESTS_S:-70} python3 -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS \
    > "$R/kernels-gpu-tests.txt" 2>&1; echo "kernel gpu tests: exit $?"
  grep -E "passed|failed|FAILED" "$R/kernels-gpu-tests.txt" | tail -8
  pack
  timeout ${DECODE_S:-60} python3 -m bench.decode --only_ours --batches=1,16 --dtypes=bfloat16 \
    --attention_cache=xla,pallas --deadline_s=30 --out="$R/decode-kernels.json" \
    > "$R/decode-kernels.log" 2>&1; echo "decode table: exit $?"
  quiet < "$R/decode-kernels.log" | grep -E "^ours|^row" | tail -5
  pack
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout ${STEP_S:-130} python3 -m bench --config=configs/1b.py \
    --config.train.seq_len=2048 --config.train.micro_batch_per_device=8 \
    --variants="${STEP_VARIANTS:-base;tokamax:model.kernels.attention=tokamax}" --plain= --peer= \
    --steps=12 --warmup=3 --window=5 --worker_timeout_s=70 --deadline_s=80 \
    --out="$R/step.json" > "$R/step.log" 2>&1; echo "step: exit $?"
  quiet < "$R/step.log" | tail -6
  pack
fi

if has logits; then
  timeout ${LOGITS_S:-50} python3 -m bench.spec_logits --dtypes=float32 --batches=1 \
    --out="$R/spec-logits-fp32.json" > "$R/spec-logits-fp32.log" 2>&1; echo "spec logits: exit $?"
  quiet < "$R/spec-logits-fp32.log" | cut -c1-400 | tail -3
  pack
fi
ls -la "$R"
