"""Flash attention in Pallas (Triton lowering): causal, GQA, packed-document segment ids.

Same contract as `attention.attention_xla` (the reference): q_BTHD, k_BTKD, v_BTKD with H % K == 0,
segment_ids_BT or None, output in q's dtype; softmax statistics and all accumulators in fp32.

How it differs from jax's own `ops.gpu.attention.mha`:
- GQA without repeating K/V: a query head's program indexes kv head h // G; the dK/dV kernel runs
  one program per (kv block, kv head) and loops over its G query heads, so dK/dV need no reduction.
- Skipped blocks: for every (query block, key block) pair the wrapper decides, from causality and
  the per-block [min, max] segment id ranges, whether any element can be unmasked; each program
  loops only over the contiguous range of key (or query) blocks that can. Interval disjointness is
  exact for any ids, and with packed (non-decreasing) ids it skips everything outside a document.
- Unmasked blocks skip the mask: a block pair is "full" when every key is visible to every query
  (below the causal diagonal, and all ids of both blocks equal); each program runs three loops,
  masked [lo, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi), so only the diagonal
  and document-boundary blocks pay for the iota/compare/select (the Triton tutorial's split).
- Heavy programs first: with causality the work per program grows with the query block (forward,
  dQ) or shrinks with the key block (dK/dV); the grid puts the block index on the slowest launch
  axis, ordered heaviest first, so the last wave holds the lightest programs.
- Backward: a dQ kernel (query tile held, key tiles streamed; it also writes delta = rowsum(o * do),
  which it reads anyway) and a dK/dV kernel (key tile held, query tiles streamed, in the transposed
  orientation s^T = k q^T so no register tile is transposed); each has its own tiles and launch
  parameters in FlashConfig. The scale rides on the exp2's FMA (s * scale2 - m), never a pass.
- Any length: T is padded up to a multiple of the blocks (padded keys are masked).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from tinyllama_jax.kernels import _pallas

# An alignment hint only; jax 0.11 moved several pl.* helpers, so never fail for want of it.
_multiple_of = getattr(pl, "multiple_of", lambda x, _: x)
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Tile sizes (powers of two, >= 16 for Triton's dot) and launch parameters, per kernel.

  Forward: block_q x block_k. dQ kernel: block_q_dq query rows held, block_k_dq keys streamed.
  dK/dV kernel: block_k_dkv keys held, block_q_dkv query rows streamed. block_q_bwd / block_k_bwd
  (legacy), when set, override the query / key tile of both backward kernels. Warps None: 4 for
  head dim 64, 8 for 128; the dq/dkv warps and stages None: the forward's.
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 128
  block_k_dq: int = 32
  block_q_dkv: int = 32
  block_k_dkv: int = 128
  block_q_bwd: int | None = None
  block_k_bwd: int | None = None
  num_warps: int | None = None
  num_stages: int = 2
  num_warps_dq: int | None = None
  num_stages_dq: int | None = None
  num_warps_dkv: int | None = None
  num_stages_dkv: int | None = None
  heavy_first: bool = True
  interpret: bool | None = None  # None: interpret on CPU

  def tiles(self):
    """(fwd q, fwd k, dq q, dq k, dkv q, dkv k) after the legacy overrides."""
    bq_b, bk_b = self.block_q_bwd, self.block_k_bwd
    return (self.block_q, self.block_k, bq_b or self.block_q_dq, bk_b or self.block_k_dq,
            bq_b or self.block_q_dkv, bk_b or self.block_k_dkv)

  def launch(self, kernel, D):
    """(num_warps, num_stages) for kernel 'fwd', 'dq' or 'dkv' at head dim D."""
    warps = self.num_warps or (4 if D <= 64 else 8)
    stages = self.num_stages
    if kernel != "fwd":
      warps = getattr(self, f"num_warps_{kernel}") or warps
      stages = getattr(self, f"num_stages_{kernel}") or stages
    return warps, stages


def _check(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT):
  B, T, H, D = q_BTHD.shape
  if k_BTKD.shape != v_BTKD.shape or k_BTKD.shape[:2] != (B, T) or k_BTKD.shape[3] != D:
    raise ValueError(f"attention 'pallas': k {k_BTKD.shape} and v {v_BTKD.shape} must be "
                     f"[B={B}, T={T}, kv heads, D={D}] like q {q_BTHD.shape}")
  K = k_BTKD.shape[2]
  if H % K:
    raise ValueError(f"attention 'pallas': query heads ({H}) must be a multiple of kv heads ({K})")
  if D < 16 or D & (D - 1):
    raise ValueError(f"attention 'pallas' needs a power-of-two head dim >= 16 (Triton tiles), "
                     f"got {D}; use --config.model.kernels.attention=xla or cudnn")
  if segment_ids_BT is not None and segment_ids_BT.shape != (B, T):
    raise ValueError(f"segment_ids {segment_ids_BT.shape} must be [B, T] = {(B, T)}")


def _live_full(seg_BT, B, T, T_pad, bq, bk, causal):
  """[B, nq, nk] bools: block pairs with any unmasked element, and with no masked element."""
  nq, nk = T_pad // bq, T_pad // bk
  q0_I = jnp.arange(nq)[None, :, None] * bq  # first query position of each block
  k0_J = jnp.arange(nk)[None, None, :] * bk
  live_BIJ = jnp.ones((B, nq, nk), bool)
  full_BIJ = jnp.ones((B, nq, nk), bool)
  if causal:
    live_BIJ &= k0_J <= q0_I + bq - 1
    full_BIJ &= k0_J + bk - 1 <= q0_I  # the last key precedes the first query
  elif T_pad != T:
    full_BIJ &= k0_J + bk <= T  # no padded key
  if seg_BT is not None:
    q_min, q_max = seg_BT.reshape(B, nq, bq).min(-1), seg_BT.reshape(B, nq, bq).max(-1)
    k_min, k_max = seg_BT.reshape(B, nk, bk).min(-1), seg_BT.reshape(B, nk, bk).max(-1)
    live_BIJ &= (q_min[:, :, None] <= k_max[:, None, :]) & (k_min[:, None, :] <= q_max[:, :, None])
    full_BIJ &= ((q_min == q_max)[:, :, None] & (k_min == k_max)[:, None, :]
                 & (q_min[:, :, None] == k_min[:, None, :]))
  return live_BIJ, full_BIJ & live_BIJ


def _lo_hi(live, axis):
  """First and one-past-last True along axis (both 0 where none)."""
  n = live.shape[axis]
  first = jnp.argmax(live, axis=axis)
  last = n - jnp.argmax(jnp.flip(live, axis=axis), axis=axis)
  any_ = live.any(axis=axis)
  return (jnp.where(any_, first, 0).astype(jnp.int32),
          jnp.where(any_, last, 0).astype(jnp.int32))


def _block_ranges(seg_BT, B, T_pad, bq, bk, causal):
  """For each query block the [lo, hi) key blocks that can be unmasked, and the transpose.

  Returns kv_lo_BI, kv_hi_BI (per query block) and q_lo_BJ, q_hi_BJ (per key block), int32.
  """
  live_BIJ, _ = _live_full(seg_BT, B, T_pad, T_pad, bq, bk, causal)
  return _lo_hi(live_BIJ, 2) + _lo_hi(live_BIJ, 1)


def _split_ranges(seg_BT, B, T, T_pad, bq, bk, causal, axis):
  """(lo, full_lo, full_hi, hi), each [B, n] int32, for the blocks along the other axis.

  axis 2: per query block, over key blocks; axis 1: per key block, over query blocks. [lo, hi)
  holds every live block; [full_lo, full_hi) is a run of full blocks inside it (the first run:
  with packed ids the only one), which the kernels visit without a mask.
  """
  live, full = _live_full(seg_BT, B, T, T_pad, bq, bk, causal)
  lo, hi = _lo_hi(live, axis)
  n = live.shape[axis]
  idx = jnp.arange(n).reshape((1, n, 1) if axis == 1 else (1, 1, n))
  f_lo = jnp.argmax(full, axis=axis)
  not_full_after = ~full & (idx >= jnp.expand_dims(f_lo, axis))
  f_hi = jnp.where(not_full_after.any(axis), jnp.argmax(not_full_after, axis=axis), n)
  any_full = full.any(axis)
  f_lo = jnp.where(any_full, f_lo, hi).astype(jnp.int32)
  f_hi = jnp.where(any_full, f_hi, hi).astype(jnp.int32)
  return lo, f_lo, f_hi, hi


def _dot(a, b, trans_a=False, trans_b=False):
  """a @ b (optionally transposed) accumulated in fp32; fp32 inputs without TF32.

  lax.dot_general rather than pl.dot: jax 0.11 deprecates pl.dot (the GPU machine raises on it).
  """
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _mask(s, q_pos, k_pos, seg_q, seg_k, *, causal, T, T_pad):
  """Masks logits s; q_pos/seg_q and k_pos/seg_k are shaped to broadcast against s (either
  orientation). Padded keys (position >= T) only matter without causality."""
  keep = None

  def both(a, b):
    return b if a is None else a & b

  if causal:
    keep = both(keep, q_pos >= k_pos)
  elif T_pad != T:
    keep = both(keep, jnp.broadcast_to(k_pos < T, s.shape))
  if seg_q is not None:
    keep = both(keep, seg_q == seg_k)
  return s if keep is None else jnp.where(keep, s, _MASK_VALUE)


def _three_loops(ranges, body, carry):
  """body(j, carry, masked) over [lo, f_lo) masked, [f_lo, f_hi) unmasked, [f_hi, hi) masked."""
  lo, f_lo, f_hi, hi = ranges
  carry = lax.fori_loop(lo, f_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(f_lo, f_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(f_hi, hi, functools.partial(body, masked=True), carry)


def _grid(n, B, heads, heavy_first, reverse):
  """Launch grid and the map from program ids to (block, batch, head).

  Pallas' Triton launch makes grid axis 0 the fastest; heavy_first puts the block axis last
  (slowest), reversed when the heavy blocks are the last ones.
  """
  if not heavy_first:
    return (n, B, heads), lambda a, b, c: (a, b, c)
  return (heads, B, n), lambda a, b, c: ((n - 1 - c) if reverse else c, b, a)


def _ids(unpack):
  return unpack(pl.program_id(0), pl.program_id(1), pl.program_id(2))


def _fwd_kernel(lo_ref, flo_ref, fhi_ref, hi_ref, q_ref, k_ref, v_ref, *rest, scale2, causal,
                bq, bk, T, T_pad, has_seg, unpack):
  seg_ref = rest[0] if has_seg else None
  o_ref, lse_ref = rest[-2:]
  i = _ids(unpack)[0]
  q = q_ref[...]
  D = q.shape[-1]
  q_pos = (i * bq + jnp.arange(bq))[:, None]
  seg_q = seg_ref[pl.ds(_multiple_of(i * bq, bq), bq)][:, None] if has_seg else None

  def body(j, carry, masked):
    acc, m, l = carry
    ks = pl.ds(_multiple_of(j * bk, bk), bk)
    s = _dot(q, k_ref[ks, :], trans_b=True)  # unscaled: the scale rides on the exp2's FMA
    if masked:
      seg_k = seg_ref[ks][None, :] if has_seg else None
      s = _mask(s, q_pos, (j * bk + jnp.arange(bk))[None, :], seg_q, seg_k, causal=causal, T=T,
                T_pad=T_pad)
    m_new = jnp.maximum(m, s.max(axis=-1) * scale2)
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s * scale2 - m_new[:, None])
    l = l * alpha + p.sum(axis=-1)
    v = v_ref[ks, :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  init = (jnp.zeros((bq, D), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  ranges = (lo_ref[...], flo_ref[...], fhi_ref[...], hi_ref[...])
  acc, m, l = _three_loops(ranges, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)  # log2 domain; the backward uses exp2


def _dq_kernel(lo_ref, flo_ref, fhi_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref,
               *rest, scale2, sm_scale, causal, bq, bk, T, T_pad, has_seg, unpack):
  """dQ for one query block of one head; also writes delta = rowsum(o * do) for the dK/dV kernel
  (this kernel reads do anyway, so delta costs one read of o instead of an XLA pass)."""
  seg_ref = rest[0] if has_seg else None
  dq_ref, delta_ref = rest[-2:]
  i = _ids(unpack)[0]
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...][:, None]
  delta = jnp.sum(o_ref[...].astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta_ref[...] = delta
  delta = delta[:, None]
  q_pos = (i * bq + jnp.arange(bq))[:, None]
  seg_q = seg_ref[pl.ds(_multiple_of(i * bq, bq), bq)][:, None] if has_seg else None

  def body(j, dq, masked):
    ks = pl.ds(_multiple_of(j * bk, bk), bk)
    k = k_ref[ks, :]
    s = _dot(q, k, trans_b=True)
    if masked:
      seg_k = seg_ref[ks][None, :] if has_seg else None
      s = _mask(s, q_pos, (j * bk + jnp.arange(bk))[None, :], seg_q, seg_k, causal=causal, T=T,
                T_pad=T_pad)
    p = jnp.exp2(s * scale2 - lse)
    dp = _dot(do, v_ref[ks, :], trans_b=True)
    ds = p * (dp - delta)
    return dq + _dot(ds.astype(k.dtype), k)

  ranges = (lo_ref[...], flo_ref[...], fhi_ref[...], hi_ref[...])
  dq = _three_loops(ranges, body, jnp.zeros((bq, q.shape[-1]), jnp.float32))
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, flo_ref, fhi_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, *rest, scale2, sm_scale, causal, bq, bk, T, T_pad, has_seg, G, unpack):
  """One kv block of one kv head: loops over the live query blocks x its G query heads.

  Works in the transposed orientation (s^T = k q^T, [bk, bq]) so p^T and ds^T feed the dV and dK
  dots directly; only loaded tiles (q, do) are transposed, which Triton does in shared memory.
  """
  seg_ref = rest[0] if has_seg else None
  dk_ref, dv_ref = rest[-2:]
  j = _ids(unpack)[0]
  k = k_ref[...]
  v = v_ref[...]
  D = k.shape[-1]
  k_pos = (j * bk + jnp.arange(bk))[:, None]
  seg_k = seg_ref[pl.ds(_multiple_of(j * bk, bk), bk)][:, None] if has_seg else None

  def body(t, carry, lo, masked):
    dk, dv = carry
    # Query block outer, head inner: the G heads of a row are adjacent in memory. t >= 0, so
    # lax's truncating div/rem are exact (jnp's floor versions lower to a failing select here).
    i = lo + lax.div(t, jnp.int32(G))
    g = lax.rem(t, jnp.int32(G))
    qs = pl.ds(_multiple_of(i * bq, bq), bq)
    q = q_ref[qs, g, :]
    do = do_ref[qs, g, :]
    sT = _dot(k, q, trans_b=True)
    if masked:
      seg_q = seg_ref[qs][None, :] if has_seg else None
      sT = _mask(sT, (i * bq + jnp.arange(bq))[None, :], k_pos, seg_q, seg_k, causal=causal, T=T,
                 T_pad=T_pad)
    pT = jnp.exp2(sT * scale2 - lse_ref[g, qs][None, :])
    dv = dv + _dot(pT.astype(do.dtype), do)
    dpT = _dot(v, do, trans_b=True)
    dsT = pT * (dpT - delta_ref[g, qs][None, :])
    dk = dk + _dot(dsT.astype(q.dtype), q)
    return dk, dv

  lo, f_lo, f_hi, hi = (lo_ref[...], flo_ref[...], fhi_ref[...], hi_ref[...])
  zeros = jnp.zeros((bk, D), jnp.float32)
  carry = (zeros, zeros)
  for a, b, masked in ((lo, f_lo, True), (f_lo, f_hi, False), (f_hi, hi, True)):
    carry = lax.fori_loop(0, G * (b - a), functools.partial(body, lo=a, masked=masked), carry)
  dk, dv = carry
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(unpack):
  """spec(block_shape, index): a BlockSpec whose index map gets (block, batch, head)."""
  return lambda shape, index: pl.BlockSpec(shape, lambda *g: index(*unpack(*g)))


def _forward(q, k, v, seg, cfg, T, causal):
  B, T_pad, H, D = q.shape
  G = H // k.shape[2]
  bq, bk = cfg.tiles()[:2]
  grid, unpack = _grid(T_pad // bq, B, H, cfg.heavy_first, reverse=causal)
  spec = _specs(unpack)
  ranges = list(_split_ranges(seg, B, T, T_pad, bq, bk, causal, 2))
  q_blk = spec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
  kv_all = spec((None, T_pad, None, D), lambda i, b, h: (b, 0, h // G, 0))
  in_specs = [spec((None, None), lambda i, b, h: (b, i))] * 4 + [q_blk, kv_all, kv_all]
  args = ranges + [q, k, v]
  if seg is not None:
    in_specs.append(spec((None, T_pad), lambda i, b, h: (b, 0)))
    args.append(seg)
  kernel = functools.partial(_fwd_kernel, scale2=D ** -0.5 * _LOG2E, causal=causal, bq=bq, bk=bk,
                             T=T, T_pad=T_pad, has_seg=seg is not None, unpack=unpack)
  warps, stages = cfg.launch("fwd", D)
  o, lse = _pallas.call(
      kernel, grid=grid, in_specs=in_specs,
      out_specs=[q_blk, spec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, T_pad), jnp.float32)],
      name="flash_fwd", num_warps=warps, num_stages=stages,
      interpret=_pallas.resolve_interpret(cfg.interpret))(*args)
  return o, lse


def _backward(q, k, v, seg, o, lse, do, cfg, T, causal):
  B, T_pad, H, D = q.shape
  K = k.shape[2]
  G = H // K
  _, _, bq, bk, bq2, bk2 = cfg.tiles()
  interpret = _pallas.resolve_interpret(cfg.interpret)
  sm_scale = D ** -0.5
  common = dict(scale2=sm_scale * _LOG2E, sm_scale=sm_scale, causal=causal, T=T, T_pad=T_pad,
                has_seg=seg is not None)
  seg_args = [] if seg is None else [seg]

  # dQ (and delta): grid over (query block, batch, query head).
  grid, unpack = _grid(T_pad // bq, B, H, cfg.heavy_first, reverse=causal)
  spec = _specs(unpack)
  ranges = list(_split_ranges(seg, B, T, T_pad, bq, bk, causal, 2))
  range_spec = spec((None, None), lambda i, b, h: (b, i))
  q_blk = spec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
  kv_all = spec((None, T_pad, None, D), lambda i, b, h: (b, 0, h // G, 0))
  row_blk = spec((None, None, bq), lambda i, b, h: (b, h, i))
  seg_specs = [spec((None, T_pad), lambda i, b, h: (b, 0))] * len(seg_args)
  warps, stages = cfg.launch("dq", D)
  dq, delta_BHT = _pallas.call(
      functools.partial(_dq_kernel, bq=bq, bk=bk, unpack=unpack, **common), grid=grid,
      in_specs=[range_spec] * 4 + [q_blk, kv_all, kv_all, q_blk, q_blk, row_blk] + seg_specs,
      out_specs=[q_blk, row_blk],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, T_pad), jnp.float32)],
      name="flash_dq", num_warps=warps, num_stages=stages, interpret=interpret,
  )(*ranges, q, k, v, o, do, lse, *seg_args)

  # dK/dV: grid over (kv block, batch, kv head); q/do/lse/delta blocks cover the G query heads.
  # No reversal: with causality the first key blocks are the heavy ones.
  grid, unpack = _grid(T_pad // bk2, B, K, cfg.heavy_first, reverse=False)
  spec = _specs(unpack)
  ranges = list(_split_ranges(seg, B, T, T_pad, bq2, bk2, causal, 1))
  range_spec = spec((None, None), lambda j, b, h: (b, j))
  q_grp = spec((None, T_pad, G, D), lambda j, b, h: (b, 0, h, 0))
  kv_blk = spec((None, bk2, None, D), lambda j, b, h: (b, j, h, 0))
  row_grp = spec((None, G, T_pad), lambda j, b, h: (b, h, 0))
  seg_specs = [spec((None, T_pad), lambda j, b, h: (b, 0))] * len(seg_args)
  warps, stages = cfg.launch("dkv", D)
  dk, dv = _pallas.call(
      functools.partial(_dkv_kernel, G=G, bq=bq2, bk=bk2, unpack=unpack, **common), grid=grid,
      in_specs=[range_spec] * 4 + [q_grp, kv_blk, kv_blk, q_grp, row_grp, row_grp] + seg_specs,
      out_specs=[kv_blk, kv_blk],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="flash_dkv", num_warps=warps, num_stages=stages, interpret=interpret,
  )(*ranges, q, k, v, do, lse, delta_BHT, *seg_args)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, seg, cfg, T, causal):
  return _forward(q, k, v, seg, cfg, T, causal)[0]


def _flash_fwd(q, k, v, seg, cfg, T, causal):
  o, lse = _forward(q, k, v, seg, cfg, T, causal)
  return o, (q, k, v, seg, o, lse)


def _flash_bwd(cfg, T, causal, res, do):
  q, k, v, seg, o, lse = res
  dq, dk, dv = _backward(q, k, v, seg, o, lse, do, cfg, T, causal)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True,
                    config=FlashConfig()):
  """Drop-in for `attention_xla`, with tile sizes in `config`."""
  _check(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)
  T = q_BTHD.shape[1]
  blocks = config.tiles()
  if any(b < 16 or b & (b - 1) for b in blocks):
    raise ValueError(f"FlashConfig blocks must be powers of two >= 16, got {blocks}")
  T_pad = _pallas.round_up(T, max(blocks))
  pad = [(0, 0), (0, T_pad - T), (0, 0), (0, 0)]
  q, k, v = (jnp.pad(x, pad) for x in (q_BTHD, k_BTKD, v_BTKD))
  seg = None
  if segment_ids_BT is not None:
    # Edge padding keeps each block's [min, max] id range as tight as the real ids'.
    seg = jnp.pad(segment_ids_BT.astype(jnp.int32), [(0, 0), (0, T_pad - T)], mode="edge")
  return _flash(q, k, v, seg, config, T, causal)[:, :T]


_TILE_FIELDS = ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv",
                "block_q_bwd", "block_k_bwd")


# Backward tiles by head dim, from the H200 sweep (bench/NOTES.md, bench/results/attention-sweep-*):
# d64: 64x64 in both backward kernels, 1.80 ms fwd+bwd (0.97 with packed documents) against the
# 128x32 tiles' 1.91 (1.30); d128: the 128x32 tiles with 3 pipeline stages, 1.75 (1.23) against
# 64x64's 2.80 (1.49).
_MEASURED_BEST = {64: FlashConfig(block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64),
                  128: FlashConfig(num_stages_dq=3, num_stages_dkv=3)}


def default_config(T, config=None, *, dtype=None, head_dim=None):
  """Tiles for length T: `config` (default: the measured best for the head dim, else
  FlashConfig()), shrunk (to >= 16) for short sequences.

  With rows wider than 256 bytes (fp32 at head dim 128) both backward kernels fall back to 64x64
  tiles, the ones measured to compile there: the 128-wide held tiles may not fit shared memory.
  """
  cap = max(16, 1 << max(T - 1, 1).bit_length())
  c = config or _MEASURED_BEST.get(head_dim, FlashConfig())
  if dtype is not None and head_dim is not None and jnp.dtype(dtype).itemsize * head_dim > 256:
    c = dataclasses.replace(c, block_q_bwd=min(c.block_q_bwd or 64, 64),
                            block_k_bwd=min(c.block_k_bwd or 64, 64))
  return dataclasses.replace(c, **{f: min(getattr(c, f), cap) for f in _TILE_FIELDS
                                   if getattr(c, f) is not None})


def attention_pallas(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True):
  """The backend table's entry: flash attention with tiles chosen for the length."""
  return flash_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, causal=causal,
                         config=default_config(q_BTHD.shape[1], dtype=q_BTHD.dtype,
                                               head_dim=q_BTHD.shape[3]))
