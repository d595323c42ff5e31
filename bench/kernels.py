"""Kernel benchmark: every fused op and backend at TinyLlama shapes; prints a table, writes JSON.

  python -m bench.kernels [--out bench/results/kernels-DATE.json] [--quick]

Times are loop-timed: after warm-up, `inner` calls are enqueued and one block_until_ready ends the
loop; the figure is the median over `reps` loops of (loop time / inner). Forward + backward is one
jitted vjp. Throughput is against fixed H200 ceilings (bf16 matmul 750 TFLOP/s and copy 4.2 TB/s,
as measured on that machine); the run measures both again and records them beside.
--quick runs tiny shapes (on CPU: Pallas interpreted) to check the script, not to time anything.
"""

import argparse
import platform
import statistics
import sys
import time
import traceback

import numpy as np

import jax
import jax.numpy as jnp

from tinyllama_jax import kernels
from tinyllama_jax.data import formats
from tinyllama_jax.kernels import cross_entropy as ce
import bench as bench_lib  # `bench` below is the Bench in hand
from tinyllama_jax.kernels import flash_attention as fa

CEIL_FLOPS = 750e12
CEIL_BYTES = 4.2e12


def loop_time_ms(fn, args, reps=5, inner=10):
  out = fn(*args)
  jax.block_until_ready(out)
  jax.block_until_ready(fn(*args))
  per_call = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) / inner)
  return statistics.median(per_call) * 1e3


