"""Flash attention tile / launch sweep against cuDNN at TinyLlama's shape: a table and a JSON.

  python -m bench.attention_sweep [--out DIR/attention_sweep.json] [--quick]
      [--only name,name] [--deadline_s 150]

Shape: B=8, T=2048, 32 query / 4 kv heads, d 64, bf16, causal: every config without segment
ids, then the two best (fwd+bwd, among the correct ones) and the default with packed-document
ids (bench/kernels.py's generator, same seed); then d 128 with 16 / 2 heads: the two best and
the old tiles, without and with ids. Each row's
output and gradients are checked against XLA's attention in fp32 (relative L2, bf16 bound 2e-2),
taken from the timed fwd+bwd call's own outputs. Timing: bench/kernels.py's `_time` / `_fwd_bwd`.
Configs start in priority order; a row that would start after its phase's deadline is a
'skipped' row (d64 phases end --d128_reserve_s before --deadline_s, so d128 always gets time).
--quick: tiny shapes (on CPU: Pallas interpreted), checks the script, times nothing useful.
"""

import argparse
import json
import platform
import sys
import time
import traceback

import numpy as np

import jax
import jax.numpy as jnp

from tinyllama_jax import kernels
from tinyllama_jax.data import formats
from bench import kernels as kb
import bench
from tinyllama_jax.kernels import flash_attention as fa

TOL_BF16 = 2e-2
F = fa.FlashConfig

# Priority order: the new default, its controls, then the alternatives most likely to win.
CONFIGS = [
    ("default", F()),
    # The pre-change tiling (fwd 128x64, both bwd kernels 64x64, old launch order): isolates what
    # the tiles and the order bring on top of the unmasked loops.
    ("old-tiles", F(block_q_bwd=64, block_k_bwd=64, heavy_first=False)),
    ("no-heavy-first", F(heavy_first=False)),
    ("bwd64x64", F(block_q_bwd=64, block_k_bwd=64)),
    ("dq128x64-dkv64x128", F(block_k_dq=64, block_q_dkv=64)),
    ("dkv-8warps", F(num_warps_dkv=8)),
    ("bwd-3stages", F(num_stages_dq=3, num_stages_dkv=3)),
    ("bwd-4stages", F(num_stages_dq=4, num_stages_dkv=4)),
    ("dq64x64-dkv64x128", F(block_q_dq=64, block_k_dq=64, block_q_dkv=64)),
    ("fwd-3stages", F(num_stages=3, num_stages_dq=2, num_stages_dkv=2)),
    ("fwd128x32", F(block_k=32)),
    ("fwd-8warps", F(num_warps=8, num_warps_dq=4, num_warps_dkv=4)),
]


def _rel_l2(x, ref):
  x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
  err = jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)
  return float(jnp.where(jnp.isfinite(x).all(), err, jnp.inf))


