#!/usr/bin/env bash
# The whole-step benchmark (issue 5) on one H200 in one device call (~7-8 min): our train step at
# TinyLlama-1.1B, 8 x 2048 tokens per device, as a matrix of variants, and the PyTorch peer
# (transformers + torch.compile; fp32+autocast and pure bf16) on the same batch.
# Run from the repo root on the device machine with .whl carried (the grain / tensorboardX /
# ml_collections wheels); results under $OUT. The copy there has no .git: pass the commit, e.g.
#   run(command="BENCH_COMMIT=$(git rev-parse HEAD) bash bench/run_step_gpu.sh", carry=[".whl"])
# with $(...) expanded here before sending. Variants start in priority order; one that would
# start after DEADLINE_S seconds is listed as skipped (never silently dropped).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1

# base: the defaults (unrolled layers, cuDNN attention, chunked cross-entropy, no remat).
# accum2: 2 accumulated micro-batches per step (issue 5: accumulation may cost <= 2%).
# micro16: 16 x 2048 per device. remat_*: what the <= 32 GiB target costs in speed.
# ce_xla: the [tokens, vocab] logits cross-entropy. pallas_attn / fused: our Pallas kernels.
# scan: layers under lax.scan (faster compile, known slower).
VARIANTS=${VARIANTS:-"base;accum2:accum=2;micro16:train.micro_batch_per_device=16;\
remat_mlp:model.remat=save_all_but_mlp;remat_dots:model.remat=save_dots;\
ce_xla:model.kernels.cross_entropy=xla;pallas_attn:model.kernels.attention=pallas;\
fused:model.kernels.rms_norm=pallas,model.kernels.rope=pallas,model.kernels.swiglu=pallas;\
scan:model.scan_layers=True"}

timeout 570 python3 -m bench --config=configs/1b.py \
  --config.train.seq_len=2048 --config.train.micro_batch_per_device=8 \
  --variants="$VARIANTS" --peer=autocast,bf16 --steps=20 --warmup=3 --window=5 \
  --deadline_s=${DEADLINE_S:-400} --worker_timeout_s=240 \
  --out="$OUT/step_1xh200.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/step_1xh200.log"
