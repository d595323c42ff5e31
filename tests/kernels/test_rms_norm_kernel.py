"""RMSNorm and the fused residual add + RMSNorm (Pallas) against the references."""

import functools
from unittest import mock

import pytest

import jax
import jax.numpy as jnp

from kernels_util import assert_close, normal
from tinyllama_jax.kernels import _pallas
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
def test_rms_norm(shape, dtype, config=None):
  x, _, w, g, _ = _inputs(shape, dtype, len(shape) + shape[-1])
  loss = lambda fn: lambda x, w: (jnp.sum(fn(x, w, 1e-5).astype(jnp.float32) * g), fn(x, w, 1e-5))
  pallas = functools.partial(rn.rms_norm_pallas, config=config)
  (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss(pallas), (0, 1), has_aux=True))(x, w)
  (_, y_ref), (dx_ref, dw_ref) = jax.value_and_grad(loss(rn.rms_norm_ref), (0, 1), has_aux=True)(
      x.astype(jnp.float32), w)
  assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == w.dtype
  assert_close(y, y_ref, dtype, "y")
  assert_close(dx, dx_ref, dtype, "dx")
  assert_close(dw, dw_ref, dtype, "dw")


@pytest.mark.parametrize("shape,dtype", SHAPES[:3])
def test_add_rms_norm(shape, dtype, config=None):
  x, d, w, gy, gh = _inputs(shape, dtype, shape[-1])

  def loss(fn):
    def f(x, d, w):
      h, y = fn(x, d, w, 1e-5)
      return jnp.sum(y.astype(jnp.float32) * gy) + jnp.sum(h.astype(jnp.float32) * gh), (h, y)
    return f

  pallas = functools.partial(rn.add_rms_norm_pallas, config=config)
  (_, (h, y)), grads = jax.jit(jax.value_and_grad(loss(pallas), (0, 1, 2), has_aux=True))(x, d, w)
  # bf16: the reference rounds h to bf16 too, then normalises it in fp32.
  (_, (h_ref, y_ref)), grads_ref = jax.value_and_grad(loss(rn.add_rms_norm_ref), (0, 1, 2),
                                                      has_aux=True)(x, d, w)
  assert h.dtype == dtype and y.dtype == dtype
  assert_close(h, h_ref, dtype, "h")
  assert_close(y, y_ref, dtype, "y")
  for name, a, b in zip(["dx", "ddelta", "dw"], grads, grads_ref):
    assert_close(a, b, dtype, name)


# Row blocks that do not divide the rows, forward and backward loops of several steps, single-row
# programs (no loop), and a block larger than all the rows; D = 45 and 40 are padded to 64.
CONFIGS = [
    ((13, 64), jnp.bfloat16, rn.RowConfig(block_rows=4, steps=2, num_stages=3, bwd_block_rows=2,
                                          bwd_steps=4)),
    ((3, 5, 45), jnp.float32, rn.RowConfig(block_rows=2, steps=4, num_warps=2, bwd_block_rows=4,
                                           bwd_steps=2, bwd_num_warps=2)),
    ((7, 40), jnp.float32, rn.RowConfig(block_rows=1, num_warps=1, bwd_block_rows=1, bwd_steps=1,
                                        bwd_num_stages=1)),
    ((2, 3, 32), jnp.bfloat16, rn.RowConfig(block_rows=16, bwd_block_rows=16, bwd_steps=16)),
]


@pytest.mark.parametrize("shape,dtype,config", CONFIGS)
def test_configs(shape, dtype, config):
  test_rms_norm(shape, dtype, config)
  test_add_rms_norm(shape, dtype, config)


@pytest.mark.parametrize("config", [rn.RowConfig(block_rows=4, steps=8, bwd_num_stages=3),
                                    rn.RowConfig(block_rows=16, num_warps=16, bwd_block_rows=8,
                                                 bwd_steps=1, bwd_num_warps=4)])
def test_configs_lower_to_triton(config):
  # The Triton lowering (for CUDA, here on CPU) of the loops and blocks the GPU sweep times.
  S = jax.ShapeDtypeStruct
  x, w = S((16384, 2048), jnp.bfloat16), S((2048,), jnp.float32)
  loss = lambda x, d, w: sum(o.astype(jnp.float32).sum()
                             for o in rn.add_rms_norm_pallas(x, d, w, 1e-5, config=config))
  with mock.patch.object(_pallas, "interpret_default", lambda: False):
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, x, w).lower(
        lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 2


def test_bad_config_is_refused():
  with pytest.raises(ValueError, match="power of two"):
    rn.RowConfig(block_rows=3)
  with pytest.raises(TypeError, match="RowConfig"):
    rn.rms_norm_pallas(jnp.zeros((2, 8)), jnp.ones((8,)), 1e-5, config=(4, 8))


def test_bad_weight_is_refused():
  with pytest.raises(ValueError, match="weight"):
    rn.rms_norm_pallas(jnp.zeros((2, 8)), jnp.ones((4,)), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((4, 2048, 2048), jnp.bfloat16),
                                         ((3, 77, 768), jnp.float32)])
def test_rms_norm_gpu(on_gpu, shape, dtype):
  test_rms_norm(shape, dtype)
  test_add_rms_norm(shape, dtype)


@pytest.mark.gpu
def test_rms_norm_configs_gpu(on_gpu):
  # The sweep's extremes through Triton: big blocks with few warps, a ragged row count.
  for config in (rn.RowConfig(block_rows=16, num_warps=4, bwd_block_rows=8, bwd_steps=16,
                              bwd_num_warps=16, bwd_num_stages=3),
                 rn.RowConfig(block_rows=4, steps=8, num_warps=8),
                 rn.RowConfig(block_rows=1, num_warps=4, bwd_block_rows=1, bwd_steps=1)):
    test_rms_norm((1000, 2048), jnp.bfloat16, config)
    test_add_rms_norm((1000, 2048), jnp.bfloat16, config)
