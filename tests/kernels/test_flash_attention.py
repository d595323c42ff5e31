"""Flash attention (Pallas) against the jnp reference: forward and gradients, GQA, segments."""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels_util import assert_close, normal, packed_segments
from tinyllama_jax.kernels import attention, flash_attention as fa

SMALL = fa.FlashConfig(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16,
                       block_k_dkv=16)


def _segments(rng, B, T, segmented):
  """None, packed documents (True), documents spanning several 16-blocks ("long": a length-1
  one between, trailing padding), or ids in no order ("random": repeats, runs of 1)."""
  if segmented == "long":
    rows = [[1] * 50 + [2] + [3] * 30, [1] * 20 + [2] * 60]
    return jnp.asarray([(r + [0] * T)[:T] for r in rows * B][:B], jnp.int32)
  if segmented == "random":
    return jnp.asarray(rng.integers(0, 3, (B, T)), jnp.int32)
  return packed_segments(rng, B, T, with_padding=True) if segmented else None


def _check_against_reference(B, T, H, K, D, dtype, segmented, causal, config, seed):
  rng = np.random.default_rng(seed)
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  q = normal(kq, (B, T, H, D), dtype)
  k = normal(kk, (B, T, K, D), dtype)
  v = normal(kv, (B, T, K, D), dtype)
  do = normal(kd, (B, T, H, D), jnp.float32)
  seg = _segments(rng, B, T, segmented)

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


# Every kernel with its own tiles (dQ holds more queries than it streams keys, dK/dV the other
# way round, as the defaults do), in both launch orders; and ids in no order, where the unmasked
# run is only the first of several.
@pytest.mark.parametrize("heavy_first,segmented,T", [(True, "long", 90), (False, "random", 45)])
def test_unequal_tiles_per_kernel(heavy_first, segmented, T):
  cfg = fa.FlashConfig(block_q=32, block_k=16, block_q_dq=32, block_k_dq=16, block_q_dkv=16,
                       block_k_dkv=32, heavy_first=heavy_first)
  _check_against_reference(2, T, 4, 1, 64, jnp.bfloat16, segmented, True, cfg, seed=5)


def test_long_documents_small_tiles_fp32():
  """fp32 (tight tolerance) with every unmasked/masked loop populated, GQA 2."""
  _check_against_reference(2, 90, 4, 2, 64, jnp.float32, "long", True, SMALL, seed=7)


def test_legacy_bwd_tiles_and_table_entry():
  cfg = fa.FlashConfig(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)
  assert cfg.tiles() == (32, 16, 16, 32, 16, 32)
  assert fa.default_config(2048, dtype=jnp.float32, head_dim=128).tiles()[2:] == (64,) * 4
  # The measured best per head dim (the H200 sweep), else the class defaults.
  assert fa.default_config(2048, dtype=jnp.bfloat16, head_dim=128) == fa._MEASURED_BEST[128]
  assert fa.default_config(2048, dtype=jnp.bfloat16, head_dim=64).tiles()[2:] == (64,) * 4
  assert fa.default_config(2048, dtype=jnp.bfloat16, head_dim=32) == fa.FlashConfig()
  assert fa.default_config(40).tiles() == (64, 64, 64, 32, 32, 64)
  _check_against_reference(1, 45, 2, 1, 64, jnp.float32, True, True, cfg, seed=3)
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


def _keep(seg, T, T_pad, causal):
  """The elementwise mask for real query rows, [B, T, T_pad] (numpy)."""
  q = np.arange(T)[:, None]
  k = np.arange(T_pad)[None, :]
  keep = (q >= k) if causal else np.broadcast_to(k < T, (T, T_pad))
  keep = np.broadcast_to(keep, (seg.shape[0], T, T_pad))
  return keep & (seg[:, :T, None] == seg[:, None, :])


