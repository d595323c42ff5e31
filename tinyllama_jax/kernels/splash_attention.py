"""Causal GQA attention on TPU: jax's splash attention kernel behind the attention signature.

`attention_splash(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT|None, *, causal)` -> o_BTHD, the same
contract as kernels/attention.py's reference: packed documents attend only within their segment
id (0, padding, is one more segment, as in the reference). Splash is a block-sparse flash kernel:
blocks the causal mask or the segment ids rule out entirely are skipped, forward and backward.

GQA without repeating K/V: splash's MQA form takes G query heads against one K/V head, so the
kernel runs once per (row, kv head) under vmap with that kv head's group of G = H/K query heads.
Splash does not scale the logits; q is scaled by D**-0.5 first, which its custom VJP transposes.

Off TPU (the tests on CPU) the kernel runs in Pallas's interpreter: correct and slow; it is not
what `auto` picks anywhere but TPU.
"""

import functools

import jax
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

_MAX_BLOCK = 512  # MaxText's splash default; a multiple of the TPU's 128 lanes


def block_size(T):
  """The largest of 512, 256, 128 dividing T (a TPU block spans whole 128-lane tiles)."""
  for block in (_MAX_BLOCK, 256, 128):
    if T % block == 0:
      return block
  raise ValueError(f"attention backend 'splash' needs the sequence length ({T}) to be a multiple "
                   f"of 128; use --config.model.kernels.attention=xla for this length")


@functools.lru_cache(maxsize=16)
def _kernel(T, G, causal, interpret):
  """One kernel per (length, query heads per kv head, mask): its mask tables are built on the
  host from the static mask, once."""
  one = masks.CausalMask((T, T)) if causal else masks.FullMask((T, T))
  block = block_size(T)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  # Built the first time inside some jit's trace: its mask tables must be concrete arrays, or
  # the cache would hand that trace's tracers to the next one.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mqa_single_device(mask=masks.MultiHeadMask([one] * G),
                                                block_sizes=sizes, interpret=interpret)


def attention_splash(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True):
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  if H % K:
    raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K})")
  G = H // K
  kernel = _kernel(T, G, causal, jax.default_backend() != "tpu")
  q_BKGTD = (q_BTHD * np.asarray(D ** -0.5, q_BTHD.dtype)).reshape(B, T, K, G, D)
  q_BKGTD = q_BKGTD.transpose(0, 2, 3, 1, 4)
  k_BKTD, v_BKTD = k_BTKD.transpose(0, 2, 1, 3), v_BTKD.transpose(0, 2, 1, 3)

  def one_group(q_GTD, k_TD, v_TD, segment_ids_T):
    ids = None if segment_ids_T is None else splash.SegmentIds(q=segment_ids_T, kv=segment_ids_T)
    return kernel(q_GTD, k_TD, v_TD, segment_ids=ids)

  seg_axis = None if segment_ids_BT is None else 0
  per_row = jax.vmap(one_group, in_axes=(0, 0, 0, None))  # over kv heads: one row's ids
  o_BKGTD = jax.vmap(per_row, in_axes=(0, 0, 0, seg_axis))(q_BKGTD, k_BKTD, v_BKTD,
                                                          segment_ids_BT)
  return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BTHD.dtype)
