#!/usr/bin/env bash
# The new user's journey, in a venv of requirements.txt alone (the test extras can hide a missing
# dependency): own files -> prepare (.txt, .jsonl, .jsonl.zst) -> train the tiny config on them with
# first_fit -> rerun (resume) -> export -> generate -> evaluate -> sweep --launcher=print.
# Each step must exit 0 and print what a user would look for. Run from the repo root:
#   bash .ci/journey.sh            (about 3-4 minutes on 2 cores, the venv included)
set -uo pipefail
cd "$(dirname "$0")/.."
J=${JOURNEY_DIR:-$(mktemp -d /tmp/journey.XXXXXX)}
V=$J/venv
passed=0
failed=0

step() {  # step NAME EXPECTED_REGEX COMMAND...: runs it, checks exit 0 and that its output matches
  local name=$1 want=$2
  shift 2
  local t0=$SECONDS
  if "$@" >"$J/$name.log" 2>&1 && grep -Eq -- "$want" "$J/$name.log"; then
    passed=$((passed + 1))
    echo "journey: ok   $name ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1))
    echo "journey: FAIL $name ($((SECONDS - t0)) s): wanted /$want/ and exit 0; the last lines:"
    tail -n 25 "$J/$name.log" | sed 's/^/    /'
  fi
}

echo "journey: in $J"
step venv "Successfully installed|already satisfied" \
  bash -c "python3 -m venv '$V' && '$V/bin/pip' install -r requirements.txt"
R=$V/bin/python

# Real text, made on this machine: the standard library's sources as the three raw formats.
step make_text "wrote" "$R" - "$J/raw" <<'EOF'
import json, os, sys, sysconfig, zstandard
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
lib = sysconfig.get_paths()["stdlib"]
files = sorted(os.path.join(lib, f) for f in os.listdir(lib) if f.endswith(".py"))[:240]
docs = [open(p, encoding="utf-8", errors="replace").read() for p in files]
for i, d in enumerate(docs[:60]):
  with open(os.path.join(out, f"doc{i:03d}.txt"), "w") as f:
    f.write(d)
with open(os.path.join(out, "code.jsonl"), "w") as f:
  f.writelines(json.dumps({"text": d}) + "\n" for d in docs[60:150])
with open(os.path.join(out, "more.jsonl.zst"), "wb") as f:
  f.write(zstandard.ZstdCompressor().compress(
      "".join(json.dumps({"text": d}) + "\n" for d in docs[150:]).encode()))
with open(os.path.join(out, "held_out.jsonl"), "w") as f:
  f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:8])
print(f"wrote {len(docs)} documents to {out}")
EOF

# A tokenizer: the tiny run trains one on first use (2 steps are enough to get it).
TINY="--config=configs/tiny.py --config.train.sample_tokens=0"
step tokenizer "step +2" "$R" -m tinyllama_jax.train $TINY --workdir="$J/runs/tok" \
  --config.train.steps=2 --config.train.log_every=1 --config.train.eval_batches=1
TOK=$J/runs/tok/tokenizer/tokenizer.model

for fmt in txt jsonl zst; do
  case $fmt in txt) glob="$J/raw/*.txt" ;; jsonl) glob="$J/raw/code.jsonl" ;;
               zst) glob="$J/raw/*.jsonl.zst" ;; esac
  step "prepare_$fmt" "documents" "$R" -m tinyllama_jax.prepare --input="$glob" \
    --tokenizer="$TOK" --out="$J/data/$fmt" --eval_fraction=0.1 --num_workers=2
done

# Train on the three prepared sets as a mixture, documents kept whole; then resume to step 8.
MIX="0.3:prepared:$J/data/txt;0.4:prepared:$J/data/jsonl;0.3:prepared:$J/data/zst"
RUN="$R -m tinyllama_jax.train $TINY --workdir=$J/runs/mine --config.data.source=mixture
  --config.data.mixture=$MIX --config.data.packing=first_fit --config.train.log_every=1
  --config.train.eval_every=4 --config.train.checkpoint_every=4 --config.train.eval_batches=1"
step train "eval loss" $RUN --config.train.steps=4
step resume "resuming from .*checkpoints/4" $RUN --config.train.steps=8
step rerun_finished "already at step 8 of 8: nothing to train" $RUN --config.train.steps=8

step export '"files": \["model.safetensors"\]' "$R" -m tinyllama_jax.export --workdir="$J/runs/mine" --out="$J/mine-hf"
step export_files "tokenizer.model" ls "$J/mine-hf"
step generate "def" "$R" -m tinyllama_jax.generate --workdir="$J/runs/mine" --prompt="def " \
  --max_new_tokens=16
step evaluate "perplexity [0-9.]+ \| [0-9,]+ tokens" "$R" -m tinyllama_jax.evaluate --workdir="$J/runs/mine" \
  --data="$J/raw/held_out.jsonl" --seq_len=128 --batch_size=2
step sweep "^$V/bin/python -m tinyllama_jax.train --config=" "$R" -m tinyllama_jax.sweep --config=configs/tiny.py \
  --sweep=configs/sweeps/tiny_lr.py --workdir="$J/sweep" --launcher=print

echo "journey: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