class Sweep:
  def __init__(self, args, on_gpu):
    self.on_gpu, self.out_path = on_gpu, args.out
    self.reps, self.inner = (1, 1) if args.quick else (5, 10)
    self.t0, self.deadline_s = time.perf_counter(), args.deadline_s
    self.rows, self.meta, self.refs = [], {}, {}

  def save(self):
    formats.write_json_atomic(self.out_path, dict(meta=self.meta, results=self.rows))

  def inputs(self, B, T, H, K, D):
    ks = jax.random.split(jax.random.key(0), 4)  # as bench/kernels.py's bench_attention
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, K, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, K, D), jnp.bfloat16)
    do = jax.random.normal(ks[3], (B, T, H, D), jnp.bfloat16)
    return (q, k, v), do

  def reference(self, key, qkv, do, seg):
    """XLA attention in fp32 without TF32: (o, dq, dk, dv), computed once per shape."""
    if key not in self.refs:
      xla = kernels.get("attention", "xla")
      with jax.default_matmul_precision("highest"):
        f32 = [x.astype(jnp.float32) for x in qkv]
        o, g = kb._fwd_bwd(lambda q, k, v: xla(q, k, v, seg, causal=True))(
            do.astype(jnp.float32), *f32)
        self.refs[key] = jax.block_until_ready((o, *g))
    return self.refs[key]

  def run(self, shape, docs, impl, fn, qkv, do, ref_key=None, seg=None, extra=None):
    row = dict(shape=shape, docs=docs, impl=impl, **(extra or {}))
    elapsed = time.perf_counter() - self.t0
    if elapsed > self.deadline_s:
      row["skipped"] = f"deadline ({elapsed:.0f} s > {self.deadline_s:.0f} s)"
    else:
      try:
        row["fwd_ms"] = kb._time(jax.jit(fn), qkv, self.reps, self.inner)
        fb = kb._fwd_bwd(fn)
        row["fwd_bwd_ms"] = kb._time(fb, (do,) + tuple(qkv), self.reps, self.inner)
        if ref_key is not None:
          o, g = fb(do, *qkv)
          ref = self.reference(ref_key, qkv, do, seg)
          errs = [_rel_l2(x, r) for x, r in zip((o, *g), ref)]
          row["rel_l2"] = dict(zip(("o", "dq", "dk", "dv"), errs))
          row["max_rel_l2"] = max(errs)
          if not max(errs) < TOL_BF16:
            row["error"] = f"WRONG: max relative L2 {max(errs):.3g} >= {TOL_BF16}"
      except Exception as e:  # one failing config must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        traceback.print_exc()
    row["t_s"] = round(time.perf_counter() - self.t0, 1)
    self.rows.append(row)
    print(_fmt(row), flush=True)
    self.save()
    return row

  def attention(self, B, T, H, K, D, configs, docs_configs, deadlines, rng_seed=0):
    """cuDNN, then `configs` without ids, then `docs_configs` (None: the best two without ids and
    the default) with packed documents. deadlines: (plain rows, docs rows) in seconds."""
    qkv, do = self.inputs(B, T, H, K, D)
    seg = kb._documents(np.random.default_rng(rng_seed), B, T, mean_len=T / 4)
    shape = f"B{B} T{T} H{H}/{K} d{D}"
    self.deadline_s = deadlines[0]
    if self.on_gpu:
      cudnn = kernels.get("attention", "cudnn")
      self.run(shape, False, "cudnn", lambda q, k, v: cudnn(q, k, v, None, causal=True), qkv, do)

    def run(name, cfg, s):
      cfg = fa.default_config(T, cfg)  # no-op at T 2048; shrinks the tiles in --quick
      self.run(shape, s is not None, name,
               lambda q, k, v: fa.flash_attention(q, k, v, s, causal=True, config=cfg),
               qkv, do, ref_key=(shape, s is not None), seg=s, extra=dict(config=repr(cfg)))

    for name, cfg in configs:
      run(name, cfg, None)
    top = self.best(shape)
    if docs_configs is None:
      docs_configs = [c for c in configs if c[0] in top or c[0] == "default"]
    self.deadline_s = deadlines[1]
    for name, cfg in docs_configs:
      run(name, cfg, seg)
    if configs and configs[0][0] == "default":
      self.backward_split(shape, fa.default_config(T, configs[0][1]), qkv, do)
    self.refs.clear()  # free the fp32 references before the next shape
    return top

  def backward_split(self, shape, cfg, qkv, do):
    """The backward alone, and its dQ kernel alone (XLA drops the unused dK/dV call): where the
    backward's time goes. Needs T to be a multiple of the tiles (no padding)."""
    row = dict(shape=shape, docs=False, impl="default:bwd-split", config=repr(cfg))
    elapsed = time.perf_counter() - self.t0
    if elapsed > self.deadline_s:
      row["skipped"] = f"deadline ({elapsed:.0f} s > {self.deadline_s:.0f} s)"
    else:
      try:
        q, k, v = qkv
        T = q.shape[1]
        assert T % max(cfg.tiles()) == 0, "T must be a multiple of the tiles"
        o, lse = jax.jit(lambda q, k, v: fa._forward(q, k, v, None, cfg, T, True))(q, k, v)
        args = (q, k, v, o, lse, do)
        bwd = lambda *a: fa._backward(*a[:3], None, *a[3:], cfg, T, True)
        row["bwd_ms"] = kb._time(jax.jit(bwd), args, self.reps, self.inner)
        row["dq_kernel_ms"] = kb._time(jax.jit(lambda *a: bwd(*a)[0]), args, self.reps,
                                       self.inner)
        row["dkv_kernel_ms"] = row["bwd_ms"] - row["dq_kernel_ms"]
      except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        traceback.print_exc()
    self.rows.append(row)
    nan = float("nan")
    print(f"{shape:<20} backward alone {row.get('bwd_ms', nan):.3f} ms: dQ kernel "
          f"{row.get('dq_kernel_ms', nan):.3f}, dK/dV kernel {row.get('dkv_kernel_ms', nan):.3f}"
          f"  {row.get('error', row.get('skipped', ''))}", flush=True)
    self.save()

  def best(self, shape, n=2):
    """The n fastest correct configs (fwd+bwd without ids) at shape."""
    ranked = sorted((r for r in self.rows if r["shape"] == shape and r["impl"] != "cudnn"
                     and not r["docs"] and "fwd_bwd_ms" in r and "error" not in r),
                    key=lambda r: r["fwd_bwd_ms"])
    return [r["impl"] for r in ranked[:n]]


def _fmt(r):
  def f(k):
    return f"{r[k]:.3f}" if k in r else "-"
  tail = f"  SKIPPED {r['skipped']}" if "skipped" in r else ""
  tail += f"  ERROR {r['error']}" if "error" in r else ""
  err = f"{r['max_rel_l2']:.1e}" if "max_rel_l2" in r else "-"
  return (f"{r['shape']:<20} {'docs' if r['docs'] else '    '} {r['impl']:<20} fwd {f('fwd_ms'):>7}"
          f"  fwd+bwd {f('fwd_bwd_ms'):>7}  err {err:>7}{tail}")


