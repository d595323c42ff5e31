#!/usr/bin/env bash
# Session 8 (each call <= 9.5 min on one H200):
#   run(command="BENCH_COMMIT=<sha> PARTS='...' bash bench/run_session8_gpu.sh", carry=[".whl"])
# Parts, run in PARTS' order (each capped; the tarball is rewritten after each, so a killed
# call keeps what finished):
#   flags   issue 17: ours at batch 1/16 bf16 for each XLA option set in XLA_SETS (';' between
#           sets; bench.decode --xla_options), the last set's batch-1 kernel profile
#   hf      issue 17: ours, the draft = target speculative row and transformers' generate (eager,
#           static cache + torch.compile) at batch 1 in one process (the >= 10x ratio)
#   mgpu    issue 16: our Mosaic GPU attention's GPU test at the TinyLlama shape, then
#           bench.attention_backends (every backend, with and without documents) writing the
#           auto table (tokamax, measured in session 6, only with its wheels carried: BACKENDS)
#   gemv    issue 17: the decode GEMV kernels' GPU tests and bench.decode_gemv (XLA vs ours)
#   pair    issue 17: a 1b target and a 4-layer d1024 draft trained on the stdlib text, then
#           speculative K=4 and K=6 at batch 1 (run_spec_gpu.sh without its table)
#   decode  issue 17: ours at batch 1/16 for the --kernels sets in KERNELS and --xla_options
#           sets in XLA_SETS (after gemv is wired), profile of the last
#   step    issue 16: the 1b train step with attention=cudnn, base (auto: the committed table)
#           and the plain-JAX floor, one worker each (~35-60 s a row)
# Session 9 also: HF_DRAFT='' leaves the speculative row out of the hf part.
# Everything lands in $OUT/session8.tgz (the device returns at most 8 files).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; R=/tmp/s8; rm -rf "$R"; mkdir -p "$R"
PARTS=${PARTS:-"flags hf mgpu"}
quiet() { grep -v "^[IW][0-9]\|^WARNING"; }
pack() { tar -czf "$OUT/session8.tgz" -C "$R" . ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/device.txt" 2>&1
echo "commit ${BENCH_COMMIT:-?}" >> "$R/device.txt"

DEFAULT_SETS=";xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL;xla_gpu_enable_triton_gemm=false;xla_gpu_enable_triton_gemm=false xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
part_flags() {
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
  timeout ${FLAGS_S:-240} python3 -m bench.decode --only_ours --batches=1,16 --dtypes=bfloat16 \
    --xla_options="${XLA_SETS:-$DEFAULT_SETS}" --deadline_s=${FLAGS_DEADLINE_S:-190} \
    --profile_dir="$R/prof-flags" --out="$R/decode-flags.json" > "$R/decode-flags.log" 2>&1
  echo "decode flags: exit $?"
  quiet < "$R/decode-flags.log" | grep -v "^ " | cut -c1-220 | tail -${FLAGS_TAIL:-16}
  find "$R/prof-flags" -type f ! -name summary.txt -delete 2>/dev/null
  pack
}

part_hf() {
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout ${HF_S:-160} python3 -m bench.decode --batches=1 \
    --dtypes=bfloat16 --draft_tokens="${HF_DRAFT-4}" --deadline_s=${HF_DEADLINE_S:-100} --out="$R/decode-hf.json" \
    > "$R/decode-hf.log" 2>&1; echo "decode with hf: exit $?"
  quiet < "$R/decode-hf.log" | tail -8
  pack
}

part_mgpu() {
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
  if [[ ${MGPU_TESTS_S:-70} -gt 0 ]]; then  # (timeout 0 would mean no limit)
    timeout ${MGPU_TESTS_S:-70} python3 -m pytest -q -p no:cacheprovider -m gpu -x \
      -k "${MGPU_K:-8-2048-32-4-64}" tests/kernels/test_flash_mgpu.py \
      > "$R/mgpu-gpu-tests.txt" 2>&1; echo "mgpu gpu tests: exit $?"
    grep -E "passed|failed|FAILED|Error" "$R/mgpu-gpu-tests.txt" | cut -c1-300 | tail -6
    pack
  fi
  timeout ${BACKENDS_S:-150} python3 -m bench.attention_backends --backends=${BACKENDS:-cudnn,pallas,mgpu} \
    --out="$R/attention-backends.json" \
    --write_table="$R/attention_auto.json" > "$R/attention-backends.log" 2>&1
  echo "attention backends: exit $?"
  quiet < "$R/attention-backends.log" | cut -c1-200 | tail -22
  pack
}

part_gemv() {
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
  timeout ${GEMV_TESTS_S:-60} python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_decode_gemv.py \
    > "$R/gemv-gpu-tests.txt" 2>&1; echo "gemv gpu tests: exit $?"
  grep -E "passed|failed|FAILED|Error" "$R/gemv-gpu-tests.txt" | cut -c1-300 | tail -6
  timeout ${GEMV_S:-120} python3 -m bench.decode_gemv --budget_s=${GEMV_BUDGET_S:-90} --out="$R/decode-gemv.json" \
    > "$R/decode-gemv.log" 2>&1; echo "decode gemv: exit $?"
  quiet < "$R/decode-gemv.log" | cut -c1-200 | tail -${GEMV_TAIL:-30}
  pack
}

part_pair() {
  OUT="$R" TABLE=0 STEPS_T=${STEPS_T:-600} TRAIN_T_S=${TRAIN_T_S:-100} STEPS_D=${STEPS_D:-1500} \
    TRAIN_D_S=${TRAIN_D_S:-55} SPEC_S=${SPEC_S:-130} SPEC_DEADLINE_S=${SPEC_DEADLINE_S:-95} \
    DRAFT_FLAGS="--config.model.n_layers=4 --config.model.d_model=1024 --config.model.n_heads=16
      --config.model.n_kv_heads=4 --config.model.ffn_dim=2816" bash bench/run_spec_gpu.sh 2>&1 \
    | grep -v "^WARNING: Target" | tail -30
  rm -rf /tmp/spec-runs
  pack
}

part_decode() {
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
  timeout ${DECODE_S:-150} python3 -m bench.decode --only_ours --batches=1,16 --dtypes=bfloat16 \
    --kernels="${KERNELS:-}" --xla_options="${XLA_SETS:-}" --deadline_s=${DECODE_DEADLINE_S:-110} \
    --profile_dir="$R/prof" --out="$R/decode.json" > "$R/decode.log" 2>&1; echo "decode table: exit $?"
  quiet < "$R/decode.log" | grep -v "^ " | cut -c1-220 | tail -${DECODE_TAIL:-14}
  find "$R/prof" -type f ! -name summary.txt -delete 2>/dev/null
  pack
}
part_step() {
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout ${STEP_S:-240} python3 -m bench --config=configs/1b.py \
    --config.train.seq_len=2048 --config.train.micro_batch_per_device=8 \
    --variants="${STEP_VARIANTS:-base;cudnn:model.kernels.attention=cudnn}" --peer= --plain=plain \
    --steps=20 --warmup=3 --window=5 --deadline_s=${STEP_DEADLINE_S:-200} --worker_timeout_s=150 \
    --out="$R/step.json" > "$R/step.log" 2>&1; echo "step: exit $?"
  quiet < "$R/step.log" | cut -c1-200 | tail -12
  pack
}
for part in $PARTS; do
  if declare -F "part_$part" > /dev/null; then "part_$part"
  else echo "unknown part '$part': flags hf mgpu gemv pair decode step"; exit 2; fi
done
ls -la "$R"
