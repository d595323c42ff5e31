"""Scaling table from `python -m bench` JSON files run on 1, 2, 4, ... devices.

    python -m bench.scaling step_1x.json step_2x.json step_4x.json \
        [--baseline=base] [--tokens=22e9] [--json=scaling.json]

Per variant and device count: tokens/s per device, its share of the one-device figure (the
baseline variant of the file with the fewest devices), MFU, peak memory, and the wall-clock a
run of --tokens would take on that many devices at that speed (TinyLlama: 22B tokens, 32 hours
on 8 A100s, is the yardstick the README quotes).
"""

import argparse
import json
import sys


def rows(reports, baseline):
  results = [r for rep in reports for r in rep["results"]
             if r.get("kind") == "jax" and r.get("tokens_per_s_per_device")]
  if not results:
    raise ValueError("no successful JAX variant in the given files")
  n_min = min(r["n_devices"] for r in results)
  base = [r for r in results if r["n_devices"] == n_min and r["name"] == baseline]
  if not base:
    raise ValueError(f"no variant named {baseline!r} on {n_min} device(s): pass --baseline")
  ref = base[0]["tokens_per_s_per_device"]
  return [{"name": r["name"], "n_devices": r["n_devices"], "mesh": r["mesh"],
           "tokens_per_s_per_device": r["tokens_per_s_per_device"],
           "tokens_per_s": r["tokens_per_s_per_device"] * r["n_devices"],
           "efficiency": r["tokens_per_s_per_device"] / ref, "mfu": r.get("mfu"),
           "peak_memory_gib": r.get("peak_memory_gib"), "step_time_s": r.get("step_time_s")}
          for r in sorted(results, key=lambda r: (r["n_devices"], r["name"] != baseline))]


def table(rows_, tokens):
  head = (f"{'variant':<18}{'devices':>8}{'mesh':>16}{'tok/s/dev':>11}{'of 1 dev':>9}{'MFU':>7}"
          f"{'peak GiB':>9}{f'{tokens / 1e9:.0f}B tokens':>14}")
  out = [head, "-" * len(head)]
  for r in rows_:
    mesh = "x".join(f"{k[0]}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
    hours = tokens / r["tokens_per_s"] / 3600
    out.append(f"{r['name']:<18}{r['n_devices']:>8}{mesh:>16}"
               f"{r['tokens_per_s_per_device']:>11,.0f}{r['efficiency']:>9.1%}"
               f"{(r['mfu'] or 0):>7.1%}{(r['peak_memory_gib'] or 0):>9.1f}"
               f"{hours:>11.1f} h")
  return "\n".join(out)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("files", nargs="+")
  p.add_argument("--baseline", default="base")
  p.add_argument("--tokens", type=float, default=22e9)
  p.add_argument("--json", default="")
  args = p.parse_args()
  reports = []
  try:
    for f in args.files:
      try:
        with open(f) as fh:
          reports.append(json.load(fh))
      except ValueError as e:
        raise ValueError(f"{f} is not a benchmark's JSON ({e})") from e
    r = rows(reports, args.baseline)
  except (OSError, ValueError) as e:  # a missing file, bad JSON, no such baseline: one line
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(table(r, args.tokens))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"tokens": args.tokens, "rows": r,
                 "sources": [{"file": f, "commit": rep.get("commit"), "date": rep.get("date")}
                             for f, rep in zip(args.files, reports)]}, fh, indent=1)


if __name__ == "__main__":
  main()
