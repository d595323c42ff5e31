"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32."""

import functools

import jax
import jax.numpy as jnp


def rms_norm_ref(x, w_D, eps):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w_D.astype(jnp.float32)).astype(x.dtype)


def add_rms_norm_ref(x, delta, w_D, eps):
  """The pre-norm residual step: h = x + delta, y = rms_norm(h). Returns (h, y)."""
  h = x + delta
  return h, rms_norm_ref(h, w_D, eps)


# --- 'pallas': one program normalises `block_rows` rows; the backward fuses dx and partial dw ---
# Rows are flattened to [N, D]; N is padded to the row block and D to a power of two (Triton
# tiles) only when they do not fit already, so TinyLlama's [16384, 2048] runs unpadded.

_BLOCK_ROWS = 8


def _pallas_mod():
  # Deferred so that importing the reference never imports Pallas.
  from jax.experimental import pallas as pl
  from tinyllama_jax.kernels import _pallas
  return pl, _pallas


def _fwd_kernel(*refs, eps, D, has_delta):
  if has_delta:
    x_ref, d_ref, w_ref, h_ref, y_ref, rstd_ref = refs
    h = (x_ref[...].astype(jnp.float32) + d_ref[...].astype(jnp.float32)).astype(h_ref.dtype)
    h_ref[...] = h
    h = h.astype(jnp.float32)  # normalise the rounded h, as the reference does
  else:
    x_ref, w_ref, y_ref, rstd_ref = refs
    h = x_ref[...].astype(jnp.float32)
  rstd = jax.lax.rsqrt(jnp.sum(h * h, axis=1) / D + eps)
  y_ref[...] = (h * rstd[:, None] * w_ref[...].astype(jnp.float32)[None, :]).astype(y_ref.dtype)
  rstd_ref[...] = rstd


def _bwd_kernel(*refs, D, has_dh):
  if has_dh:
    h_ref, w_ref, rstd_ref, dy_ref, dh_ref, dx_ref, dw_ref = refs
  else:
    h_ref, w_ref, rstd_ref, dy_ref, dx_ref, dw_ref = refs
  rstd = rstd_ref[...][:, None]
  hhat = h_ref[...].astype(jnp.float32) * rstd
  dy = dy_ref[...].astype(jnp.float32)
  wdy = w_ref[...].astype(jnp.float32)[None, :] * dy
  c = jnp.sum(hhat * wdy, axis=1, keepdims=True) / D
  dx = rstd * (wdy - hhat * c)
  if has_dh:
    dx = dx + dh_ref[...].astype(jnp.float32)
  dx_ref[...] = dx.astype(dx_ref.dtype)
  dw_ref[...] = jnp.sum(dy * hhat, axis=0)


def _rows(a, N_pad, D_pad):
  a = a.reshape(-1, a.shape[-1])
  return jnp.pad(a, [(0, N_pad - a.shape[0]), (0, D_pad - a.shape[1])])


