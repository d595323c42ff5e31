"""The fp8 loss-parity result from two finished runs (bench/run_fp8_gpu.sh trains them: the same
config, seed, data and tokenizer, model.matmul_dtype bf16 and fp8).

    python3 -m bench.fp8_parity --bf16=WORKDIR --fp8=WORKDIR --out=fp8-parity.json

Prints the held-out (eval) loss of each at its last eval and at every eval step, with the ratio
fp8 / bf16, and writes both runs' train and eval curves and their step rates to JSON.
"""

import argparse
import sys

from tinyllama_jax.data import formats
from tinyllama_jax.training import metrics


def curves(workdir):
  series, _ = metrics.read_metrics(workdir)
  return {name: series.get(name, []) for name in ("train/loss", "eval/loss", "perf/tokens_per_s")}


def main(argv):
  p = argparse.ArgumentParser(prog="python3 -m bench.fp8_parity", description=__doc__)
  p.add_argument("--bf16", required=True)
  p.add_argument("--fp8", required=True)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  runs = {name: curves(workdir) for name, workdir in (("bf16", args.bf16), ("fp8", args.fp8))}
  evals = {name: dict(run["eval/loss"]) for name, run in runs.items()}
  shared = sorted(set(evals["bf16"]) & set(evals["fp8"]))
  if not shared:
    print(f"no eval step in both runs (bf16: {sorted(evals['bf16'])}, fp8: "
          f"{sorted(evals['fp8'])}): see the runs' logs")
    return 1
  rows = [{"step": s, "bf16": evals["bf16"][s], "fp8": evals["fp8"][s],
           "ratio": evals["fp8"][s] / evals["bf16"][s]} for s in shared]
  for r in rows:
    print(f"step {r['step']:>5}  held-out loss bf16 {r['bf16']:.4f}  fp8 {r['fp8']:.4f}  "
          f"fp8/bf16 {r['ratio']:.4f}")
  final = rows[-1]
  print(f"final (step {final['step']}): bf16 {final['bf16']:.4f}, fp8 {final['fp8']:.4f}, "
        f"ratio {final['ratio']:.4f} ({100 * (final['ratio'] - 1):+.2f}%)")
  if args.out:
    formats.write_json_atomic(args.out, {"final": final, "evals": rows, "runs": runs,
                                         "workdirs": {"bf16": args.bf16, "fp8": args.fp8}})
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
