"""Causal GQA attention: the pure-jnp reference (`xla`), cuDNN (`cudnn`) and cuDNN's packed
layout for documents packed in rows (`cudnn_packed`).

Shapes: q_BTHD (H query heads), k_BTKD / v_BTKD (K kv heads, H % K == 0), segment_ids_BT
(int, documents packed in a row get distinct ids; 0 marks padding) or None for one document a row.
Output o_BTHD in q's dtype. Softmax runs in fp32. `attention_cache_xla` is the decoding form:
queries at their own positions against a KV cache of S slots (slot s holds position s's key).
"""

import functools

import jax
import jax.numpy as jnp

try:
  # The public jax.nn.dot_product_attention takes no per-document offsets; this private module
  # is what it calls, and its packed ("ragged") layout attends within segments given by offsets.
  # Private, so a jax that moves it costs only the cudnn_packed backend.
  from jax._src.cudnn import fused_attention_stablehlo as _cudnn_fa
except ImportError:
  _cudnn_fa = None

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_xla(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True):
  """Reference. GQA by grouping query heads (B,T,K,G,D), never by repeating K/V in memory."""
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  if H % K:
    raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K})")
  q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
  logits_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BTKD,
                            preferred_element_type=jnp.float32) * (D ** -0.5)
  mask_BTS = jnp.ones((B, T, T), dtype=bool)
  if causal:
    mask_BTS &= jnp.tril(jnp.ones((T, T), dtype=bool))[None]
  if segment_ids_BT is not None:
    mask_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASK_VALUE)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BTKD.dtype)
  o_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS, v_BTKD,
                       preferred_element_type=jnp.float32)
  return o_BTKGD.reshape(B, T, H, D).astype(q_BTHD.dtype)


def attention_cudnn(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True):
  """cuDNN flash attention through jax.nn.dot_product_attention (GQA native, GPU only).

  Its public API takes no segment ids; a dense mask would make it far slower than the
  reference, so packed documents are refused instead of silently attended across.
  """
  if segment_ids_BT is not None:
    raise ValueError(
        "attention backend 'cudnn' cannot mask packed documents (segment ids); "
        "set --config.model.kernels.attention=pallas or xla, or data.packing=concat")
  return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, is_causal=causal,
                                      implementation="cudnn")