@pytest.mark.parametrize("segmented", [False, True, "random", "long"])
@pytest.mark.parametrize("causal", [True, False])
def test_split_ranges_against_elementwise_mask(segmented, causal):
  """[lo, hi) holds every unmasked pair; [full_lo, full_hi) holds no masked pair; and without ids
  or with packed ones the unmasked run is every full block (the split loses nothing)."""
  B, T, T_pad = 3, 90, 96
  seg = _segments(np.random.default_rng(1), B, T, segmented)
  seg = (jnp.ones((B, T), jnp.int32) if seg is None else seg)
  seg_pad = np.asarray(jnp.pad(seg, [(0, 0), (0, T_pad - T)], mode="edge"))
  keep = _keep(seg_pad, T, T_pad, causal)
  for bq, bk in ((16, 32), (32, 16), (16, 16)):
    arg = None if segmented is False else jnp.asarray(seg_pad)
    per_q = [np.asarray(a) for a in fa._split_ranges(arg, B, T, T_pad, bq, bk, causal, 2)]
    per_k = [np.asarray(a) for a in fa._split_ranges(arg, B, T, T_pad, bq, bk, causal, 1)]
    i_Q = np.arange(T)[None, :, None] // bq  # block of each (query, key) pair, [1, T, T_pad]
    j_K = np.arange(T_pad)[None, None, :] // bk
    b_B = np.arange(B)[:, None, None]
    for (lo, flo, fhi, hi), own, other in ((per_q, i_Q, j_K), (per_k, j_K, i_Q)):
      lo, flo, fhi, hi = (a[b_B, own] for a in (lo, flo, fhi, hi))
      assert (lo <= flo).all() and (flo <= fhi).all() and (fhi <= hi).all()
      assert ((lo <= other) & (other < hi))[keep].all(), "an unmasked pair outside [lo, hi)"
      assert not ((flo <= other) & (other < fhi))[~keep].any(), (
          f"a masked pair in an unmasked block ({bq}x{bk})")
    if segmented != "random" and causal:  # every block that needs no mask runs without one
      _, full = fa._live_full(arg, B, T, T_pad, bq, bk, causal)
      np.testing.assert_array_equal(per_q[2] - per_q[1], np.asarray(full).sum(2))
      np.testing.assert_array_equal(per_k[2] - per_k[1], np.asarray(full).sum(1))


def test_refuses_what_it_cannot_do():
  q = jnp.zeros((1, 8, 4, 48))
  with pytest.raises(ValueError, match="power-of-two head dim"):
    fa.attention_pallas(q, q[:, :, :2], q[:, :, :2])
  q = jnp.zeros((1, 8, 4, 64))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    fa.attention_pallas(q, q[:, :, :3], q[:, :, :3])


@pytest.mark.parametrize("D,segmented,name", [(64, False, ""), (64, True, ""), (128, False, ""),
                                              (128, True, ""), (64, True, "old-tiles"),
                                              (64, True, "dkv-8warps-3stages")])
def test_lowers_to_triton_at_tinyllama_shape(D, segmented, name):
  """The Triton lowering (not the GPU compiler) runs on CPU: catches unsupported ops early."""
  cfg = dataclasses.replace(GPU_CONFIGS.get(name, fa.FlashConfig()), interpret=False)
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
                           fa.default_config(T, dtype=dtype, head_dim=D), seed=T + H)


# Alternatives the GPU sweep times (`python -m bench.gpu --parts=sweeps`), with poisoned outputs:
# tiles/launch parameters the interpret tests cannot vouch for on Triton.
GPU_CONFIGS = {
    "old-tiles": fa.FlashConfig(block_q_bwd=64, block_k_bwd=64, heavy_first=False),
    "dq128x64-dkv64x128": fa.FlashConfig(block_k_dq=64, block_q_dkv=64),
    "dkv-8warps-3stages": fa.FlashConfig(num_warps_dkv=8, num_stages_dq=3, num_stages_dkv=3),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CONFIGS))
def test_configs_gpu(on_gpu, name):
  _check_against_reference(2, 1000, 16, 2, 64, jnp.bfloat16, True, True, GPU_CONFIGS[name],
                           seed=11)
