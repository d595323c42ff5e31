"""Cross-entropy of the lm_head: loss_N = logsumexp(x @ w) - (x @ w)[target], logits in fp32.

The reference materialises the [N, V] fp32 logits; a chunked kernel must not.
"""

import functools

import jax
import jax.numpy as jnp

from tinyllama_jax import sharding


def cross_entropy_ref(x_ND, w_DV, targets_N):
  logits_NV = jnp.einsum("nd,dv->nv", x_ND, w_DV.astype(x_ND.dtype),
                         preferred_element_type=jnp.float32)
  lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
  target_logit_N = jnp.take_along_axis(logits_NV, targets_N[:, None], axis=-1)[:, 0]
  return lse_N - target_logit_N


# --- 'chunked': the same loss without the [N, V] fp32 logits -------------------------------------
# Tokens go through the lm_head in chunks of `chunk` rows; a chunk's logits live only inside one
# scan step. The forward keeps logsumexp (N floats); the backward recomputes each chunk's logits
# and folds dlogits into dx (per chunk) and dw (an fp32 [D, V] accumulator, the size of w's grad).
# That is 4 lm_head-sized matmuls instead of 3: the price of not storing [N, V].


def _chunk_logits(x_CD, w_DV):
  return jnp.einsum("cd,dv->cv", x_CD, w_DV.astype(x_CD.dtype),
                    preferred_element_type=jnp.float32)


def _chunked_forward(x_nCD, w_DV, t_nC):
  def one(args):
    x_CD, t_C = args
    logits_CV = _chunk_logits(x_CD, w_DV)
    lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
    return lse_C, jnp.take_along_axis(logits_CV, t_C[:, None], axis=-1)[:, 0]

  lse_nC, target_nC = jax.lax.map(one, (x_nCD, t_nC))
  return lse_nC - target_nC, lse_nC


@jax.custom_vjp
def _chunked(x_nCD, w_DV, t_nC):
  return _chunked_forward(x_nCD, w_DV, t_nC)[0]


def _chunked_fwd(x_nCD, w_DV, t_nC):
  loss_nC, lse_nC = _chunked_forward(x_nCD, w_DV, t_nC)
  return loss_nC, (x_nCD, w_DV, t_nC, lse_nC)


def _chunked_bwd(res, g_nC):
  x_nCD, w_DV, t_nC, lse_nC = res
  w_c = w_DV.astype(x_nCD.dtype)

  def step(dw_DV, args):
    x_CD, t_C, lse_C, g_C = args
    p_CV = jnp.exp(_chunk_logits(x_CD, w_DV) - lse_C[:, None])
    onehot_CV = jnp.arange(p_CV.shape[1])[None, :] == t_C[:, None]
    dlogits_CV = ((p_CV - onehot_CV) * g_C[:, None]).astype(x_CD.dtype)
    dx_CD = jnp.einsum("cv,dv->cd", dlogits_CV, w_c, preferred_element_type=jnp.float32)
    dw_DV = dw_DV + jnp.einsum("cd,cv->dv", x_CD, dlogits_CV, preferred_element_type=jnp.float32)
    return dw_DV, dx_CD.astype(x_CD.dtype)

  dw_DV, dx_nCD = jax.lax.scan(step, jnp.zeros(w_DV.shape, jnp.float32),
                               (x_nCD, t_nC, lse_nC, g_nC.astype(jnp.float32)))
  return dx_nCD, dw_DV.astype(w_DV.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def cross_entropy_chunked(x_ND, w_DV, targets_N, *, chunk=2048):
  """Drop-in for `cross_entropy_ref`; peak extra memory ~ chunk x V fp32 instead of N x V.

  Under a mesh whose batch devices divide N (and no tensor axis splitting the vocabulary), it
  runs per device on the local rows, w whole on each device and its gradient summed once: left
  to XLA, the scan over chunks of a batch-sharded token axis was partitioned on w's FSDP axis,
  D, which all-reduced every chunk's [C, V] logits (bench/NOTES.md, "FSDP on 2 devices").
  With no mesh or one device it is the plain function."""
  N, D = x_ND.shape
  if w_DV.shape[0] != D or targets_N.shape != (N,):
    raise ValueError(f"cross_entropy: x {x_ND.shape}, w {w_DV.shape}, targets {targets_N.shape} "
                     f"must be [N, D], [D, V], [N]")
  fn = functools.partial(_cross_entropy_chunked, chunk=chunk)
  if N % sharding.shards("act_batch") == 0 and sharding.shards("vocab") == 1:
    fn = sharding.shard_map_local(fn, [("act_batch", None), None, ("act_batch",)], ("act_batch",))
  return fn(x_ND, w_DV, targets_N)


def _cross_entropy_chunked(x_ND, w_DV, targets_N, *, chunk):
  N, D = x_ND.shape
  C = min(chunk, N)
  n = -(-N // C)
  pad = n * C - N  # padded rows get a zero cotangent, so they add nothing to dw
  x_nCD = jnp.pad(x_ND, [(0, pad), (0, 0)]).reshape(n, C, D)
  t_nC = jnp.pad(targets_N.astype(jnp.int32), [(0, pad)]).reshape(n, C)
  return _chunked(x_nCD, w_DV, t_nC).reshape(n * C)[:N]
