"""Packed-document attention on the GPU: cuDNN's packed layout (`cudnn_packed`) against cuDNN
without documents and the Pallas flash kernel with the same documents.

  python -m bench.attention_packed [--out DIR/attention_packed.json] [--quick] [--deadline_s 150]

Shapes: B=8, T=2048, bf16, causal, 32 query / 4 kv heads d 64 and 16 / 2 d 128. Documents a row
(`layouts`): four of fixed lengths (300, 900, 120, 728: no padding), stdlib-file-like
(exponential lengths, mean 256, the row's tail padding), short (24 of 64-128 tokens, then
padding), one a row.
Rows: cudnn without ids (the concat step's attention), then per layout cudnn_packed (default
slots) and pallas; on the four-document layout also cudnn_packed with 8 and 64 slots (what the
slot count costs: cuDNN keeps per-slot softmax statistics). Every row with ids is checked
against XLA's fp32 attention with the same ids (bench/attention_sweep.py's Sweep: timing,
relative L2, the bf16 bound 2e-2). --quick: tiny shapes on CPU (pallas interpreted, no cuDNN).
"""

import argparse
import platform
import sys

import numpy as np

import jax
import jax.numpy as jnp

import bench
from bench import attention_sweep as sweep_lib
from tinyllama_jax import kernels
from tinyllama_jax.kernels import attention as attn


def _rows(B, T, lengths_per_row):
  """Rows of documents of the given lengths (cycled over rows), ids 1, 2, ..., then padding 0."""
  rows = np.zeros((B, T), np.int32)
  for b in range(B):
    pos = 0
    for i, n in enumerate(lengths_per_row[b % len(lengths_per_row)]):
      n = min(n, T - pos)
      rows[b, pos:pos + n] = i + 1
      pos += n
  return jnp.asarray(rows)


def _stdlib_like(B, T, rng):
  """Exponential lengths, mean 256 (>= 16), until the row is nearly full; the rest is padding."""
  rows = []
  for _ in range(B):
    lengths = []
    while True:
      n = max(16, int(rng.exponential(256)))
      if sum(lengths) + n > T:
        break
      lengths.append(n)
    rows.append(lengths)
  return _rows(B, T, rows)


def layouts(B, T):
  rng = np.random.default_rng(0)
  scale = T / 2048
  return {
      "four_docs": _rows(B, T, [[int(n * scale) for n in (300, 900, 120, 728)]]),
      "stdlib_like": _stdlib_like(B, T, rng),
      "short_docs": _rows(B, T, [[max(1, int(64 * scale))] * 20 + [max(1, int(128 * scale))] * 4]),
      "one_doc": jnp.ones((B, T), jnp.int32),
  }


def attention(sweep, B, T, H, K, D, on_gpu):
  """One shape's rows, most wanted first (a row past the deadline is a 'skipped' row): cudnn
  without ids; per layout cudnn_packed then pallas; then the slot counts 8 and 64."""
  qkv, do = sweep.inputs(B, T, H, K, D)
  shape = f"B{B} T{T} H{H}/{K} d{D}"
  cudnn = kernels.get("attention", "cudnn")
  pallas = kernels.get("attention", "pallas")
  if on_gpu:
    sweep.run(shape, False, "cudnn", lambda q, k, v: cudnn(q, k, v, None, causal=True), qkv, do)
  segs = layouts(B, T)
  jobs = [(name, m) for name in segs for m in ("default", "pallas")]
  jobs += [("four_docs", 8), ("four_docs", 64)]
  for name, m in jobs:
    seg = segs[name]
    seg_np = np.asarray(seg)
    runs = 1 + (seg_np[:, 1:] != seg_np[:, :-1]).sum(1)  # segments a row, padding counted
    extra = dict(layout=name, max_runs_a_row=int(runs.max()), mean_runs_a_row=float(runs.mean()))
    if m == "pallas":
      impl, fn = "pallas", lambda q, k, v, s=seg: pallas(q, k, v, s, causal=True)
    elif not on_gpu:
      continue
    else:
      slots = attn.default_max_segments(T) if m == "default" else m
      impl, extra["slots"] = "cudnn_packed" + ("" if m == "default" else f"-m{m}"), slots
      fn = lambda q, k, v, s=seg, M=slots: attn.attention_cudnn_packed(q, k, v, s, causal=True,
                                                                        max_segments=M)
    sweep.run(shape, True, f"{impl}:{name}", fn, qkv, do, ref_key=(shape, name), seg=seg,
              extra=extra)
  sweep.refs.clear()  # free the fp32 references before the next shape


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="bench/results/attention_packed.json")
  p.add_argument("--quick", action="store_true", help="tiny shapes on CPU: checks the script runs")
  p.add_argument("--deadline_s", type=float, default=150.0,
                 help="no new row starts after this many seconds")
  args = p.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.quick:
    print("attention_packed: no GPU backend; pass --quick to check the script on CPU",
          file=sys.stderr)
    return 2
  sweep = sweep_lib.Sweep(args, on_gpu)
  sweep.meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                    python=platform.python_version(), git_commit=bench.commit(),
                    date=bench.now_utc(), quick=args.quick, reps=sweep.reps, inner=sweep.inner,
                    gqa_offsets_fixed=attn.packed_gqa_offsets_fixed(),
                    tolerance_bf16=sweep_lib.TOL_BF16)
  print(f"jax {jax.__version__}: packed GQA kv offsets fixed in this jax: "
        f"{sweep.meta['gqa_offsets_fixed']} (False: cudnn_packed repeats kv heads)", flush=True)
  B, T, shapes = (1, 128, [(4, 1, 64)]) if args.quick else (8, 2048, [(32, 4, 64), (16, 2, 128)])
  for i, (H, K, D) in enumerate(shapes):  # each shape its share of the deadline
    sweep.deadline_s = args.deadline_s * (i + 1) / len(shapes)
    attention(sweep, B, T, H, K, D, on_gpu)
  sweep.save()
  print(table(sweep.rows))
  errors = [r for r in sweep.rows if "error" in r]
  print(f"\nwrote {args.out}: {len(sweep.rows)} rows, {len(errors)} errors, "
        f"{sum('skipped' in r for r in sweep.rows)} skipped")
  return 1 if errors else 0


def table(rows):
  lines = ["", f"{'shape':<20} {'impl:layout':<28} {'fwd':>7} {'fwd+bwd':>8} {'vs cudnn':>8} "
           f"{'runs max/mean':>13} {'err':>7}"]
  for shape in dict.fromkeys(r["shape"] for r in rows):
    base = next((r for r in rows if r["shape"] == shape and r["impl"] == "cudnn"
                 and "fwd_bwd_ms" in r), None)
    for r in (r for r in rows if r["shape"] == shape):
      f = lambda k: f"{r[k]:.3f}" if k in r else "-"
      vs = (f"{r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x" if base and "fwd_bwd_ms" in r
            else "-")
      runs = f"{r['max_runs_a_row']}/{r['mean_runs_a_row']:.1f}" if "layout" in r else "-"
      err = f"{r['max_rel_l2']:.1e}" if "max_rel_l2" in r else "-"
      note = r.get("error", r.get("skipped", ""))[:80]
      lines.append(f"{shape:<20} {r['impl']:<28} {f('fwd_ms'):>7} {f('fwd_bwd_ms'):>8} "
                   f"{vs:>8} {runs:>13} {err:>7}  {note}")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
