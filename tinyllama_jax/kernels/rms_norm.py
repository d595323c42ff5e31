"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32."""

import dataclasses
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


# --- 'pallas': a program normalises steps x block_rows rows; the backward fuses dx, partial dw ---
# Rows are flattened to [N, D]; N is padded to a program's rows and D to a power of two (Triton
# tiles) only when they do not fit already, so TinyLlama's [16384, 2048] runs unpadded.
# The backward program loops over `bwd_steps` blocks of `bwd_block_rows` rows, summing its dw in
# registers, so the fp32 dw partials XLA reduces afterwards are [N / (rows x steps), D], not
# [N / rows, D] (at 16384 x 2048 with 8-row programs: 16 MiB written and read again, ~15% of the
# backward's bytes).


@dataclasses.dataclass(frozen=True)
class RowConfig:
  """Tunables of the Pallas norm kernels (all powers of two). Elements per thread, rows x D /
  (32 x warps), is what matters: too many spill registers, too few leave bytes in flight short.
  Field defaults are the reasoned start of the sweep; DEFAULT_CONFIG is what the H200 sweep
  (`python -m bench.gpu --parts=sweeps`, bench/NOTES.md) measured best for both norms together."""
  block_rows: int = 4        # forward: rows a loop step (4 x 2048 bf16: 16 KiB in, x2 with delta)
  steps: int = 1             # forward: loop steps per program (w loaded once for all of them)
  num_warps: int = 8
  num_stages: int = 2
  bwd_block_rows: int = 4    # backward: rows per loop step
  bwd_steps: int = 8         # backward: loop steps per program (dw summed over them in registers)
  bwd_num_warps: int = 8
  bwd_num_stages: int = 2    # Triton may prefetch the next step's rows

  def __post_init__(self):
    for k in ("block_rows", "steps", "num_warps", "bwd_block_rows", "bwd_steps", "bwd_num_warps"):
      v = getattr(self, k)
      if v < 1 or v & (v - 1):
        raise ValueError(f"RowConfig.{k} must be a power of two, got {v}")


# H200, 16384 x 2048 bf16: forward 0.045 ms rms_norm (74% of copy) / 0.082 add_rms_norm (81%);
# forward + backward 0.107 / 0.190 ms (XLA: 0.113 / 0.193).
DEFAULT_CONFIG = RowConfig(block_rows=8, num_warps=8, bwd_block_rows=2, bwd_steps=16,
                           bwd_num_warps=8)


def _pallas_mod():
  # Deferred so that importing the reference never imports Pallas.
  from jax.experimental import pallas as pl
  from tinyllama_jax.kernels import _pallas
  return pl, _pallas


def _row_loop(step, init, rows, steps):
  """Runs step(row slice, carry) over `steps` blocks of `rows` rows of the program's block."""
  pl, _ = _pallas_mod()
  multiple_of = getattr(pl, "multiple_of", lambda x, _: x)
  if steps == 1:
    return step(pl.ds(0, rows), init)
  return jax.lax.fori_loop(
      0, steps, lambda j, c: step(pl.ds(multiple_of(j * rows, rows), rows), c), init)


def _fwd_kernel(*refs, eps, D, has_delta, rows, steps):
  if has_delta:
    x_ref, d_ref, w_ref, h_ref, y_ref, rstd_ref = refs
  else:
    x_ref, w_ref, y_ref, rstd_ref = refs
  w = w_ref[...].astype(jnp.float32)[None, :]  # once per program, reused by all its rows

  def step(r, carry):
    if has_delta:
      h = (x_ref[r, :].astype(jnp.float32) + d_ref[r, :].astype(jnp.float32)).astype(h_ref.dtype)
      h_ref[r, :] = h
      h = h.astype(jnp.float32)  # normalise the rounded h, as the reference does
    else:
      h = x_ref[r, :].astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.sum(h * h, axis=1) / D + eps)
    y_ref[r, :] = (h * rstd[:, None] * w).astype(y_ref.dtype)
    rstd_ref[r] = rstd
    return carry

  _row_loop(step, 0, rows, steps)


