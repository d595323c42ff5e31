"""Batch-1 decode: do the fused Pallas GEMVs (kernels/decode_gemv.py) beat XLA's GEMMs?

    python -m bench.decode_gemv --out=gemv.json       # one H200: ~1-2 minutes (--budget_s)
    python -m bench.decode_gemv --smoke --out=/tmp/g.json  # CPU, interpreted: checks the script
    python -m bench.decode_gemv --rows=1 --configs=16:512:4:3,32:256:4:3 --out=g.json  # a sweep

At the 1b shapes (D 2048, qkv N 2560, ffn F 5632), M = 1 and 16 rows, bf16, per fused op:
  xla        the model's formula, jitted: rms_norm then einsum (qkv, gate/up + swiglu), einsum +
             residual (o-proj, down); XLA's split-K GEMM and its finalizer, the norm's kernel;
  ours       the Pallas kernel, one row per block config of a small sweep (a config that fails
             to compile or run is a row with its error).
Timing: one jit holds `calls` calls (>= 16), each with its own x and its own weight copy (no
two calls share a weight: XLA's DotMerger would fold two dots sharing an operand into one; and
>= 150 MB of copies, so the H200's 50 MB L2 holds none from one use to the next; nor can XLA
share a norm between calls). After warm-up, `reps` (50) timed loops each enqueue `inner` (4)
runs of that jit and block_until_ready once; us per call = the loops' median / inner / calls.
Launch gaps between kernels count, as in a decode step. GB/s = weight bytes / time.
max_rel_err = max |y - ref| / max |ref| against the fp32 reference on the same bf16 inputs.
"""

import argparse
import math
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

import bench
from tinyllama_jax.data import formats
from tinyllama_jax.kernels import decode_gemv, rms_norm, swiglu

EPS = 1e-5
L2_DEFEAT_BYTES = 150e6  # 3x the H200's L2
N_LAYERS = 22

# (name, op, K, N): N counts the packed gate/up's 2F columns.
SHAPES = [("qkv", "norm_matmul", 2048, 2560), ("o-proj", "matmul_add", 2048, 2048),
          ("gate_up", "norm_matmul_swiglu", 2048, 2 * 5632), ("down", "matmul_add", 5632, 2048)]
SMOKE_SHAPES = [("qkv", "norm_matmul", 256, 128), ("o-proj", "matmul_add", 256, 128),
                ("gate_up", "norm_matmul_swiglu", 256, 192)]
# Ordered by priority (--budget_s may cut the tail). The M = 1 path keeps a [block_k, block_n]
# fp32 accumulator per weight strip (two for gate/up): 8 warps halve its registers a thread.
SWEEP = [dict(block_n=16, block_k=512, num_warps=4, num_stages=3),  # the module's default
         dict(block_n=16, block_k=512, num_warps=8, num_stages=3),
         dict(block_n=16, block_k=256, num_warps=4, num_stages=4),
         dict(block_n=32, block_k=256, num_warps=4, num_stages=3),
         dict(block_n=32, block_k=512, num_warps=8, num_stages=3),
         dict(block_n=64, block_k=128, num_warps=4, num_stages=4)]
# The second config tiles none of the smoke shapes: an error row, not a crash.
SMOKE_SWEEP = [dict(block_n=16, block_k=64, num_warps=4, num_stages=2),
               dict(block_n=256, block_k=64, num_warps=4, num_stages=2)]


def xla_fn(op):
  """The model's bf16 formula of the fused op (model.block)."""
  if op == "norm_matmul":
    return lambda x, g, w: jnp.einsum("md,dn->mn", rms_norm.rms_norm_ref(x, g, EPS), w)
  if op == "matmul_add":
    return lambda a, w, r: r + jnp.einsum("mk,kn->mn", a, w)
  return lambda x, g, w: swiglu.swiglu_packed_ref(
      jnp.einsum("md,df->mf", rms_norm.rms_norm_ref(x, g, EPS), w))