def table(rows):
  """The compact summary: per shape, cuDNN's times, then each config with and without ids."""
  lines = ["", "shape                config               fwd    fwd+bwd  (docs: fwd  fwd+bwd) "
           "fb/cuDNN docs/plain err"]
  for shape in dict.fromkeys(r["shape"] for r in rows):
    base = next((r for r in rows if r["shape"] == shape and r["impl"] == "cudnn"
                 and "fwd_bwd_ms" in r), None)
    for impl in dict.fromkeys(r["impl"] for r in rows if r["shape"] == shape):
      if impl.endswith("bwd-split"):
        r = next(r for r in rows if r["shape"] == shape and r["impl"] == impl)
        lines.append(f"{shape:<20} {impl:<20} backward alone "
                     + (f"{r['bwd_ms']:.3f}: dQ {r['dq_kernel_ms']:.3f} + dK/dV "
                        f"{r['dkv_kernel_ms']:.3f}" if "bwd_ms" in r
                        else r.get("error", r.get("skipped", ""))[:80]))
        continue
      plain = next((r for r in rows if r["shape"] == shape and r["impl"] == impl
                    and not r["docs"]), {})
      docs = next((r for r in rows if r["shape"] == shape and r["impl"] == impl and r["docs"]), {})

      def g(r, k):
        return f"{r[k]:7.3f}" if k in r else "      -"
      vs = (f"{plain['fwd_bwd_ms'] / base['fwd_bwd_ms']:5.2f}x" if base and "fwd_bwd_ms" in plain
            else "     -")
      ratio = (f"{docs['fwd_bwd_ms'] / plain['fwd_bwd_ms']:5.2f}x"
               if "fwd_bwd_ms" in plain and "fwd_bwd_ms" in docs else "     -")
      errs = [r["max_rel_l2"] for r in (plain, docs) if "max_rel_l2" in r]
      err = f"{max(errs):.1e}" if errs else "-"
      notes = "; ".join(r.get("error", r.get("skipped", ""))[:80] for r in (plain, docs)
                        if "error" in r or "skipped" in r)
      lines.append(f"{shape:<20} {impl:<20} {g(plain, 'fwd_ms')} {g(plain, 'fwd_bwd_ms')}  "
                   f"({g(docs, 'fwd_ms')} {g(docs, 'fwd_bwd_ms')})  {vs}    {ratio}   {err}"
                   + (f"  {notes}" if notes else ""))
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="", help="JSON path ('' = bench/results/<date>-<card>-<commit>-"
                 "attention-sweep.json)")
  p.add_argument("--quick", action="store_true", help="tiny shapes: checks the script runs")
  p.add_argument("--only", default="", help="comma list of config names (default: all)")
  p.add_argument("--deadline_s", type=float, default=150.0,
                 help="no new row starts after this many seconds")
  p.add_argument("--d128_reserve_s", type=float, default=60.0,
                 help="d64 rows stop starting this long before the deadline (for the d128 rows)")
  p.add_argument("--table", default="", help="only print the table of this JSON file")
  args = p.parse_args(argv)
  if args.table:
    with open(args.table) as f:
      print(table(json.load(f)["results"]))
    return 0
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.quick:
    print("attention sweep: no GPU backend; pass --quick to check the script on CPU",
          file=sys.stderr)
    return 2
  args.out = args.out or bench.result_path("attention-sweep.json",
                                           [d.device_kind for d in jax.devices()])
  sweep = Sweep(args, on_gpu)
  dev = jax.devices()[0]
  sweep.meta = dict(device=dev.device_kind, jax=jax.__version__, python=platform.python_version(),
                    git_commit=bench.commit(), quick=args.quick, reps=sweep.reps,
                    inner=sweep.inner, date=bench.now_utc(),
                    default_config=repr(fa.FlashConfig()), tolerance_bf16=TOL_BF16,
                    timing="median over reps of (loop of inner calls, one block) / inner")
  only = set(args.only.split(",")) - {""}
  configs = [c for c in CONFIGS if not only or c[0] in only]
  if args.quick:
    B, T, H, K, D = 1, 64, 4, 1, 64
    configs = configs[:3]
  else:
    B, T, H, K, D = 8, 2048, 32, 4, 64
  # d64: every config without ids; with ids the best two and the default; then d128 (16 query
  # heads, 2 kv heads: the same FLOPs) for the best two and the old tiles (bench/NOTES.md's row),
  # both ways. Each phase has its own deadline so the later ones always get their time.
  dl = args.deadline_s
  top = sweep.attention(B, T, H, K, D, configs, None,
                        (dl - args.d128_reserve_s - 30, dl - args.d128_reserve_s))
  sweep.meta["best_d64"] = top
  d128 = top or ["default"]
  d128 += [n for n in ("old-tiles",) if n not in d128 and (not only or n in only)]
  d128_configs = sorted((c for c in CONFIGS if c[0] in d128), key=lambda c: d128.index(c[0]))
  sweep.attention(B, T, H // 2, max(1, K // 2), 2 * D, d128_configs, d128_configs, (dl, dl))
  sweep.save()
  print(table(sweep.rows))
  errors = [r for r in sweep.rows if "error" in r]
  print(f"\nwrote {args.out}: {len(sweep.rows)} rows, {len(errors)} errors, "
        f"{sum('skipped' in r for r in sweep.rows)} skipped; best d64: {top}")
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
