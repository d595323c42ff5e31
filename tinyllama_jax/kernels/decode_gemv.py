"""Decode-time GEMVs with their neighbours fused in: norm + matmul, matmul + residual, norm +
gate/up matmul + SwiGLU. For M <= 16 rows (M = the batch at a decode step).

Why: at batch 1 a decode step is bound by reading the weights once (~2.2 GB a token at 1b), but
XLA spends it as split-K GEMMs, each followed by a reduction "finalizer" kernel, plus a separate
kernel per RMSNorm: ~10 kernels a layer of a few microseconds each. Here a layer's dense work is
four kernels (qkv, o + residual, gate/up + swiglu, down + residual), and each program streams its
[K, BLOCK_N] column strip of the weight once, looping over K in BLOCK_K chunks, with no finalizer.
The grid is N / BLOCK_N programs; BLOCK_N = 16 gives >= 128 programs at the 1b shapes (an H200
has 132 SMs), so the whole machine reads weight bytes.

Two inner products, picked by M:
  M == 1    a true GEMV: acc_KN += x_K[:, None] * w_KN elementwise in fp32 (no tensor cores, no
            padding: a dot needs 16 rows), one reduction over the chunk rows at the end;
  M in 2..16 a dot of 16 rows (Triton's smallest MMA tile) with an fp32 accumulator; x (and the
            residual) are padded to 16 rows first when M < 16 (an extra small XLA op), the
            output sliced back.
The RMSNorm is not a separate pass: sum(x^2) per row is accumulated in the same K loop (x is
tiny and is re-read by every program from L2), g is folded into x before the product, and the
accumulator is scaled by rsqrt(mean(x^2) + eps) per row at the end; the same value as
normalising x first, since the scale is per row.

Weights stay in the model's [K, N] row-major layout. Forward only (decode): no custom_vjp, so
jax.grad of these fails rather than silently differentiating through a kernel.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

MAX_ROWS = 16  # rows a dot tile holds; more rows is a prefill, which XLA's GEMMs do well


# --- references: fp32 math, the kernels' output dtypes --------------------------------------


def _dot32(a, b):
  return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


def _normed32(x_MD, g_D, eps):
  x32 = x_MD.astype(jnp.float32)
  rstd = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return x32 * rstd * g_D.astype(jnp.float32)


def norm_matmul_ref(x_MD, g_D, w_DN, eps):
  return _dot32(_normed32(x_MD, g_D, eps), w_DN).astype(x_MD.dtype)


def matmul_add_ref(a_MK, w_KN, r_MN):
  return (r_MN.astype(jnp.float32) + _dot32(a_MK, w_KN)).astype(r_MN.dtype)


def norm_matmul_swiglu_ref(x_MD, g_D, w_gate_up_D2F, eps):
  gu = _dot32(_normed32(x_MD, g_D, eps), w_gate_up_D2F)
  F = gu.shape[-1] // 2
  return (jax.nn.silu(gu[..., :F]) * gu[..., F:]).astype(x_MD.dtype)


# --- the kernel: one body, the fusions switched by static flags ---------------------------------


def _kernel(*refs, rows, K, block_k, norm, swiglu, residual, eps):
  from jax.experimental import pallas as pl
  refs = list(refs)
  x_ref = refs.pop(0)
  g_ref = refs.pop(0) if norm else None
  w_refs = [refs.pop(0) for _ in range(2 if swiglu else 1)]  # (gate, up) strips, or one strip
  r_ref = refs.pop(0) if residual else None
  (y_ref,) = refs
  block_n = w_refs[0].shape[1]
  gemv = rows == 1
  f32 = jnp.float32

  def body(i, carry):
    accs, ss = carry
    ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
    x = (x_ref[0, ks] if gemv else x_ref[:, ks]).astype(f32)  # [BK] or [16, BK]
    if norm:
      # GEMV: the squares summed elementwise, reduced once after the loop (no per-chunk
      # cross-thread reduction); dot: reduced per chunk, a [16, BK] carry would cost registers.
      ss = ss + (x * x if gemv else jnp.sum(x * x, axis=1))
      x = x * g_ref[ks].astype(f32)
    new = []
    for acc, w_ref in zip(accs, w_refs):
      w_KN = w_ref[ks, :]
      if gemv:
        new.append(acc + x[:, None] * w_KN.astype(f32))
      else:  # fp32 inputs lower to an IEEE fp32 dot (Pallas Triton picks TF32 only when asked)
        new.append(acc + jnp.dot(x.astype(w_KN.dtype), w_KN, preferred_element_type=f32))
    return tuple(new), ss

  acc_shape = (block_k, block_n) if gemv else (rows, block_n)
  accs = tuple(jnp.zeros(acc_shape, f32) for _ in w_refs)
  ss = jnp.zeros((block_k,) if gemv else (rows,), f32)
  accs, ss = jax.lax.fori_loop(0, K // block_k, body, (accs, ss))
  if gemv:
    outs = [jnp.sum(a, axis=0)[None, :] for a in accs]  # [1, BN]
    ss = jnp.sum(ss, keepdims=True)  # [1]
  else:
    outs = list(accs)  # [16, BN]
  if norm:
    rstd = jax.lax.rsqrt(ss / K + eps)[:, None]
    outs = [o * rstd for o in outs]
  if swiglu:
    gate, up = outs
    out = gate * jax.nn.sigmoid(gate) * up
  else:
    (out,) = outs
  if residual:
    out = out + r_ref[...].astype(f32)
  y_ref[...] = out.astype(y_ref.dtype)


def _pow2(n):
  return n >= 1 and n & (n - 1) == 0


def _check(op, M, K, N, block_n, block_k):
  """One-line ValueErrors for what the kernel cannot do."""
  if M > MAX_ROWS:
    raise ValueError(f"{op}: {M} rows > {MAX_ROWS} (a decode GEMV; use a GEMM for prefill)")
  if not (_pow2(block_n) and _pow2(block_k) and block_n >= 16 and block_k >= 16):
    raise ValueError(f"{op}: block_n={block_n}, block_k={block_k} must be powers of two >= 16 "
                     "(Triton tiles)")
  if N % block_n:
    raise ValueError(f"{op}: N={N} is not a multiple of block_n={block_n}")
  if K % block_k:
    raise ValueError(f"{op}: K={K} is not a multiple of block_k={block_k}")


def _run(op, x, g, ws, r, eps, out_dtype, *, block_n, block_k, num_warps, num_stages,
         interpret):
  """Flattens x [..., K] to rows, pads them to 16 for the dot path, calls the kernel."""
  from jax.experimental import pallas as pl
  from tinyllama_jax.kernels import _pallas
  K = x.shape[-1]
  lead = x.shape[:-1]
  M = x.size // K if K else 0
  w = ws[0]
  if w.ndim != 2 or w.shape[0] != K:
    raise ValueError(f"{op}: weight {w.shape} must be [K, N] with K = x's last dim {x.shape}")
  swiglu = len(ws) == 2
  if swiglu and w.shape[1] % 2:
    raise ValueError(f"{op}: packed gate/up weight {w.shape} must have an even 2F columns")
  N = w.shape[1] // 2 if swiglu else w.shape[1]
  if g is not None and g.shape != (K,):
    raise ValueError(f"{op}: norm weight {g.shape} must be [D] with D = x's last dim {x.shape}")
  if r is not None and r.shape != lead + (N,):
    raise ValueError(f"{op}: residual {r.shape} must be {lead + (N,)}")
  _check(op, M, K, N, block_n, block_k)
  rows = 1 if M == 1 else MAX_ROWS
  pad = lambda a: jnp.pad(a.reshape(M, -1), [(0, rows - M), (0, 0)])  # padded rows: zeros
  x2 = pad(x)
  whole = lambda *shape: pl.BlockSpec(shape, lambda j: (0,) * len(shape))
  in_specs, args = [whole(rows, K)], [x2]
  if g is not None:
    in_specs.append(whole(K))
    args.append(g)
  # The gate strip of program j is columns [j BN, (j+1) BN); its up strip the same columns + F.
  in_specs.append(pl.BlockSpec((K, block_n), lambda j: (0, j)))
  if swiglu:
    in_specs.append(pl.BlockSpec((K, block_n), lambda j: (0, j + N // block_n)))
  args += [w] * len(ws)
  strip = pl.BlockSpec((rows, block_n), lambda j: (0, j))
  if r is not None:
    in_specs.append(strip)
    args.append(pad(r))
  kernel = functools.partial(_kernel, rows=rows, K=K, block_k=block_k, norm=g is not None,
                             swiglu=swiglu, residual=r is not None, eps=float(eps))
  y = _pallas.call(kernel, grid=(N // block_n,), in_specs=in_specs, out_specs=strip,
                   out_shape=jax.ShapeDtypeStruct((rows, N), out_dtype), name=op,
                   num_warps=num_warps, num_stages=num_stages,
                   interpret=_pallas.resolve_interpret(interpret))(*args)
  return y[:M].reshape(lead + (N,))


# Block defaults: BLOCK_N 16 -> 128..352 programs at the 1b shapes; BLOCK_K 512 divides 2048
# and 5632 (= 11 x 512) and keeps a 16 KiB bf16 weight chunk in flight per stage. The GPU bench
# (bench/decode_gemv.py) sweeps them.
# interpret=None: interpreted on CPU, Triton on GPU.


def norm_matmul(x_MD, g_D, w_DN, eps, *, block_n=16, block_k=512, num_warps=4, num_stages=3,
                interpret=None):
  """(rms_norm(x) * g) @ w, fp32 inside, in x's dtype. x: [..., D] with <= 16 rows."""
  return _run("norm_matmul", x_MD, g_D, [w_DN], None, eps, x_MD.dtype, block_n=block_n,
              block_k=block_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def matmul_add(a_MK, w_KN, r_MN, *, block_n=16, block_k=512, num_warps=4, num_stages=3,
               interpret=None):
  """r + a @ w (the o- and down-projection with the residual add), in r's dtype."""
  return _run("matmul_add", a_MK, None, [w_KN], r_MN, 0.0, r_MN.dtype, block_n=block_n,
              block_k=block_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def norm_matmul_swiglu(x_MD, g_D, w_gate_up_D2F, eps, *, block_n=16, block_k=512, num_warps=4,
                       num_stages=3, interpret=None):
  """silu(gate) * up of (rms_norm(x) * g) @ [w_gate | w_up]: [..., F] in x's dtype."""
  return _run("norm_matmul_swiglu", x_MD, g_D, [w_gate_up_D2F] * 2, None, eps, x_MD.dtype,
              block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
              interpret=interpret)


def block_k_for(K):
  """The largest power-of-two chunk <= 512 dividing K (512 at the 1b shapes)."""
  return min(512, K & -K)


class GemvOps(NamedTuple):
  """The three fused ops a layer's few-row step uses (model.block's decode path)."""
  norm_matmul: Callable
  matmul_add: Callable
  norm_matmul_swiglu: Callable


def _tiled(fn, k_arg):
  """fn with block_k fitted to the K of its argument k_arg (a model's dims need not be 2^n)."""
  def call(*args):
    return fn(*args, block_k=block_k_for(args[k_arg].shape[-1]))
  return call


# The backend table's entries: model.kernels.decode_gemv=pallas takes these for steps of <= 16
# rows; 'xla' keeps the block's own path (XLA's norms, GEMMs and adds), the references' math.
GEMV_REF = GemvOps(norm_matmul_ref, matmul_add_ref, norm_matmul_swiglu_ref)
GEMV_PALLAS = GemvOps(_tiled(norm_matmul, 0), _tiled(matmul_add, 0),
                      _tiled(norm_matmul_swiglu, 0))
