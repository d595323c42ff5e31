"""RoPE (q and k in one pass) and SwiGLU Pallas kernels against the references."""

import functools
import re
from unittest import mock

import pytest

import jax
import jax.numpy as jnp

from kernels_util import assert_close, normal
from tinyllama_jax.kernels import _pallas, rope, swiglu


def _check_rope_qk(B, T, H, K, D, dtype, seed, config=None):
  kq, kk, kp, kg, kh = jax.random.split(jax.random.key(seed), 5)
  q = normal(kq, (B, T, H, D), dtype)
  k = normal(kk, (B, T, K, D), dtype)
  # Packed documents restart their positions; large positions test the angle rounding.
  pos = jax.random.randint(kp, (B, T), 0, 2048)
  gq = normal(kg, q.shape, jnp.float32)
  gk = normal(kh, k.shape, jnp.float32)

  def loss(fn):
    def f(q, k):
      a, b = fn(q, k, pos, 10000.0)
      return jnp.sum(a.astype(jnp.float32) * gq) + jnp.sum(b.astype(jnp.float32) * gk), (a, b)
    return f

  pallas = functools.partial(rope.rope_qk_pallas, config=config)
  (_, outs), grads = jax.jit(jax.value_and_grad(loss(pallas), (0, 1), has_aux=True))(q, k)
  (_, outs_ref), grads_ref = jax.value_and_grad(loss(rope.rope_qk_ref), (0, 1), has_aux=True)(
      q.astype(jnp.float32), k.astype(jnp.float32))
  for name, a, b in zip(["q", "k", "dq", "dk"], outs + grads, outs_ref + grads_ref):
    assert a.dtype == dtype
    assert_close(a, b, dtype, name)
  single = jax.jit(functools.partial(rope.rope_pallas, config=config), static_argnums=2)(
      k, pos, 10000.0)
  assert_close(single, outs_ref[1], dtype, "rope_pallas(k)")


@pytest.mark.parametrize("B,T,H,K,D,dtype", [
    (2, 7, 4, 1, 64, jnp.float32), (1, 9, 8, 2, 128, jnp.bfloat16), (1, 6, 12, 3, 32, jnp.float32)])
def test_rope_qk(B, T, H, K, D, dtype):
  _check_rope_qk(B, T, H, K, D, dtype, seed=T * D)


# Token blocks that do not divide B*T (2 x 7), one token per program, a block larger than all the
# tokens, and the element-budget rule picking the block (with the halves split in registers); 3
# and 5 heads are padded to 4 and 8.
@pytest.mark.parametrize("B,T,H,K,D,dtype,config", [
    (2, 7, 3, 1, 64, jnp.bfloat16, rope.RopeConfig(block_tokens=4)),
    (1, 5, 4, 2, 32, jnp.float32, rope.RopeConfig(block_tokens=1, num_warps=2)),
    (1, 3, 2, 2, 16, jnp.float32, rope.RopeConfig(block_tokens=64, num_warps=1)),
    (3, 5, 5, 1, 16, jnp.bfloat16, rope.RopeConfig(block_elems=512, num_warps=4,
                                                   split_in_registers=True)),
])
def test_rope_qk_configs(B, T, H, K, D, dtype, config):
  _check_rope_qk(B, T, H, K, D, dtype, seed=B * T + H, config=config)


@pytest.mark.parametrize("config", [rope.RopeConfig(block_tokens=16, num_warps=16),
                                    rope.RopeConfig(block_tokens=1, num_warps=4,
                                                    split_in_registers=True)])
