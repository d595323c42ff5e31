"""The fused decode layer's kernels against their references on random inputs: interpreted on
CPU (fp32 tight, bf16 in its band), on the GPU at the 1b shapes (gpu-marked)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_util import assert_close, normal
from tinyllama_jax.kernels import decode_layer as dl
from tinyllama_jax.kernels import rope


def _gemv_inputs(seed, M, K, N, dtype):
  k = jax.random.split(jax.random.key(seed), 4)
  x = normal(k[0], (M, K), dtype)
  g = (1 + 0.2 * jax.random.normal(k[1], (K,))).astype(dtype)
  w = (normal(k[2], (N, K), jnp.float32) * K ** -0.5).astype(dtype)
  r = normal(k[3], (M, N), dtype)
  return x, g, w, r


def _check_gemvs(M, D, N, F, dtype, seed=0, **tiles):
  x, g, w, _ = _gemv_inputs(seed, M, D, N, dtype)
  up = lambda a: a.astype(jnp.float32)  # references from the same rounded values
  assert_close(dl.norm_gemv(x, g, w, 1e-5, **tiles), dl.norm_gemv_ref(up(x), up(g), up(w), 1e-5),
               dtype, f"norm_gemv M={M}")
  logits = dl.norm_gemv(x, g, w, 1e-5, jnp.float32, **tiles)
  assert logits.dtype == jnp.float32
  assert_close(logits, dl.norm_gemv_ref(up(x), up(g), up(w), 1e-5), dtype, "norm_gemv fp32 out")
  a, _, w_o, _ = _gemv_inputs(seed + 1, M, N, D, dtype)
  res = normal(jax.random.key(seed + 3), (M, D), dtype)
  assert_close(dl.gemv_add(a, w_o, res, **tiles), dl.gemv_add_ref(up(a), up(w_o), up(res)),
               dtype, f"gemv_add M={M}")
  _, _, w_gu, _ = _gemv_inputs(seed + 2, M, D, 2 * F, dtype)
  assert_close(dl.norm_gemv_swiglu(x, g, w_gu, 1e-5, **tiles),
               dl.norm_gemv_swiglu_ref(up(x), up(g), up(w_gu), 1e-5), dtype, f"swiglu M={M}")


@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemvs_match_their_references(M, dtype):
  # K = 96 is not a power of two (5632 is not): a dot's K loop takes chunks of 32, one row's a
  # chunk of 64 and a piece of 32.
  _check_gemvs(M, D=96, N=48, F=32, dtype=dtype)


def test_gemvs_take_other_tiles():
  # bench.decode_layer sweeps these. K = 96 at block_k 64: a whole chunk, then a piece of 32.
  for M in (1, 5):
    _check_gemvs(M, D=96, N=96, F=64, dtype=jnp.float32, block_k=64)
  assert dl.pow2_pieces(5632 % 2048) == [1024, 512] and dl.pow2_pieces(0) == []
  assert dl.tail_pieces(5632, 2048) == [(4096, 1024), (5120, 512)]
  assert dl.tail_pieces(2048, 512) == []
  assert dl.block_k_for(1, 5632) == 2048 and dl.block_k_for(16, 5632) == 512


def _attend_inputs(seed, S, H, G, D, dtype, positions_BT):
  k = jax.random.split(jax.random.key(seed), 3)
  pos = jnp.asarray(positions_BT, jnp.int32)
  B, T = pos.shape
  qkv = normal(k[0], (B, T, H + 2 * G, D), dtype)
  kc, vc = normal(k[1], (B, S, G, D), dtype), normal(k[2], (B, S, G, D), dtype)
  cos, sin = rope.cos_sin(pos, D, 10000.0)
  return qkv, cos, sin, kc, vc, pos


def _check_attend(args, H, dtype, **tiles):
  o, k, v = dl.attend(*args, H, **tiles)
  o_ref, k_ref, v_ref = dl.attend_ref(*args, H)
  assert_close(o, o_ref, dtype, "o")
  # The caches: the new slots written (v bitwise: no arithmetic), every other slot untouched.
  np.testing.assert_array_equal(np.asarray(v, np.float32), np.asarray(v_ref, np.float32))
  assert_close(k, k_ref, dtype, "k cache")
  pos = np.asarray(args[-1])
  untouched = np.ones(k.shape[:2], bool)
  untouched[np.arange(pos.shape[0])[:, None], pos] = False
  np.testing.assert_array_equal(np.asarray(k, np.float32)[untouched],
                                np.asarray(args[3], np.float32)[untouched])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attend_one_token_a_row(dtype):
  # Positions at 0 (only its own key), inside a block, at and past block edges, the last slot.
  _check_attend(_attend_inputs(0, 64, 8, 2, 16, dtype, [[0], [7], [16], [17], [40], [63]]), 8,
                dtype, block_s=16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("split_s", [None, 32])
def test_attend_several_tokens_a_row(dtype, split_s):
  """A speculative round's verify pass: T consecutive new tokens a row, causal among them."""
  starts = np.array([0, 13, 16, 58])
  positions = starts[:, None] + np.arange(4)[None, :]
  _check_attend(_attend_inputs(1, 64, 4, 2, 16, dtype, positions), 4, dtype, block_s=16,
                split_s=split_s)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attend_split_over_the_slots(dtype):
  """Flash-decoding: a program per 16 slots (and per 8 over two trips), the splits combined.
  Positions in the first split, at a split's edge, inside one, and splits wholly past them."""
  args = _attend_inputs(2, 64, 8, 2, 16, dtype, [[0], [15], [16], [33], [63]])
  _check_attend(args, 8, dtype, block_s=16, split_s=16)
  _check_attend(args, 8, dtype, block_s=8, split_s=16)


