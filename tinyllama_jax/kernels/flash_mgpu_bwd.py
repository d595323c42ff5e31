"""Flash attention backward for Hopper in Pallas Mosaic GPU: a dQ kernel and a dK/dV kernel.

The residuals of `flash_mgpu`'s forward: o and the log-sum-exp in the log2 domain ([B, H, T]
fp32, lse2 = log2 sum exp2(s * scale * log2 e)), so p = exp2(s * scale2 - lse2) is one FMA and
an exp2 per logit. delta = rowsum(o * do) is one fused XLA pass before the kernels.

Both kernels have the forward's shape: two compute warp groups (64 rows of the held operand
each, one wgmma M tile) and a memory warp group streaming the other operand by TMA into a ring
of `steps` SMEM slots ("loaded" barriers per buffer, one "consumed" barrier per slot).
- dQ: a CTA holds 128 query rows of one query head (Q, dO, lse, delta); streams K/V tiles of its
  kv head h // G up to the diagonal: S = Q K^T, P, dP = dO V^T, dS = P (dP - delta),
  dQ += dS K (dS from registers).
- dK/dV: a CTA holds 128 keys of one kv head (K, V); streams (query block, query head) pairs,
  query block outer and the G heads of the kv head inner, from the diagonal on, in the
  transposed orientation: S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T, dK += dS^T Q.
  GQA's sum over the G heads happens in the accumulators: no [B, T, H, D] dK/dV and no
  reduction pass.
- Causality: blocks wholly below the diagonal skip the mask; the diagonal ones are masked by
  iota compares. A CTA's two groups visit the same blocks (the blocks one group does not need
  are fully masked for it: zeros), so no group skips a barrier phase. Heavy CTAs launch first.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from tinyllama_jax.kernels import _mgpu

_LOG2E = math.log2(math.e)
_ROWS = 64  # held rows per compute warp group


def _accs(fn, *shapes):
  """fn(*acc_refs) issues wgmmas into fresh fp32 accumulators; their values after one wait
  (independent products issued together overlap on the tensor cores)."""
  def body(*refs):
    fn(*refs)
    return [r[...] for r in refs]
  return pl.run_scoped(body, *(plgpu.ACC(s, jnp.float32) for s in shapes))


def _accs_add(accs, fn):
  """accs += the wgmmas fn(*acc_refs) issues, in place in the accumulator registers."""
  return pl.run_state(lambda refs: fn(*refs))(tuple(plgpu.ACC.init(a) for a in accs))


def _zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem2, do_smem2,
               lse_smem2, delta_smem2, k_smem, v_smem, held, k_loaded, v_loaded, free, *, bk, S,
               causal, G, n_tiles):
  T, D = q_ref.shape[1], q_ref.shape[3]
  dtype = q_ref.dtype
  scale = D ** -0.5
  b, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
  tile = lax.axis_index("q")
  if causal:
    tile = n_tiles - 1 - tile
  cta_q0 = tile * (2 * _ROWS)
  n = lax.div(cta_q0 + 2 * _ROWS + bk - 1, jnp.int32(bk)) if causal else T // bk
  n_full = lax.div(cta_q0, jnp.int32(bk)) if causal else n

  @pl.when(wg < 2)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    q0 = cta_q0 + wg * _ROWS
    rows = (b, pl.ds(q0, _ROWS), h)
    q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
    lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
    for i, (src, dst) in enumerate([(q_ref.at[rows], q_smem), (do_ref.at[rows], do_smem),
                                    (lse_ref.at[b, h, pl.ds(q0, _ROWS)], lse_smem),
                                    (delta_ref.at[b, h, pl.ds(q0, _ROWS)], delta_smem)]):
      plgpu.copy_gmem_to_smem(src, dst, held.at[4 * wg + i])
    for i in range(4):
      plgpu.barrier_wait(held.at[4 * wg + i])
    lse = plgpu.layout_cast(lse_smem[...], plgpu.Layout.WGMMA.reduce(1))
    delta = plgpu.layout_cast(delta_smem[...], plgpu.Layout.WGMMA.reduce(1))

    def step(j, dq, masked):
      slot = lax.rem(j, jnp.int32(S))
      plgpu.barrier_wait(k_loaded.at[slot])
      plgpu.barrier_wait(v_loaded.at[slot])
      k_slot, v_slot = k_smem.at[slot], v_smem.at[slot]

      def s_dp(s_ref, dp_ref):
        plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_slot, (1, 0)))
        plgpu.wgmma(dp_ref, do_smem, plgpu.transpose_ref(v_slot, (1, 0)))

      s, dp = _accs(s_dp, (_ROWS, bk), (_ROWS, bk))
      if masked:
        r_ = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
        c_ = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(r_ + q0 >= c_ + j * bk, s, -jnp.inf)
      p = jnp.exp2(s * (scale * _LOG2E) - lax.broadcast_in_dim(lse, s.shape, [0]))
      ds = (p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))).astype(dtype)
      (dq,) = _accs_add((dq,), lambda r: plgpu.wgmma(r, ds, k_slot))
      plgpu.barrier_arrive(free.at[slot])
      return dq

    dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), _zeros((_ROWS, D)))
    if causal:
      dq = lax.fori_loop(n_full, n, functools.partial(step, masked=True), dq)
    q_smem[...] = (dq * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    kv_h = lax.div(h, jnp.int32(G))

    def fetch(j, slot):
      rows = (b, pl.ds(j * bk, bk), kv_h)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_loaded.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_loaded.at[slot])

    _mgpu.stream(n, S, fetch, (free,))


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, k_smem2,
                v_smem2, q_smem, do_smem, lse_smem, delta_smem, held, q_loaded, do_loaded,
                lse_loaded, delta_loaded, free, *, bq, S, causal, G):
  T, D = q_ref.shape[1], q_ref.shape[3]
  dtype = q_ref.dtype
  scale = D ** -0.5
  b, kh, wg = lax.axis_index("b"), lax.axis_index("kh"), lax.axis_index("wg")
  cta_k0 = lax.axis_index("k") * (2 * _ROWS)  # causal: the first key tiles are the heavy ones
  nq = T // bq
  i_lo = lax.div(cta_k0, jnp.int32(bq)) if causal else 0
  # Query blocks from i_full on see every key of the CTA (first query >= last key).
  i_full = jnp.minimum(lax.div(cta_k0 + 2 * _ROWS - 1 + bq - 1, jnp.int32(bq)), nq) if causal else 0
  n = (nq - i_lo) * G
  n_masked = (i_full - i_lo) * G

  @pl.when(wg < 2)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    k0 = cta_k0 + wg * _ROWS
    rows = (b, pl.ds(k0, _ROWS), kh)
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, held.at[2 * wg])
    plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, held.at[2 * wg + 1])
    plgpu.barrier_wait(held.at[2 * wg])
    plgpu.barrier_wait(held.at[2 * wg + 1])

    def step(t, carry, masked):
      dk, dv = carry
      slot = lax.rem(t, jnp.int32(S))
      i = i_lo + lax.div(t, jnp.int32(G))
      q_slot, do_slot = q_smem.at[slot], do_smem.at[slot]
      plgpu.barrier_wait(q_loaded.at[slot])
      plgpu.barrier_wait(do_loaded.at[slot])

      def sT_dpT(sT_ref, dpT_ref):
        plgpu.wgmma(sT_ref, k_smem, plgpu.transpose_ref(q_slot, (1, 0)))
        plgpu.wgmma(dpT_ref, v_smem, plgpu.transpose_ref(do_slot, (1, 0)))

      sT, dpT = _accs(sT_dpT, (_ROWS, bq), (_ROWS, bq))
      if masked:
        r_ = plgpu.broadcasted_iota(jnp.int32, sT.shape, 0, layout=plgpu.Layout.WGMMA)
        c_ = plgpu.broadcasted_iota(jnp.int32, sT.shape, 1, layout=plgpu.Layout.WGMMA)
        sT = jnp.where(c_ + i * bq >= r_ + k0, sT, -jnp.inf)
      plgpu.barrier_wait(lse_loaded.at[slot])
      plgpu.barrier_wait(delta_loaded.at[slot])
      lse = plgpu.layout_cast(lse_smem.at[slot][...], plgpu.Layout.WGMMA.reduce(0))
      delta = plgpu.layout_cast(delta_smem.at[slot][...], plgpu.Layout.WGMMA.reduce(0))
      pT = jnp.exp2(sT * (scale * _LOG2E) - lax.broadcast_in_dim(lse, sT.shape, [1]))
      dsT = pT * (dpT - lax.broadcast_in_dim(delta, sT.shape, [1]))

      def dk_dv(dk_ref, dv_ref):
        plgpu.wgmma(dv_ref, pT.astype(dtype), do_slot)
        plgpu.wgmma(dk_ref, dsT.astype(dtype), q_slot)

      dk, dv = _accs_add((dk, dv), dk_dv)
      plgpu.barrier_arrive(free.at[slot])
      return dk, dv

    carry = (_zeros((_ROWS, D)), _zeros((_ROWS, D)))
    if causal:
      carry = lax.fori_loop(0, n_masked, functools.partial(step, masked=True), carry)
    dk, dv = lax.fori_loop(n_masked, n, functools.partial(step, masked=False), carry)
    k_smem[...] = (dk * scale).astype(dtype)
    v_smem[...] = dv.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    fetch = _dkv_fetch_fn(q_ref, do_ref, lse_ref, delta_ref, q_smem, do_smem, lse_smem,
                          delta_smem, q_loaded, do_loaded, lse_loaded, delta_loaded, b, kh, i_lo,
                          bq, G)
    _mgpu.stream(n, S, fetch, (free,))


def _dkv_fetch_fn(q_ref, do_ref, lse_ref, delta_ref, q_smem, do_smem, lse_smem, delta_smem,
                  q_loaded, do_loaded, lse_loaded, delta_loaded, b, kh, i_lo, bq, G):
  """The dK/dV memory group's fetch(t, slot): step t's query block of query head t % G."""

  def fetch(t, slot):
    i = i_lo + lax.div(t, jnp.int32(G))
    h = kh * G + lax.rem(t, jnp.int32(G))
    rows = (b, pl.ds(i * bq, bq), h)
    cols = (b, h, pl.ds(i * bq, bq))
    plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_loaded.at[slot])
    plgpu.copy_gmem_to_smem(lse_ref.at[cols], lse_smem.at[slot], lse_loaded.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_loaded.at[slot])
    plgpu.copy_gmem_to_smem(delta_ref.at[cols], delta_smem.at[slot], delta_loaded.at[slot])

  return fetch


def backward(q, k, v, o, lse, do, *, causal, block_kv, block_q, steps, interpret):
  """(dq, dk, dv) in q's dtype; block_kv: keys the dQ kernel streams, block_q: query rows the
  dK/dV kernel streams; steps: ring slots of both."""
  B, T, H, D = q.shape
  K = k.shape[2]
  G = H // K
  dtype = q.dtype
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  do = do.astype(dtype)
  params = plgpu.CompilerParams(approx_math=True)
  n_tiles = T // (2 * _ROWS)
  transforms = _mgpu.smem_transforms(dtype)

  S = min(steps, T // block_kv)
  dq = plgpu.kernel(
      functools.partial(_dq_kernel, bk=block_kv, S=S, causal=causal, G=G, n_tiles=n_tiles),
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=[
          plgpu.SMEM((2, _ROWS, D), dtype, transforms=transforms),
          plgpu.SMEM((2, _ROWS, D), dtype, transforms=transforms),
          plgpu.SMEM((2, _ROWS), jnp.float32),
          plgpu.SMEM((2, _ROWS), jnp.float32),
          plgpu.SMEM((S, block_kv, D), dtype, transforms=transforms),
          plgpu.SMEM((S, block_kv, D), dtype, transforms=transforms),
          plgpu.Barrier(num_barriers=8),
          plgpu.Barrier(num_barriers=S),
          plgpu.Barrier(num_barriers=S),
          plgpu.Barrier(num_arrivals=2, num_barriers=S),
      ],
      grid=(H, B, n_tiles), grid_names=("h", "b", "q"), num_threads=3, thread_name="wg",
      compiler_params=params, interpret=interpret,
  )(q, k, v, do, lse, delta)

  S = min(steps, (T // block_q) * G)
  dk, dv = plgpu.kernel(
      functools.partial(_dkv_kernel, bq=block_q, S=S, causal=causal, G=G),
      out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
      scratch_types=[
          plgpu.SMEM((2, _ROWS, D), dtype, transforms=transforms),
          plgpu.SMEM((2, _ROWS, D), dtype, transforms=transforms),
          plgpu.SMEM((S, block_q, D), dtype, transforms=transforms),
          plgpu.SMEM((S, block_q, D), dtype, transforms=transforms),
          plgpu.SMEM((S, block_q), jnp.float32),
          plgpu.SMEM((S, block_q), jnp.float32),
          plgpu.Barrier(num_barriers=4),
          plgpu.Barrier(num_barriers=S),
          plgpu.Barrier(num_barriers=S),
          plgpu.Barrier(num_barriers=S),
          plgpu.Barrier(num_barriers=S),
          plgpu.Barrier(num_arrivals=2, num_barriers=S),
      ],
      grid=(K, B, n_tiles), grid_names=("kh", "b", "k"), num_threads=3, thread_name="wg",
      compiler_params=params, interpret=interpret,
  )(q, k, v, do, lse, delta)
  return dq, dk, dv