def _geometry(x):
  D = x.shape[-1]
  N = x.size // D
  D_pad = max(16, 1 << (D - 1).bit_length())
  return N, D, -(-N // _BLOCK_ROWS) * _BLOCK_ROWS, D_pad


def _norm_forward(x, delta, w_D, eps):
  pl, _pallas = _pallas_mod()
  N, D, N_pad, D_pad = _geometry(x)
  has_delta = delta is not None
  h_dtype = jnp.result_type(x, delta) if has_delta else x.dtype
  row = pl.BlockSpec((_BLOCK_ROWS, D_pad), lambda i: (i, 0))
  vec = pl.BlockSpec((D_pad,), lambda i: (0,))
  stat = pl.BlockSpec((_BLOCK_ROWS,), lambda i: (i,))
  ins = [_rows(x, N_pad, D_pad)] + ([_rows(delta, N_pad, D_pad)] if has_delta else [])
  rows_out = [jax.ShapeDtypeStruct((N_pad, D_pad), h_dtype)] * (2 if has_delta else 1)
  outs = _pallas.call(
      functools.partial(_fwd_kernel, eps=eps, D=D, has_delta=has_delta),
      grid=(N_pad // _BLOCK_ROWS,), in_specs=[row] * len(ins) + [vec],
      out_specs=[row] * len(rows_out) + [stat],
      out_shape=rows_out + [jax.ShapeDtypeStruct((N_pad,), jnp.float32)],
      name="add_rms_norm_fwd" if has_delta else "rms_norm_fwd",
      interpret=_pallas.interpret_default())(*ins, jnp.pad(w_D, [(0, D_pad - D)]))
  unrow = lambda a: a[:N, :D].reshape(x.shape[:-1] + (D,))
  h = unrow(outs[0]) if has_delta else x
  return h, unrow(outs[-2]), outs[-1]


def _norm_backward(h, w_D, rstd_pad, dy, dh):
  pl, _pallas = _pallas_mod()
  N, D, N_pad, D_pad = _geometry(h)
  row = pl.BlockSpec((_BLOCK_ROWS, D_pad), lambda i: (i, 0))
  vec = pl.BlockSpec((D_pad,), lambda i: (0,))
  stat = pl.BlockSpec((_BLOCK_ROWS,), lambda i: (i,))
  part = pl.BlockSpec((None, D_pad), lambda i: (i, 0))
  ins = [_rows(h, N_pad, D_pad), jnp.pad(w_D, [(0, D_pad - D)]), rstd_pad, _rows(dy, N_pad, D_pad)]
  if dh is not None:
    ins.append(_rows(dh, N_pad, D_pad))
  n_blocks = N_pad // _BLOCK_ROWS
  dx, dw_parts = _pallas.call(
      functools.partial(_bwd_kernel, D=D, has_dh=dh is not None), grid=(n_blocks,),
      in_specs=[row, vec, stat, row] + [row] * (dh is not None), out_specs=[row, part],
      out_shape=[jax.ShapeDtypeStruct((N_pad, D_pad), h.dtype),
                 jax.ShapeDtypeStruct((n_blocks, D_pad), jnp.float32)],
      name="rms_norm_bwd", interpret=_pallas.interpret_default())(*ins)
  return dx[:N, :D].reshape(h.shape), dw_parts[:, :D].sum(0).astype(w_D.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, w_D, eps):
  return _norm_forward(x, None, w_D, eps)[1]


def _rms_norm_fwd(x, w_D, eps):
  _, y, rstd = _norm_forward(x, None, w_D, eps)
  return y, (x, w_D, rstd)


def _rms_norm_bwd(eps, res, dy):
  x, w_D, rstd = res
  return _norm_backward(x, w_D, rstd, dy, None)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _add_rms_norm(x, delta, w_D, eps, dtypes):
  h, y, _ = _norm_forward(x, delta, w_D, eps)
  return h, y


def _add_rms_norm_fwd(x, delta, w_D, eps, dtypes):
  h, y, rstd = _norm_forward(x, delta, w_D, eps)
  return (h, y), (h, w_D, rstd)


def _add_rms_norm_bwd(eps, dtypes, res, cot):
  h, w_D, rstd = res
  dh, dy = cot
  dsum, dw = _norm_backward(h, w_D, rstd, dy, dh)
  return dsum.astype(dtypes[0]), dsum.astype(dtypes[1]), dw


_add_rms_norm.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd)


def _check(x, w_D):
  if w_D.shape != (x.shape[-1],):
    raise ValueError(f"rms_norm: weight {w_D.shape} must be [D] with D = x's last dim {x.shape}")


def rms_norm_pallas(x, w_D, eps):
  """Drop-in for `rms_norm_ref`."""
  _check(x, w_D)
  return _rms_norm(x, w_D, float(eps))


def add_rms_norm_pallas(x, delta, w_D, eps):
  """Drop-in for `add_rms_norm_ref`: one read of x and delta, writes h and y."""
  _check(x, w_D)
  if x.shape != delta.shape:
    raise ValueError(f"add_rms_norm: x {x.shape} and delta {delta.shape} must have one shape")
  return _add_rms_norm(x, delta, w_D, float(eps), (x.dtype, delta.dtype))
