"""Attention of one new token a row over its KV cache, as one Pallas kernel (`attention_cache`'s
`pallas` backend).

A decode step at batch 1 is launch-bound, not bandwidth-bound: XLA runs this op as ~5 small
kernels a layer (the q.k reduction, the mask, max and sum reductions, the p.v reduction; ~4 us
each on an H200, bench/NOTES.md session 5), where the bytes (the cache up to the row's position)
take well under a microsecond. Here it is one kernel: a program per (row, kv head) walks the
cache in blocks up to that row's position only, with an online softmax over its G = H / K query
heads (GQA without repeating K/V). The products are broadcast multiply-sums, not tl.dot: with one
query token there are only G (< 16) rows, below Triton's smallest dot tile.

Only the decode form (T = 1) runs here; prefill and a speculative round's verify pass (T > 1)
run the jnp reference, whose GEMM-shaped einsums suit them.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tinyllama_jax.kernels import _pallas
from tinyllama_jax.kernels.attention import attention_cache_xla

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _kernel(q_ref, k_ref, v_ref, pos_ref, o_ref, *, block_s, scale):
  q_GD = q_ref[...].astype(jnp.float32) * scale
  G, D = q_GD.shape
  pos = pos_ref[()]

  def body(i, carry):
    m_G, l_G, acc_GD = carry
    rows = pl.ds(i * block_s, block_s)
    k_SD = k_ref[rows, :].astype(jnp.float32)
    s_GS = jnp.sum(q_GD[:, None, :] * k_SD[None, :, :], axis=-1)
    slot_S = i * block_s + jnp.arange(block_s)
    s_GS = jnp.where((slot_S <= pos)[None, :], s_GS, _MASK_VALUE)
    m_new_G = jnp.maximum(m_G, jnp.max(s_GS, axis=-1))
    correction_G = jnp.exp(m_G - m_new_G)
    p_GS = jnp.exp(s_GS - m_new_G[:, None])
    v_SD = v_ref[rows, :].astype(jnp.float32)
    acc_GD = acc_GD * correction_G[:, None] + jnp.sum(p_GS[:, :, None] * v_SD[None, :, :], axis=1)
    return m_new_G, l_G * correction_G + jnp.sum(p_GS, axis=-1), acc_GD

  init = (jnp.full((G,), _MASK_VALUE, jnp.float32), jnp.zeros((G,), jnp.float32),
          jnp.zeros((G, D), jnp.float32))
  # Blocks past the row's position hold nothing it may see: the loop stops at its own length.
  _, l_G, acc_GD = lax.fori_loop(0, pos // block_s + 1, body, init)
  o_ref[...] = (acc_GD / l_G[:, None]).astype(o_ref.dtype)


def _one_row(q_KGD, k_SKD, v_SKD, pos, *, block_s, interpret):
  K, G, D = q_KGD.shape
  S = k_SKD.shape[0]
  kernel = functools.partial(_kernel, block_s=block_s, scale=D ** -0.5)
  return _pallas.call(
      kernel, grid=(K,),
      in_specs=[pl.BlockSpec((None, G, D), lambda k: (k, 0, 0)),
                pl.BlockSpec((S, None, D), lambda k: (0, k, 0)),
                pl.BlockSpec((S, None, D), lambda k: (0, k, 0)),
                pl.BlockSpec((), lambda k: ())],
      out_specs=pl.BlockSpec((None, G, D), lambda k: (k, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(q_KGD.shape, q_KGD.dtype), name="decode_attention",
      num_warps=4, num_stages=2, interpret=interpret)(q_KGD, k_SKD, v_SKD, pos)


def attention_cache_pallas(q_BTHD, k_BSKD, v_BSKD, positions_BT, *, block_s=32, interpret=None):
  """attention_cache_xla's contract; one kernel a call when T = 1 (a decode step)."""
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1], k_BSKD.shape[2]
  if T != 1 or S % block_s or H % K or (H // K) & (H // K - 1) or D & (D - 1):
    # Prefill, verify passes, and shapes Triton's power-of-two tiles cannot hold: the reference.
    return attention_cache_xla(q_BTHD, k_BSKD, v_BSKD, positions_BT)
  q_BKGD = q_BTHD.reshape(B, K, H // K, D)
  run = functools.partial(_one_row, block_s=block_s,
                          interpret=_pallas.resolve_interpret(interpret))
  o_BKGD = jax.vmap(run)(q_BKGD, k_BSKD, v_BSKD, positions_BT[:, 0].astype(jnp.int32))
  return o_BKGD.reshape(B, 1, H, D)
