#!/usr/bin/env bash
# The scaling table in one device call on kind nvidia-h200-x4 (~8 min): the whole-step
# benchmark on 1 GPU (with the PyTorch peer), 2 GPUs and 4 GPUs of one host, 8 x 2048 tokens per
# device, FSDP over all devices (and data x fsdp on 4), then the scaling table. Run from the repo
# root on the device machine with .whl carried; the copy there has no .git, so pass the commit:
#   run(kind="nvidia-h200-x4", carry=[".whl"],
#       command="BENCH_COMMIT=<hash> bash bench/run_scale_gpu.sh")
# The same script serves 8 GPUs, on kind nvidia-h200-x8: GPUS="1 4 8" (8: all-FSDP and
# data 2 x fsdp 4; the scaling table then gives each row's share of one GPU and its 22B-token time).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1
COMMON="--config=configs/1b.py --config.train.seq_len=2048 --config.train.micro_batch_per_device=8 --steps=20 --warmup=3 --window=5 --worker_timeout_s=240"
files=()
for n in ${GPUS:-1 2 4}; do
  devs=$(seq -s, 0 $((n - 1)))
  case $n in
    1) variants=${VARIANTS_1:-"base;mlp_recompute:model.recompute_mlp_act=True"}; peer=${PEER:-autocast,bf16}; plain=plain ;;
    4) variants=${VARIANTS_4:-"base;data2_fsdp2:mesh.data=2,mesh.fsdp=2;lhs:xla_flags=--xla_gpu_enable_latency_hiding_scheduler=true"}; peer=; plain= ;;
    8) variants=${VARIANTS_8:-"base;data2_fsdp4:mesh.data=2,mesh.fsdp=4"}; peer=; plain= ;;
    *) variants=${VARIANTS_N:-"base"}; peer=; plain= ;;
  esac
  CUDA_VISIBLE_DEVICES=$devs timeout ${STEP_TIMEOUT:-330} python3 -m bench $COMMON \
    --variants="$variants" --peer="$peer" --plain="$plain" --out="$OUT/step_${n}xh200.json" 2>&1 | tee -a "$OUT/scale.log" | grep -v "^\[bench\]"
  files+=("$OUT/step_${n}xh200.json")
done
python3 -m bench.scaling "${files[@]}" --json="$OUT/scaling.json" | tee "$OUT/scaling.txt"
