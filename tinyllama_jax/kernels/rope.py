"""Rotary position embedding in the rotate-half layout (HF LlamaRotaryEmbedding's), all dims."""

import dataclasses
import functools

import jax
import jax.numpy as jnp


def rope_ref(x_BTHD, positions_BT, theta):
  D = x_BTHD.shape[-1]
  inv_freq_F = 1.0 / (theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
  angle_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq_F
  cos_BT1F = jnp.cos(angle_BTF)[:, :, None, :]
  sin_BT1F = jnp.sin(angle_BTF)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
  return out.astype(x_BTHD.dtype)


def rope_qk_ref(q_BTHD, k_BTKD, positions_BT, theta):
  """RoPE on queries and keys (the model's use): two calls of the reference."""
  return rope_ref(q_BTHD, positions_BT, theta), rope_ref(k_BTKD, positions_BT, theta)


# --- 'pallas': one pass rotates q and k of a token block with shared cos/sin --------------------
# One program takes `block_tokens` tokens with all their q and k heads: cos/sin are computed once
# per token (in fp32, from the positions) and reused by every head. The backward is the same
# kernel rotating by -angle. Rows are B*T (a free reshape, no copy); the head axis is padded to a
# power of two (Triton tiles) only when it is not one already, and B*T to the token block.


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Tunables of the Pallas RoPE kernel (powers of two). block_tokens None: the most tokens whose
  q + k heads fit `block_elems` elements (4 tokens at 32 + 4 heads of 64). DEFAULT_CONFIG is
  the H200 sweep's best (`python -m bench.gpu --parts=sweeps`, bench/NOTES.md)."""
  block_tokens: int | None = None
  num_warps: int = 8
  block_elems: int = 16384
  # True: load each head vector whole (contiguous) and split its halves in registers; False: load
  # the two halves as two strided loads. Which is faster on the GPU is the sweep's to say.
  split_in_registers: bool = False

  def __post_init__(self):
    for k in ("block_tokens", "num_warps", "block_elems"):  # split_in_registers: a bool
      v = getattr(self, k)
      if v is not None and (v < 1 or v & (v - 1)):
        raise ValueError(f"RopeConfig.{k} must be a power of two, got {v}")


# H200, 16384 tokens, 32 + 4 heads of 64: 0.071 ms forward (53% of copy), 0.125 forward +
# backward; XLA's fusion is faster (0.052 / 0.096), so the model keeps `rope=xla`.
DEFAULT_CONFIG = RopeConfig(block_tokens=1, num_warps=4)


def _inv_freq(D, theta):
  # Computed exactly as the reference does, so angles round identically.
  return 1.0 / (theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))


def _rope_kernel(pos_ref, f_ref, *refs, n, sign, split):
  D2 = f_ref.shape[0]
  angle = pos_ref[...].astype(jnp.float32)[:, None] * f_ref[...][None, :]
  cos = jnp.cos(angle)[:, None, :]
  sin = sign * jnp.sin(angle)[:, None, :]
  for x_ref, o_ref in zip(refs[:n], refs[n:]):
    if split:
      x1, x2 = jnp.split(x_ref[...].astype(jnp.float32), 2, axis=-1)
    else:
      x1 = x_ref[:, :, :D2].astype(jnp.float32)
      x2 = x_ref[:, :, D2:].astype(jnp.float32)
    o_ref[:, :, :D2] = (x1 * cos - x2 * sin).astype(o_ref.dtype)
    o_ref[:, :, D2:] = (x2 * cos + x1 * sin).astype(o_ref.dtype)


def _pow2_at_least(n):
  return 1 << max(0, (n - 1).bit_length())


def _block_tokens(cfg, R, per_token):
  if cfg.block_tokens is not None:
    rows = cfg.block_tokens
  else:
    rows = max(1, cfg.block_elems // per_token)
    rows = 1 << (rows.bit_length() - 1)
  return min(rows, _pow2_at_least(R))  # a tiny R is not padded to a big block


def _rope_call(xs, positions_BT, theta, sign, cfg):
  from jax.experimental import pallas as pl
  from tinyllama_jax.kernels import _pallas
  B, T, _, D = xs[0].shape
  R = B * T
  heads = [x.shape[2] for x in xs]
  H_pad = [_pow2_at_least(h) for h in heads]
  rows = _block_tokens(cfg, R, sum(H_pad) * D)
  R_pad = -(-R // rows) * rows
  ins = [jnp.pad(x.reshape(R, h, D), [(0, R_pad - R), (0, hp - h), (0, 0)])
         for x, h, hp in zip(xs, heads, H_pad)]
  pos = jnp.pad(positions_BT.reshape(R).astype(jnp.int32), [(0, R_pad - R)])
  specs = [pl.BlockSpec((rows, hp, D), lambda i: (i, 0, 0)) for hp in H_pad]
  outs = _pallas.call(
      functools.partial(_rope_kernel, n=len(xs), sign=sign, split=cfg.split_in_registers),
      grid=(R_pad // rows,),
      in_specs=[pl.BlockSpec((rows,), lambda i: (i,)),
                pl.BlockSpec((D // 2,), lambda i: (0,))] + specs,
      out_specs=specs, out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in ins],
      name=f"rope{len(xs)}", num_warps=cfg.num_warps, interpret=_pallas.interpret_default(),
  )(pos, _inv_freq(D, theta), *ins)
  return tuple(o[:R, :h].reshape(B, T, h, D) for o, h in zip(outs, heads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rope_many(xs, positions_BT, theta, cfg):
  return _rope_call(xs, positions_BT, theta, 1.0, cfg)


def _rope_many_fwd(xs, positions_BT, theta, cfg):
  return _rope_call(xs, positions_BT, theta, 1.0, cfg), positions_BT


def _rope_many_bwd(theta, cfg, positions_BT, dys):
  return _rope_call(dys, positions_BT, theta, -1.0, cfg), None


_rope_many.defvjp(_rope_many_fwd, _rope_many_bwd)


def _check(xs, positions_BT):
  for x in xs:
    D = x.shape[-1]
    if x.ndim != 4 or x.shape[:2] != positions_BT.shape:
      raise ValueError(f"rope: x {x.shape} must be [B, T, heads, D] with positions "
                       f"{positions_BT.shape} = [B, T]")
    if D < 4 or (D // 2) & (D // 2 - 1) or D % 2:
      raise ValueError(f"rope 'pallas' needs head dim = 2 x a power of two (Triton tiles), got "
                       f"{D}; use --config.model.kernels.rope=xla")


def _config(config):
  if config is not None and not isinstance(config, RopeConfig):
    raise TypeError(f"rope: config must be a RopeConfig, got {type(config).__name__}")
  return config or DEFAULT_CONFIG


def rope_pallas(x_BTHD, positions_BT, theta, *, config=None):
  """Drop-in for `rope_ref`; `config` (a RopeConfig) tunes the kernel."""
  _check([x_BTHD], positions_BT)
  return _rope_many((x_BTHD,), positions_BT, float(theta), _config(config))[0]


def rope_qk_pallas(q_BTHD, k_BTKD, positions_BT, theta, *, config=None):
  """Drop-in for `rope_qk_ref`: q and k in one kernel, cos/sin computed once per token."""
  _check([q_BTHD, k_BTKD], positions_BT)
  return _rope_many((q_BTHD, k_BTKD), positions_BT, float(theta), _config(config))
