#!/usr/bin/env bash
# The export round trip at 1.1B on the GPU machine: the 1.1B config trains 2 steps, exports to a HF
# directory, loads in transformers, and re-imports; wall time and peak host memory of each command.
# Then the kernel benchmark's row ops again (forward+backward fixed after the first run).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 PYTHONPATH=.:$PYTHONPATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/dev/shm/interop; rm -rf $W; mkdir -p $W
measure() {  # name, command...: wall seconds and peak RSS of the child, appended to $OUT/interop.txt
  local name=$1; shift
  python3 - "$name" "$@" <<'PY' 2>&1 | tee -a "$OUT/interop.txt" | grep -vE "^I[0-9]{4} " | tail -5
import resource, subprocess, sys, time
t = time.time(); rc = subprocess.call(sys.argv[2:])
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
print(f"MEASURE {sys.argv[1]}: rc={rc} wall={time.time() - t:.1f}s peak_host_rss={rss:.2f} GiB")
PY
}
measure train_1b_2_steps python3 -m tinyllama_jax.train --config=configs/1b.py --workdir=$W/run \
  --config.train.steps=2 --config.train.global_batch=8 --config.train.eval_batches=1 \
  --config.data.tokenizer_train_bytes=2000000 --config.train.async_checkpoint=false
measure export_1b_bf16 python3 -m tinyllama_jax.export --workdir=$W/run --out=$W/hf
ls -la $W/hf | tee -a "$OUT/interop.txt"
measure import_1b python3 -m tinyllama_jax.export --from_hf=$W/hf --workdir=$W/back --config=configs/1b.py
measure transformers_load_and_forward python3 -c "
import torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained('$W/hf', local_files_only=True)
t = transformers.AutoTokenizer.from_pretrained('$W/hf', local_files_only=True)
ids = t('def fib(n):', return_tensors='pt').input_ids
print('transformers', transformers.__version__, 'params', sum(p.numel() for p in m.parameters()), 'logits', tuple(m(ids).logits.shape))
"
grep MEASURE "$OUT/interop.txt"
rm -rf $W
timeout 200 python3 -m bench.kernels --only rows --out "$OUT/kernels-rows.json" 2>&1 | tail -25
