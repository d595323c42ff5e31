"""A decode step's layer as five Pallas (Triton) kernels, for steps of at most 16 rows.

Why: at batch 1 the 1b decode step is bound by how many kernels it launches, not by the bytes it
reads. XLA runs a layer as ~22 kernels (GEMMs and their split-K finalizers, two norms, RoPE, the
cache writes, the attention's reductions, converts), each a few microseconds on tiny data with a
~2 us gap after it (bench/NOTES.md, 2026-12-02 and 2026-12-03). Here a layer is five:

  qkv      rms_norm(x) @ Wqkv               the norm is a per-row scale, applied at the end
  attend   RoPE on q and the new k; the new k and v written into the cache; each query head's
           attention over its row's slots 0..p (online softmax)
  o        x + o @ Wo                       the residual add in the epilogue
  gate_up  silu(h @ Wg) * (h @ Wu), h = rms_norm(x)
  down     x + a @ Wd

The weights are read in an [N, K] layout (`layer_weights` transposes them once, before the decode
loop), so a program streams BLOCK_N whole rows of K contiguous elements. The retired GEMVs read
the model's [K, N] layout as 16-column strips: 32-byte pieces of 2,048 rows, ~0.9 TB/s
(docs/kernels.md, "Retired").

Rows: one row is a true GEMV (fp32 multiply-adds, no tensor cores); 2..16 rows are one dot of 16
rows (Triton's smallest), the rows past the batch masked. Forward only: decoding has no backward.
"""

import functools

import jax
import jax.numpy as jnp

from tinyllama_jax.kernels import attention, rope

MAX_ROWS = 16  # a dot tile's rows; more rows is a prefill, which XLA's GEMMs do well


def _pallas_mods():
  # Deferred: importing the model must not import Pallas.
  from jax.experimental import pallas as pl
  from tinyllama_jax.kernels import _pallas
  return pl, _pallas


# --- the weights' decode layout ------------------------------------------------------------------


def layer_weights(p):
  """One layer's weights in the kernels' [N, K] layout (q, k, v as one; gate then up as one),
  plus its two norm weights: made once before a decode loop, not once a token."""
  D = p["wq"].shape[0]
  qkv_DN = jnp.concatenate([p["wq"].reshape(D, -1), p["wk"].reshape(D, -1),
                            p["wv"].reshape(D, -1)], axis=1)
  return {"qkv_NK": qkv_DN.T, "o_NK": p["wo"].reshape(-1, D).T,
          "gate_up_NK": jnp.concatenate([p["w_gate"], p["w_up"]], axis=1).T,
          "down_NK": p["w_down"].T, "attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"]}


# --- references: the block's own math, fp32 inside ------------------------------------------------


def _normed(x_MD, g_D, eps):
  x = x_MD.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * g_D.astype(jnp.float32)


def _dot_t(a_MK, w_NK):
  return jnp.dot(a_MK.astype(jnp.float32), w_NK.astype(jnp.float32).T,
                 precision=jax.lax.Precision.HIGHEST)


def norm_gemv_ref(x_MD, g_D, w_ND, eps, out_dtype=None):
  return _dot_t(_normed(x_MD, g_D, eps), w_ND).astype(out_dtype or x_MD.dtype)


def gemv_add_ref(a_MK, w_NK, r_MN):
  return (r_MN.astype(jnp.float32) + _dot_t(a_MK, w_NK)).astype(r_MN.dtype)


def norm_gemv_swiglu_ref(x_MD, g_D, w_2FD, eps):
  gu = _dot_t(_normed(x_MD, g_D, eps), w_2FD)
  F = gu.shape[-1] // 2
  return (jax.nn.silu(gu[:, :F]) * gu[:, F:]).astype(x_MD.dtype)


# --- the GEMV kernel: one body, its fusions switched by static flags ------------------------------


