"""The fp8 loss-parity result from finished runs: pairs of runs with the same config, seed, data
and tokenizer, model.matmul_dtype bf16 and fp8 (`python -m bench.gpu --parts=parity` trains them).

    python3 -m bench.fp8_parity --bf16=WORKDIR --fp8=WORKDIR --out=fp8-parity.json
    python3 -m bench.fp8_parity --root=DIR --seeds=0,1,2 --out=fp8-parity.json
        # DIR/seed<N>-bf16 and DIR/seed<N>-fp8 for each seed

Prints each pair's held-out (eval) loss at every shared eval step with the ratio fp8 / bf16 and
the paired difference fp8 - bf16; with several seeds, the mean and spread of the final
differences (one seed's difference alone cannot tell fp8 from the run-to-run noise). The JSON has
both runs' train and eval curves and step rates per seed.
"""

import argparse
import os
import statistics
import sys

from tinyllama_jax.data import formats
from tinyllama_jax.training import metrics


def curves(workdir):
  series, bad = metrics.read_metrics(workdir)
  if bad:
    print(f"{workdir}: {bad} unreadable metrics line(s) left out")
  return {name: series.get(name, []) for name in ("train/loss", "eval/loss", "perf/tokens_per_s")}


def pair(bf16_dir, fp8_dir):
  """{evals, final, runs, workdirs} of one seed's two runs; None without a shared eval step."""
  runs = {name: curves(workdir) for name, workdir in (("bf16", bf16_dir), ("fp8", fp8_dir))}
  evals = {name: dict(run["eval/loss"]) for name, run in runs.items()}
  shared = sorted(set(evals["bf16"]) & set(evals["fp8"]))
  if not shared:
    print(f"no eval step in both runs (bf16 {bf16_dir}: {sorted(evals['bf16'])}, fp8 {fp8_dir}: "
          f"{sorted(evals['fp8'])}): see the runs' logs")
    return None
  rows = [{"step": s, "bf16": evals["bf16"][s], "fp8": evals["fp8"][s],
           "ratio": evals["fp8"][s] / evals["bf16"][s],
           "difference": evals["fp8"][s] - evals["bf16"][s]} for s in shared]
  return {"evals": rows, "final": rows[-1], "runs": runs,
          "workdirs": {"bf16": bf16_dir, "fp8": fp8_dir}}


def spread(differences):
  """Mean and spread of the seeds' final fp8 - bf16 differences."""
  out = {"seeds": len(differences), "mean_difference": statistics.fmean(differences),
         "min_difference": min(differences), "max_difference": max(differences)}
  out["stdev_difference"] = statistics.stdev(differences) if len(differences) > 1 else None
  return out


def report(seed, result):
  for r in result["evals"]:
    print(f"seed {seed}  step {r['step']:>5}  held-out loss bf16 {r['bf16']:.4f}  "
          f"fp8 {r['fp8']:.4f}  fp8/bf16 {r['ratio']:.4f}  fp8-bf16 {r['difference']:+.4f}")
  final = result["final"]
  print(f"final (step {final['step']}): bf16 {final['bf16']:.4f}, fp8 {final['fp8']:.4f}, "
        f"ratio {final['ratio']:.4f} ({100 * (final['ratio'] - 1):+.2f}%)")


def parse(argv):
  p = argparse.ArgumentParser(prog="python3 -m bench.fp8_parity", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--bf16", default="", help="one pair: the bf16 run's workdir")
  p.add_argument("--fp8", default="", help="one pair: the fp8 run's workdir")
  p.add_argument("--root", default="", help="the pairs' folder: seed<N>-bf16, seed<N>-fp8")
  p.add_argument("--seeds", default="0", help="with --root: comma-separated seeds")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  one_pair = bool(args.bf16 and args.fp8)
  if (args.root and (args.bf16 or args.fp8)) or not (args.root or one_pair):
    raise ValueError("give --bf16=DIR --fp8=DIR (one pair) or --root=DIR --seeds=0,1 (a pair "
                     "a seed), not both")
  return args


def main(argv):
  args = parse(argv)
  if args.root:
    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    if not seeds or not all(s.isdigit() for s in seeds):
      raise ValueError(f"--seeds={args.seeds!r}: give non-negative integers, e.g. 0,1,2")
    pairs = {int(s): (os.path.join(args.root, f"seed{s}-bf16"),
                      os.path.join(args.root, f"seed{s}-fp8")) for s in seeds}
  else:
    pairs = {None: (args.bf16, args.fp8)}
  results = {}
  for seed, (bf16_dir, fp8_dir) in pairs.items():
    result = pair(bf16_dir, fp8_dir)
    if result is not None:
      results[seed] = result
      report(seed, result)
  if not results:
    return 1
  summary = spread([r["final"]["difference"] for r in results.values()])
  print(f"fp8 - bf16 at the final eval over {summary['seeds']} seed(s): mean "
        f"{summary['mean_difference']:+.4f}, from {summary['min_difference']:+.4f} to "
        f"{summary['max_difference']:+.4f}")
  missing = sorted(set(pairs) - set(results), key=str)
  if args.out:
    one = next(iter(results.values()))
    formats.write_json_atomic(args.out, {
        "final": one["final"], "evals": one["evals"], "runs": one["runs"],
        "workdirs": one["workdirs"], "seeds": {str(s): r for s, r in results.items()},
        "across_seeds": summary, "seeds_without_a_result": missing})
  return 0 if not missing else 1


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv[1:]))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
