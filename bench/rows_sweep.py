"""Row-op sweep: rms_norm and add_rms_norm, XLA against Pallas over (rows per program, warps).

  python -m bench.rows_sweep [--out bench/results/rows_sweep.json] [--quick]
                                           [--budget SECONDS]

Times and bytes as bench/kernels.py (its `loop_time_ms` and `_fwd_bwd`; the same byte counts), but the
percentages are of the copy ceiling measured in this run (1 GiB fp32 `x + 1`, read + write). The
forward sweeps vary the forward kernel; the fwd+bwd sweeps vary the backward kernel with the
forward at its default; the order (XLA, defaults and old kernels of every op first, then the
forward sweeps, then the backward sweeps) keeps the most wanted rows in a short run.
`bwd_ms_est` = fwd+bwd - the forward of that config (the default's, in the backward sweeps): the
backward's share. Each config is its own try/except (a failure is a row with `error`); past
`--budget` seconds no new config starts, so the table and JSON always come out.
--quick: tiny shapes (on CPU: Pallas interpreted) to check the script, not to time anything.
"""

import argparse
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from bench.kernels import _fwd_bwd, loop_time_ms
import bench
from tinyllama_jax.data import formats
from tinyllama_jax.kernels import rms_norm as rn

RC = rn.RowConfig
# The kernels as they were before the tunables (8-row programs, 4 warps, one backward block per
# program): the baseline of "what changed".
OLD_ROW = RC(block_rows=8, num_warps=4, bwd_block_rows=8, bwd_steps=1, bwd_num_warps=4)
assert OLD_ROW.steps == 1

# (label, config). Forward: rows x warps around ~16-64 fp32 elements a thread at d 2048.
ROW_FWD = [("r1w8", RC(block_rows=1, num_warps=8)), ("r2w4", RC(block_rows=2, num_warps=4)),
           ("r2w8", RC(block_rows=2, num_warps=8)), ("r4w4", RC(block_rows=4, num_warps=4)),
           ("r4w16", RC(block_rows=4, num_warps=16)), ("r8w8", RC(block_rows=8, num_warps=8)),
           ("r8w16", RC(block_rows=8, num_warps=16)),
           # Looping programs: w loaded once per 32 rows, a grid of 512 programs.
           ("r4s8w8", RC(block_rows=4, steps=8, num_warps=8)),
           ("r2s16w8", RC(block_rows=2, steps=16, num_warps=8))]
# Backward: rows per step x steps x warps (x stages).
ROW_BWD = [("b2s16w4", RC(bwd_block_rows=2, bwd_steps=16, bwd_num_warps=4)),
           ("b2s16w8", RC(bwd_block_rows=2, bwd_steps=16, bwd_num_warps=8)),
           ("b4s8w16", RC(bwd_block_rows=4, bwd_steps=8, bwd_num_warps=16)),
           ("b4s8w8st1", RC(bwd_num_stages=1)), ("b4s8w8st3", RC(bwd_num_stages=3)),
           ("b8s8w16", RC(bwd_block_rows=8, bwd_steps=8, bwd_num_warps=16))]


class Sweep:
  def __init__(self, reps, inner, budget_s, out_path):
    self.reps, self.inner, self.out_path = reps, inner, out_path
    self.deadline = time.monotonic() + budget_s
    self.rows, self.meta = [], {}
    self.ceil_bps = None

  def run(self, op, impl, label, fn, args, cot, bytes_fwd, bytes_fb, parts=("fwd", "fwd_bwd"),
          config=None):
    row = dict(op=op, impl=impl, config=label, config_repr=repr(config) if config else None)
    if time.monotonic() > self.deadline:
      row["skipped"] = "time budget"
      self.rows.append(row)
      return row
    try:
      if "fwd" in parts:
        row["fwd_ms"] = loop_time_ms(jax.jit(fn), args, self.reps, self.inner)
      if "fwd_bwd" in parts:
        row["fwd_bwd_ms"] = loop_time_ms(_fwd_bwd(fn), (cot,) + tuple(args), self.reps, self.inner)
      for part, b in (("fwd", bytes_fwd), ("fwd_bwd", bytes_fb)):
        if f"{part}_ms" in row:
          row[f"{part}_gbs"] = b / (row[f"{part}_ms"] * 1e-3) / 1e9
          if self.ceil_bps:
            row[f"{part}_pct_ceiling"] = 100 * b / (row[f"{part}_ms"] * 1e-3) / self.ceil_bps
    except Exception as e:  # one failing config must not hide the others' numbers
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      traceback.print_exc()
    self.rows.append(row)
    print(_fmt(row), flush=True)
    self.save()
    return row

  def save(self):
    formats.write_json_atomic(self.out_path, dict(meta=self.meta, results=self.rows))


