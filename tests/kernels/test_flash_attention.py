"""Flash attention (Pallas) against the jnp reference: forward and gradients, GQA, segments."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels_util import assert_close, normal, packed_segments
from tinyllama_jax.kernels import attention, flash_attention as fa

SMALL = fa.FlashConfig(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _check_against_reference(B, T, H, K, D, dtype, segmented, causal, config, seed):
  rng = np.random.default_rng(seed)
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  q = normal(kq, (B, T, H, D), dtype)
  k = normal(kk, (B, T, K, D), dtype)
  v = normal(kv, (B, T, K, D), dtype)
  do = normal(kd, (B, T, H, D), jnp.float32)
  seg = packed_segments(rng, B, T, with_padding=True) if segmented else None

  def loss(fn, q, k, v):
    o = fn(q, k, v)
    return jnp.sum(o.astype(jnp.float32) * do), o

  kernel = lambda q, k, v: fa.flash_attention(q, k, v, seg, causal=causal, config=config)
  reference = lambda q, k, v: attention.attention_xla(q, k, v, seg, causal=causal)
  (_, o), grads = jax.jit(jax.value_and_grad(lambda *a: loss(kernel, *a), (0, 1, 2),
                                             has_aux=True))(q, k, v)
  with jax.default_matmul_precision("highest"):  # no TF32 in the fp32 reference on GPU
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, o_ref), grads_ref = jax.jit(jax.value_and_grad(lambda *a: loss(reference, *a), (0, 1, 2),
                                                       has_aux=True))(*f32)
  assert o.dtype == dtype
  assert_close(o, o_ref, dtype, "output")
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert g.dtype == dtype
    assert_close(g, g_ref, dtype, f"d{name}")


# (B, T, H, K, D, dtype, segmented, causal): odd and even T, GQA 1/4/8, head dim 64/128, both
# dtypes, packed documents with a length-1 document and trailing padding.
CASES = [
    (2, 37, 2, 2, 64, jnp.float32, True, True),
    (1, 48, 4, 1, 128, jnp.bfloat16, True, True),
    (1, 33, 8, 1, 64, jnp.bfloat16, False, True),
    (2, 64, 8, 2, 64, jnp.float32, True, True),
    (1, 31, 8, 1, 128, jnp.float32, True, True),
    (2, 40, 4, 1, 64, jnp.bfloat16, True, True),
    (1, 35, 4, 2, 64, jnp.float32, True, False),
]


@pytest.mark.parametrize("B,T,H,K,D,dtype,segmented,causal", CASES)
def test_matches_reference_interpret(B, T, H, K, D, dtype, segmented, causal):
  _check_against_reference(B, T, H, K, D, dtype, segmented, causal, SMALL, seed=T + H)


def test_unequal_tiles_and_table_entry():
  cfg = fa.FlashConfig(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)
  _check_against_reference(1, 45, 4, 1, 64, jnp.float32, True, True, cfg, seed=3)
  from tinyllama_jax import kernels
  q = jnp.ones((1, 5, 2, 16))
  assert kernels.get("attention", "pallas")(q, q, q).shape == q.shape


def test_block_ranges_skip_other_documents():
  # Two documents of 32 tokens each, tiles of 16: the second document's query blocks start at
  # key block 2, and its key blocks are never visited by the first document's queries.
  seg = jnp.asarray([[1] * 32 + [2] * 32], jnp.int32)
  kv_lo, kv_hi, q_lo, q_hi = fa._block_ranges(seg, 1, 64, 16, 16, causal=True)
  np.testing.assert_array_equal(kv_lo[0], [0, 0, 2, 2])
  np.testing.assert_array_equal(kv_hi[0], [1, 2, 3, 4])
  np.testing.assert_array_equal(q_lo[0], [0, 1, 2, 3])
  np.testing.assert_array_equal(q_hi[0], [2, 2, 4, 4])
  kv_lo, kv_hi, _, _ = fa._block_ranges(None, 1, 64, 16, 16, causal=False)
  np.testing.assert_array_equal(kv_hi[0] - kv_lo[0], [4, 4, 4, 4])


def test_refuses_what_it_cannot_do():
  q = jnp.zeros((1, 8, 4, 48))
  with pytest.raises(ValueError, match="power-of-two head dim"):
    fa.attention_pallas(q, q[:, :, :2], q[:, :, :2])
  q = jnp.zeros((1, 8, 4, 64))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    fa.attention_pallas(q, q[:, :, :3], q[:, :, :3])


@pytest.mark.parametrize("segmented", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_lowers_to_triton_at_tinyllama_shape(D, segmented):
  """The Triton lowering (not the GPU compiler) runs on CPU: catches unsupported ops early."""
  cfg = fa.FlashConfig(interpret=False)
  q = jax.ShapeDtypeStruct((8, 2048, 32, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((8, 2048, 4, D), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((8, 2048), jnp.int32)

  def loss(q, k, v, s):
    o = fa.flash_attention(q, k, v, s if segmented else None, causal=True, config=cfg)
    return o.astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, kv, kv, seg).lower(
      lowering_platforms=("cuda",))
  assert lowered.as_text().count("xla.gpu.triton") == 3  # forward, dQ, dK/dV


GPU_CASES = [
    (2, 2048, 32, 4, 64, jnp.bfloat16, True, True),    # TinyLlama heads, packed documents
    (1, 1000, 8, 1, 128, jnp.bfloat16, False, True),   # head dim 128, padded length
    (1, 515, 8, 8, 64, jnp.float32, True, True),       # fp32 (no TF32), odd length
    (1, 256, 16, 4, 128, jnp.float32, True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,K,D,dtype,segmented,causal", GPU_CASES)
def test_matches_reference_gpu(on_gpu, B, T, H, K, D, dtype, segmented, causal):
  _check_against_reference(B, T, H, K, D, dtype, segmented, causal,
                           fa.default_config(T), seed=T + H)
