"""Every training attention backend at TinyLlama's shapes, with and without packed documents:
forward and forward + backward times and errors against the fp32 reference; a table and a JSON.

    python -m bench.attention_backends --out=att.json        # one H200, ~1-2 minutes
    python -m bench.attention_backends --quick --out=/tmp/a.json   # CPU: checks the script

Shapes: B8 T2048 causal bf16, 32 query / 4 kv heads of 64 (TinyLlama) and 16 / 2 of 128 (the
wider head). Documents: rows packed in order with the standard library's modules as documents, their
lengths in tokens estimated as bytes / 4 (real-text lengths: most far shorter than a row; long
ones cut at the row's end). Backends: the registered ones that take the case (cuDNN takes no
documents), each from the backend table (`kernels.get`), so the rows time what the model runs.
Errors: relative L2 of the output and of dq, dk, dv against XLA's attention in fp32 on the same
inputs (fresh random inputs per shape, the backward's cotangent random too); bf16's band is
1e-3..1e-2. A backend that fails (not installed, a shape it cannot take) is a row with its error.
Each case's backends within the error band, fastest fwd+bwd first (cuDNN ahead of any within
3% of it: `rank`), are what `attention=auto` picks from: `--write_table=PATH` writes
kernels/attention_auto.json with this device kind's rows replaced by this run's (copy it into
tinyllama_jax/kernels/ to commit it).
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bench as bench_lib
from bench import kernels as kb
from tinyllama_jax import kernels
from tinyllama_jax.data import formats, sources

SHAPES = [(8, 2048, 32, 4, 64), (8, 2048, 16, 2, 128)]
BACKENDS = ("cudnn", "pallas", "mgpu")
TOL = 2e-2  # relative L2: the kernel tests' bf16 bound
# cuDNN (no compile of ours) stays ahead unless another backend is this much faster fwd+bwd:
# the spread between calls is ~3%, and the 1b step with mgpu first (2% faster kernel) showed no
# gain but +60 s of compile to the first step (bench/NOTES.md, 2026-12-03, H200, 12cf41e).
MARGIN_OVER_CUDNN = 0.03


def rank(rows):
  """Backend names, fastest fwd+bwd first, from [(fwd_bwd_ms, name)] within the band; a
  backend within MARGIN_OVER_CUDNN of cuDNN ranks after it."""
  return [name for _, name in sorted(
      (ms * (1.0 if name == "cudnn" else 1.0 + MARGIN_OVER_CUDNN), name) for ms, name in rows)]


def stdlib_rows(B, T, chars_per_token=4):
  """Segment ids [B, T]: the stdlib modules in order as documents of len(bytes) / 4 tokens."""
  root = sources.stdlib_root()
  lengths = [max(1, os.path.getsize(os.path.join(root, p)) // chars_per_token)
             for p in sources.stdlib_files()]
  ids, doc = [], 1
  for n in lengths:
    ids += [doc] * n
    doc += 1
    if len(ids) >= B * T:
      break
  rows = np.asarray(ids[:B * T], np.int32).reshape(B, T)
  return jnp.asarray(rows - rows[:, :1] + 1)  # ids from 1 in each row


def rel_l2(x, ref):
  x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
  err = jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)
  return float(jnp.where(jnp.isfinite(x).all(), err, jnp.inf))


def errors(fn, q, k, v, seg, do, ref):
  def loss(q, k, v):
    o = fn(q, k, v, seg, causal=True)
    return jnp.sum(o.astype(jnp.float32) * do), o
  (_, o), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return {name: rel_l2(x, r) for name, x, r in zip(("o", "dq", "dk", "dv"), (o,) + grads, ref)}


def reference(q, k, v, seg, do):
  xla = kernels.get("attention", "xla")

  def loss(q, k, v):
    o = xla(q, k, v, seg, causal=True)
    return jnp.sum(o * do), o
  with jax.default_matmul_precision("highest"):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, o), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(*f32)
  return (o,) + grads


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--backends", default=",".join(BACKENDS))
  ap.add_argument("--quick", action="store_true", help="tiny shapes: checks the script on CPU")
  ap.add_argument("--write_table", default="",
                  help="Write the auto table (kernels/attention_auto.json) with this run's rows here.")
  args = ap.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  shapes = [(1, 256, 4, 2, 64)] if args.quick else SHAPES
  b = kb.Bench(reps=2 if args.quick else 5, inner=2 if args.quick else 10, on_gpu=on_gpu,
               out_path=args.out)
  b.meta = dict(date=bench_lib.now_utc(), commit=bench_lib.commit(),
                versions=bench_lib.versions(), device=jax.devices()[0].device_kind)
  registered = kernels.backends("attention")
  ranked = {}  # (head_dim, case) -> [(fwd+bwd ms, backend)] within the band
  for B, T, H, K, D in shapes:
    ks = jax.random.split(jax.random.key(H * D), 4)
    q, k, v = (jax.random.normal(ks[0], (B, T, H, D), jnp.bfloat16),
               jax.random.normal(ks[1], (B, T, K, D), jnp.bfloat16),
               jax.random.normal(ks[2], (B, T, K, D), jnp.bfloat16))
    do = jax.random.normal(ks[3], (B, T, H, D), jnp.float32)
    causal_flops = 4 * B * H * T * T * D / 2
    flops = (causal_flops, 3.5 * causal_flops)
    for seg in (None, stdlib_rows(B, T)):
      case = f"B{B} T{T} H{H}/{K} d{D}" + ("" if seg is None else " stdlib docs")
      key = (D, "no_documents" if seg is None else "documents")
      extra = {} if seg is None else dict(
          documents=int(sum(len(np.unique(r)) for r in np.asarray(seg))))
      ref = reference(q, k, v, seg, do)
      for name in args.backends.split(","):
        if name not in registered:
          continue
        if name in ("cudnn", "mgpu") and seg is not None:
          continue  # take no segment ids (their errors say so); the no-documents row is their time
        fn = kernels.get("attention", name)
        row_extra = dict(extra)
        try:
          row_extra["rel_l2"] = errors(fn, q, k, v, seg, do.astype(jnp.bfloat16), ref)
        except Exception as e:  # the timing row below records the same failure
          row_extra["rel_l2_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        r = b.run("attention", case, name, lambda q, k, v, fn=fn, seg=seg: fn(
            q, k, v, seg, causal=True), (q, k, v), do.astype(jnp.bfloat16), flops=flops,
                  gpu_only=name in ("cudnn", "mgpu"), extra=row_extra)
        ok = "rel_l2" in r and max(r["rel_l2"].values()) < TOL and "fwd_bwd_ms" in r
        r["within_band"] = ok
        if ok:
          ranked.setdefault(key, []).append((r["fwd_bwd_ms"], name))
        print(f"    errors {r.get('rel_l2', r.get('rel_l2_error'))}", flush=True)
  b.relate()
  order = {f"d{dim} {case}": rank(rows) for (dim, case), rows in ranked.items()}
  b.meta["ranked"] = order
  b.save()
  for case, names in order.items():
    print(f"auto {case:<22} {' > '.join(names)}")
  print(f"wrote {args.out}")
  if args.write_table:
    with open(kernels.AUTO_ATTENTION_TABLE) as f:
      table = json.load(f)
    dims = {}
    for (dim, case), rows in sorted(ranked.items()):
      dims.setdefault(str(dim), {})[case] = rank(rows)
    table["devices"][jax.devices()[0].device_kind] = dict(
        measured=os.path.basename(args.out), commit=b.meta["commit"], date=b.meta["date"],
        head_dims=dims)
    formats.write_json_atomic(args.write_table, table)
    print(f"wrote {args.write_table}")


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
