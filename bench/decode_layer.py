"""The fused decode layer's kernels (kernels/decode_layer.py) against XLA's formula of each op, at
TinyLlama-1.1B's shapes, with a tile sweep: where a decode step's layer time goes, kernel by
kernel, and which tiles to take.

    python -m bench.decode_layer --out=k.json        # one GPU: ~2 minutes (--budget_s)
    python -m bench.decode_layer --smoke --out=/tmp/k.json   # CPU, interpreted: checks it
    python -m bench.decode_layer --rows=1 --configs=4:2048:4:3,-:-:8:- --out=k.json

Ops (D 2048, 32 query and 4 kv heads of 64, F 5632; M = 1 and 16 rows, bf16):
  qkv      rms_norm(x) @ Wqkv               gate_up  silu(h @ Wg) * (h @ Wu), h = rms_norm(x)
  o        x + o @ Wo                       down     x + a @ Wd
  attend   RoPE, the new k and v written into a 384-slot cache, attention over slots 0..p
           (p = 200 + the row % 8); attend_long: a 2048-slot cache, p = 1864 + the row % 8
  lm_head  rms_norm(x) @ W_lm_head in fp32 (once a token, after the layers; XLA's now)
xla: the model's formula in the model's layout ([K, N] weights), jitted; ours: the kernel on the
[N, K] layout, one row per config (block_n:block_k:num_warps:num_stages for the GEMVs, '-' for
the kernel's default; block_s:num_warps[:split_s] for attend). A config the kernel or Triton
refuses is a row with its error.
Timing: one jit holds `calls` calls (>= 16), each with its own inputs and weight copy (>= 150 MB
of them, so no weight stays in an H100's or H200's 50 MB L2 from one use to the next, and XLA
cannot merge two dots that share a weight). After warm-up, `reps` timed loops each enqueue
`inner` runs and block once; us a call = the loops' median / inner / calls. Launch gaps count, as
in a decode step. GB/s = weight (attend: cache) bytes / time. max_rel_err: against the fp32
reference on the same bf16 inputs. attend's caches are not donated here, so both sides copy
the cache once a call (XLA's update and our aliased write); in the decode loop neither does.
"""

import argparse
import math
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp

import bench
from bench.kernels import loop_time_ms
from tinyllama_jax.data import formats
from tinyllama_jax.kernels import decode_layer as dl
from tinyllama_jax.kernels import rms_norm, rope, swiglu

EPS = 1e-5
L2_DEFEAT_BYTES = 150e6
N_LAYERS = 22
H, G, DH = 32, 4, 64
MAX_CALLS = 64  # attend's caches are small: 150 MB of them would be a program of ~400 calls

# name -> (K, N): N counts the packed gate/up's 2F rows.
SHAPES = {"qkv": (2048, 2560), "o": (2048, 2048), "gate_up": (2048, 2 * 5632),
          "down": (5632, 2048), "attend": 384, "attend_long": 2048, "lm_head": (2048, 32000)}
SMOKE_SHAPES = {"qkv": (64, 48), "o": (64, 64), "gate_up": (64, 64), "down": (96, 64),
                "attend": 32, "attend_long": 64, "lm_head": (64, 96)}
# In priority order (--budget_s may cut the tail). M = 1: a program's loads in flight are its
# block_n x block_k weights (no pipelining without a dot), hence the longer chunks and fewer rows.
SWEEP_1 = ["-:-:4:3", "-:1024:4:3", "-:2048:4:3", "-:2048:8:3", "-:4096:4:3", "2:2048:4:3",
           "8:-:4:3", "-:-:8:3"]
SWEEP_16 = ["-:-:4:3", "-:256:4:4", "-:1024:4:2", "-:-:8:3", "32:-:4:3", "-:128:4:5"]
# A program walks its row's past slots block_s at a time, serially: longer blocks, fewer trips
# (none spills at 2048 slots: bench.ptx, 94 registers at 64 to 165 at 256 with 4 warps).
# block_s:num_warps:split_s, a program per split_s slots (flash-decoding): one or two trips each.
ATTEND_SWEEP = ["64:4", "128:4", "256:4", "256:8", "32:4", "64:8", "64:4:64", "128:4:128",
                "64:4:128", "64:8:128"]
SMOKE_SWEEP = {1: ["-:-:4:3", "-:32:4:3", "-:48:4:3"], 16: ["-:-:4:3", "-:32:4:3"]}
SMOKE_ATTEND = ["16:4", "32:4", "8:4:16"]


