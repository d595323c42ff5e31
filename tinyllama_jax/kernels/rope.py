"""Rotary position embedding in the rotate-half layout (HF LlamaRotaryEmbedding's), all dims.

XLA alone: its fusion beat the Pallas RoPE kernel forward and backward on an H200
(docs/kernels.md)."""

import jax.numpy as jnp


def cos_sin(positions_BT, D, theta):
  """(cos, sin) of the rotation angles, [B, T, D/2] in fp32."""
  inv_freq_F = 1.0 / (theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
  angle_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq_F
  return jnp.cos(angle_BTF), jnp.sin(angle_BTF)


def rotate(x_BTHD, cos_BTF, sin_BTF):
  """x rotated by the angles' (cos, sin), in x's dtype (fp32 inside)."""
  cos_BT1F, sin_BT1F = cos_BTF[:, :, None, :], sin_BTF[:, :, None, :]
  x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
  return out.astype(x_BTHD.dtype)


def rope_ref(x_BTHD, positions_BT, theta):
  return rotate(x_BTHD, *cos_sin(positions_BT, x_BTHD.shape[-1], theta))


def rope_qk_ref(q_BTHD, k_BTKD, positions_BT, theta):
  """RoPE on queries and keys (the model's use): two calls of the reference."""
  return rope_ref(q_BTHD, positions_BT, theta), rope_ref(k_BTKD, positions_BT, theta)
