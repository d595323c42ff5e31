#!/usr/bin/env bash
# Train on one GPU of this machine: bash launch/one_gpu.sh [GPU index] [more train flags]
#   bash launch/one_gpu.sh 0 --config=configs/1b.py --workdir=runs/1b
# The mesh is the one device (fsdp=-1 takes what exists). Compiled programs are cached in
# .jax_cache, so a rerun starts training sooner.
set -euo pipefail
gpu=${1:-0}; shift || true
export CUDA_VISIBLE_DEVICES=$gpu
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}
exec python -m tinyllama_jax.train "$@"
