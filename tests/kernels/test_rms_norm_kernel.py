"""RMSNorm and the fused residual add + RMSNorm (Pallas) against the references."""

import pytest

import jax
import jax.numpy as jnp

from kernels_util import assert_close, normal
from tinyllama_jax.kernels import rms_norm as rn

SHAPES = [((3, 5, 64), jnp.float32), ((2, 7, 48), jnp.bfloat16), ((13, 128), jnp.bfloat16),
          ((9, 96), jnp.float32)]


def _inputs(shape, dtype, seed):
  kx, kd, kw, kg, kh = jax.random.split(jax.random.key(seed), 5)
  D = shape[-1]
  return (normal(kx, shape, dtype), normal(kd, shape, dtype),
          1.0 + 0.1 * jax.random.normal(kw, (D,)), normal(kg, shape, jnp.float32),
          normal(kh, shape, jnp.float32))


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_rms_norm(shape, dtype):
  x, _, w, g, _ = _inputs(shape, dtype, len(shape) + shape[-1])
  loss = lambda fn: lambda x, w: (jnp.sum(fn(x, w, 1e-5).astype(jnp.float32) * g), fn(x, w, 1e-5))
  (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss(rn.rms_norm_pallas), (0, 1),
                                                has_aux=True))(x, w)
  (_, y_ref), (dx_ref, dw_ref) = jax.value_and_grad(loss(rn.rms_norm_ref), (0, 1), has_aux=True)(
      x.astype(jnp.float32), w)
  assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == w.dtype
  assert_close(y, y_ref, dtype, "y")
  assert_close(dx, dx_ref, dtype, "dx")
  assert_close(dw, dw_ref, dtype, "dw")


@pytest.mark.parametrize("shape,dtype", SHAPES[:3])
def test_add_rms_norm(shape, dtype):
  x, d, w, gy, gh = _inputs(shape, dtype, shape[-1])

  def loss(fn):
    def f(x, d, w):
      h, y = fn(x, d, w, 1e-5)
      return jnp.sum(y.astype(jnp.float32) * gy) + jnp.sum(h.astype(jnp.float32) * gh), (h, y)
    return f

  (_, (h, y)), grads = jax.jit(jax.value_and_grad(loss(rn.add_rms_norm_pallas), (0, 1, 2),
                                                  has_aux=True))(x, d, w)
  # bf16: the reference rounds h to bf16 too, then normalises it in fp32.
  (_, (h_ref, y_ref)), grads_ref = jax.value_and_grad(loss(rn.add_rms_norm_ref), (0, 1, 2),
                                                      has_aux=True)(x, d, w)
  assert h.dtype == dtype and y.dtype == dtype
  assert_close(h, h_ref, dtype, "h")
  assert_close(y, y_ref, dtype, "y")
  for name, a, b in zip(["dx", "ddelta", "dw"], grads, grads_ref):
    assert_close(a, b, dtype, name)


def test_bad_weight_is_refused():
  with pytest.raises(ValueError, match="weight"):
    rn.rms_norm_pallas(jnp.zeros((2, 8)), jnp.ones((4,)), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((4, 2048, 2048), jnp.bfloat16),
                                         ((3, 77, 768), jnp.float32)])
def test_rms_norm_gpu(on_gpu, shape, dtype):
  test_rms_norm(shape, dtype)
  test_add_rms_norm(shape, dtype)
