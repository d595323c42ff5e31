"""SwiGLU activation: silu(gate) * up, in fp32 inside."""

import jax
import jax.numpy as jnp


def swiglu_ref(gate, up):
  g = gate.astype(jnp.float32)
  return (jax.nn.silu(g) * up.astype(jnp.float32)).astype(gate.dtype)


# --- 'pallas': forward and backward as one elementwise pass each -------------------------------
# Rows are flattened to [N, F]; F is tiled by its largest power-of-two factor (<= 1024; 5632 ->
# 512) and padded only when that factor is below 16.


def _fwd_kernel(g_ref, u_ref, y_ref):
  g = g_ref[...].astype(jnp.float32)
  y_ref[...] = (g * jax.nn.sigmoid(g) * u_ref[...].astype(jnp.float32)).astype(y_ref.dtype)


def _bwd_kernel(g_ref, u_ref, dy_ref, dg_ref, du_ref):
  g = g_ref[...].astype(jnp.float32)
  sig = jax.nn.sigmoid(g)
  dy = dy_ref[...].astype(jnp.float32)
  du_ref[...] = (dy * g * sig).astype(du_ref.dtype)
  dg_ref[...] = (dy * u_ref[...].astype(jnp.float32) * sig * (1.0 + g * (1.0 - sig))
                 ).astype(dg_ref.dtype)


def _tiles(F, N):
  bf = min(1024, F & -F)
  F_pad = F if bf >= 16 else -(-F // 128) * 128
  bf = max(bf, 128) if bf < 16 else bf
  bn = max(1, 4096 // bf)
  return bf, F_pad, bn, -(-N // bn) * bn


def _elementwise(kernel, arrays, n_out, out_dtypes, name):
  from jax.experimental import pallas as pl
  from tinyllama_jax.kernels import _pallas
  shape = arrays[0].shape
  F = shape[-1]
  N = arrays[0].size // F
  bf, F_pad, bn, N_pad = _tiles(F, N)
  ins = [jnp.pad(a.reshape(N, F), [(0, N_pad - N), (0, F_pad - F)]) for a in arrays]
  spec = pl.BlockSpec((bn, bf), lambda i, j: (i, j))
  outs = _pallas.call(kernel, grid=(N_pad // bn, F_pad // bf), in_specs=[spec] * len(ins),
                      out_specs=[spec] * n_out,
                      out_shape=[jax.ShapeDtypeStruct((N_pad, F_pad), d) for d in out_dtypes],
                      name=name, interpret=_pallas.interpret_default())(*ins)
  return [o[:N, :F].reshape(shape) for o in outs]


@jax.custom_vjp
def _swiglu(gate, up):
  return _elementwise(_fwd_kernel, [gate, up], 1, [gate.dtype], "swiglu_fwd")[0]


def _swiglu_fwd(gate, up):
  return _swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dy):
  gate, up = res
  dg, du = _elementwise(_bwd_kernel, [gate, up, dy], 2, [gate.dtype, up.dtype], "swiglu_bwd")
  return dg, du


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu_pallas(gate, up):
  """Drop-in for `swiglu_ref`."""
  if gate.shape != up.shape:
    raise ValueError(f"swiglu: gate {gate.shape} and up {up.shape} must have one shape")
  return _swiglu(gate, up)