def gemv_config(text):
  """'4:2048:4:3' / '-:-:8:-' -> tile kwargs (a '-' keeps the kernel's default)."""
  keys = ("block_n", "block_k", "num_warps", "num_stages")
  parts = text.split(":")
  if len(parts) != 4 or not all(p == "-" or p.isdigit() for p in parts):
    raise ValueError(f"config {text!r}: want block_n:block_k:num_warps:num_stages ('-': default)")
  return {k: int(p) for k, p in zip(keys, parts) if p != "-"}


def attend_config(text):
  """'64:4' / '64:4:128' -> attend's tile kwargs (the third, split_s: slots a program)."""
  parts = text.split(":")
  if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
    raise ValueError(f"config {text!r}: want block_s:num_warps or block_s:num_warps:split_s")
  return dict(zip(("block_s", "num_warps", "split_s"), map(int, parts)))


def xla_fn(op, n_heads):
  """The model's bf16 formula of the op, on the model's [K, N] weights (model.block)."""
  norm = lambda x, g: rms_norm.rms_norm_ref(x, g, EPS)
  return {"qkv": lambda x, g, w: jnp.einsum("md,dn->mn", norm(x, g), w),
          "o": lambda a, w, r: r + jnp.einsum("mk,kn->mn", a, w),
          "down": lambda a, w, r: r + jnp.einsum("mk,kn->mn", a, w),
          "gate_up": lambda x, g, w: swiglu.swiglu_packed_ref(
              jnp.einsum("md,df->mf", norm(x, g), w)),
          "attend": lambda *a: dl.attend_ref(*a, n_heads),
          "lm_head": lambda x, g, w: jnp.einsum("md,dv->mv", norm(x, g), w,
                                                preferred_element_type=jnp.float32)}[op]


def ours_fn(op, tiles, n_heads):
  return {"qkv": lambda x, g, w: dl.norm_gemv(x, g, w, EPS, **tiles),
          "o": lambda a, w, r: dl.gemv_add(a, w, r, **tiles),
          "down": lambda a, w, r: dl.gemv_add(a, w, r, **tiles),
          "gate_up": lambda x, g, w: dl.norm_gemv_swiglu(x, g, w, EPS, **tiles),
          "attend": lambda *a: dl.attend(*a, n_heads, **tiles),
          "lm_head": lambda x, g, w: dl.norm_gemv(x, g, w, EPS, jnp.float32, **tiles)}[op]


def ref_fn(op, n_heads):
  up = lambda args: [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
                     for a in args]
  return {"qkv": lambda *a: dl.norm_gemv_ref(*up(a), EPS),
          "o": lambda *a: dl.gemv_add_ref(*up(a)), "down": lambda *a: dl.gemv_add_ref(*up(a)),
          "gate_up": lambda *a: dl.norm_gemv_swiglu_ref(*up(a), EPS),
          "attend": lambda *a: dl.attend_ref(*up(a), n_heads),
          "lm_head": lambda *a: dl.norm_gemv_ref(*up(a), EPS, jnp.float32)}[op]


def gemv_inputs(op, M, K, N, key):
  """(ours' args with the [N, K] weight, xla's with the same weight as [K, N]: its own array)."""
  k = jax.random.split(key, 3)
  bf = jnp.bfloat16
  w_NK = (jax.random.normal(k[0], (N, K), jnp.float32) * K ** -0.5).astype(bf)
  x = jax.random.normal(k[1], (M, K), bf)
  if op in ("o", "down"):
    r = jax.random.normal(k[2], (M, N), bf)
    return (x, w_NK, r), (x, w_NK.T.copy(), r)
  g = (1 + 0.1 * jax.random.normal(k[2], (K,))).astype(bf)
  return (x, g, w_NK), (x, g, w_NK.T.copy())


def attend_inputs(M, S, key, smoke):
  """A row's one new token at position S - 184 + its row % 8 in an S-slot cache (smoke: 3 +)."""
  heads, gs, d = (4, 2, 8) if smoke else (H, G, DH)
  k = jax.random.split(key, 3)
  bf = jnp.bfloat16
  pos = (jnp.arange(M, dtype=jnp.int32) % 8 + (3 if smoke else S - 184))[:, None]
  qkv = jax.random.normal(k[0], (M, 1, heads + 2 * gs, d), bf)
  cos, sin = rope.cos_sin(pos, d, 10000.0)
  kc, vc = (jax.random.normal(k[1], (M, S, gs, d), bf), jax.random.normal(k[2], (M, S, gs, d), bf))
  args = (qkv, cos, sin, kc, vc, pos)
  return args, args