def _bwd_kernel(*refs, D, has_dh, rows, steps):
  if has_dh:
    h_ref, w_ref, rstd_ref, dy_ref, dh_ref, dx_ref, dw_ref = refs
  else:
    h_ref, w_ref, rstd_ref, dy_ref, dx_ref, dw_ref = refs
  w = w_ref[...].astype(jnp.float32)[None, :]

  def step(r, dw):
    rstd = rstd_ref[r][:, None]
    hhat = h_ref[r, :].astype(jnp.float32) * rstd
    dy = dy_ref[r, :].astype(jnp.float32)
    wdy = w * dy
    c = jnp.sum(hhat * wdy, axis=1, keepdims=True) / D
    dx = rstd * (wdy - hhat * c)
    if has_dh:
      dx = dx + dh_ref[r, :].astype(jnp.float32)
    dx_ref[r, :] = dx.astype(dx_ref.dtype)
    return dw + jnp.sum(dy * hhat, axis=0)

  dw_ref[...] = _row_loop(step, jnp.zeros(w_ref.shape, jnp.float32), rows, steps)


def _pow2_at_least(n):
  return 1 << max(0, (n - 1).bit_length())


def _rows(a, N_pad, D_pad):
  a = a.reshape(-1, a.shape[-1])
  return jnp.pad(a, [(0, N_pad - a.shape[0]), (0, D_pad - a.shape[1])])


def _geometry(x):
  D = x.shape[-1]
  return x.size // D, D, max(16, _pow2_at_least(D))


