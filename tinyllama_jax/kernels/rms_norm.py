"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32."""

import jax
import jax.numpy as jnp


def rms_norm_ref(x, w_D, eps):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w_D.astype(jnp.float32)).astype(x.dtype)
