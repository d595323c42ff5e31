"""Chunked lm_head cross-entropy against the reference: loss, dx, dw, and its memory."""

import pytest

import jax
import jax.numpy as jnp

from kernels_util import assert_close, normal
from tinyllama_jax.kernels import cross_entropy as ce


def _loss_and_grads(fn, x, w, t, g):
  return jax.jit(jax.value_and_grad(lambda x, w: (jnp.sum(fn(x, w, t) * g), fn(x, w, t)),
                                    (0, 1), has_aux=True))(x, w)


@pytest.mark.parametrize("N,D,V,chunk,dtype", [
    (37, 32, 300, 8, jnp.float32),    # odd N, ragged last chunk
    (64, 64, 515, 16, jnp.bfloat16),
    (20, 16, 128, 64, jnp.float32),   # one chunk larger than N
])
def test_chunked_matches_reference(N, D, V, chunk, dtype):
  kx, kw, kt, kg = jax.random.split(jax.random.key(N), 4)
  x = normal(kx, (N, D), dtype)
  w = normal(kw, (D, V), jnp.float32) * 0.2  # fp32 master weights, like the model's lm_head
  t = jax.random.randint(kt, (N,), 0, V)
  g = jax.random.uniform(kg, (N,))
  (_, loss), (dx, dw) = _loss_and_grads(lambda *a: ce.cross_entropy_chunked(*a, chunk=chunk),
                                        x, w, t, g)
  with jax.default_matmul_precision("highest"):
    (_, loss_ref), (dx_ref, dw_ref) = _loss_and_grads(ce.cross_entropy_ref,
                                                      x.astype(jnp.float32), w, t, g)
  assert loss.dtype == jnp.float32 and dx.dtype == dtype and dw.dtype == jnp.float32
  assert_close(loss, loss_ref, dtype, "loss")
  assert_close(dx, dx_ref, dtype, "dx")
  assert_close(dw, dw_ref, dtype, "dw")


def _temp_bytes(fn, N, D, V):
  x = jax.ShapeDtypeStruct((N, D), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((D, V), jnp.float32)
  t = jax.ShapeDtypeStruct((N,), jnp.int32)
  step = jax.jit(jax.grad(lambda x, w, t: fn(x, w, t).mean(), (0, 1)))
  return step.lower(x, w, t).compile().memory_analysis().temp_size_in_bytes


def test_chunked_never_holds_the_full_logits():
  N, D, V = 1024, 32, 4096
  full_logits = N * V * 4
  chunked = _temp_bytes(lambda *a: ce.cross_entropy_chunked(*a, chunk=128), N, D, V)
  assert chunked < full_logits / 2, (chunked, full_logits)
  assert _temp_bytes(ce.cross_entropy_ref, N, D, V) >= full_logits


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="must be"):
    ce.cross_entropy_chunked(jnp.zeros((4, 8)), jnp.zeros((9, 16)), jnp.zeros((4,), jnp.int32))