def _gemv_kernel(*refs, M, rows, K, block_k, norm, swiglu, residual, eps):
  pl, _ = _pallas_mods()
  from jax.experimental.pallas import triton as plgpu
  refs = list(refs)
  x_ref = refs.pop(0)  # [R, K]
  g_ref = refs.pop(0) if norm else None  # [K]
  w_refs = [refs.pop(0) for _ in range(2 if swiglu else 1)]  # [BN, K]: (gate, up) or one
  r_ref = refs.pop(0) if residual else None  # [R, BN]
  (y_ref,) = refs  # [R, BN]
  f32 = jnp.float32
  gemv = rows == 1
  # Rows past M (a dot of 16 for fewer): Pallas's Triton lowering does not bound a block to its
  # array, so their loads and stores are masked here.
  live = (jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < M) if M < rows else None

  def load_rows(ref, cols):
    if live is None:
      return ref[:, cols]
    return plgpu.load(ref.at[:, cols], mask=live, other=0)

  def products(ks):  # one chunk's products: [BN, size] (one row, reduced later) or [R, BN]
    x = load_rows(x_ref, ks).astype(f32)  # [R, size]
    # The norm's scale is per row, applied after the loop. One row sums its squares elementwise
    # here (reduced once after the loop); a dot's rows sum theirs in a prologue (below).
    sq = x * x if norm and gemv else None
    if norm:
      x = x * g_ref[ks].astype(f32)[None, :]
    x = x.astype(w_refs[0].dtype)  # the dot's operand; one row rounds the same way
    out = []
    for w_ref in w_refs:
      w = w_ref[:, ks]  # [BN, size], K contiguous
      if gemv:  # elementwise, reduced once after the loop (no cross-thread sums inside it)
        out.append(w.astype(f32) * x.astype(f32))
      else:
        out.append(jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                       preferred_element_type=f32))
    return out, sq

  def chunk(i):
    return pl.ds(pl.multiple_of(i * block_k, block_k), block_k)

  def body(i, carry):
    accs, ss = carry
    prods, sq = products(chunk(i))
    return tuple(a + p for a, p in zip(accs, prods)), ss if sq is None else ss + sq

  block_n = w_refs[0].shape[0]
  pieces = [pl.ds(start, size) for start, size in tail_pieces(K, block_k)]  # unrolled
  ss = jnp.zeros((1, block_k) if gemv else (rows,), f32)
  if norm and not gemv:
    # The rows' squares before the dot's loop, which then holds only loads, the scale by g and
    # the dot: their cross-thread sums inside it cost the normed 16-row kernels 1.5-3x against
    # the plain ones at the 1b shapes (bench/NOTES.md, 2026-12-08). x is small (<= 16 x K).
    squares = lambda ks: jnp.sum(jnp.square(load_rows(x_ref, ks).astype(f32)), axis=1)
    ss = jax.lax.fori_loop(0, K // block_k, lambda i, s: s + squares(chunk(i)), ss)
    for ks in pieces:
      ss = ss + squares(ks)
  accs = tuple(jnp.zeros((block_n, block_k) if gemv else (rows, block_n), f32) for _ in w_refs)
  accs, ss = jax.lax.fori_loop(0, K // block_k, body, (accs, ss))
  outs = [jnp.sum(a, axis=1)[None, :] for a in accs] if gemv else list(accs)  # [R, BN]
  ss = jnp.sum(ss, axis=1) if gemv else ss  # [R]
  for ks in pieces:
    prods, sq = products(ks)
    outs = [o + (jnp.sum(p, axis=1)[None, :] if gemv else p) for o, p in zip(outs, prods)]
    if sq is not None:
      ss = ss + jnp.sum(sq, axis=1)
  if norm:
    rstd = jax.lax.rsqrt(ss / K + eps)[:, None]
    outs = [o * rstd for o in outs]
  if swiglu:
    gate, up = outs
    out = gate * jax.nn.sigmoid(gate) * up
  else:
    (out,) = outs
  if residual:
    out = out + load_rows(r_ref, slice(None)).astype(f32)
  if live is None:
    y_ref[...] = out.astype(y_ref.dtype)
  else:
    plgpu.store(y_ref, out.astype(y_ref.dtype), mask=live)


def _pow2(n):
  return n >= 1 and n & (n - 1) == 0


def block_k_for(M, K):
  """A program's chunk of K. One row: up to 2,048 columns (the 1b shapes' whole K but down's),
  so a program issues its loads in one or two trips (no dot, no pipelining: the loads one trip
  has in flight are all it has); a dot: the largest power of two <= 512 dividing K, which keeps
  its 3-stage pipeline within shared memory (bench/NOTES.md, 2026-12-08)."""
  if M == 1:
    return min(2048, 1 << (K.bit_length() - 1))
  return min(512, K & -K)


def pow2_pieces(n):
  """n as descending powers of two (1536 -> 1024, 512): the chunks after the whole ones."""
  return [1 << b for b in reversed(range(n.bit_length())) if n >> b & 1]


def tail_pieces(K, block_k):
  """(start, size) of K's columns past its last whole chunk, as power-of-two pieces (5632 at
  2048: (4096, 1024), (5120, 512))."""
  start, out = K // block_k * block_k, []
  for size in pow2_pieces(K % block_k):
    out.append((start, size))
    start += size
  return out


def block_n_for(M):
  """Weight rows a program: 16 for a dot (its smallest N); 2 for one row, the fastest at every
  1b shape in the one-row sweep with block_k_for's chunks (bench/NOTES.md, 2026-12-08: qkv 9.4
  us against 9.9 at the old default of 4 x 512, o 8.7 against 13.9, gate_up 22.5 against 23.1)."""
  return 16 if M > 1 else 2


def _gemv(op, x_MK, g_K, w_NK, r_MN, eps, out_dtype, *, swiglu=False, block_n=None,
          block_k=None, num_warps=4, num_stages=3, interpret=None):
  pl, _pallas = _pallas_mods()
  M, K = x_MK.shape
  N = w_NK.shape[0] // (2 if swiglu else 1)
  block_n = block_n or block_n_for(M)
  block_k = block_k or block_k_for(M, K)
  if M > MAX_ROWS:
    raise ValueError(f"{op}: {M} rows > {MAX_ROWS} (a decode step; a prefill uses the GEMMs)")
  if w_NK.shape[1] != K:
    raise ValueError(f"{op}: weight {w_NK.shape} must be [N, K] with K = {K}, x's last dim")
  if not (_pow2(block_n) and N % block_n == 0 and _pow2(block_k) and 16 <= block_k <= K
          and K % 16 == 0):
    raise ValueError(f"{op}: N={N} must be a multiple of block_n={block_n}, K={K} of 16, and "
                     f"block_k={block_k} a power of two from 16 to K")
  rows = 1 if M == 1 else MAX_ROWS
  whole = lambda *shape: pl.BlockSpec(shape, lambda j: (0,) * len(shape))
  strip = pl.BlockSpec((rows, block_n), lambda j: (0, j))
  in_specs, args = [whole(rows, K)], [x_MK]
  if g_K is not None:
    in_specs.append(whole(K))
    args.append(g_K)
  in_specs.append(pl.BlockSpec((block_n, K), lambda j: (j, 0)))
  if swiglu:  # program j's up rows are its gate rows + F
    in_specs.append(pl.BlockSpec((block_n, K), lambda j: (j + N // block_n, 0)))
  args += [w_NK] * (2 if swiglu else 1)
  if r_MN is not None:
    in_specs.append(strip)
    args.append(r_MN)
  kernel = functools.partial(_gemv_kernel, M=M, rows=rows, K=K, block_k=block_k,
                             norm=g_K is not None, swiglu=swiglu, residual=r_MN is not None,
                             eps=float(eps))
  return _pallas.call(kernel, grid=(N // block_n,), in_specs=in_specs, out_specs=strip,
                      out_shape=jax.ShapeDtypeStruct((M, N), out_dtype), name=op,
                      num_warps=num_warps, num_stages=num_stages,
                      interpret=_pallas.resolve_interpret(interpret))(*args)


def norm_gemv(x_MD, g_D, w_ND, eps, out_dtype=None, **tiles):
  """rms_norm(x) * g @ w.T: [M, N] in out_dtype (x's by default)."""
  return _gemv("norm_gemv", x_MD, g_D, w_ND, None, eps, out_dtype or x_MD.dtype, **tiles)


def gemv_add(a_MK, w_NK, r_MN, **tiles):
  """r + a @ w.T, in r's dtype (the o and down projections with the residual add)."""
  return _gemv("gemv_add", a_MK, None, w_NK, r_MN, 0.0, r_MN.dtype, **tiles)


def norm_gemv_swiglu(x_MD, g_D, w_2FD, eps, **tiles):
  """silu(gate) * up of rms_norm(x) * g @ [w_gate | w_up].T: [M, F] in x's dtype."""
  return _gemv("norm_gemv_swiglu", x_MD, g_D, w_2FD, None, eps, x_MD.dtype, swiglu=True, **tiles)


# --- attention of a row's new tokens over its KV cache ------------------------------------------


def attend_ref(qkv_BTND, cos_BTF, sin_BTF, k_BSGD, v_BSGD, positions_BT, n_heads):
  """(o_BTHD, k, v): RoPE, the cache write and attention over slots 0..p as the block does them
  (kernels.rope, kernels.attention, model.write_cache's consecutive positions), for T new tokens
  a row; qkv_BTND holds q's H heads, then k's, then v's."""
  H, G = n_heads, k_BSGD.shape[2]
  q = rope.rotate(qkv_BTND[:, :, :H], cos_BTF, sin_BTF)
  k = rope.rotate(qkv_BTND[:, :, H:H + G], cos_BTF, sin_BTF)
  write = lambda c_SGD, x_TGD, p: jax.lax.dynamic_update_slice(c_SGD, x_TGD.astype(c_SGD.dtype),
                                                               (p, 0, 0))
  k_BSGD = jax.vmap(write)(k_BSGD, k, positions_BT[:, 0])
  v_BSGD = jax.vmap(write)(v_BSGD, qkv_BTND[:, :, H + G:], positions_BT[:, 0])
  return attention.attention_cache_xla(q, k_BSGD, v_BSGD, positions_BT), k_BSGD, v_BSGD


def _attend_kernel(pos_ref, qkv_ref, cos_ref, sin_ref, k_ref, v_ref, *outs, H, G, D, T, block_s,
                   split_s):
  """Program (token r of the flattened [B T] rows, query head h, split s of the cache's slots).
  One split: o_ref holds the head's output. More: o_ref, m_ref and l_ref hold the split's
  unnormalised sum, running max and sum of weights, which `attend` combines."""
  pl, _ = _pallas_mods()
  f32 = jnp.float32
  r, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  o_ref, *stats, k_out, v_out = outs
  b, t = r // T, r % T
  g = h // (H // G)
  half = D // 2
  lo, hi = pl.ds(0, half), pl.ds(half, half)
  past = pos_ref[b * T]  # the row's first new position: the slots before it are its past
  first = split * split_s  # this program's slots: first .. first + split_s - 1, those before past
  dt = k_ref.dtype
  scale = D ** -0.5

  def rotated(row, head):  # RoPE (rotate-half), rounded to the cache's dtype as the block's is
    c, s = cos_ref[row, :], sin_ref[row, :]
    x1, x2 = qkv_ref[row, head, lo].astype(f32), qkv_ref[row, head, hi].astype(f32)
    return ((x1 * c - x2 * s).astype(dt).astype(f32), (x2 * c + x1 * s).astype(dt).astype(f32))

  q1, q2 = rotated(r, h)

  @pl.when((h % (H // G) == 0) & (split == 0))  # one program of the kv head writes k and v
  def _():
    k1, k2 = rotated(r, H + g)
    pos = pos_ref[r]
    k_out[b, pos, g, lo] = k1.astype(dt)
    k_out[b, pos, g, hi] = k2.astype(dt)
    v_out[b, pos, g, :] = qkv_ref[r, H + G + g, :].astype(dt)

  def past_block(j, carry):
    m, l, acc = carry
    start = first + j * block_s
    slots = pl.ds(pl.multiple_of(start, block_s), block_s)
    # Only slots written before this call: the new tokens' slots are being written by others.
    valid = start + jax.lax.broadcasted_iota(jnp.int32, (block_s,), 0) < past
    kb1, kb2 = k_ref[b, slots, g, lo].astype(f32), k_ref[b, slots, g, hi].astype(f32)
    logits = (jnp.sum(kb1 * q1[None, :], axis=1) + jnp.sum(kb2 * q2[None, :], axis=1)) * scale
    logits = jnp.where(valid, logits, attention._MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(logits))
    p = jnp.exp(logits - m_new)
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha + jnp.sum(p[:, None] * v_ref[b, slots, g, :].astype(f32), axis=0)
    return m_new, l * alpha + jnp.sum(p), acc

  def new_token(j, carry):  # the row's new tokens up to this one, from qkv (causal)
    m, l, acc = carry
    k1, k2 = rotated(b * T + j, H + g)
    logit = (jnp.sum(k1 * q1) + jnp.sum(k2 * q2)) * scale
    m_new = jnp.maximum(m, logit)
    alpha, p = jnp.exp(m - m_new), jnp.exp(logit - m_new)
    v = qkv_ref[b * T + j, H + G + g, :].astype(dt).astype(f32)
    return m_new, l * alpha + p, acc * alpha + p * v

  carry = (jnp.float32(attention._MASK_VALUE), jnp.float32(0.0), jnp.zeros((D,), f32))
  blocks = jnp.clip((past - first + block_s - 1) // block_s, 0, split_s // block_s)
  carry = jax.lax.fori_loop(0, blocks, past_block, carry)
  m, l, acc = jax.lax.fori_loop(0, jnp.where(split == 0, t + 1, 0), new_token, carry)
  if stats:
    m_ref, l_ref = stats
    o_ref[r, h, split, :] = acc
    m_ref[r, h, split] = m
    l_ref[r, h, split] = l
  else:
    o_ref[r, h, :] = (acc / l).astype(o_ref.dtype)


def attend(qkv_BTND, cos_BTF, sin_BTF, k_BSGD, v_BSGD, positions_BT, n_heads, *, block_s=64,
           split_s=None, num_warps=4, interpret=None):
  """attend_ref as one kernel: a program per (new token, query head), over the cache's slots
  `block_s` at a time, serially; with split_s (a multiple of block_s) a program per split_s of
  them too (flash-decoding: more programs, fewer trips each, for long caches), the splits' sums
  combined after. A row's T new tokens are at consecutive positions. Returns (o_BTHD, k, v);
  the caches are updated in place (aliased)."""
  pl, _pallas = _pallas_mods()
  B, S, G, D = k_BSGD.shape
  T, H = qkv_BTND.shape[1], n_heads
  if qkv_BTND.shape != (B, T, H + 2 * G, D) or cos_BTF.shape != (B, T, D // 2):
    raise ValueError(f"attend: qkv {qkv_BTND.shape} / cos {cos_BTF.shape} do not match a cache "
                     f"{k_BSGD.shape} with {H} query heads")
  block_s = min(block_s, S & -S)
  split_s = split_s or S
  if S % block_s or split_s % block_s or S % split_s or not _pow2(D // 2):
    raise ValueError(f"attend: cache length {S} must be a multiple of split_s={split_s} and of "
                     f"block_s={block_s}, split_s of block_s, head dim {D} twice a power of two")
  M, splits = B * T, S // split_s
  kernel = functools.partial(_attend_kernel, H=H, G=G, D=D, T=T, block_s=block_s,
                             split_s=split_s)
  f32 = jnp.float32
  outs = ((jax.ShapeDtypeStruct((M, H, D), qkv_BTND.dtype),) if splits == 1 else
          (jax.ShapeDtypeStruct((M, H, splits, D), f32), jax.ShapeDtypeStruct((M, H, splits), f32),
           jax.ShapeDtypeStruct((M, H, splits), f32)))
  caches = (jax.ShapeDtypeStruct(k_BSGD.shape, k_BSGD.dtype),
            jax.ShapeDtypeStruct(v_BSGD.shape, v_BSGD.dtype))
  # No block specs: each program indexes the whole arrays by its (token, head, split).
  *parts, k, v = pl.pallas_call(
      kernel, grid=(M, H, splits), out_shape=outs + caches,
      input_output_aliases={4: len(outs), 5: len(outs) + 1},
      compiler_params=_triton_params(num_warps, 1), name="attend",
      interpret=_pallas.resolve_interpret(interpret))(
          positions_BT.reshape(M).astype(jnp.int32), qkv_BTND.reshape(M, H + 2 * G, D),
          cos_BTF.reshape(M, D // 2).astype(f32), sin_BTF.reshape(M, D // 2).astype(f32),
          k_BSGD, v_BSGD)
  if splits == 1:
    (o_MHD,) = parts
  else:  # the splits' softmax sums as one (each scaled to the largest max)
    acc_MHSD, m_MHS, l_MHS = parts
    w_MHS = jnp.exp(m_MHS - jnp.max(m_MHS, axis=2, keepdims=True))
    o_MHD = (jnp.sum(w_MHS[..., None] * acc_MHSD, axis=2)
             / jnp.sum(w_MHS * l_MHS, axis=2)[..., None]).astype(qkv_BTND.dtype)
  return o_MHD.reshape(B, T, H, D), k, v


def _triton_params(num_warps, num_stages):
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
