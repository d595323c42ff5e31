"""The packed SwiGLU Pallas kernel (the fused gate/up projection's) against the reference."""

import re
from unittest import mock

import pytest

import jax
import jax.numpy as jnp

from kernels_util import assert_close, normal
from tinyllama_jax.kernels import _pallas, swiglu


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
