#!/usr/bin/env bash
# Train on all GPUs of this machine in one process (JAX drives every local GPU itself; no
# torchrun-style process per GPU): bash launch/one_host.sh --config=configs/1b.py --workdir=runs/1b
# Default mesh: FSDP over all GPUs (--config.mesh.fsdp=-1). Data x FSDP, e.g. 2 x 4 on 8 GPUs:
#   bash launch/one_host.sh ... --config.mesh.data=2 --config.mesh.fsdp=-1
# Global batch = train.global_batch sequences; each GPU runs micro_batch_per_device of them per
# forward/backward and the rest accumulates.
set -euo pipefail
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}
exec python -m tinyllama_jax.train "$@"