def ref_fn(op):
  if op == "matmul_add":
    return decode_gemv.matmul_add_ref
  ref = getattr(decode_gemv, f"{op}_ref")
  return lambda x, g, w: ref(x, g, w, EPS)


def kernel_fn(op, cfg):
  fn = getattr(decode_gemv, op)
  if op == "matmul_add":
    return lambda a, w, r: fn(a, w, r, **cfg)
  return lambda x, g, w: fn(x, g, w, EPS, **cfg)


def make_inputs(op, M, K, N, calls, seed=0):
  """Per call, the op's arguments: an x or a, a g or r, and a weight, each its own."""
  keys = iter(jax.random.split(jax.random.key(seed), 3 * calls))
  bf = jnp.bfloat16
  ws = [(jax.random.normal(next(keys), (K, N), jnp.float32) * K ** -0.5).astype(bf)
        for _ in range(calls)]
  out_n = N // 2 if op == "norm_matmul_swiglu" else N
  args = []
  for i in range(calls):
    x = jax.random.normal(next(keys), (M, K), bf)
    if op == "matmul_add":
      args.append((x, ws[i], jax.random.normal(next(keys), (M, out_n), bf)))
    else:
      g = (1 + 0.1 * jax.random.normal(next(keys), (K,))).astype(bf)
      args.append((x, g, ws[i]))
  return args


def time_calls(fn, args, reps, inner):
  """us per call of fn over the argument sets, all in one jit (see the module docstring)."""
  flat, n = [a for call in args for a in call], len(args[0])
  one = jax.jit(fn)  # traced and lowered once, however many calls the outer jit holds
  many = jax.jit(lambda *f: tuple(one(*f[i:i + n]) for i in range(0, len(f), n)))
  jax.block_until_ready(many(*flat))
  jax.block_until_ready(many(*flat))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):  # enqueued back to back: the host's dispatch and sync amortised
      out = many(*flat)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times) / len(args) * 1e6


