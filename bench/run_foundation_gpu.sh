#!/usr/bin/env bash
# The foundation's GPU check (issue 2): the real 1b config trains a few steps on one H200.
# Run from the repo root on the device machine with .whl carried; results under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import jax, flax, optax, orbax.checkpoint as o, grain; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())" 2>&1 | tee "$OUT/versions.txt"
common="--config=configs/1b.py --config.data.source=synthetic --config.train.global_batch=8 --config.train.log_every=10 --config.train.eval_every=100000 --config.train.eval_batches=2 --config.train.checkpoint_every=100000"
run() {  # name, extra flags
  local name=$1; shift
  echo "=== $name $*"
  timeout 240 python3 -m tinyllama_jax.train $common --workdir=/dev/shm/$name "$@" 2>&1 | grep -E "step [0-9]+/|compiled|memory plan|error|Error|eval loss" | tee "$OUT/$name.log"
  rm -rf /dev/shm/$name
}
run unrolled_cudnn --config.train.steps=40
run scan_cudnn --config.train.steps=30 --config.model.scan_layers=true
run unrolled_cudnn_b16 --config.train.steps=30 --config.train.global_batch=16 --config.train.micro_batch_per_device=16
run stdlib_1b --config.train.steps=20 --config.data.source=stdlib --config.data.tokenizer_train_bytes=2000000