def test_attend_ignores_slots_past_the_position():
  """Slots after a row's position hold stale keys (a longer earlier request): never read."""
  qkv, cos, sin, kc, vc, pos = _attend_inputs(1, 64, 4, 2, 16, jnp.float32, [[5], [30]])
  o, _, _ = dl.attend(qkv, cos, sin, kc, vc, pos, 4, block_s=16)
  stale = np.arange(64)[None, :, None, None] > np.asarray(pos)[:, :1, None, None]
  o2, _, _ = dl.attend(qkv, cos, sin, jnp.where(stale, 1e3, kc), jnp.where(stale, -1e3, vc), pos,
                       4, block_s=16)
  np.testing.assert_array_equal(np.asarray(o), np.asarray(o2))


def test_bad_shapes_are_one_line_errors():
  x, g, w, r = _gemv_inputs(0, 17, 64, 32, jnp.float32)
  with pytest.raises(ValueError, match="17 rows > 16"):
    dl.norm_gemv(x, g, w, 1e-5)
  with pytest.raises(ValueError, match="must be \\[N, K\\]"):
    dl.norm_gemv(x[:4], g, w.T, 1e-5)
  with pytest.raises(ValueError, match="multiple of block_n"):
    dl.norm_gemv(x[:4], g, w[:24], 1e-5)
  with pytest.raises(ValueError, match="block_k=48 a power of two"):
    dl.norm_gemv(x[:4], g, w, 1e-5, block_k=48)
  attend_args = _attend_inputs(0, 64, 4, 2, 16, jnp.float32, [[3]])
  with pytest.raises(ValueError, match="multiple of split_s=48"):
    dl.attend(*attend_args, 4, block_s=16, split_s=48)


def test_layer_weights_are_the_block_weights_transposed():
  k = jax.random.split(jax.random.key(0), 7)
  D, H, G, Dh, F = 32, 4, 2, 8, 48
  p = {"wq": jax.random.normal(k[0], (D, H, Dh)), "wk": jax.random.normal(k[1], (D, G, Dh)),
       "wv": jax.random.normal(k[2], (D, G, Dh)), "wo": jax.random.normal(k[3], (H, Dh, D)),
       "w_gate": jax.random.normal(k[4], (D, F)), "w_up": jax.random.normal(k[5], (D, F)),
       "w_down": jax.random.normal(k[6], (F, D)), "attn_norm": jnp.ones(D),
       "mlp_norm": jnp.ones(D)}
  lw = dl.layer_weights(p)
  x = jax.random.normal(k[0], (3, D))
  dot = lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(dot(x, lw["qkv_NK"].T)[:, H * Dh:(H + G) * Dh],
                             jnp.einsum("md,dgk->mgk", x, p["wk"]).reshape(3, -1), rtol=1e-5)
  np.testing.assert_allclose(dot(x, lw["gate_up_NK"].T)[:, F:], dot(x, p["w_up"]), rtol=1e-5)
  o = jax.random.normal(k[1], (3, H * Dh))
  np.testing.assert_allclose(dot(o, lw["o_NK"].T), dot(o, p["wo"].reshape(H * Dh, D)),
                             rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 5, 16])
def test_decode_layer_kernels_gpu(on_gpu, M):
  """TinyLlama-1.1B's shapes in bf16 through the Triton lowering."""
  _check_gemvs(M, D=2048, N=2560, F=5632, dtype=jnp.bfloat16)
  positions = [[200]] if M == 1 else [[p] for p in range(0, 384, 24)][:M]
  _check_attend(_attend_inputs(0, 384, 32, 4, 64, jnp.bfloat16, positions), 32, jnp.bfloat16)
  _check_attend(_attend_inputs(1, 384, 32, 4, 64, jnp.bfloat16, [[100 + i for i in range(5)]]),
                32, jnp.bfloat16)