def _fwd_bwd(fn):
  """Forward + backward as one jit, returning the forward's output too.

  The output is returned because a training step always consumes it: without that, XLA drops a
  forward the backward does not need (SwiGLU, RoPE) and "fwd+bwd" times only the backward.
  The cotangent is an argument: closed over, XLA would constant-fold transposes of it.
  """
  def step(cot, *a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(cot)
  return jax.jit(step)


class Bench:
  def __init__(self, reps, inner, on_gpu, out_path):
    self.reps, self.inner, self.on_gpu, self.out_path = reps, inner, on_gpu, out_path
    self.rows = []
    self.meta = {}

  def run(self, op, shape, impl, fn, args, cot, *, flops=None, bytes_=None, memory=False,
          gpu_only=False, extra=None):
    """Times fn(*args) forward and forward+backward; flops/bytes_ = (forward, forward+backward)."""
    row = dict(op=op, shape=shape, impl=impl, **(extra or {}))
    if gpu_only and not self.on_gpu:
      row["skipped"] = "needs a GPU"
      print(f"SKIPPED {op} {impl}: needs a GPU", flush=True)
      self.rows.append(row)
      return row
    try:
      fwd = jax.jit(fn)
      fb = _fwd_bwd(fn)
      row["fwd_ms"] = loop_time_ms(fwd, args, self.reps, self.inner)
      row["fwd_bwd_ms"] = loop_time_ms(fb, (cot,) + tuple(args), self.reps, self.inner)
      for key, work, ceil, unit in (("flops", flops, CEIL_FLOPS, "tflops"),
                                    ("bytes", bytes_, CEIL_BYTES, "gbs")):
        if work is None:
          continue
        for part, w in zip(("fwd", "fwd_bwd"), work):
          rate = w / (row[f"{part}_ms"] * 1e-3)
          row[f"{part}_{unit}"] = rate / (1e12 if unit == "tflops" else 1e9)
          row[f"{part}_pct_ceiling"] = 100 * rate / ceil
      if memory:
        for part, f, a in (("fwd", fwd, args), ("fwd_bwd", fb, (cot,) + tuple(args))):
          stats = f.lower(*a).compile().memory_analysis()
          row[f"{part}_temp_gib"] = stats.temp_size_in_bytes / 2**30
    except Exception as e:  # one failing backend must not hide the others' numbers
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      traceback.print_exc()
    self.rows.append(row)
    self.print_row(row)
    self.save()
    return row

  def print_row(self, r):
    def f(k, fmt="{:.3f}"):
      return fmt.format(r[k]) if k in r else "-"
    rate = (f"{f('fwd_tflops', '{:.0f}')}/{f('fwd_bwd_tflops', '{:.0f}')} TFLOP/s"
            if "fwd_tflops" in r else f"{f('fwd_gbs', '{:.0f}')}/{f('fwd_bwd_gbs', '{:.0f}')} GB/s")
    pct = f"{f('fwd_pct_ceiling', '{:.0f}')}%/{f('fwd_bwd_pct_ceiling', '{:.0f}')}%"
    mem = f" temp {f('fwd_bwd_temp_gib', '{:.2f}')} GiB" if "fwd_bwd_temp_gib" in r else ""
    err = f"  ERROR {r['error']}" if "error" in r else ""
    print(f"{r['op']:<13} {r['shape']:<28} {r['impl']:<18} fwd {f('fwd_ms'):>8} ms  "
          f"fwd+bwd {f('fwd_bwd_ms'):>8} ms  {rate:<24} {pct:<10}{mem}{err}", flush=True)

  def relate(self):
    """Speedups against the XLA and cuDNN rows of the same op and shape."""
    for r in self.rows:
      for base in ("xla", "cudnn", "cudnn-nomask"):
        b = next((x for x in self.rows if x["op"] == r["op"] and x["shape"] == r["shape"]
                  and x["impl"] == base and "fwd_ms" in x), None)
        if b is None or "fwd_ms" not in r or b is r:
          continue
        r[f"fwd_speedup_vs_{base}"] = b["fwd_ms"] / r["fwd_ms"]
        r[f"fwd_bwd_speedup_vs_{base}"] = b["fwd_bwd_ms"] / r["fwd_bwd_ms"]

  def save(self):
    formats.write_json_atomic(self.out_path, dict(meta=self.meta, results=self.rows))


def _documents(rng, B, T, mean_len):
  """Packed rows of documents with exponential lengths (>= 1), ids 1, 2, ... per row."""
  rows = []
  for _ in range(B):
    lengths = []
    while sum(lengths) < T:
      lengths.append(max(1, int(rng.exponential(mean_len))))
    rows.append(np.repeat(np.arange(1, len(lengths) + 1), lengths)[:T])
  return jnp.asarray(np.stack(rows), jnp.int32)


def bench_attention(bench, rng, B, T, H, K, D, flash_configs):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (B, T, H, D), jnp.bfloat16)
  k = jax.random.normal(ks[1], (B, T, K, D), jnp.bfloat16)
  v = jax.random.normal(ks[2], (B, T, K, D), jnp.bfloat16)
  do = jax.random.normal(ks[3], (B, T, H, D), jnp.bfloat16)
  causal_flops = 4 * B * H * T * T * D / 2
  flops = (causal_flops, 3.5 * causal_flops)  # FlashAttention-2 convention: bwd = 2.5 fwd
  shape = f"B{B} T{T} H{H}/{K} d{D}"
  xla, cudnn = kernels.get("attention", "xla"), kernels.get("attention", "cudnn")
  for impl, fn in (("xla", xla), ("cudnn", cudnn)):
    bench.run("attention", shape, impl, lambda q, k, v, fn=fn: fn(q, k, v, None, causal=True),
              (q, k, v), do, flops=flops, gpu_only=impl == "cudnn")
  best = None
  for name, cfg in flash_configs:
    r = bench.run("attention", shape, f"pallas{name}",
                  lambda q, k, v, cfg=cfg: fa.flash_attention(q, k, v, None, causal=True,
                                                              config=cfg),
                  (q, k, v), do, flops=flops, extra=dict(config=repr(cfg)))
    if "fwd_bwd_ms" in r and (best is None or r["fwd_bwd_ms"] < best[1]["fwd_bwd_ms"]):
      best = (cfg, r)

  seg = _documents(rng, B, T, mean_len=T / 4)
  n_docs = int(sum(len(np.unique(r)) for r in np.asarray(seg)))
  cfg = best[0] if best else fa.default_config(T)
  bq, bk = cfg.block_q, cfg.block_k
  T_pad = -(-T // max(bq, bk)) * max(bq, bk)
  lo, hi, _, _ = fa._block_ranges(jnp.pad(seg, [(0, 0), (0, T_pad - T)], mode="edge"), B, T_pad,
                                  bq, bk, True)
  causal_blocks = sum(min(T_pad // bk, -(-(i + 1) * bq // bk)) for i in range(T_pad // bq))
  live_frac = float(jnp.sum(hi - lo)) / (B * causal_blocks)  # of the causal-only visits
  extra = dict(documents=n_docs, mean_doc_len=B * T / n_docs)
  shape_s = shape + " docs"
  bench.run("attention", shape_s, "xla", lambda q, k, v: xla(q, k, v, seg, causal=True),
            (q, k, v), do, flops=flops, extra=extra)
  bench.run("attention", shape_s, "cudnn-nomask", lambda q, k, v: cudnn(q, k, v, None, causal=True),
            (q, k, v), do, flops=flops, gpu_only=True, extra=extra)
  bench.run("attention", shape_s, "pallas", lambda q, k, v: fa.flash_attention(
      q, k, v, seg, causal=True, config=cfg), (q, k, v), do, flops=flops,
            extra=dict(extra, config=repr(cfg), fwd_blocks_visited_vs_causal=live_frac))
  return cfg


def bench_rows(bench, N, Dm, F, T, H, K, Dh):
  keys = jax.random.split(jax.random.key(1), 6)
  bf = jnp.bfloat16
  x = jax.random.normal(keys[0], (N, Dm), bf)
  delta = jax.random.normal(keys[1], (N, Dm), bf)
  w = jnp.ones((Dm,), jnp.float32)
  xb = x.size * 2
  for impl in ("xla", "pallas"):
    fn = kernels.get("rms_norm", impl)
    bench.run("rms_norm", f"{N}x{Dm}", impl, lambda x, w, fn=fn: fn(x, w, 1e-5), (x, w), x,
              bytes_=(2 * xb, 5 * xb))
  for impl in ("xla", "pallas"):
    fn = kernels.get("add_rms_norm", impl)
    bench.run("add_rms_norm", f"{N}x{Dm}", impl, lambda x, d, w, fn=fn: fn(x, d, w, 1e-5),
              (x, delta, w), (x, x), bytes_=(4 * xb, 8 * xb))

  B = N // T
  q = jax.random.normal(keys[2], (B, T, H, Dh), bf)
  k = jax.random.normal(keys[3], (B, T, K, Dh), bf)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  qkb = (q.size + k.size) * 2
  for impl in kernels.backends("rope_qk"):
    fn = kernels.get("rope_qk", impl)
    bench.run("rope_qk", f"B{B} T{T} H{H}/{K} d{Dh}", impl,
              lambda q, k, fn=fn: fn(q, k, pos, 10000.0), (q, k), (q, k),
              bytes_=(2 * qkb, 4 * qkb))

  g = jax.random.normal(keys[4], (N, F), bf)
  u = jax.random.normal(keys[5], (N, F), bf)
  gb = g.size * 2
  for impl in kernels.backends("swiglu"):
    fn = kernels.get("swiglu", impl)
    bench.run("swiglu", f"{N}x{F}", impl, fn, (g, u), g, bytes_=(3 * gb, 8 * gb))


def bench_cross_entropy(bench, N, Dm, V, chunks):
  kx, kw, kt = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, (N, Dm), jnp.bfloat16)
  w = jax.random.normal(kw, (Dm, V), jnp.float32) * 0.02
  t = jax.random.randint(kt, (N,), 0, V)
  cot = jnp.ones((N,), jnp.float32) / N
  mm = 2 * N * Dm * V
  bench.run("cross_entropy", f"N{N} d{Dm} V{V}", "xla",
            lambda x, w: ce.cross_entropy_ref(x, w, t), (x, w), cot, flops=(mm, 3 * mm),
            memory=True, extra=dict(flops_note="model FLOPs: 1 matmul fwd, 3 fwd+bwd"))
  for c in chunks:
    bench.run("cross_entropy", f"N{N} d{Dm} V{V}", f"chunked{c}",
              lambda x, w, c=c: ce.cross_entropy_chunked(x, w, t, chunk=c), (x, w), cot,
              flops=(mm, 3 * mm), memory=True,
              extra=dict(flops_note="model FLOPs; the chunked backward recomputes logits (4 matmuls)"))


def measure_ceilings(bench):
  a = jax.random.normal(jax.random.key(3), (8192, 8192), jnp.bfloat16)
  mm = jax.jit(lambda a: a @ a)
  big = jnp.ones((1 << 28,), jnp.float32)
  copy = jax.jit(lambda x: x + 1)
  bench.meta["measured_matmul_tflops"] = 2 * 8192**3 / (loop_time_ms(mm, (a,), 5, 10) * 1e-3) / 1e12
  bench.meta["measured_copy_tbs"] = 2 * big.size * 4 / (loop_time_ms(copy, (big,), 5, 10) * 1e-3) / 1e12


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="", help="JSON path ('' = bench/results/<date>-<card>-<commit>-"
                 "kernels.json)")
  p.add_argument("--quick", action="store_true", help="tiny shapes: checks the script runs")
  p.add_argument("--only", default="", help="comma list of: attention,rows,cross_entropy")
  args = p.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.quick:
    print("kernels benchmark: no GPU backend; run it on the GPU machine or pass --quick",
          file=sys.stderr)
    return 2
  args.out = args.out or bench_lib.result_path(
      "kernels.json", [d.device_kind for d in jax.devices()])
  bench = Bench(reps=2 if args.quick else 5, inner=1 if args.quick else 10, on_gpu=on_gpu,
                out_path=args.out)
  dev = jax.devices()[0]
  bench.meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                    python=platform.python_version(), git_commit=bench_lib.commit(),
                    date=bench_lib.now_utc(),
                    ceilings=dict(bf16_matmul_tflops=CEIL_FLOPS / 1e12,
                                  copy_tbs=CEIL_BYTES / 1e12),
                    timing="median over reps of (loop of inner calls, one block) / inner",
                    reps=bench.reps, inner=bench.inner, quick=args.quick)
  only = set(args.only.split(",")) - {""}
  rng = np.random.default_rng(0)
  if on_gpu:
    measure_ceilings(bench)
  if args.quick:
    shapes = dict(B=1, T=64, H=4, K=1, D=64, N=128, Dm=64, F=128, V=256)
    configs = [("", fa.default_config(64))]
    chunks = [32]
  else:
    shapes = dict(B=8, T=2048, H=32, K=4, D=64, N=8 * 2048, Dm=2048, F=5632, V=32000)
    base = fa.FlashConfig()
    configs = [
        ("", base),
        ("-q128k128", fa.FlashConfig(block_q=128, block_k=128)),
        ("-s3-bwd32x64", fa.FlashConfig(num_stages=3, block_q_bwd=32)),
    ]
    chunks = [2048, 4096]
  s = shapes
  # Attention first, then cross-entropy: the results a short run must not lose.
  if not only or "attention" in only:
    cfg = bench_attention(bench, rng, s["B"], s["T"], s["H"], s["K"], s["D"], configs)
    bench.meta["best_flash_config"] = repr(cfg)
    if not args.quick:  # head dim 128 at the same FLOPs: 16 q heads, 2 kv heads
      bench_attention(bench, rng, s["B"], s["T"], 16, 2, 128, [("", cfg)])
  if not only or "cross_entropy" in only:
    bench_cross_entropy(bench, s["N"], s["Dm"], s["V"], chunks)
  if not only or "rows" in only:
    bench_rows(bench, s["N"], s["Dm"], s["F"], s["T"], s["H"], s["K"], s["D"])
  bench.relate()
  bench.save()
  errors = [r for r in bench.rows if "error" in r]
  skipped = [r for r in bench.rows if "skipped" in r]
  print(f"\nwrote {args.out}: {len(bench.rows)} rows, {len(errors)} errors, "
        f"{len(skipped)} skipped")
  for r in bench.rows:
    sp = {k: round(v, 2) for k, v in r.items() if "speedup" in k}
    if sp:
      print(f"  {r['op']:<13} {r['shape']:<28} {r['impl']:<18} {sp}")
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
