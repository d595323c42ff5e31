"""Causal GQA attention: the pure-jnp reference (`xla`) and cuDNN (`cudnn`).

Shapes: q_BTHD (H query heads), k_BTKD / v_BTKD (K kv heads, H % K == 0), segment_ids_BT
(int, documents packed in a row get distinct ids; 0 marks padding) or None for one document a row.
Output o_BTHD in q's dtype. Softmax runs in fp32. `attention_cache_xla` is the decoding form:
queries at their own positions against a KV cache of S slots (slot s holds position s's key).
"""

import jax
import jax.numpy as jnp

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
