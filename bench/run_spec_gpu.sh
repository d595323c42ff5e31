#!/usr/bin/env bash
# Issue 17's speculative row with a trained draft, in one device call (<= 8 min on one H200):
#   1. the decode loop body's ops as the GPU compiles them (bench.decode --count_ops, batch 1/16);
#   2. a 1b target and a 120m draft trained a few hundred steps on the same real text (the stdlib
#      source), one tokenizer: the target's run trains it, the draft's run reads that file
#      (data.tokenizer), so both workdirs hold the same tokenizer (bench.decode checks the sha256);
#   3. bench.decode on the pair: the target alone (greedy, batch 1), then speculative K=4 and K=6:
#      acceptance, tokens a target call, tokens/s, speedup vs the target alone, same_as_target.
#   run(command="BENCH_COMMIT=<sha> bash bench/run_spec_gpu.sh", carry=[".whl"])
# Env: STEPS_T (300), STEPS_D (600), TOKENS (4 rows of 1024 a step; BATCH_T/BATCH_D); DRAFT_FLAGS:
# overrides of the draft's 120m config (a shallower draft: each of its steps costs a launch per
# kernel, ~30 a layer, so its depth sets its cost at batch 1); TABLE=0 skips issue 17's table.
# Results under $OUT: [ops.json/.log with COUNT_OPS=1], train-1b.log, train-120m.log,
# decode.json/.log (issue 17's table), spec.json/.log (the trained pair).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; RUNS=${RUNS:-/tmp/spec-runs}; rm -rf "$RUNS"; mkdir -p "$RUNS"
quiet() { grep -v "^[IW][0-9]\|^WARNING"; }

if [ -n "${COUNT_OPS:-}" ]; then  # the loop body's ops as the GPU compiles them (~60 s)
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout 90 python3 -m bench.decode --count_ops --only_ours \
    --batches=1,16 --dtypes=bfloat16 --deadline_s=0 --out="$OUT/ops.json" > "$OUT/ops.log" 2>&1
  quiet < "$OUT/ops.log" | grep -B1 -A14 "^decode loop body" | head -36
fi

# Short runs: warmup 20 steps, no eval, one checkpoint at the end; an 8192-piece tokenizer from a
# 2 MB sample (the model's vocab stays 32000, so the decode costs are the 1.1B's).
COMMON="--config.train.seq_len=1024 --config.train.eval_every=0 --config.train.checkpoint_every=0
  --config.train.sample_tokens=0 --config.optim.warmup_steps=20 --config.train.log_every=50"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
timeout ${TRAIN_T_S:-100} python3 -m tinyllama_jax.train --config=configs/1b.py --workdir="$RUNS/1b" $COMMON \
  --config.train.steps=${STEPS_T:-300} --config.train.global_batch=${BATCH_T:-4} \
  --config.train.micro_batch_per_device=${BATCH_T:-4} --config.optim.lr=4e-4 \
  --config.data.tokenizer_vocab_size=8192 --config.data.tokenizer_train_bytes=2000000 \
  > "$OUT/train-1b.log" 2>&1; echo "train 1b: exit $?"
quiet < "$OUT/train-1b.log" | tail -4; grep "step .*/" "$OUT/train-1b.log" | tail -2 | cut -c30-
timeout ${TRAIN_D_S:-60} python3 -m tinyllama_jax.train --config=configs/120m.py --workdir="$RUNS/120m" $COMMON \
  --config.train.steps=${STEPS_D:-600} --config.train.global_batch=${BATCH_D:-4} \
  --config.train.micro_batch_per_device=${BATCH_D:-4} --config.optim.lr=1e-3 \
  --config.data.tokenizer="$RUNS/1b/tokenizer/tokenizer.model" ${DRAFT_FLAGS:-} \
  > "$OUT/train-120m.log" 2>&1; echo "train 120m: exit $?"
quiet < "$OUT/train-120m.log" | tail -4; grep "step .*/" "$OUT/train-120m.log" | tail -2 | cut -c30-

export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
# Issue 17's table: ours at batch 1 and 16 (random 1.1B weights: the speed of any), with XLA's
# and the Pallas kernel's attention over the cache, the draft = target machinery row and
# transformers eager, in the same call. First: the Pallas kernel's GPU test.
if [ "${TABLE:-1}" != 0 ]; then
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_decode_attention.py \
  > "$OUT/decode-attention-gpu-test.txt" 2>&1; echo "decode attention gpu test: exit $?"
tail -3 "$OUT/decode-attention-gpu-test.txt"
BENCH_COMMIT=${BENCH_COMMIT:-} timeout ${TABLE_S:-160} python3 -m bench.decode --batches=1,16 \
  --dtypes=bfloat16 --attention_cache=${ATTENTION_CACHE:-xla,pallas} --draft_tokens=4 --deadline_s=${TABLE_DEADLINE_S:-110} --out="$OUT/decode.json" \
  > "$OUT/decode.log" 2>&1; echo "decode table: exit $?"
quiet < "$OUT/decode.log" | tail -12
fi
# The trained pair: the target alone, then speculative K=4 and K=6 (greedy, batch 1).
BENCH_COMMIT=${BENCH_COMMIT:-} timeout ${SPEC_S:-150} python3 -m bench.decode --target_workdir="$RUNS/1b" \
  --draft_workdir="$RUNS/120m" --batches=${SPEC_BATCHES:-1} --dtypes=bfloat16 --draft_tokens=4,6 \
  --only_speculative --deadline_s=${SPEC_DEADLINE_S:-110} --out="$OUT/spec.json" > "$OUT/spec.log" 2>&1
echo "speculative: exit $?"
quiet < "$OUT/spec.log" | tail -24
nvidia-smi --query-gpu=name,driver_version --format=csv >> "$OUT/spec.log" 2>&1