def default_max_segments(T):
  """Segment slots a row for cudnn_packed: one per 64 tokens (32 at 2048, padding counts as one).
  cuDNN keeps softmax statistics per slot (B x slots x H x T fp32), so slots cost memory."""
  return max(2, T // 64)


def packed_segments(segment_ids_BT, max_segments):
  """Segment ids -> cuDNN's packed layout: (offsets_BM1, lengths_BM, overflow_B), int32/bool.

  A segment is a maximal run of equal ids in a row; the padding run (id 0 at the end) is one too,
  so every token lies in exactly one segment and padding attends to padding as in the reference.
  Precondition: a document's tokens are contiguous in its row (the first_fit/best_fit packers'
  rows: ids 1, 2, ... in order, then 0s); an id split into two runs would not attend across the
  gap here, while the reference would. Slot m < runs holds run m's start (offsets) and length;
  unused slots hold -1, as does offsets' last column (cuDNN's [B, M + 1] form). A row with more
  runs than slots sets overflow_B; its last slot runs from run M - 1's start to the row's end,
  across documents: the caller must not use that row (cudnn_packed makes it NaN)."""
  B, T = segment_ids_BT.shape
  starts_BT = jnp.concatenate([jnp.ones((B, 1), bool),
                               segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  run_BT = jnp.cumsum(starts_BT, axis=1, dtype=jnp.int32) - 1
  runs_B = run_BT[:, -1] + 1
  slots_M1 = jnp.arange(max_segments + 1, dtype=jnp.int32)
  # bounds[b, m]: tokens before run m (run m's start; T when the row has no run m)
  bounds_BM1 = jnp.sum(run_BT[:, :, None] < slots_M1, axis=1, dtype=jnp.int32)
  used_BM = slots_M1[None, :-1] < runs_B[:, None]
  # The last slot ends at T: the same end for a row that fits; a row that overflows it has
  # every token in some slot still (so nothing is left unwritten), its tail's runs in one.
  ends_BM = bounds_BM1[:, 1:].at[:, -1].set(T)
  lengths_BM = jnp.where(used_BM, ends_BM - bounds_BM1[:, :-1], -1)
  offsets_BM1 = jnp.concatenate([jnp.where(used_BM, bounds_BM1[:, :-1], -1),
                                 jnp.full((B, 1), -1, jnp.int32)], axis=1)
  return offsets_BM1, lengths_BM, runs_B > max_segments


@functools.cache
def packed_gqa_offsets_fixed():
  """Whether this jax strides packed kv offsets by the kv heads. Up to jax 0.11.0 both offsets
  were scaled by the query heads, so with fewer kv heads (GQA) cuDNN read the wrong keys with no
  error (fixed on jax's main on 2026-07-30, PR 39521). Asked of jax's own conversion, on one
  2-query-head / 1-kv-head case: the second segment's kv offset must be 2 tokens x 1 head x 8."""
  fix = getattr(_cudnn_fa, "_fix_seqlen_offsets", None)
  try:
    with jax.ensure_compile_time_eval():
      q, k = jnp.zeros((1, 4, 2, 8), jnp.bfloat16), jnp.zeros((1, 4, 1, 8), jnp.bfloat16)
      offsets, lengths = jnp.array([[0, 2, -1]], jnp.int32), jnp.array([[2, 2]], jnp.int32)
      kv_offsets = fix(lengths, lengths, offsets, offsets, q, k)[3]
      return int(kv_offsets.reshape(-1)[1]) == 2 * 1 * 8
  except Exception:  # renamed or reshaped: assume the old behaviour (repeating kv stays exact)
    return False


def attention_cudnn_packed(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True,
                           max_segments=None):
  """cuDNN flash attention within packed documents (its packed layout; Hopper or later, bf16/fp16).

  Segments come from packed_segments (its precondition: contiguous documents). max_segments
  (static; model.kernels.attention_slots, default default_max_segments(T)) bounds the segments
  a row; a row with more is not attended across documents: its output and gradients are NaN, so
  the step is non-finite and train.nan_policy stops or skips it. Without segment ids this is the
  `cudnn` backend.
  """
  if segment_ids_BT is None:
    return attention_cudnn(q_BTHD, k_BTKD, v_BTKD, None, causal=causal)
  if _cudnn_fa is None:
    raise ValueError(f"attention backend 'cudnn_packed' needs jax's cuDNN attention module, which "
                     f"jax {jax.__version__} does not have where it was; set "
                     "--config.model.kernels.attention=pallas or auto")
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  if H % K:
    raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K})")
  M = default_max_segments(T) if max_segments is None else max_segments
  if M < 2:  # one slot is cuDNN's unpacked path, which ignores offsets
    raise ValueError(f"max_segments={M} must be >= 2 (segment slots a row, padding included)")
  offsets_BM1, lengths_BM, overflow_B = packed_segments(segment_ids_BT.astype(jnp.int32), M)
  if K != H and not packed_gqa_offsets_fixed():
    # This jax misplaces GQA kv offsets: one kv head per query head is exact (autodiff sums
    # the copies' gradients), at the cost of G-times larger K/V.
    k_BTKD, v_BTKD = (jnp.repeat(x, H // K, axis=2) for x in (k_BTKD, v_BTKD))
  # A NaN query makes the row's output and gradients NaN; on q, the select fuses into the RoPE
  # fusion that writes q (and its transpose into RoPE's backward): no pass of its own.
  q_BTHD = jnp.where(overflow_B[:, None, None, None], jnp.nan, q_BTHD).astype(q_BTHD.dtype)
  mask = _cudnn_fa.MaskType.PADDING_CAUSAL if causal else _cudnn_fa.MaskType.NO_MASK
  return _cudnn_fa.dot_product_attention(
      q_BTHD, k_BTKD, v_BTKD, q_seqlen=lengths_BM, kv_seqlen=lengths_BM, q_offsets=offsets_BM1,
      kv_offsets=offsets_BM1, scale=D ** -0.5, mask_type=mask, qkv_layout="BTNH")


def attention_cache_xla(q_BTHD, k_BSKD, v_BSKD, positions_BT):
  """A query at position p attends to cache slots 0..p: each row of a batch at its own position,
  so prompts of different lengths decode together exactly as each would alone."""
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1], k_BSKD.shape[2]
  q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
  logits_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD,
                            preferred_element_type=jnp.float32) * (D ** -0.5)
  mask_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASK_VALUE)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKD.dtype)
  o_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS, v_BSKD,
                       preferred_element_type=jnp.float32)
  return o_BTKGD.reshape(B, T, H, D).astype(q_BTHD.dtype)
