"""SwiGLU activation: silu(gate) * up, in fp32 inside."""

import jax
import jax.numpy as jnp


def swiglu_ref(gate, up):
  g = gate.astype(jnp.float32)
  return (jax.nn.silu(g) * up.astype(jnp.float32)).astype(gate.dtype)