def max_rel_err(y, ref):
  y, ref = y.astype(jnp.float32), ref.astype(jnp.float32)
  return float(jnp.max(jnp.abs(y - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def bench_shape(name, op, K, N, M, sweep, calls, reps, inner, deadline, smoke):
  weight_bytes = K * N * 2
  if not smoke:
    calls = max(calls, math.ceil(L2_DEFEAT_BYTES / weight_bytes))
  args = make_inputs(op, M, K, N, calls)
  ref = jax.jit(ref_fn(op))(*args[0])
  base = dict(shape=name, op=op, m=M, k=K, n=N, weight_mb=weight_bytes / 1e6, calls=calls)
  rows = []
  for impl, cfg in [("xla", None)] + [("ours", c) for c in sweep]:
    row = dict(base, impl=impl, config=cfg, us=None)
    if time.perf_counter() > deadline:
      rows.append(dict(row, note="skipped: --budget_s spent"))
      continue
    try:
      fn = xla_fn(op) if cfg is None else kernel_fn(op, cfg)
      row["max_rel_err"] = max_rel_err(jax.jit(fn)(*args[0]), ref)
      row["us"] = time_calls(fn, args, reps, inner)
      row["gbs"] = weight_bytes / (row["us"] * 1e-6) / 1e9
    except Exception as e:  # a config the kernel or Triton refuses is a row, not a crash
      row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else \
          traceback.format_exc().splitlines()[-1][:200]
    rows.append(row)
  xla_us = rows[0]["us"]
  for r in rows:
    r["vs_xla"] = xla_us / r["us"] if xla_us and r["us"] else None
  return rows


def layer_summary(rows, M):
  """A layer's fused ops (the four, but for --smoke), XLA against our best config each (us),
  and x22 layers (ms)."""
  xla = ours = 0.0
  names = list(dict.fromkeys(r["shape"] for r in rows))
  for name in names:
    mine = [r for r in rows if r["shape"] == name and r["m"] == M and r["us"]]
    x = [r["us"] for r in mine if r["impl"] == "xla"]
    o = [r["us"] for r in mine if r["impl"] == "ours"]
    if not x or not o:
      return None
    xla, ours = xla + x[0], ours + min(o)
  return dict(m=M, ops=names, xla_layer_us=xla, ours_layer_us=ours,
              xla_token_ms=xla * N_LAYERS / 1e3, ours_token_ms=ours * N_LAYERS / 1e3)


def print_table(rows, summaries):
  print(f"{'shape':<9}{'M':>3}  {'impl':<5}{'config':<34}{'us':>8}{'GB/s':>7}{'vs xla':>7}"
        f"{'err':>9}  note")
  for r in rows:
    cfg = "-" if r["config"] is None else "n{block_n} k{block_k} w{num_warps} s{num_stages}" \
        .format(**r["config"])
    f = lambda k, fmt: "-" if r.get(k) is None else fmt.format(r[k])
    print(f"{r['shape']:<9}{r['m']:>3}  {r['impl']:<5}{cfg:<34}{f('us', '{:.1f}'):>8}"
          f"{f('gbs', '{:.0f}'):>7}{f('vs_xla', '{:.2f}'):>7}{f('max_rel_err', '{:.1e}'):>9}"
          f"  {r.get('note', '')[:80]}")
  for s in summaries:
    print(f"M={s['m']}: a layer's {'+'.join(s['ops'])} {s['xla_layer_us']:.1f} us (xla) -> "
          f"{s['ours_layer_us']:.1f} us (ours, best configs); x{N_LAYERS}: "
          f"{s['xla_token_ms']:.3f} -> {s['ours_token_ms']:.3f} ms a token")


def parse_configs(text):
  """'16:512:4:3,32:256:4:3' (block_n:block_k:num_warps:num_stages each) -> config dicts."""
  keys = ("block_n", "block_k", "num_warps", "num_stages")
  try:
    configs = [dict(zip(keys, map(int, c.split(":")), strict=True)) for c in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--configs {text!r}: want n:k:warps:stages[,...]") from None
  return configs


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted (CPU check)")
  ap.add_argument("--budget_s", type=float, default=90.0, help="later rows are skipped rows")
  ap.add_argument("--configs", type=parse_configs, default=None,
                  help="the kernel configs to time instead of SWEEP, n:k:warps:stages[,...]")
  ap.add_argument("--rows", default="1,16", help="the M values (batch rows) to time")
  ap.add_argument("--reps", type=int, default=50, help="timed loops; the median is kept")
  ap.add_argument("--inner", type=int, default=4, help="runs of the jit enqueued per loop")
  ap.add_argument("--calls", type=int, default=16,
                  help="op calls (and weight copies) per jit; more where 150 MB needs more")
  args = ap.parse_args(argv)
  if args.smoke:
    shapes, sweep, calls, reps, inner = SMOKE_SHAPES, SMOKE_SWEEP, 2, 2, 1
  else:
    shapes, sweep, calls, reps, inner = SHAPES, SWEEP, args.calls, args.reps, args.inner
  sweep = args.configs or sweep
  deadline = time.perf_counter() + args.budget_s
  rows = []
  ms = [int(m) for m in args.rows.split(",")]
  for M in ms:
    for name, op, K, N in shapes:
      try:
        rows += bench_shape(name, op, K, N, M, sweep, calls, reps, inner, deadline,
                            args.smoke)
      except Exception:  # inputs or the reference failing: the shape's one row says why
        rows.append(dict(shape=name, op=op, m=M, impl="-", config=None, us=None,
                         note=traceback.format_exc().splitlines()[-1][:200]))
  summaries = [s for s in (layer_summary(rows, M) for M in ms) if s]
  print_table(rows, summaries)
  formats.write_json_atomic(args.out, {
      "rows": rows, "layer": summaries, "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version(),
      "commit": bench.commit(), "date": bench.now_utc(), "smoke": args.smoke})
  return 0


if __name__ == "__main__":
  sys.exit(main())
