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
  """Tile sizes (powers of two, >= 16 for Triton's dot) and launch parameters."""
  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int | None = None   # None: 4 for head dim 64, 8 for 128
  num_stages: int = 2
  interpret: bool | None = None  # None: interpret on CPU


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


def _block_ranges(seg_BT, B, T_pad, bq, bk, causal):
  """For each query block the [lo, hi) key blocks that can be unmasked, and the transpose.

  Returns kv_lo_BI, kv_hi_BI (per query block) and q_lo_BJ, q_hi_BJ (per key block), int32.
  """
  nq, nk = T_pad // bq, T_pad // bk
  i_I = jnp.arange(nq)
  j_J = jnp.arange(nk)
  live_BIJ = jnp.ones((B, nq, nk), bool)
  if causal:
    live_BIJ &= (j_J * bk)[None, None, :] <= (i_I * bq + bq - 1)[None, :, None]
  if seg_BT is not None:
    q_min, q_max = seg_BT.reshape(B, nq, bq).min(-1), seg_BT.reshape(B, nq, bq).max(-1)
    k_min, k_max = seg_BT.reshape(B, nk, bk).min(-1), seg_BT.reshape(B, nk, bk).max(-1)
    live_BIJ &= (q_min[:, :, None] <= k_max[:, None, :]) & (k_min[:, None, :] <= q_max[:, :, None])

  def lo_hi(live, axis, n):
    first = jnp.argmax(live, axis=axis)
    last = n - jnp.argmax(jnp.flip(live, axis=axis), axis=axis)
    any_ = live.any(axis=axis)
    return (jnp.where(any_, first, 0).astype(jnp.int32),
            jnp.where(any_, last, 0).astype(jnp.int32))

  kv_lo, kv_hi = lo_hi(live_BIJ, 2, nk)
  q_lo, q_hi = lo_hi(live_BIJ, 1, nq)
  return kv_lo, kv_hi, q_lo, q_hi


def _dot(a, b, trans_a=False, trans_b=False):
  """a @ b (optionally transposed) accumulated in fp32; fp32 inputs without TF32.

  lax.dot_general rather than pl.dot: jax 0.11 deprecates pl.dot (the GPU machine raises on it).
  """
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _mask(s, q_pos, k_pos, seg_q, seg_k, *, causal, T, T_pad):
  """Masks logits s[bq, bk]; padded keys (position >= T) only matter without causality."""
  keep = None

  def both(a, b):
    return b if a is None else a & b

  if causal:
    keep = both(keep, q_pos[:, None] >= k_pos[None, :])
  elif T_pad != T:
    keep = both(keep, jnp.broadcast_to(k_pos[None, :] < T, s.shape))
  if seg_q is not None:
    keep = both(keep, seg_q[:, None] == seg_k[None, :])
  return s if keep is None else jnp.where(keep, s, _MASK_VALUE)


