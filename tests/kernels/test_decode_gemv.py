"""The decode GEMV kernels (Pallas, interpreted on CPU) against their fp32 references."""

import pytest

import jax
import jax.numpy as jnp

from kernels_util import assert_close, normal
from tinyllama_jax.kernels import decode_gemv as dg

D, N, F = 256, 128, 96  # K of 4 chunks of 64; N and F of 8 and 6 strips of 16
EPS = 1e-5
SMALL = dict(block_n=16, block_k=64)


def _inputs(M, dtype, seed, K=D, N=N, F=F, lead=None):
  kx, kg, kw, kgu, kr = jax.random.split(jax.random.key(seed), 5)
  # Rows of very different scales, so a missing or misplaced norm is far outside the tolerance.
  scale = (0.25 + jnp.arange(M, dtype=jnp.float32) * 1.5)[:, None]
  x = (normal(kx, (M, K), jnp.float32) * scale).astype(dtype)
  g = 1.0 + 0.5 * jax.random.normal(kg, (K,))
  w = (normal(kw, (K, N), jnp.float32) * K ** -0.5).astype(dtype)
  w_gu = (normal(kgu, (K, 2 * F), jnp.float32) * K ** -0.5).astype(dtype)
  r = normal(kr, (M, N), dtype)
  if lead is not None:
    x, r = x.reshape(*lead, K), r.reshape(*lead, N)
  return x, g, w, w_gu, r


def _check_all(M, dtype, seed, tuning, lead=None, shape=(D, N, F)):
  K, N_, F_ = shape
  x, g, w, w_gu, r = _inputs(M, dtype, seed, K, N_, F_, lead=lead)
  cases = [
      ("norm_matmul", dg.norm_matmul(x, g, w, EPS, **tuning), dg.norm_matmul_ref(x, g, w, EPS)),
      ("matmul_add", dg.matmul_add(x, w, r, **tuning), dg.matmul_add_ref(x, w, r)),
      ("norm_matmul_swiglu", dg.norm_matmul_swiglu(x, g, w_gu, EPS, **tuning),
       dg.norm_matmul_swiglu_ref(x, g, w_gu, EPS)),
  ]
  for name, y, y_ref in cases:
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype == dtype, (name, y.shape, y.dtype)
    assert_close(y, y_ref, dtype, f"{name} M={M}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16])  # the GEMV path, the padded dot path, the full dot
def test_kernels_match_references(M, dtype):
  _check_all(M, dtype, seed=M + (dtype == jnp.bfloat16), tuning=SMALL)


@pytest.mark.parametrize("M,tuning", [(1, dict(block_n=32, block_k=256, num_warps=8)),
                                      (7, dict(block_n=32, block_k=128, num_stages=2))])
def test_other_blocks(M, tuning):
  # One K chunk (no loop carry across chunks) and wider strips.
  _check_all(M, jnp.bfloat16, seed=10 + M, tuning=tuning)


def test_leading_dims_are_rows():
  _check_all(4, jnp.float32, seed=20, tuning=SMALL, lead=(2, 2))  # [B, T, D] with B*T rows


def test_references_are_the_model_formulas():
  # The refs against the plain composition: norm, scale, dot, swiglu on the halves.
  x, g, w, w_gu, r = _inputs(3, jnp.float32, seed=30)
  with jax.default_matmul_precision("highest"):
    h = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + EPS) * g
    assert_close(dg.norm_matmul_ref(x, g, w, EPS), h @ w, jnp.float32, "norm_matmul_ref")
    assert_close(dg.matmul_add_ref(x, w, r), r + x @ w, jnp.float32, "matmul_add_ref")
    gu = h @ w_gu
    assert_close(dg.norm_matmul_swiglu_ref(x, g, w_gu, EPS),
                 jax.nn.silu(gu[:, :F]) * gu[:, F:], jnp.float32, "norm_matmul_swiglu_ref")


@pytest.mark.parametrize("call,match", [
    (lambda x, g, w, gu, r: dg.norm_matmul(jnp.zeros((17, D)), g, w, EPS, **SMALL), "17 rows > 16"),
    (lambda x, g, w, gu, r: dg.norm_matmul(x, g, w[:, :120], EPS, **SMALL),
     "N=120 is not a multiple of block_n=16"),
    (lambda x, g, w, gu, r: dg.matmul_add(x[:, :224], w[:224], r, block_n=16, block_k=128),
     "K=224 is not a multiple of block_k=128"),
    (lambda x, g, w, gu, r: dg.norm_matmul_swiglu(x, g, gu, EPS, block_n=24, block_k=64),
     "block_n=24, block_k=64 must be powers of two"),
    (lambda x, g, w, gu, r: dg.norm_matmul_swiglu(x, g, gu[:, 1:], EPS, **SMALL), "even 2F"),
    (lambda x, g, w, gu, r: dg.norm_matmul(x, g, w[:128], EPS, **SMALL), "weight"),
    (lambda x, g, w, gu, r: dg.norm_matmul(x, g[:128], w, EPS, **SMALL), "norm weight"),
    (lambda x, g, w, gu, r: dg.matmul_add(x, w, r[:, :64], **SMALL), "residual"),
])
def test_bad_shapes_are_refused_in_one_line(call, match):
  x, g, w, w_gu, r = _inputs(2, jnp.float32, seed=40)
  with pytest.raises(ValueError, match=match) as err:
    call(x, g, w, w_gu, r)
  assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("tuning", [{}, dict(block_n=32, block_k=256, num_warps=8, num_stages=4)])
def test_kernels_gpu(on_gpu, M, tuning):
  # Through Triton at the 1b shapes: qkv's 2560 columns (o- and down-proj's are tested by
  # matmul_add at K 2048), gate/up's F 5632; the defaults and a sweep config.
  _check_all(M, jnp.bfloat16, seed=50 + M, tuning=tuning, shape=(2048, 2560, 5632))
  x, w, r = (normal(k, s, jnp.bfloat16) for k, s in zip(
      jax.random.split(jax.random.key(M), 3), [(M, 5632), (5632, 2048), (M, 2048)]))
  w = (w.astype(jnp.float32) * 5632 ** -0.5).astype(jnp.bfloat16)
  assert_close(dg.matmul_add(x, w, r, **tuning), dg.matmul_add_ref(x, w, r), jnp.bfloat16,
               f"down-proj M={M}")
