"""Can a hand-placed GEMM beat XLA's at the 1b step's shapes?

    python -m bench.gemm --out=gemm.json          # one H200: ~2 minutes
    python -m bench.gemm --quick --out=/tmp/g.json  # CPU: checks the script, times nothing useful

Fusing the step's memory-bound third into GEMMs only pays if the fused GEMM first runs at the
speed of the one XLA calls. Per shape of the step (8 x 2048 tokens, d 2048, ffn 5632, q/k/v as one
[2048, 2560] projection), forward and the two backward GEMMs, bf16 in, this times:
  xla            jnp.dot (XLA picks cuBLAS or its Triton GEMM);
  xla+residual   jnp.dot(a, b) + c: the residual add, as the o-proj and down-proj have it (XLA may
                 fold the add into cuBLAS's beta = 1 epilogue);
  xla+norm       dot(rms_norm(x) * w, b): the norm in front of the q/k/v and gate/up GEMMs (does
                 XLA fuse the scaling into its Triton GEMM's prologue, or write the normed copy?);
  fp8            e4m3 operands (pre-quantized) through XLA's cuBLASLt FP8 rewrite, the per-tensor
                 scales applied: FP8's ceiling; fp8+quantize also quantizes both operands
                 (amax + convert) in the timed call, as a step with current scaling must;
                 fp8 direct: the f8 operands into the dot itself, the scales on its output;
  mgpu(+residual) jax's Pallas Mosaic GPU Hopper matmul (wgmma, TMA, warp-specialised; its
                 epilogue adds c), over a small sweep of its tile configs, the best kept.
Each row: ms (median of loop-timed calls), TFLOP/s, and the ratio to xla. Errors are rows.
"""

import argparse
import dataclasses
import datetime
import itertools
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from tinyllama_jax.data import formats
from tinyllama_jax.kernels import fp8 as fp8_lib
import bench
from bench.kernels import loop_time_ms

N_TOKENS, D, F, QKV = 8 * 2048, 2048, 5632, 2560
# (name, m, k, n, residual: the forward adds the residual stream to this GEMM's output)
SHAPES = [
    ("qkv fwd", N_TOKENS, D, QKV, False),
    ("o-proj fwd", N_TOKENS, D, D, True),
    ("gate_up fwd", N_TOKENS, D, 2 * F, False),
    ("down fwd", N_TOKENS, F, D, True),
    ("down dgrad (dY W^T)", N_TOKENS, D, F, False),
    ("down wgrad (A^T dY)", F, N_TOKENS, D, False),
    ("gate_up dgrad", N_TOKENS, 2 * F, D, False),
]


def rms_norm_dot(x, w, b):
  x32 = x.astype(jnp.float32)
  h = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5) * w
  return jnp.dot(h.astype(x.dtype), b)


def e4m3(x):
  """(x in e4m3, its scale): the model's current scaling (kernels/fp8.py)."""
  return fp8_lib.quantize_current(x, fp8_lib.E4M3)


def fp8_dot(a8, b8, sa, sb):
  """The dequantize-then-dot pattern XLA's GEMM rewriter turns into one cuBLASLt FP8 GEMM."""
  a = a8.astype(jnp.bfloat16) * sa.astype(jnp.bfloat16)
  b = b8.astype(jnp.bfloat16) * sb.astype(jnp.bfloat16)
  return jnp.dot(a, b, preferred_element_type=jnp.bfloat16)


def fp8_dot_direct(a8, b8, sa, sb):
  """The f8 operands straight into the dot, the scales on the output (no dequantize pattern)."""
  out = jnp.dot(a8, b8, preferred_element_type=jnp.float32)
  return (out * (sa * sb)).astype(jnp.bfloat16)


def fp8_gemm_kind(hlo):
  """Whether the compiled FP8 dot became cuBLASLt's FP8 GEMM (else: see the saved HLO)."""
  if "__cublas$lt$matmul$f8" in hlo:
    return "cuBLASLt f8 GEMM"
  return "no cuBLASLt f8 call" + (" (a Triton GEMM fusion)" if "__triton_gemm" in hlo else "")


def fp8_dot_quantizing(a, b):
  """Both operands quantized in the timed call, as a training step must (current scaling)."""
  (a8, sa), (b8, sb) = e4m3(a), e4m3(b)
  return fp8_dot(a8, b8, sa, sb)


