"""Attention of one new token a row over its KV cache as flash-decoding: two Pallas kernels
(`attention_cache`'s `pallas` backend).

A decode step at batch 1 is launch- and latency-bound, not bandwidth-bound: XLA runs this op as
~5 small kernels a layer (the q.k reduction, the mask, max and sum reductions, the p.v reduction;
~4 us each on an H200, bench/NOTES.md session 5), where the bytes (the cache up to the row's
position) take well under a microsecond. A single program per (row, kv head) walking the cache
serially was slower still (4 programs at batch 1, +50 us a layer: bench/NOTES.md session 6).

So the cache axis is split over programs. Kernel 1, grid (row, kv head, split): a program takes
`blocks_per_split` blocks of `block_s` slots (one block at the 1b shapes) and computes, for the
G = H / K query heads of its kv head (GQA without repeating K/V), the partial softmax of its
slots: max m, sum l of exp(s - m), and the unnormalized exp(s - m) @ V. Splits wholly after the
row's position read nothing and write the neutral partial (m = mask value, l = 0, acc = 0).
Kernel 2, grid (row, kv head, query head of the group), merges a head's partials:
o = sum_n exp(m_n - M) acc_n / sum_n exp(m_n - M) l_n with M = max_n m_n.

The products are broadcast multiply-sums, not tl.dot: one query token gives only G (< 16) rows,
below Triton's smallest dot tile. Triton tiles are powers of two, so the split axis is padded to
one (the padding splits are past every position: neutral).

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
_MAX_SPLITS = 64  # beyond it a split walks several blocks: the merge's reads stay small


def _pow2_at_least(n):
  return 1 << max(0, (n - 1).bit_length())


def _split_kernel(q_ref, k_ref, v_ref, pos_ref, m_ref, l_ref, acc_ref, *, block_s,
                  blocks_per_split, scale):
  G, D = q_ref.shape
  pos = pos_ref[0]
  first = pl.program_id(2) * blocks_per_split  # this split's first block
  # Blocks of this split that hold a slot <= pos (0 when the split starts after it).
  n_blocks = jnp.clip(pos // block_s + 1 - first, 0, blocks_per_split)

  @pl.when(n_blocks == 0)
  def _():
    m_ref[...] = jnp.full((G,), _MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros((G,), jnp.float32)
    acc_ref[...] = jnp.zeros((G, D), jnp.float32)

  @pl.when(n_blocks > 0)
  def _():
    q_GD = q_ref[...].astype(jnp.float32) * scale

    def body(i, carry):
      m_G, l_G, acc_GD = carry
      rows = pl.ds(i * block_s, block_s)
      k_SD = k_ref[rows, :].astype(jnp.float32)
      s_GS = jnp.sum(q_GD[:, None, :] * k_SD[None, :, :], axis=-1)
      slot_S = (first + i) * block_s + lax.broadcasted_iota(jnp.int32, (block_s,), 0)
      s_GS = jnp.where((slot_S <= pos)[None, :], s_GS, _MASK_VALUE)
      m_new_G = jnp.maximum(m_G, jnp.max(s_GS, axis=-1))
      correction_G = jnp.exp(m_G - m_new_G)
      p_GS = jnp.exp(s_GS - m_new_G[:, None])
      v_SD = v_ref[rows, :].astype(jnp.float32)
      acc_GD = acc_GD * correction_G[:, None] + jnp.sum(p_GS[:, :, None] * v_SD[None, :, :],
                                                        axis=1)
      return m_new_G, l_G * correction_G + jnp.sum(p_GS, axis=-1), acc_GD

    init = (jnp.full((G,), _MASK_VALUE, jnp.float32), jnp.zeros((G,), jnp.float32),
            jnp.zeros((G, D), jnp.float32))
    m_G, l_G, acc_GD = lax.fori_loop(0, n_blocks, body, init)
    m_ref[...], l_ref[...], acc_ref[...] = m_G, l_G, acc_GD


def _merge_kernel(m_ref, l_ref, acc_ref, o_ref):
  m_N = m_ref[...]
  # Split 0 always holds slot 0 (<= every position), so M is a real score and the neutral
  # splits' weights exp(mask - M) are exactly 0.
  w_N = jnp.exp(m_N - jnp.max(m_N))
  o_D = jnp.sum(w_N[:, None] * acc_ref[...], axis=0) / jnp.sum(w_N * l_ref[...])
  o_ref[...] = o_D.astype(o_ref.dtype)


def _splits(S, block_s):
  """(blocks_per_split, splits) for a cache of S slots: the fewest blocks a split (dividing the
  blocks evenly) for at most _MAX_SPLITS splits; the splits padded to a power of two."""
  n_blocks = S // block_s
  blocks_per_split = next(d for d in range(1, n_blocks + 1)
                          if n_blocks % d == 0 and n_blocks // d <= _MAX_SPLITS)
  return blocks_per_split, _pow2_at_least(n_blocks // blocks_per_split)


def attention_cache_pallas(q_BTHD, k_BSKD, v_BSKD, positions_BT, *, block_s=16, interpret=None):
  """attention_cache_xla's contract; two kernels a call when T = 1 (a decode step)."""
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1], k_BSKD.shape[2]
  G = H // K if H % K == 0 else 0
  if T != 1 or S % block_s or not G or G & (G - 1) or D & (D - 1):
    # Prefill, verify passes, and shapes Triton's power-of-two tiles cannot hold: the reference.
    return attention_cache_xla(q_BTHD, k_BSKD, v_BSKD, positions_BT)
  interpret = _pallas.resolve_interpret(interpret)
  blocks_per_split, N = _splits(S, block_s)
  span = blocks_per_split * block_s  # slots a split covers
  # A padding split's blocks would lie past the cache: it points at the last (and reads nothing).
  clamp = lambda n: jnp.minimum(n, S // span - 1)
  q_BKGD = q_BTHD.reshape(B, K, G, D)  # free: the heads of a kv head are consecutive
  f32 = jnp.float32
  m_BKGN, l_BKGN, acc_BKGND = _pallas.call(
      functools.partial(_split_kernel, block_s=block_s, blocks_per_split=blocks_per_split,
                        scale=D ** -0.5),
      grid=(B, K, N),
      in_specs=[pl.BlockSpec((None, None, G, D), lambda b, k, n: (b, k, 0, 0)),
                pl.BlockSpec((None, span, None, D), lambda b, k, n: (b, clamp(n), k, 0)),
                pl.BlockSpec((None, span, None, D), lambda b, k, n: (b, clamp(n), k, 0)),
                pl.BlockSpec((None, 1), lambda b, k, n: (b, 0))],
      out_specs=[pl.BlockSpec((None, None, G, None), lambda b, k, n: (b, k, 0, n)),
                 pl.BlockSpec((None, None, G, None), lambda b, k, n: (b, k, 0, n)),
                 pl.BlockSpec((None, None, G, None, D), lambda b, k, n: (b, k, 0, n, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, K, G, N), f32), jax.ShapeDtypeStruct((B, K, G, N), f32),
                 jax.ShapeDtypeStruct((B, K, G, N, D), f32)],
      name="decode_attention_split", num_warps=4, num_stages=2, interpret=interpret)(
          q_BKGD, k_BSKD, v_BSKD, positions_BT.astype(jnp.int32))
  o_BKGD = _pallas.call(
      _merge_kernel, grid=(B, K, G),
      in_specs=[pl.BlockSpec((None, None, None, N), lambda b, k, g: (b, k, g, 0)),
                pl.BlockSpec((None, None, None, N), lambda b, k, g: (b, k, g, 0)),
                pl.BlockSpec((None, None, None, N, D), lambda b, k, g: (b, k, g, 0, 0))],
      out_specs=pl.BlockSpec((None, None, None, D), lambda b, k, g: (b, k, g, 0)),
      out_shape=jax.ShapeDtypeStruct((B, K, G, D), q_BTHD.dtype), name="decode_attention_merge",
      num_warps=2, num_stages=1, interpret=interpret)(m_BKGN, l_BKGN, acc_BKGND)
  return o_BKGD.reshape(B, 1, H, D)
