"""The flash-decoding attention kernels (Pallas, interpreted on CPU) against the reference: GQA
groups, rows at different positions of the cache, bf16, splits of several blocks and padding
splits; other shapes fall back to the reference; it lowers to two Triton kernels at the 1b
decode shapes (tests/inference/test_decode.py: the decode loop with it gives the reference's
tokens)."""

import functools
from unittest import mock

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels_util import assert_close, normal
from tinyllama_jax.kernels import _pallas, attention, decode_attention


def _inputs(B, S, H, K, D, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (normal(ks[0], (B, 1, H, D), dtype), normal(ks[1], (B, S, K, D), dtype),
          normal(ks[2], (B, S, K, D), dtype))


@pytest.mark.parametrize("B,S,H,K,D,dtype,positions,block_s", [
    (1, 384, 32, 4, 64, jnp.float32, [383], 16),          # 1b's heads: 24 splits (32), last slot
    (4, 128, 8, 2, 32, jnp.float32, [0, 15, 31, 100], 16),  # first slot, block ends, mid-block
    (2, 64, 4, 4, 16, jnp.bfloat16, [5, 63], 16),          # MHA, bf16
    (2, 96, 16, 1, 64, jnp.float32, [40, 95], 16),         # MQA; 6 splits padded to 8
    (3, 384, 8, 1, 32, jnp.float32, [3, 4, 200], 4),       # 2 blocks a split (96 blocks)
])
def test_matches_the_reference(B, S, H, K, D, dtype, positions, block_s):
  q, k, v = _inputs(B, S, H, K, D, dtype)
  pos = jnp.asarray(positions, jnp.int32)[:, None]
  out = jax.jit(functools.partial(decode_attention.attention_cache_pallas, block_s=block_s))(
      q, k, v, pos)
  with jax.default_matmul_precision("highest"):
    ref = attention.attention_cache_xla(*(x.astype(jnp.float32) for x in (q, k, v)), pos)
  assert out.dtype == dtype and out.shape == q.shape
  assert_close(out, ref, dtype, "decode attention")


@pytest.mark.gpu
def test_decode_attention_gpu(on_gpu):
  """Through Triton on the device, at the 1b decode shapes (batch 1 and 16, a 384-slot cache)."""
  test_matches_the_reference(1, 384, 32, 4, 64, jnp.bfloat16, [200], 16)
  test_matches_the_reference(16, 384, 32, 4, 64, jnp.bfloat16, list(range(0, 384, 24)), 16)
  test_matches_the_reference(2, 96, 16, 1, 64, jnp.float32, [40, 95], 16)
  test_matches_the_reference(3, 384, 8, 1, 32, jnp.float32, [3, 4, 200], 4)


def test_slots_after_the_position_change_nothing():
  """Later slots of the position's block are masked (finite garbage there changes nothing);
  blocks after it are not read at all (NaN there changes nothing either)."""
  q, k, v = _inputs(1, 128, 4, 2, 32, jnp.float32)
  pos = jnp.asarray([[50]], jnp.int32)  # block 3 of 16-slot blocks holds slots 48..63
  out = decode_attention.attention_cache_pallas(q, k, v, pos)
  junk = lambda x: x.at[:, 51:64].set(1e3).at[:, 64:].set(jnp.nan)
  np.testing.assert_array_equal(
      np.asarray(out), np.asarray(decode_attention.attention_cache_pallas(q, junk(k), junk(v), pos)))


def test_prefill_and_odd_shapes_run_the_reference():
  q, k, v = _inputs(2, 64, 6, 2, 32, jnp.float32)  # 3 query heads a kv head: not a power of two
  pos = jnp.asarray([[10], [20]], jnp.int32)
  np.testing.assert_array_equal(decode_attention.attention_cache_pallas(q, k, v, pos),
                                attention.attention_cache_xla(q, k, v, pos))
  q4 = jnp.concatenate([q] * 4, axis=1)  # T = 4: a verify pass
  pos4 = pos + jnp.arange(4)[None]
  np.testing.assert_array_equal(decode_attention.attention_cache_pallas(q4, k, v, pos4),
                                attention.attention_cache_xla(q4, k, v, pos4))


def test_lowers_to_two_triton_kernels_at_the_1b_decode_shapes():
  """The split kernel and the merge (around them only free reshapes, and here the poisoning)."""
  S = jax.ShapeDtypeStruct
  for B in (1, 16):
    with mock.patch.object(_pallas, "interpret_default", lambda: False):
      lowered = jax.jit(decode_attention.attention_cache_pallas).trace(
          S((B, 1, 32, 64), jnp.bfloat16), S((B, 384, 4, 64), jnp.bfloat16),
          S((B, 384, 4, 64), jnp.bfloat16), S((B, 1), jnp.int32)).lower(
              lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 2
