"""The FP8 matmul (kernels/fp8.py): its per-tensor current scaling, and the dot, forward and both
gradients, against fp32 within the error that e4m3 (3 mantissa bits) and e5m2 (2) allow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyllama_jax.kernels import fp8

E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("q_dtype, fmax", [(fp8.E4M3, E4M3_MAX), (fp8.E5M2, E5M2_MAX)])
def test_the_scale_maps_amax_onto_the_largest_finite_value(q_dtype, fmax):
  assert float(jnp.finfo(q_dtype).max) == fmax
  x = jnp.array([[0.5, -3.0], [2.0, 1.0]], jnp.float32)
  scale = fp8.scale_of(x, q_dtype)
  assert scale.dtype == jnp.float32 and scale.shape == ()
  np.testing.assert_allclose(scale, 3.0 / fmax, rtol=1e-7)
  q = fp8.quantize(x, q_dtype, scale)
  assert q.dtype == q_dtype
  assert float(q[0, 1]) == -fmax  # the amax element lands on the top of the range, exactly
  np.testing.assert_allclose(q.astype(jnp.float32) * scale, x, rtol=0.13)


def test_an_all_zero_tensor_has_scale_one_and_quantizes_to_zeros():
  x = jnp.zeros((4, 8), jnp.bfloat16)
  q, scale = fp8.quantize_current(x, fp8.E4M3)
  assert float(scale) == 1.0
  assert np.all(np.asarray(q.astype(jnp.float32)) == 0)
  g = jax.grad(lambda x, w: fp8.dot(x, w).sum(), (0, 1))(jnp.zeros((4, 8)), jnp.zeros((8, 3)))
  assert all(np.all(np.isfinite(a)) and np.all(np.asarray(a) == 0) for a in g)


@pytest.mark.parametrize("q_dtype, fmax", [(fp8.E4M3, E4M3_MAX), (fp8.E5M2, E5M2_MAX)])
def test_values_past_the_range_saturate_instead_of_overflowing(q_dtype, fmax):
  """A scale smaller than the tensor's own (a stale one) puts values past the range: they clip to
  +-max. An unclipped cast gives NaN in e4m3fn (no inf) and inf in e5m2."""
  x = jnp.array([1.0, -1.0, 1e6, -1e6, 0.0], jnp.float32)
  q = fp8.quantize(x, q_dtype, jnp.float32(1e-6))  # 1 -> 1e6: past both ranges
  np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)),
                                [fmax, -fmax, fmax, -fmax, 0.0])
  assert not np.isfinite(float(jnp.float32(1e6).astype(q_dtype).astype(jnp.float32)))


def test_quantized_values_are_the_nearest_fp8_values():
  x = jax.random.normal(jax.random.key(0), (64, 64), jnp.float32) * 7
  q, scale = fp8.quantize_current(x, fp8.E4M3)
  expected = (np.asarray(x) / np.float32(scale)).astype(jnp.float8_e4m3fn)
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8), expected.view(np.uint8))


def _inputs(n=256, k=384, m=192, seed=0):
  kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (n, k), jnp.float32)
  w = jax.random.normal(kw, (k, m), jnp.float32) * 0.05
  g = jax.random.normal(kg, (n, m), jnp.float32) * 1e-3  # gradients are small: the scale handles it
  return x, w, g


@pytest.mark.parametrize("seed", [0, 1])
def test_the_fp8_dot_and_its_gradients_match_fp32_within_fp8_error(seed):
  """Relative (Frobenius) error of the forward ~ e4m3's rounding (2^-4 at worst an element,
  ~2.3% rms, two operands): below 6%; the gradients, e5m2 (2^-3) times e4m3: below 10%. And
  well above fp32's own error: the operands really are rounded to fp8."""
  x, w, g = _inputs(seed=seed)
  y = fp8.dot(x, w)
  y_ref = jnp.dot(x, w, precision="highest")
  assert y.dtype == jnp.float32 and y.shape == (256, 192)
  assert 5e-3 < _rel(y, y_ref) < 0.06
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * g)
  dx, dw = jax.grad(loss(fp8.dot), (0, 1))(x, w)
  dx_ref, dw_ref = jax.grad(loss(lambda x, w: jnp.dot(x, w, precision="highest")), (0, 1))(x, w)
  assert dx.shape == x.shape and dw.shape == w.shape
  assert 5e-3 < _rel(dx, dx_ref) < 0.10
  assert 5e-3 < _rel(dw, dw_ref) < 0.10