def _program_rows(N, rows, steps):
  """(rows a step, steps, rows a program, N padded): a tiny N is not padded to a big block."""
  R = min(rows, _pow2_at_least(N))
  steps = min(steps, _pow2_at_least(-(-N // R)))
  P = R * steps
  return R, steps, P, -(-N // P) * P


def _norm_forward(x, delta, w_D, eps, cfg):
  pl, _pallas = _pallas_mod()
  N, D, D_pad = _geometry(x)
  R, steps, P, N_pad = _program_rows(N, cfg.block_rows, cfg.steps)
  has_delta = delta is not None
  h_dtype = jnp.result_type(x, delta) if has_delta else x.dtype
  row = pl.BlockSpec((P, D_pad), lambda i: (i, 0))
  vec = pl.BlockSpec((D_pad,), lambda i: (0,))
  stat = pl.BlockSpec((P,), lambda i: (i,))
  ins = [_rows(x, N_pad, D_pad)] + ([_rows(delta, N_pad, D_pad)] if has_delta else [])
  rows_out = [jax.ShapeDtypeStruct((N_pad, D_pad), h_dtype)] * (2 if has_delta else 1)
  outs = _pallas.call(
      functools.partial(_fwd_kernel, eps=eps, D=D, has_delta=has_delta, rows=R, steps=steps),
      grid=(N_pad // P,), in_specs=[row] * len(ins) + [vec],
      out_specs=[row] * len(rows_out) + [stat],
      out_shape=rows_out + [jax.ShapeDtypeStruct((N_pad,), jnp.float32)],
      name="add_rms_norm_fwd" if has_delta else "rms_norm_fwd", num_warps=cfg.num_warps,
      num_stages=cfg.num_stages,
      interpret=_pallas.interpret_default())(*ins, jnp.pad(w_D, [(0, D_pad - D)]))
  unrow = lambda a: a[:N, :D].reshape(x.shape[:-1] + (D,))
  h = unrow(outs[0]) if has_delta else x
  return h, unrow(outs[-2]), outs[-1][:N]


def _norm_backward(h, w_D, rstd_N, dy, dh, cfg):
  pl, _pallas = _pallas_mod()
  N, D, D_pad = _geometry(h)
  R, steps, P, N_pad = _program_rows(N, cfg.bwd_block_rows, cfg.bwd_steps)
  row = pl.BlockSpec((P, D_pad), lambda i: (i, 0))
  vec = pl.BlockSpec((D_pad,), lambda i: (0,))
  stat = pl.BlockSpec((P,), lambda i: (i,))
  part = pl.BlockSpec((None, D_pad), lambda i: (i, 0))
  # Padded rows have h = dy = 0 and rstd = 0: their dx and dw terms are 0.
  ins = [_rows(h, N_pad, D_pad), jnp.pad(w_D, [(0, D_pad - D)]),
         jnp.pad(rstd_N, [(0, N_pad - N)]), _rows(dy, N_pad, D_pad)]
  if dh is not None:
    ins.append(_rows(dh, N_pad, D_pad))
  n_programs = N_pad // P
  dx, dw_parts = _pallas.call(
      functools.partial(_bwd_kernel, D=D, has_dh=dh is not None, rows=R, steps=steps),
      grid=(n_programs,),
      in_specs=[row, vec, stat, row] + [row] * (dh is not None), out_specs=[row, part],
      out_shape=[jax.ShapeDtypeStruct((N_pad, D_pad), h.dtype),
                 jax.ShapeDtypeStruct((n_programs, D_pad), jnp.float32)],
      name="rms_norm_bwd", num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages,
      interpret=_pallas.interpret_default())(*ins)
  return dx[:N, :D].reshape(h.shape), dw_parts[:, :D].sum(0).astype(w_D.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x, w_D, eps, cfg):
  return _norm_forward(x, None, w_D, eps, cfg)[1]


def _rms_norm_fwd(x, w_D, eps, cfg):
  _, y, rstd = _norm_forward(x, None, w_D, eps, cfg)
  return y, (x, w_D, rstd)


def _rms_norm_bwd(eps, cfg, res, dy):
  x, w_D, rstd = res
  return _norm_backward(x, w_D, rstd, dy, None, cfg)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _add_rms_norm(x, delta, w_D, eps, dtypes, cfg):
  h, y, _ = _norm_forward(x, delta, w_D, eps, cfg)
  return h, y


def _add_rms_norm_fwd(x, delta, w_D, eps, dtypes, cfg):
  h, y, rstd = _norm_forward(x, delta, w_D, eps, cfg)
  return (h, y), (h, w_D, rstd)


def _add_rms_norm_bwd(eps, dtypes, cfg, res, cot):
  h, w_D, rstd = res
  dh, dy = cot
  dsum, dw = _norm_backward(h, w_D, rstd, dy, dh, cfg)
  return dsum.astype(dtypes[0]), dsum.astype(dtypes[1]), dw


_add_rms_norm.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd)


def _check(x, w_D, config):
  if w_D.shape != (x.shape[-1],):
    raise ValueError(f"rms_norm: weight {w_D.shape} must be [D] with D = x's last dim {x.shape}")
  if config is not None and not isinstance(config, RowConfig):
    raise TypeError(f"rms_norm: config must be a RowConfig, got {type(config).__name__}")
  return config or DEFAULT_CONFIG


def rms_norm_pallas(x, w_D, eps, *, config=None):
  """Drop-in for `rms_norm_ref`; `config` (a RowConfig) tunes the kernels."""
  cfg = _check(x, w_D, config)
  return _rms_norm(x, w_D, float(eps), cfg)


def add_rms_norm_pallas(x, delta, w_D, eps, *, config=None):
  """Drop-in for `add_rms_norm_ref`: one read of x and delta, writes h and y."""
  cfg = _check(x, w_D, config)
  if x.shape != delta.shape:
    raise ValueError(f"add_rms_norm: x {x.shape} and delta {delta.shape} must have one shape")
  return _add_rms_norm(x, delta, w_D, float(eps), (x.dtype, delta.dtype), cfg)