def time_calls(fn, args, reps, inner):
  """us a call of fn over the argument sets, all in one jit (see the module docstring)."""
  flat, n = [a for call in args for a in call], len(args[0])
  one = jax.jit(fn)
  many = jax.jit(lambda *f: tuple(one(*f[i:i + n]) for i in range(0, len(f), n)))
  return loop_time_ms(many, flat, reps=reps, inner=inner) * 1e3 / len(args)


def max_rel_err(y, ref):
  y, ref = jax.tree.leaves(y)[0], jax.tree.leaves(ref)[0]  # attend: its output, not the caches
  y, ref = y.astype(jnp.float32), ref.astype(jnp.float32)
  return float(jnp.max(jnp.abs(y - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def bench_op(op, M, shapes, configs, calls, reps, inner, deadline, smoke):
  """The op's rows at M rows: xla, then ours per config."""
  key = jax.random.key(M)
  n_heads = 4 if smoke else H  # attend_inputs' heads
  kind = "attend" if op.startswith("attend") else op
  if kind == "attend":
    make = lambda k: attend_inputs(M, shapes[op], k, smoke)
    K = N = None
  else:
    K, N = shapes[op]
    make = lambda k: gemv_inputs(op, M, K, N, k)
  key, first_key = jax.random.split(key)
  sets = [make(first_key)]
  # What the op streams: the k and v caches, or the weight.
  nbytes = (sum(c.size * c.dtype.itemsize for c in sets[0][0][3:5]) if kind == "attend" else
            K * N * 2)
  if not smoke:
    calls = min(max(calls, math.ceil(L2_DEFEAT_BYTES / nbytes)), MAX_CALLS)
  sets += [make(k) for k in jax.random.split(key, calls - 1)]
  ref = jax.jit(ref_fn(kind, n_heads))(*sets[0][0])
  base = dict(op=op, m=M, k=K, n=N, mbytes=nbytes / 1e6, calls=calls)
  rows = []
  for impl, config in [("xla", None)] + [("ours", c) for c in configs]:
    row = dict(base, impl=impl, config=config, us=None)
    if time.perf_counter() > deadline:
      rows.append(dict(row, note="skipped: --budget_s spent"))
      continue
    try:
      if impl == "xla":
        fn, args = xla_fn(kind, n_heads), [xla_args for _, xla_args in sets]
      else:
        tiles = attend_config(config) if kind == "attend" else gemv_config(config)
        fn, args = ours_fn(kind, tiles, n_heads), [our_args for our_args, _ in sets]
      row["max_rel_err"] = max_rel_err(jax.jit(fn)(*args[0]), ref)
      row["us"] = time_calls(fn, args, reps, inner)
      row["gbs"] = nbytes / (row["us"] * 1e-6) / 1e9
    except Exception as e:  # a config the kernel or Triton refuses is a row, not a crash
      text = str(e).splitlines()[0][:200] if str(e) else traceback.format_exc().splitlines()[-1]
      row["note"] = f"{type(e).__name__}: {text}"
    rows.append(row)
  for r in rows:
    r["vs_xla"] = rows[0]["us"] / r["us"] if rows[0]["us"] and r["us"] else None
  return rows


def layer_summary(rows, M):
  """A layer's ops at M rows, XLA against our best config each (us), and a token's (ms): x22,
  plus the lm_head where it ran; one attention (the 384-slot one where both ran)."""
  mine = [r for r in rows if r["m"] == M and r["us"]]
  ops = list(dict.fromkeys(r["op"] for r in rows))
  if "attend" in ops:
    ops = [op for op in ops if op != "attend_long"]
  best = lambda op, impl: min((r["us"] for r in mine if r["op"] == op and r["impl"] == impl),
                              default=None)
  layer = [op for op in ops if op != "lm_head"]
  xla, ours = [best(op, "xla") for op in ops], [best(op, "ours") for op in ops]
  if None in xla or None in ours:
    return None
  head = dict(zip(ops, zip(xla, ours))).get("lm_head", (0.0, 0.0))
  xla_layer, ours_layer = sum(xla) - head[0], sum(ours) - head[1]
  return dict(m=M, ops=layer, xla_layer_us=xla_layer, ours_layer_us=ours_layer,
              lm_head=("lm_head" in ops), xla_token_ms=(xla_layer * N_LAYERS + head[0]) / 1e3,
              ours_token_ms=(ours_layer * N_LAYERS + head[1]) / 1e3)


def print_table(rows, summaries):
  print(f"{'op':<12}{'M':>3}  {'impl':<5}{'config':<12}{'us':>8}{'GB/s':>7}{'vs xla':>7}"
        f"{'err':>9}  note")
  for r in rows:
    f = lambda k, fmt: "-" if r.get(k) is None else fmt.format(r[k])
    print(f"{r['op']:<12}{r['m']:>3}  {r['impl']:<5}{r['config'] or '-':<12}"
          f"{f('us', '{:.1f}'):>8}"
          f"{f('gbs', '{:.0f}'):>7}{f('vs_xla', '{:.2f}'):>7}{f('max_rel_err', '{:.1e}'):>9}"
          f"  {r.get('note', '')[:90]}", flush=True)
  for s in summaries:
    print(f"M={s['m']}: a layer's {'+'.join(s['ops'])} {s['xla_layer_us']:.1f} us (xla) -> "
          f"{s['ours_layer_us']:.1f} us (ours, best configs); x{N_LAYERS}"
          f"{' + the lm_head' if s['lm_head'] else ''}: "
          f"{s['xla_token_ms']:.3f} -> {s['ours_token_ms']:.3f} ms a token")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted (CPU check)")
  ap.add_argument("--budget_s", type=float, default=120.0, help="later rows are skipped rows")
  ap.add_argument("--ops", default=",".join(SHAPES), help="of " + ",".join(SHAPES))
  ap.add_argument("--rows", default="1,16", help="the M values (batch rows) to time")
  ap.add_argument("--configs", default="", help="the GEMV configs instead of the sweep: "
                  "block_n:block_k:num_warps:num_stages,... ('-': the default)")
  ap.add_argument("--attend_configs", default="", help="attend's: block_s:num_warps[:split_s],...")
  ap.add_argument("--reps", type=int, default=30, help="timed loops; the median is kept")
  ap.add_argument("--inner", type=int, default=4, help="runs of the jit enqueued a loop")
  ap.add_argument("--calls", type=int, default=16, help="op calls (and weight copies) a jit")
  args = ap.parse_args(argv)
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  ops = args.ops.split(",")
  try:
    if not all(m.isdigit() for m in args.rows.split(",")):
      raise ValueError(f"--rows={args.rows!r}: want row counts, e.g. 1,16")
    ms = [int(m) for m in args.rows.split(",")]
    for text in filter(None, args.configs.split(",")):
      gemv_config(text)
    for text in filter(None, args.attend_configs.split(",")):
      attend_config(text)
  except ValueError as e:
    print(f"bench.decode_layer: {e}", file=sys.stderr)
    return 2
  if set(ops) - set(SHAPES) or not set(ms) <= set(range(1, dl.MAX_ROWS + 1)):
    print(f"bench.decode_layer: --ops of {','.join(SHAPES)}, --rows of 1..{dl.MAX_ROWS}",
          file=sys.stderr)
    return 2
  calls, reps, inner = (2, 2, 1) if args.smoke else (args.calls, args.reps, args.inner)
  deadline = time.perf_counter() + args.budget_s
  rows = []
  for M in ms:
    for op in ops:
      if op.startswith("attend"):
        configs = (args.attend_configs.split(",") if args.attend_configs else
                   SMOKE_ATTEND if args.smoke else ATTEND_SWEEP)
      else:
        configs = (args.configs.split(",") if args.configs else
                   SMOKE_SWEEP[1 if M == 1 else 16] if args.smoke else
                   SWEEP_1 if M == 1 else SWEEP_16)
      try:
        rows += bench_op(op, M, shapes, configs, calls, reps, inner, deadline, args.smoke)
      except Exception:  # the inputs or the reference failing: the op's one row says why
        rows.append(dict(op=op, m=M, impl="-", config=None, us=None,
                         note=traceback.format_exc().splitlines()[-1][:200]))
  summaries = [s for s in (layer_summary(rows, M) for M in ms) if s]
  print_table(rows, summaries)
  formats.write_json_atomic(args.out, {
      "rows": rows, "layer": summaries, "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(), "versions": bench.versions(),
      "python": platform.python_version(), "commit": bench.commit(), "date": bench.now_utc(),
      "smoke": args.smoke})
  return 0


if __name__ == "__main__":
  sys.exit(main())
