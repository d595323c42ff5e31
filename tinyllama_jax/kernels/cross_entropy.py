"""Cross-entropy of the lm_head: loss_N = logsumexp(x @ w) - (x @ w)[target], logits in fp32.

The reference materialises the [N, V] fp32 logits; a chunked kernel must not.
"""

import jax
import jax.numpy as jnp


def cross_entropy_ref(x_ND, w_DV, targets_N):
  logits_NV = jnp.einsum("nd,dv->nv", x_ND, w_DV.astype(x_ND.dtype),
                         preferred_element_type=jnp.float32)
  lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
  target_logit_N = jnp.take_along_axis(logits_NV, targets_N[:, None], axis=-1)[:, 0]
  return lse_N - target_logit_N