def _fwd_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, *rest, scale2, causal, bq, bk, T,
                T_pad, has_seg):
  seg_ref = rest[0] if has_seg else None
  o_ref, lse_ref = rest[-2:]
  i = pl.program_id(0)
  q = q_ref[...]
  D = q.shape[-1]
  q_pos = i * bq + jnp.arange(bq)
  seg_q = seg_ref[pl.ds(_multiple_of(i * bq, bq), bq)] if has_seg else None

  def body(j, carry):
    acc, m, l = carry
    ks = pl.ds(_multiple_of(j * bk, bk), bk)
    k = k_ref[ks, :]
    s = _dot(q, k, trans_b=True) * scale2
    seg_k = seg_ref[ks] if has_seg else None
    s = _mask(s, q_pos, j * bk + jnp.arange(bk), seg_q, seg_k, causal=causal, T=T, T_pad=T_pad)
    m_new = jnp.maximum(m, s.max(axis=-1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = l * alpha + p.sum(axis=-1)
    v = v_ref[ks, :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  init = (jnp.zeros((bq, D), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(kv_lo_ref[...], kv_hi_ref[...], body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)  # log2 domain; the backward uses exp2


def _dq_kernel(kv_lo_ref, kv_hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
               scale2, sm_scale, causal, bq, bk, T, T_pad, has_seg):
  seg_ref = rest[0] if has_seg else None
  dq_ref = rest[-1]
  i = pl.program_id(0)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_pos = i * bq + jnp.arange(bq)
  seg_q = seg_ref[pl.ds(_multiple_of(i * bq, bq), bq)] if has_seg else None

  def body(j, dq):
    ks = pl.ds(_multiple_of(j * bk, bk), bk)
    k = k_ref[ks, :]
    v = v_ref[ks, :]
    s = _dot(q, k, trans_b=True) * scale2
    seg_k = seg_ref[ks] if has_seg else None
    s = _mask(s, q_pos, j * bk + jnp.arange(bk), seg_q, seg_k, causal=causal, T=T, T_pad=T_pad)
    p = jnp.exp2(s - lse[:, None])
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(kv_lo_ref[...], kv_hi_ref[...], body,
                     jnp.zeros((bq, q.shape[-1]), jnp.float32))
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_lo_ref, q_hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest,
                scale2, sm_scale, causal, bq, bk, T, T_pad, has_seg, G):
  """One kv block of one kv head: loops over its G query heads x the live query blocks."""
  seg_ref = rest[0] if has_seg else None
  dk_ref, dv_ref = rest[-2:]
  j = pl.program_id(0)
  k = k_ref[...]
  v = v_ref[...]
  D = k.shape[-1]
  k_pos = j * bk + jnp.arange(bk)
  seg_k = seg_ref[pl.ds(_multiple_of(j * bk, bk), bk)] if has_seg else None
  q_lo = q_lo_ref[...]
  n_i = q_hi_ref[...] - q_lo

  def body(t, carry):
    dk, dv = carry
    g = t // n_i
    i = q_lo + t % n_i
    qs = pl.ds(_multiple_of(i * bq, bq), bq)
    q = q_ref[qs, g, :]
    do = do_ref[qs, g, :]
    lse = lse_ref[g, qs]
    delta = delta_ref[g, qs]
    s = _dot(q, k, trans_b=True) * scale2
    seg_q = seg_ref[qs] if has_seg else None
    s = _mask(s, i * bq + jnp.arange(bq), k_pos, seg_q, seg_k, causal=causal, T=T, T_pad=T_pad)
    p = jnp.exp2(s - lse[:, None])
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros((bk, D), jnp.float32)
  dk, dv = lax.fori_loop(0, G * n_i, body, (zeros, zeros))
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _statics(q, k, cfg, T, causal, has_seg):
  B, T_pad, H, D = q.shape
  K = k.shape[2]
  sm_scale = D ** -0.5
  warps = cfg.num_warps or (4 if D <= 64 else 8)
  common = dict(causal=causal, T=T, T_pad=T_pad, has_seg=has_seg)
  return B, T_pad, H, K, D, sm_scale, warps, common


def _forward(q, k, v, seg, cfg, T, causal):
  B, T_pad, H, K, D, sm_scale, warps, common = _statics(q, k, cfg, T, causal, seg is not None)
  G = H // K
  bq, bk = cfg.block_q, cfg.block_k
  kv_lo, kv_hi, _, _ = _block_ranges(seg, B, T_pad, bq, bk, causal)
  scalar = pl.BlockSpec((None, None), lambda i, b, h: (b, i))
  in_specs = [scalar, scalar,
              pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
              pl.BlockSpec((None, T_pad, None, D), lambda i, b, h: (b, 0, h // G, 0)),
              pl.BlockSpec((None, T_pad, None, D), lambda i, b, h: (b, 0, h // G, 0))]
  args = [kv_lo, kv_hi, q, k, v]
  if seg is not None:
    in_specs.append(pl.BlockSpec((None, T_pad), lambda i, b, h: (b, 0)))
    args.append(seg)
  kernel = functools.partial(_fwd_kernel, scale2=sm_scale * _LOG2E, bq=bq, bk=bk, **common)
  o, lse = _pallas.call(
      kernel, grid=(T_pad // bq, B, H), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, T_pad), jnp.float32)],
      name="flash_fwd", num_warps=warps, num_stages=cfg.num_stages,
      interpret=_pallas.resolve_interpret(cfg.interpret))(*args)
  return o, lse


def _backward(q, k, v, seg, o, lse, do, cfg, T, causal):
  B, T_pad, H, K, D, sm_scale, warps, common = _statics(q, k, cfg, T, causal, seg is not None)
  G = H // K
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  interpret = _pallas.resolve_interpret(cfg.interpret)
  delta_BHT = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  kv_lo, kv_hi, q_lo, q_hi = _block_ranges(seg, B, T_pad, bq, bk, causal)
  statics = dict(scale2=sm_scale * _LOG2E, sm_scale=sm_scale, bq=bq, bk=bk, **common)
  seg_spec = pl.BlockSpec((None, T_pad), lambda i, b, h: (b, 0))
  seg_args = [] if seg is None else [seg]

  scalar = pl.BlockSpec((None, None), lambda i, b, h: (b, i))
  q_blk = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
  kv_all = pl.BlockSpec((None, T_pad, None, D), lambda i, b, h: (b, 0, h // G, 0))
  row_blk = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  dq = _pallas.call(
      functools.partial(_dq_kernel, **statics), grid=(T_pad // bq, B, H),
      in_specs=[scalar, scalar, q_blk, kv_all, kv_all, q_blk, row_blk, row_blk]
      + [seg_spec] * len(seg_args),
      out_specs=q_blk, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), name="flash_dq",
      num_warps=warps, num_stages=cfg.num_stages, interpret=interpret,
  )(kv_lo, kv_hi, q, k, v, do, lse, delta_BHT, *seg_args)

  # Grid over (kv block, batch, kv head); q/do/lse/delta blocks cover the G query heads.
  q_grp = pl.BlockSpec((None, T_pad, G, D), lambda j, b, h: (b, 0, h, 0))
  kv_blk = pl.BlockSpec((None, bk, None, D), lambda j, b, h: (b, j, h, 0))
  row_grp = pl.BlockSpec((None, G, T_pad), lambda j, b, h: (b, h, 0))
  dk, dv = _pallas.call(
      functools.partial(_dkv_kernel, G=G, **statics), grid=(T_pad // bk, B, K),
      in_specs=[scalar, scalar, q_grp, kv_blk, kv_blk, q_grp, row_grp, row_grp]
      + [seg_spec] * len(seg_args),
      out_specs=[kv_blk, kv_blk],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="flash_dkv", num_warps=warps, num_stages=cfg.num_stages, interpret=interpret,
  )(q_lo, q_hi, q, k, v, do, lse, delta_BHT, *seg_args)
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
  blocks = (config.block_q, config.block_k, config.block_q_bwd, config.block_k_bwd)
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


def default_config(T):
  """Tiles for length T: the GPU defaults, shrunk (to >= 16) for short sequences."""
  cap = max(16, 1 << max(T - 1, 1).bit_length())
  c = FlashConfig()
  return dataclasses.replace(c, block_q=min(c.block_q, cap), block_k=min(c.block_k, cap),
                             block_q_bwd=min(c.block_q_bwd, cap),
                             block_k_bwd=min(c.block_k_bwd, cap))


def attention_pallas(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True):
  """The backend table's entry: flash attention with tiles chosen for the length."""
  return flash_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, causal=causal,
                         config=default_config(q_BTHD.shape[1]))
