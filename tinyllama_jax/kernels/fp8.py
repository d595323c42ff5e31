"""FP8 matmuls for the block's dense projections (model.matmul_dtype='fp8'), Hopper-style.

Forward: the activation and the weight are quantized to float8_e4m3fn, each with one scale for
the whole tensor; backward: the output gradient to float8_e5m2 (more range, less precision: the
gradients' spread), and both gradient GEMMs, dgrad = g @ w^T and wgrad = x^T @ g, run in fp8 on
the e5m2 gradient and the e4m3 tensors saved from the forward (which are also the residuals:
1 byte an element instead of bf16's 2).

Each GEMM is a dot of the fp8 operands themselves, accumulated in fp32, with the two scales on
its output: on Hopper XLA makes it one cuBLASLt FP8 GEMM (`__cublas$lt$matmul$f8`, the scales
folded into its scale operands; bench/fp8_check.py counts them in the optimized HLO), writing
model.fp8_gemm_output's type. Elsewhere (CPU) XLA upcasts the fp8 operands, which emulates the
fp8 rounding exactly (ml_dtypes gives jnp the types).

Scaling is current (just-in-time) scaling: s = amax(|x|) / finfo(fp8).max, computed in the step
from the tensor being quantized. Nothing is carried between steps, so fp8 adds no train state
and a resumed run continues bitwise, by construction. Delayed scaling (the scale from an amax
history of past steps, one pass less over each tensor) would need that history threaded through
the train state and its checkpoints: not built.

Why not flax.linen.fp8_ops: its in_qdq / out_qdq / quantized_dot take a scale and an amax
history as inputs and return the updated ones as their "gradients" (delayed scaling, the meta
living in the params tree). With current scaling only its quantize/dequantize would be left, and
those are a few lines each (with the zero-amax guard ours needs).
"""

import functools
import math

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2


def scale_of(x, q_dtype):
  """The per-tensor scale that maps amax(|x|) onto q_dtype's largest finite value, as fp32. An
  all-zero tensor gets scale 1 (any scale quantizes zeros exactly; 0 would divide by zero)."""
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  fmax = jnp.float32(jnp.finfo(q_dtype).max)
  return jnp.where(amax > 0, amax / fmax, jnp.float32(1))


def quantize(x, q_dtype, scale):
  """x / scale, clipped to q_dtype's finite range (the fp8 casts do not saturate: e4m3fn has no
  inf, an overflow would be NaN), in q_dtype. The division runs in fp32, fused into the one pass
  that reads x and writes 1 byte an element."""
  fmax = jnp.float32(jnp.finfo(q_dtype).max)
  return jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(q_dtype)


def quantize_current(x, q_dtype):
  """(q, scale): x quantized with its own current per-tensor scale."""
  scale = scale_of(x, q_dtype)
  return quantize(x, q_dtype, scale), scale


def _qdot(qa, sa, qb, sb, dtype, contract, gemm_dtype):
  """The 2D product of two quantized operands contracting qa's axis contract[0] with qb's
  contract[1], in dtype: the fp8 operands go into the dot itself and both scales multiply its
  output, which the GEMM writes in gemm_dtype. That is the form jax 0.11.2's XLA turns into
  cuBLASLt's FP8 GEMM (`__cublas$lt$matmul$f8`, the scales folded into its scale operands); the
  dequantize-then-dot form (`convert(q) * s` operands) compiles to a dequantize pass and a bf16
  GEMM on that XLA (bench/NOTES.md, 2026-12-02, H200, 7dc268a, measured). The backward's transposes stay
  dimension numbers."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  out = jax.lax.dot_general(qa, qb, dims, preferred_element_type=gemm_dtype)
  return (out * (sa * sb).astype(gemm_dtype)).astype(dtype)


@functools.cache
def make_dot(gemm_dtype):
  """An FP8 `dot(x_NK, w_KM)` (e4m3 operands, e5m2 output gradient, current scaling) whose GEMMs
  write gemm_dtype (model.fp8_gemm_output). With bf16 cuBLASLt writes the compute dtype itself:
  1.22x the bf16 step at 1b on an H200; with fp32 a kernel of its own converts each output, ~18
  ms of traffic a 1b step (1.10x; docs/performance.md, FP8)."""

  @jax.custom_vjp
  def dot(x_NK, w_KM):
    return dot_fwd(x_NK, w_KM)[0]

  def dot_fwd(x_NK, w_KM):
    qx_NK, sx = quantize_current(x_NK, E4M3)
    qw_KM, sw = quantize_current(w_KM, E4M3)
    y = _qdot(qx_NK, sx, qw_KM, sw, x_NK.dtype, (1, 0), gemm_dtype)
    return y, (qx_NK, sx, qw_KM, sw)

  def dot_bwd(res, g_NM):
    qx_NK, sx, qw_KM, sw = res
    qg_NM, sg = quantize_current(g_NM, E5M2)
    # e5m2 x e4m3: a pair cuBLASLt's FP8 GEMM takes (two e5m2 operands it does not)
    dx_NK = _qdot(qg_NM, sg, qw_KM, sw, g_NM.dtype, (1, 1), gemm_dtype)
    dw_KM = _qdot(qx_NK, sx, qg_NM, sg, g_NM.dtype, (0, 0), gemm_dtype)
    return dx_NK, dw_KM

  dot.defvjp(dot_fwd, dot_bwd)
  return dot


dot = make_dot(jnp.dtype(jnp.float32))  # x_NK @ w_KM as an FP8 GEMM, in their (one) dtype


def einsum(spec, x, w, gemm_dtype=jnp.float32):
  """jnp.einsum(spec, x, w) for a dense projection, through make_dot(gemm_dtype): spec is
  'LEAD CONTRACT, CONTRACT OUT -> LEAD OUT' (e.g. 'btd,dnk->btnk', 'bthk,hkd->btd'), so x and w
  reshape to one 2D [N, K] x [K, M] GEMM and the result back."""
  inputs, out = spec.replace(" ", "").split("->")
  lhs, rhs = inputs.split(",")
  contract = "".join(c for c in lhs if c in rhs)
  lead, rest = lhs[:len(lhs) - len(contract)], rhs[len(contract):]
  if lhs != lead + contract or rhs != contract + rest or out != lead + rest:
    raise ValueError(f"fp8 einsum {spec!r} is not a dense projection 'ab...k,k...o->ab...o': "
                     "write it so x's trailing axes contract with w's leading ones")
  n_lead = len(lead)
  lead_shape, out_shape = x.shape[:n_lead], w.shape[len(contract):]
  k = math.prod(x.shape[n_lead:])
  y = make_dot(jnp.dtype(gemm_dtype))(x.reshape(-1, k), w.reshape(k, -1).astype(x.dtype))
  return y.reshape(*lead_shape, *out_shape)