def _fmt(r):
  def f(k, fmt="{:.4f}"):
    return fmt.format(r[k]) if k in r else "-"
  tail = (f"  SKIPPED {r['skipped']}" if "skipped" in r else "") + (
      f"  ERROR {r['error']}" if "error" in r else "")
  return (f"{r['op']:<13} {r['impl']:<7} {r['config']:<10} "
          f"fwd {f('fwd_ms'):>7} ms {f('fwd_gbs', '{:.0f}'):>5} GB/s "
          f"{f('fwd_pct_ceiling', '{:.0f}'):>3}%"
          f" | fwd+bwd {f('fwd_bwd_ms'):>7} ms {f('fwd_bwd_gbs', '{:.0f}'):>5} GB/s "
          f"{f('fwd_bwd_pct_ceiling', '{:.0f}'):>3}% | bwd~ {f('bwd_ms_est'):>7} ms{tail}")


def measure_copy_ceiling(sweep, n_f32):
  big = jnp.ones((n_f32,), jnp.float32)
  t = loop_time_ms(jax.jit(lambda x: x + 1), (big,), 5, 10)
  sweep.ceil_bps = 2 * big.size * 4 / (t * 1e-3)
  sweep.meta["copy_ceiling_tbs"] = sweep.ceil_bps / 1e12
  sweep.meta["copy_ceiling_bytes"] = 2 * big.size * 4
  print(f"copy ceiling: {sweep.ceil_bps / 1e12:.3f} TB/s ({2 * big.size * 4 / 2**30:.2f} GiB "
        f"read + write in {t:.3f} ms)", flush=True)


def _with_bwd_est(fwd_row, fb_row):
  if "fwd_ms" in fwd_row and "fwd_bwd_ms" in fb_row:
    fb_row["bwd_ms_est"] = fb_row["fwd_bwd_ms"] - fwd_row["fwd_ms"]


def _norm_ops(N, Dm):
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (N, Dm), jnp.bfloat16)
  delta = jax.random.normal(keys[1], (N, Dm), jnp.bfloat16)
  w = jnp.ones((Dm,), jnp.float32)
  xb = x.size * 2
  # (op, args, cotangent, bytes fwd, bytes fwd+bwd (as bench/kernels.py's bench_rows), pallas, xla)
  return (("rms_norm", (x, w), x, 2 * xb, 5 * xb,
           lambda cfg: lambda x, w: rn.rms_norm_pallas(x, w, 1e-5, config=cfg),
           lambda x, w: rn.rms_norm_ref(x, w, 1e-5)),
          ("add_rms_norm", (x, delta, w), (x, x), 4 * xb, 8 * xb,
           lambda cfg: lambda x, d, w: rn.add_rms_norm_pallas(x, d, w, 1e-5, config=cfg),
           lambda x, d, w: rn.add_rms_norm_ref(x, d, w, 1e-5)))


def run_all(sweep, s, quick):
  norms = _norm_ops(s["N"], s["Dm"])
  # --quick: every third config and the last, enough to run each kind of kernel once.
  pick = (lambda cfgs: list(dict.fromkeys(cfgs[::3] + cfgs[-1:]))) if quick else list
  # 1. XLA, the defaults and the old kernels of every op: the rows a short run must not lose.
  for op, args, cot, bf, bfb, pallas, ref in norms:
    sweep.run(op, "xla", "-", ref, args, cot, bf, bfb)
    for label, cfg in (("default", rn.DEFAULT_CONFIG), ("old", OLD_ROW)):
      r = sweep.run(op, "pallas", label, pallas(cfg), args, cot, bf, bfb, config=cfg)
      _with_bwd_est(r, r)
  # 2. Forward sweeps.
  for op, args, cot, bf, bfb, pallas, ref in norms:
    for label, cfg in pick(ROW_FWD):
      sweep.run(op, "pallas", label, pallas(cfg), args, cot, bf, bfb, parts=("fwd",), config=cfg)
  # 3. Norm backward sweeps, the forward at its default.
  for op, args, cot, bf, bfb, pallas, ref in norms:
    default = next(r for r in sweep.rows if r["op"] == op and r["config"] == "default")
    for label, cfg in pick(ROW_BWD):
      r = sweep.run(op, "pallas", label, pallas(cfg), args, cot, bf, bfb, parts=("fwd_bwd",),
                    config=cfg)
      _with_bwd_est(default, r)


