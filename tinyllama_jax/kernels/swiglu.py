"""SwiGLU activation: silu(gate) * up, in fp32 inside."""

import jax
import jax.numpy as jnp


def swiglu_ref(gate, up):
  g = gate.astype(jnp.float32)
  return (jax.nn.silu(g) * up.astype(jnp.float32)).astype(gate.dtype)


# --- 'pallas' (the fused projection's [..., 2F] output only): forward and backward one pass each.
# Rows are flattened to [N, F]; F is tiled by its largest power-of-two factor (<= 1024; 5632 ->
# 512) and padded only when that factor is below 16. The kernel for separate gate and up arrays
# lost to XLA over forward + backward on an H200 and is retired (docs/kernels.md).


def _tiles(F):
  """(columns a block, F padded to them, rows a block of ~4096 elements)."""
  bf = min(1024, F & -F)
  F_pad = F if bf >= 16 else -(-F // 128) * 128
  bf = max(bf, 128) if bf < 16 else bf
  return bf, F_pad, max(1, 4096 // bf)


def _rows(bn, N):
  """(rows a block, N padded to it): no more rows than N has (a power of two at most), so a
  decode step's single row is not padded to a block of 4 or 8 (a pad kernel a layer, and a
  slice, at batch 1); row blocks change no element's value."""
  bn = min(bn, 1 << (max(N, 1).bit_length() - 1))
  return bn, -(-N // bn) * bn


# --- packed: gate and up as one [..., 2F] array (the fused gate/up projection's output) ---------
# Written through two slices (the reference), autodiff builds d(gate_up) as pad(d_gate) +
# pad(d_up): XLA fuses that into one kernel over the 2F width at ~2 TB/s (9.8 ms a step at 1b on
# an H200). Writing d(gate_up) with a concatenate instead made XLA emit standalone concatenate
# kernels (slower still). The Pallas kernel reads gate, up and dy once and writes d(gate_up)
# once (bench/NOTES.md, 2026-12-01, H200).


def swiglu_packed_ref(gate_up):
  """silu(gate) * up for gate_up = [gate | up] on the last axis: the plain slices (autodiff)."""
  F = gate_up.shape[-1] // 2
  return swiglu_ref(gate_up[..., :F], gate_up[..., F:])


def _packed_grads(g, u, dy):
  """(d gate, d up) in fp32 from fp32 gate, up and dy."""
  sig = jax.nn.sigmoid(g)
  return dy * u * sig * (1.0 + g * (1.0 - sig)), dy * g * sig


# Pallas: gate_up viewed as [N, 2, F] (a free reshape); a program takes (bn, 2, bf) of it, so
# gate and up of the same columns arrive in one block and d(gate_up) leaves in one.


def _packed_fwd_kernel(gu_ref, y_ref):
  g = gu_ref[:, 0, :].astype(jnp.float32)
  y_ref[...] = (g * jax.nn.sigmoid(g) * gu_ref[:, 1, :].astype(jnp.float32)).astype(y_ref.dtype)


def _packed_bwd_kernel(gu_ref, dy_ref, dgu_ref):
  dg, du = _packed_grads(gu_ref[:, 0, :].astype(jnp.float32),
                         gu_ref[:, 1, :].astype(jnp.float32), dy_ref[...].astype(jnp.float32))
  dgu_ref[:, 0, :] = dg.astype(dgu_ref.dtype)
  dgu_ref[:, 1, :] = du.astype(dgu_ref.dtype)


def _packed_call(kernel, gate_up, dy, name):
  from jax.experimental import pallas as pl
  from tinyllama_jax.kernels import _pallas
  F = gate_up.shape[-1] // 2
  N = gate_up.size // (2 * F)
  bf, F_pad, bn = _tiles(F)
  bn, N_pad = _rows(max(1, bn // 2), N)  # a block holds gate and up
  gu = jnp.pad(gate_up.reshape(N, 2, F), [(0, N_pad - N), (0, 0), (0, F_pad - F)])
  spec3 = pl.BlockSpec((bn, 2, bf), lambda i, j: (i, 0, j))
  spec2 = pl.BlockSpec((bn, bf), lambda i, j: (i, j))
  grid = (N_pad // bn, F_pad // bf)
  if dy is None:
    out = _pallas.call(kernel, grid=grid, in_specs=[spec3], out_specs=spec2,
                       out_shape=jax.ShapeDtypeStruct((N_pad, F_pad), gate_up.dtype), name=name,
                       interpret=_pallas.interpret_default())(gu)
    return out[:N, :F].reshape(*gate_up.shape[:-1], F)
  dy2 = jnp.pad(dy.reshape(N, F), [(0, N_pad - N), (0, F_pad - F)])
  out = _pallas.call(kernel, grid=grid, in_specs=[spec3, spec2], out_specs=spec3,
                     out_shape=jax.ShapeDtypeStruct((N_pad, 2, F_pad), gate_up.dtype), name=name,
                     interpret=_pallas.interpret_default())(gu, dy2)
  return out[:N, :, :F].reshape(gate_up.shape)


@jax.custom_vjp
def _swiglu_packed(gate_up):
  return _packed_call(_packed_fwd_kernel, gate_up, None, "swiglu_packed_fwd")


def _swiglu_packed_fwd(gate_up):
  return _swiglu_packed(gate_up), gate_up


def _swiglu_packed_bwd(gate_up, dy):
  return (_packed_call(_packed_bwd_kernel, gate_up, dy, "swiglu_packed_bwd"),)


_swiglu_packed.defvjp(_swiglu_packed_fwd, _swiglu_packed_bwd)


def swiglu_packed_pallas(gate_up):
  """Drop-in for `swiglu_packed_ref`."""
  if gate_up.shape[-1] % 2:
    raise ValueError(f"swiglu_packed: last axis {gate_up.shape[-1]} must be 2F")
  return _swiglu_packed(gate_up)