def test_the_gradient_is_quantized_with_its_own_scale_at_any_magnitude():
  """Current scaling: a gradient 2^-20 times smaller (its entries ~1e-9, far below e5m2's
  smallest subnormal, 1.5e-5) quantizes to the same fp8 values, so its result is the same up to
  that factor, where a fixed scale of 1 would flush it to zero."""
  x, w, g = _inputs()
  s = 2.0 ** -20  # a power of two: scaling by it is exact
  grads = [jax.grad(lambda w: jnp.sum(fp8.dot(x, w) * g * c))(w) for c in (1.0, s)]
  np.testing.assert_allclose(grads[1] / s, grads[0], rtol=1e-6)
  assert np.all(np.asarray(fp8.quantize(g * s, fp8.E5M2, jnp.float32(1)).astype(jnp.float32))
                == 0)


@pytest.mark.parametrize("gemm_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_inputs_give_bf16_outputs_and_gradients(gemm_dtype):
  """Both GEMM output types (fp8.dot's fp32, the bf16 candidate bench.fp8_check times): bf16
  results within fp8's error of fp32's, forward and gradients."""
  x, w, g = (a.astype(jnp.bfloat16) for a in _inputs())
  y, vjp = jax.vjp(fp8.make_dot(jnp.dtype(gemm_dtype)), x, w)
  dx, dw = vjp(g)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  x32, w32, g32 = (a.astype(jnp.float32) for a in (x, w, g))
  assert _rel(y, jnp.dot(x32, w32)) < 0.06
  assert _rel(dx, g32 @ w32.T) < 0.10 and _rel(dw, x32.T @ g32) < 0.10


@pytest.mark.parametrize("spec, x_shape, w_shape", [
    ("btd,dnk->btnk", (2, 8, 32), (32, 6, 4)),  # fused q/k/v
    ("bthk,hkd->btd", (2, 8, 4, 8), (4, 8, 32)),  # o-proj: two contracted axes
    ("btd,df->btf", (2, 8, 32), (32, 48)),  # gate/up
    ("btf,fd->btd", (2, 8, 48), (48, 32)),  # down
])
def test_the_block_einsums_are_one_2d_fp8_gemm_each(spec, x_shape, w_shape):
  kx, kw = jax.random.split(jax.random.key(2))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  y = fp8.einsum(spec, x, w)
  y_ref = jnp.einsum(spec, x, w, precision="highest")
  assert y.shape == y_ref.shape
  assert _rel(y, y_ref) < 0.06
  # Exactly the 2D dot of the flattened operands (one per-tensor scale each, whatever the rank).
  n_contract = (len(x_shape) + len(w_shape) - len(y.shape)) // 2
  x2 = x.reshape(-1, int(np.prod(x_shape[len(x_shape) - n_contract:])))
  np.testing.assert_array_equal(y.reshape(x2.shape[0], -1),
                                fp8.dot(x2, w.reshape(x2.shape[1], -1)))
  dx, dw = jax.grad(lambda x, w: jnp.sum(fp8.einsum(spec, x, w) ** 2), (0, 1))(x, w)
  assert dx.shape == x.shape and dw.shape == w.shape


def test_an_einsum_that_is_not_a_dense_projection_is_refused():
  with pytest.raises(ValueError, match="not a dense projection"):
    fp8.einsum("btd,ndk->btnk", jnp.ones((1, 2, 4)), jnp.ones((3, 4, 5)))