def test_rope_configs_lower_to_triton(config):
  # The Triton lowering (for CUDA, here on CPU) of the blocks the GPU sweep times.
  S = jax.ShapeDtypeStruct
  args = (S((8, 2048, 32, 64), jnp.bfloat16), S((8, 2048, 4, 64), jnp.bfloat16),
          S((8, 2048), jnp.int32))
  loss = lambda q, k, p: sum(o.astype(jnp.float32).sum()
                             for o in rope.rope_qk_pallas(q, k, p, 1e4, config=config))
  with mock.patch.object(_pallas, "interpret_default", lambda: False):
    text = jax.jit(jax.grad(loss, (0, 1))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 2


def test_rope_bad_config_is_refused():
  with pytest.raises(ValueError, match="power of two"):
    rope.RopeConfig(block_tokens=6)
  with pytest.raises(TypeError, match="RopeConfig"):
    rope.rope_pallas(jnp.zeros((1, 2, 1, 8)), jnp.zeros((1, 2), jnp.int32), 1e4, config=4)


def test_rope_refuses_odd_head_dim():
  x = jnp.zeros((1, 2, 1, 48))
  with pytest.raises(ValueError, match="head dim"):
    rope.rope_pallas(x, jnp.zeros((1, 2), jnp.int32), 10000.0)


def _check_swiglu(shape, dtype, seed):
  kg, ku, kd = jax.random.split(jax.random.key(seed), 3)
  g, u = normal(kg, shape, dtype) * 3, normal(ku, shape, dtype)
  dy = normal(kd, shape, jnp.float32)
  loss = lambda fn: lambda g, u: (jnp.sum(fn(g, u).astype(jnp.float32) * dy), fn(g, u))
  (_, y), grads = jax.jit(jax.value_and_grad(loss(swiglu.swiglu_pallas), (0, 1),
                                             has_aux=True))(g, u)
  (_, y_ref), grads_ref = jax.value_and_grad(loss(swiglu.swiglu_ref), (0, 1), has_aux=True)(
      g.astype(jnp.float32), u.astype(jnp.float32))
  for name, a, b in zip(["y", "dgate", "dup"], (y,) + grads, (y_ref,) + grads_ref):
    assert a.dtype == dtype
    assert_close(a, b, dtype, name)


@pytest.mark.parametrize("shape,dtype", [((3, 5, 176), jnp.float32), ((7, 96), jnp.bfloat16),
                                         ((5, 45), jnp.float32), ((1, 1, 96), jnp.float32)])
def test_swiglu(shape, dtype):
  _check_swiglu(shape, dtype, seed=shape[-1])


@pytest.mark.gpu
def test_rope_swiglu_gpu(on_gpu):
  _check_rope_qk(2, 2048, 32, 4, 64, jnp.bfloat16, seed=0)
  _check_rope_qk(1, 100, 12, 1, 64, jnp.float32, seed=1)
  _check_rope_qk(1, 1000, 32, 4, 64, jnp.bfloat16, seed=4,
                 config=rope.RopeConfig(block_tokens=16, num_warps=4))
  _check_rope_qk(1, 1000, 32, 4, 64, jnp.bfloat16, seed=5,
                 config=rope.RopeConfig(block_tokens=4, split_in_registers=True))
  _check_swiglu((2, 2048, 5632), jnp.bfloat16, seed=2)
  _check_swiglu((3, 77, 2048), jnp.float32, seed=3)


def _check_swiglu_packed(shape, dtype, seed):
  """The packed kernel (gate | up as one [..., 2F] array) against the two-slice reference in
  fp32 (from the same values), forward and d(gate_up)."""
  kg, kd = jax.random.split(jax.random.key(seed), 2)
  gu = normal(kg, shape, dtype) * 2
  dy = normal(kd, shape[:-1] + (shape[-1] // 2,), jnp.float32)
  loss = lambda fn: lambda x: (jnp.sum(fn(x).astype(jnp.float32) * dy), fn(x))
  (_, y), (dgu,) = jax.jit(jax.value_and_grad(loss(swiglu.swiglu_packed_pallas), (0,),
                                              has_aux=True))(gu)
  (_, y_ref), (dgu_ref,) = jax.value_and_grad(loss(swiglu.swiglu_packed_ref), (0,),
                                              has_aux=True)(gu.astype(jnp.float32))
  assert y.dtype == dtype and dgu.dtype == dtype and dgu.shape == gu.shape
  assert_close(y, y_ref, dtype, "y")
  assert_close(dgu, dgu_ref, dtype, "d(gate_up)")


@pytest.mark.parametrize("shape,dtype", [((3, 5, 2 * 176), jnp.float32),
                                         ((7, 2 * 96), jnp.bfloat16), ((5, 2 * 45), jnp.float32),
                                         ((1, 1, 2 * 96), jnp.float32)])
def test_swiglu_packed(shape, dtype):
  _check_swiglu_packed(shape, dtype, seed=shape[-1])


@pytest.mark.parametrize("rows", [1, 2, 16])
def test_swiglu_packed_pads_no_decode_step(rows):
  """A decode step's rows (the 1b MLP at batch 1 and 16) go to the kernel unpadded: one Triton
  call and no pad or slice around it (a pad kernel a layer at batch 1 before)."""
  with mock.patch.object(_pallas, "interpret_default", lambda: False):
    text = jax.jit(swiglu.swiglu_packed_pallas).trace(
        jax.ShapeDtypeStruct((rows, 1, 2 * 5632), jnp.bfloat16)).lower(
            lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 1 and "stablehlo.slice" not in text
  # jnp.pad by nothing stays in the trace as a pad of zero widths: XLA drops it.
  pads = re.findall(r"stablehlo\.pad .*low = \[([\d, ]*)\], high = \[([\d, ]*)\]", text)
  assert all(set(w.replace(",", " ").split()) == {"0"} for pad in pads for w in pad), pads


def test_swiglu_packed_refuses_an_odd_width():
  with pytest.raises(ValueError, match="2F"):
    swiglu.swiglu_packed_pallas(jnp.zeros((2, 7)))


@pytest.mark.gpu
def test_swiglu_packed_gpu(on_gpu):
  _check_swiglu_packed((2, 2048, 2 * 5632), jnp.bfloat16, seed=6)
  _check_swiglu_packed((3, 77, 2 * 2048), jnp.float32, seed=7)
