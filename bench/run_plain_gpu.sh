#!/usr/bin/env bash
# Issue 15 in one device call (~5 min on one H200): our step beside its floor, the plain JAX step
# (bench/plain_step.py), and the faster PyTorch peer; ours and the plain step profiled (3 steps
# each) and compared kernel family by kernel family. Command buffers are off for every JAX row
# (XLA_FLAGS below), so the profile names each kernel's HLO op; the rows stay comparable.
#   run(command="cd .gpu && BENCH_COMMIT=<sha> bash bench/run_plain_gpu.sh", carry=[".gpu"])
# Results under $OUT: step.json (table, ratios, profile comparison), step.log (+ nvidia-smi), the
# optimized HLO of each profiled row (hlo-NAME.txt.gz: fusion names in the profile map to it).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=2
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; PROF=${PROF:-/tmp/prof}
timeout ${TIMEOUT_S:-540} python3 -m bench --config=configs/1b.py \
  --config.train.seq_len=2048 --config.train.micro_batch_per_device=8 \
  --variants="${VARIANTS:-base}" --plain="${PLAIN-plain,stacked,chunked_ce}" --peer="${PEER-bf16}" \
  --steps=20 --warmup=3 --window=5 --deadline_s=${DEADLINE_S:-420} --worker_timeout_s=200 \
  --profile_dir=$PROF --profile_variants="${PROFILE:-base,plain}" \
  --out="$OUT/step.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/step.log"
for d in "$PROF"/*/; do
  [ -f "$d/step.hlo.txt.gz" ] && cp "$d/step.hlo.txt.gz" "$OUT/hlo-$(basename "$d").txt.gz"
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$OUT/step.log" 2>&1
ls -la "$OUT"
