"""Error measure, random inputs and output poisoning shared by the kernel tests."""

import numpy as np

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from tinyllama_jax.kernels import attention

# Relative L2 error bounds of the kernels' contract: fp32 against an fp32 reference, bf16 against the
# fp32 reference computed from the same bf16 values.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rel_l2(x, ref):
  """||x - ref|| / ||ref|| in float64; a NaN or inf anywhere in x is an infinite error."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert x.shape == ref.shape, (x.shape, ref.shape)
  if not np.isfinite(x).all():
    return float("inf")
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_close(x, ref, dtype, what=""):
  err = rel_l2(x, ref)
  assert err < TOL[dtype], f"{what}: relative L2 error {err:.3g} >= {TOL[dtype]:g} ({jnp.dtype(dtype).name})"


def packed_segments(rng, B, T, with_padding=False):
  """Segment ids of documents of random lengths packed in rows; row 0 has a length-1 document."""
  rows = []
  for b in range(B):
    ids, doc = [], 1
    while len(ids) < T:
      n = 1 if (b == 0 and doc == 2) else int(rng.integers(1, max(2, T // 2)))
      ids += [doc] * n
      doc += 1
    row = np.array(ids[:T], np.int32)
    if with_padding and b == B - 1:
      row[-max(1, T // 5):] = 0  # trailing padding, id 0
    rows.append(row)
  return jnp.asarray(np.stack(rows))


def check_attention(fn, B, T, H, K, D, dtype, *, segmented, causal, seed):
  """fn (the attention signature) against the fp32 reference on fresh random inputs, packed
  documents (a length-1 one, trailing padding) if segmented: output and dq, dk, dv."""
  rng = np.random.default_rng(seed)
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (normal(kq, (B, T, H, D), dtype), normal(kk, (B, T, K, D), dtype),
             normal(kv, (B, T, K, D), dtype))
  do = normal(kd, (B, T, H, D), jnp.float32)
  seg = packed_segments(rng, B, T, with_padding=True) if segmented else None

  def loss(fn, q, k, v):
    o = fn(q, k, v, seg, causal=causal)
    return jnp.sum(o.astype(jnp.float32) * do), o

  grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), (0, 1, 2), has_aux=True))
  (_, o), grads = grad(fn)(q, k, v)
  with jax.default_matmul_precision("highest"):
    (_, o_ref), grads_ref = grad(attention.attention_xla)(
        *(x.astype(jnp.float32) for x in (q, k, v)))
  assert o.dtype == dtype
  assert_close(o, o_ref, dtype, "output")
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    assert g.dtype == dtype
    assert_close(g, g_ref, dtype, f"d{name}")


def normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _poison_value(dtype):
  return jnp.nan if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).min


def poisoned_call(kernel, *, grid, in_specs, out_specs, out_shape, name, num_warps=4,
                  num_stages=2, interpret=False):
  """_pallas.call whose every output buffer starts as NaN (ints: their minimum), so an element a
  kernel forgets to write fails the comparison instead of passing on stale memory. Interpret
  mode already starts outputs as NaN; on the GPU a NaN-filled input is aliased to each output."""
  single = not isinstance(out_shape, (list, tuple))
  out_shapes = [out_shape] if single else list(out_shape)
  out_specs_l = [out_specs] if single else list(out_specs)
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)

  def run(*args):
    n = len(args)
    fills = [jnp.full(s.shape, _poison_value(s.dtype), s.dtype) for s in out_shapes]

    def poisoned_kernel(*refs):  # the aliased fills come in as inputs: the kernel never sees them
      kernel(*refs[:n], *refs[n + len(fills):])

    out = pl.pallas_call(poisoned_kernel, grid=grid, in_specs=list(in_specs) + out_specs_l,
                         out_specs=out_specs_l, out_shape=out_shapes, compiler_params=params,
                         interpret=interpret, name=name,
                         input_output_aliases={n + i: i for i in range(len(fills))})(*args, *fills)
    return out[0] if single else out

  return run
