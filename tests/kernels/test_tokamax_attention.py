"""tokamax's Mosaic GPU attention behind our signature: the packed-document mask it is given
(per-query first key + causal) equals the reference's segment mask (CPU, no tokamax needed);
on the device, forward and gradients against the fp32 reference, with and without documents."""

import importlib.util

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels_util import assert_close, normal, packed_segments
from tinyllama_jax.kernels import attention, tokamax_attention


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_padding", [False, True])
def test_document_starts_give_the_reference_segment_mask(seed, with_padding):
  rng = np.random.default_rng(seed)
  seg_BT = packed_segments(rng, 3, 96, with_padding=with_padding)
  start_BT = tokamax_attention.document_starts(seg_BT)
  t = jnp.arange(96)
  mask_BTS = (t[None, None, :] >= start_BT[:, :, None]) & (t[None, None, :] <= t[None, :, None])
  ref_BTS = (seg_BT[:, :, None] == seg_BT[:, None, :]) & (t[None, None, :] <= t[None, :, None])
  np.testing.assert_array_equal(mask_BTS, ref_BTS)


def test_without_tokamax_the_error_names_the_install_and_the_alternatives():
  if importlib.util.find_spec("tokamax") is not None:
    pytest.skip("tokamax is installed here: the error path cannot run")
  with pytest.raises(ValueError, match=r"pip install tokamax==.*attention=cudnn"):
    tokamax_attention._impl()


def _check(B, T, H, K, D, segmented, seed):
  rng = np.random.default_rng(seed)
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (normal(kq, (B, T, H, D), jnp.bfloat16), normal(kk, (B, T, K, D), jnp.bfloat16),
             normal(kv, (B, T, K, D), jnp.bfloat16))
  do = normal(kd, (B, T, H, D), jnp.float32)
  seg = packed_segments(rng, B, T, with_padding=True) if segmented else None

  def loss(fn, q, k, v):
    o = fn(q, k, v, seg, causal=True)
    return jnp.sum(o.astype(jnp.float32) * do), o

  grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), (0, 1, 2), has_aux=True))
  (_, o), grads = grad(tokamax_attention.attention_tokamax)(q, k, v)
  with jax.default_matmul_precision("highest"):
    (_, o_ref), grads_ref = grad(attention.attention_xla)(
        *(x.astype(jnp.float32) for x in (q, k, v)))
  assert o.dtype == jnp.bfloat16
  assert_close(o, o_ref, jnp.bfloat16, "output")
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert_close(g, g_ref, jnp.bfloat16, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("segmented", [False, True])
@pytest.mark.parametrize("H,K,D", [(32, 4, 64), (16, 2, 128), (8, 8, 64)])
def test_matches_the_reference_on_the_gpu(on_gpu, H, K, D, segmented):
  _check(2, 1024, H, K, D, segmented, seed=H + D)