def mgpu_configs(quick):
  """A small sweep of the Hopper kernel's tiles (its own example sweeps the same axes)."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
  dims = hm.MatmulDimension
  # tile_m, tile_n, tile_k, pipeline steps, grid minor dimension, grid tile width, warpgroups' split
  grid = itertools.product((128,), (128, 256), (64,), (4,), (dims.M, dims.N), (8,),
                           (dims.M, dims.N))
  if quick:
    grid = itertools.islice(grid, 1)
  for tm, tn, tk, steps, minor, width, wg in grid:
    yield hm, hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=tk, max_concurrent_steps=steps,
                              epi_tile_n=64, epi_tile_m=64, grid_minor_dim=minor,
                              grid_tile_width=width, wg_dimension=wg)


def best_mgpu(a, b, c, ref, quick):
  """(ms, config) of the fastest correct config, or (None, the last error)."""
  best, err = (None, None), "no config ran"
  for hm, cfg in mgpu_configs(quick):
    try:
      fn = jax.jit(lambda a, b, c, cfg=cfg: hm.matmul(a, b, c, cfg))
      out = fn(a, b, c)
      rel = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) /
                  jnp.linalg.norm(ref.astype(jnp.float32)))
      if not rel < 1e-2:
        err = f"wrong result (rel {rel:.2e}) with {cfg}"
        continue
      ms = loop_time_ms(fn, (a, b, c))
      if best[0] is None or ms < best[0]:
        best = (ms, str(dataclasses.asdict(cfg)))
    except Exception as e:  # a config the kernel or the shape refuses is a skipped config
      err = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return best if best[0] is not None else (None, err)


def bench_shape(name, m, k, n, residual, quick, on_gpu, hlo_dir=""):
  keys = jax.random.split(jax.random.key(0), 4)
  a = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  b = (jax.random.normal(keys[1], (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
  c = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
  w = 1 + 0.1 * jax.random.normal(keys[3], (k,), jnp.float32)
  flops = 2 * m * k * n
  rows = []

  def row(impl, ms, note=""):
    rows.append({"shape": name, "m": m, "k": k, "n": n, "impl": impl, "ms": ms,
                 "tflops": None if ms is None else flops / ms / 1e9, "note": note})

  ref = jnp.dot(a, b)
  row("xla", loop_time_ms(jax.jit(jnp.dot), (a, b)))
  if residual:
    row("xla+residual", loop_time_ms(jax.jit(lambda a, b, c: jnp.dot(a, b) + c), (a, b, c)))
  if name.endswith("fwd") and not residual:
    row("xla+norm", loop_time_ms(jax.jit(rms_norm_dot), (a, w, b)))
  (a8, sa), (b8, sb) = e4m3(a), e4m3(b)
  fp8 = jax.jit(fp8_dot)
  rel = float(jnp.linalg.norm((fp8(a8, b8, sa, sb) - ref).astype(jnp.float32)) /
              jnp.linalg.norm(ref.astype(jnp.float32)))
  hlo = fp8.lower(a8, b8, sa, sb).compile().as_text()
  row("fp8", loop_time_ms(fp8, (a8, b8, sa, sb)), f"rel err {rel:.3f}; {fp8_gemm_kind(hlo)}")
  if hlo_dir:
    with open(f"{hlo_dir}/fp8-{name.split()[0]}-{name.split()[1]}.hlo.txt", "w") as f:
      f.write(hlo)
  direct = jax.jit(fp8_dot_direct)
  rel = float(jnp.linalg.norm((direct(a8, b8, sa, sb) - ref).astype(jnp.float32)) /
              jnp.linalg.norm(ref.astype(jnp.float32)))
  row("fp8 direct", loop_time_ms(direct, (a8, b8, sa, sb)),
      f"rel err {rel:.3f}; {fp8_gemm_kind(direct.lower(a8, b8, sa, sb).compile().as_text())}")
  row("fp8+quantize", loop_time_ms(jax.jit(fp8_dot_quantizing), (a, b)))
  if on_gpu or quick:
    try:
      for cc, impl in ((None, "mgpu"), (c, "mgpu+residual")) if residual else ((None, "mgpu"),):
        ms, note = best_mgpu(a, b, cc, ref if cc is None else ref + c, quick)
        row(impl, ms, note)
    except Exception as e:
      row("mgpu", None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
  base = rows[0]["ms"]
  for r in rows:
    r["vs_xla"] = None if r["ms"] is None else base / r["ms"]
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true", help="tiny shapes, one config (script check)")
  ap.add_argument("--deadline_s", type=float, default=240.0)
  ap.add_argument("--hlo_dir", default="", help="Write each FP8 dot's compiled HLO here.")
  args = ap.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  shapes = [(n, 256, 256, 256, r) for n, *_, r in SHAPES[:2]] if args.quick else SHAPES
  start, rows = time.perf_counter(), []
  for shape in shapes:
    if time.perf_counter() - start > args.deadline_s:
      rows.append({"shape": shape[0], "impl": "-", "ms": None, "note": "skipped: deadline"})
      continue
    try:
      rows += bench_shape(*shape, quick=args.quick, on_gpu=on_gpu, hlo_dir=args.hlo_dir)
    except Exception:
      rows.append({"shape": shape[0], "impl": "-", "ms": None,
                   "note": traceback.format_exc().splitlines()[-1][:300]})
  print(f"{'shape':<22}{'impl':<15}{'ms':>8}{'TFLOP/s':>9}{'vs xla':>8}  note")
  for r in rows:
    ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
    tf = "-" if r.get("tflops") is None else f"{r['tflops']:.0f}"
    vs = "-" if r.get("vs_xla") is None else f"{r['vs_xla']:.2f}"
    print(f"{r['shape']:<22}{r['impl']:<15}{ms:>8}{tf:>9}{vs:>8}  {r.get('note', '')[:90]}")
  result = {"rows": rows, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "python": platform.python_version(), "commit": bench.commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  formats.write_json_atomic(args.out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
