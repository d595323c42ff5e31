#!/usr/bin/env bash
# bench.gemm on one H200 (~3 min): XLA's GEMMs at the 1b step's shapes against FP8 and jax's
# Mosaic GPU Hopper matmul; also the installed jax's cuDNN attention signatures (issue 16).
#   run(command="BENCH_COMMIT=<sha> bash bench/run_gemm_gpu.sh", carry=[".whl"])
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p "$OUT/hlo"; timeout 260 python3 -m bench.gemm --out="$OUT/gemm.json" --deadline_s=200 --hlo_dir="$OUT/hlo" 2>&1 | grep -v "^I[0-9]\|^W[0-9]" | tail -40 | tee "$OUT/gemm.txt"
timeout 60 python3 - <<'PY' 2>&1 | tee "$OUT/cudnn-api.txt"
import inspect, jax
from jax._src.cudnn import fused_attention_stablehlo as f
print(jax.__version__)
print("jax.nn.dot_product_attention", inspect.signature(jax.nn.dot_product_attention))
print("fused_attention_stablehlo.dot_product_attention", inspect.signature(f.dot_product_attention))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gemm.txt"
timeout 150 python3 -m bench.attention_mgpu --out="$OUT/attention-mgpu.json" 2>&1 | grep -v "^I[0-9]\|^W[0-9]" | tail -30 | tee "$OUT/attention-mgpu.txt"