def best_rows(rows):
  """Per op and part, the fastest Pallas config and XLA's time beside it."""
  out = []
  for op in dict.fromkeys(r["op"] for r in rows):
    for part in ("fwd", "fwd_bwd"):
      key = f"{part}_ms"
      cands = [r for r in rows if r["op"] == op and r["impl"] == "pallas" and key in r]
      xla = next((r for r in rows if r["op"] == op and r["impl"] == "xla" and key in r), None)
      if not cands:
        continue
      b = min(cands, key=lambda r: r[key])
      out.append(dict(op=op, part=part, best=b["config"], config_repr=b["config_repr"], ms=b[key],
                      pct_ceiling=b.get(f"{part}_pct_ceiling"),
                      xla_ms=xla[key] if xla else None,
                      xla_pct_ceiling=xla.get(f"{part}_pct_ceiling") if xla else None))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="", help="JSON path ('' = bench/results/<date>-<card>-<commit>-"
                 "rows-sweep.json)")
  p.add_argument("--quick", action="store_true", help="tiny shapes: checks the script runs")
  p.add_argument("--budget", type=float, default=90.0,
                 help="seconds after which no new config starts")
  args = p.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.quick:
    print("rows sweep: no GPU backend; run it on the GPU machine or pass --quick", file=sys.stderr)
    return 2
  args.out = args.out or bench.result_path("rows-sweep.json", [d.device_kind for d in jax.devices()])
  sweep = Sweep(reps=2 if args.quick else 5, inner=1 if args.quick else 20,
                budget_s=args.budget, out_path=args.out)
  dev = jax.devices()[0]
  sweep.meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                    python=platform.python_version(), git_commit=bench.commit(),
                    date=bench.now_utc(),
                    timing="median over reps of (loop of inner calls, one block) / inner",
                    reps=sweep.reps, inner=sweep.inner, quick=args.quick,
                    row_default=repr(rn.DEFAULT_CONFIG))
  if args.quick:
    s = dict(N=48, Dm=64, copy=1 << 16)
  else:
    s = dict(N=8 * 2048, Dm=2048, copy=1 << 28)
  sweep.meta["shapes"] = s
  measure_copy_ceiling(sweep, s["copy"])
  run_all(sweep, s, args.quick)
  sweep.meta["best"] = best_rows(sweep.rows)
  sweep.save()

  print(f"\n=== rows sweep ({dev.device_kind}, copy ceiling "
        f"{sweep.meta['copy_ceiling_tbs']:.2f} TB/s; N {s['N']} x {s['Dm']} bf16) ===")
  for r in sweep.rows:
    print(_fmt(r))
  print("\nbest Pallas per op (ms, % of ceiling) vs XLA:")
  for b in sweep.meta["best"]:
    pct = lambda v: "-" if v is None else f"{v:.0f}%"
    xla = "-" if b["xla_ms"] is None else f"{b['xla_ms']:.4f}"
    print(f"  {b['op']:<13} {b['part']:<8} {b['best']:<10} {b['ms']:.4f} ms "
          f"{pct(b['pct_ceiling']):>4}"
          f"   xla {xla} ms {pct(b['xla_pct_ceiling']):>4}   {b['config_repr']}")
  errors = [r for r in sweep.rows if "error" in r]
  skipped = [r for r in sweep.rows if "skipped" in r]
  print(f"wrote {args.out}: {len(sweep.rows)} rows, {len(errors)} errors, {len(skipped)} skipped")
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
