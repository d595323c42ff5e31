#!/usr/bin/env bash
# A change that must keep the step's speed (a refactor), in one device call (~6 min on one H200):
# the base row of the tree before the change (OLD, a copy of that commit: `git archive SHA | tar -x
# -C .gpu-old`), then this tree's base row with its floor (the plain JAX step) and the PyTorch peer.
#   run(command="OLD=.gpu-old BENCH_COMMIT=<sha> OLD_COMMIT=<sha> bash bench/run_before_after_gpu.sh",
#       carry=[".whl", ".gpu-old"])
# Results under $OUT: before.json/.log (the old tree's bench), after.json/.log (this tree's).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ARGS="--config=configs/1b.py --config.train.seq_len=2048 --config.train.micro_batch_per_device=8
  --steps=20 --warmup=3 --window=5 --worker_timeout_s=150"
# The old tree's bench lived in the package (python -m tinyllama_jax.bench) or beside it (python -m bench).
OLD_MODULE=$([ -d "$OLD/tinyllama_jax/bench" ] && echo tinyllama_jax.bench || echo bench)
(cd "$OLD" && BENCH_COMMIT=${OLD_COMMIT:-old} timeout 150 python3 -m $OLD_MODULE $ARGS --variants=base \
  --plain= --peer= --deadline_s=120 --out="$OUT/before.json") 2>&1 | tail -40 > "$OUT/before.log"
timeout 330 python3 -m bench $ARGS --variants="${VARIANTS:-base}" --plain=plain --peer=bf16 --deadline_s=${DEADLINE_S:-300} \
  --out="$OUT/after.json" 2>&1 | tail -60 > "$OUT/after.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/after.log" 2>&1
cat "$OUT/before.log" "$OUT/after.log" | grep -v "^I[0-9]\|^W[0-9]" | tail -50
