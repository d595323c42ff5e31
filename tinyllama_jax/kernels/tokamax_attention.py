"""Causal GQA attention through tokamax's Mosaic GPU flash kernel (Hopper), behind our signature.

`attention_tokamax(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT|None, *, causal)` -> o_BTHD, the
contract of kernels/attention.py's reference. tokamax (PyPI `tokamax`, Google's kernel library;
Python >= 3.12, jax >= 0.11.1) ships an sm90 Pallas Mosaic GPU attention forward and backward
(wgmma, TMA, warp-specialised), GQA without repeating K/V. It is an optional GPU dependency:
imported only when a config asks for this backend, never on CPU.

Packed documents: tokamax's mask takes, per query, the first key it may see (`k_start`), and
with `is_causal` the last is the query itself. For documents packed contiguously (what
data/packing.py writes: each document's tokens in one run, padding one more run at the end)
that is exactly the reference's segment mask, with k_start = the start of the query's run
(`document_starts`, tested on CPU against the reference mask). Without causality a run's end
would be needed too, which this backend does not pass: it refuses non-causal packed rows.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp

TESTED_VERSION = "0.0.17"  # what the GPU bench ran (bench/attention_backends.py)


def document_starts(segment_ids_BT):
  """For each position, the index of the first position of its run of equal segment ids."""
  B, T = segment_ids_BT.shape
  t_T = jnp.arange(T, dtype=jnp.int32)
  new_BT = jnp.concatenate([jnp.ones((B, 1), bool),
                            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  return jax.lax.cummax(jnp.where(new_BT, t_T, 0), axis=1)


def available():
  """tokamax is installed (auto picks this backend only then)."""
  return importlib.util.find_spec("tokamax") is not None


@functools.cache
def _impl():
  try:
    from tokamax._src.ops.attention import base, pallas_mosaic_gpu
  except ImportError as e:
    raise ValueError(f"model.kernels.attention=tokamax needs `pip install tokamax=="
                     f"{TESTED_VERSION}` (Python >= 3.12, a Hopper GPU) ({e}); or use "
                     f"attention=cudnn (no documents) or pallas") from None
  return base, pallas_mosaic_gpu.PallasMosaicGpuFlashAttention()


def attention_tokamax(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True):
  base, flash = _impl()
  if segment_ids_BT is None:
    mask = base.Mask(is_causal=causal)
  elif causal:
    mask = base.Mask(k_start=document_starts(segment_ids_BT)[:, None, :], is_causal=True)
  else:
    raise ValueError("attention backend 'tokamax' masks packed documents only with causal "
                     "attention; use --config.model.kernels.attention=pallas")
  return flash(q_BTHD, k_BTKD, v_BTKD, bias=None, mask=mask, logits_scale=base.AUTO,
               precision=None, logits_soft_cap=None, q_sharding=None)
