"""The backend table: one entry per fused op, each backend a lazily imported function.

The model asks `get(op, backend)` and calls the result with the op's reference signature, so a
backend is a drop-in replacement for the reference. Importing this package imports no kernel:
Pallas (and its Triton/Mosaic/Mosaic GPU lowering) loads only when a config asks for it.

  op             signature                                              reference
  attention      (q_BTHD, k_BTKD, v_BTKD, segment_ids_BT|None, *, causal) -> o_BTHD
  attention_cache (q_BTHD, k_BSKD, v_BSKD, positions_BT) -> o_BTHD (decoding over a KV cache)
  rms_norm       (x_...D, w_D, eps) -> y_...D (x's dtype, fp32 inside)
  add_rms_norm   (x_...D, delta_...D, w_D, eps) -> (h = x + delta, rms_norm(h, w_D, eps))
  rope           (x_BTHD, positions_BT, theta) -> x_BTHD (rotate-half layout, HF's)
  rope_qk        (q_BTHD, k_BTKD, positions_BT, theta) -> (rope(q), rope(k)) in one pass
  swiglu         (gate_...F, up_...F) -> silu(gate) * up
  swiglu_packed  (gate_up_...2F) -> silu(gate) * up, gate | up on the last axis (fused projection)
  cross_entropy  (x_ND, w_DV, targets_N) -> loss_N fp32 (lm_head matmul + log-softmax NLL)
"""

import functools
import importlib
import json
import os

# What attention=auto picks on a GPU, as bench/attention_backends.py measured it.
AUTO_ATTENTION_TABLE = os.path.join(os.path.dirname(__file__), "attention_auto.json")

_TABLE = {
    "attention": {
        "xla": "tinyllama_jax.kernels.attention:attention_xla",
        "cudnn": "tinyllama_jax.kernels.attention:attention_cudnn",
        "pallas": "tinyllama_jax.kernels.flash_attention:attention_pallas",
        "splash": "tinyllama_jax.kernels.splash_attention:attention_splash",
        "mgpu": "tinyllama_jax.kernels.flash_mgpu:attention_mgpu",  # Hopper only, no segment ids
    },
    "attention_cache": {
        "xla": "tinyllama_jax.kernels.attention:attention_cache_xla",
    },
    "rms_norm": {
        "xla": "tinyllama_jax.kernels.rms_norm:rms_norm_ref",
        "pallas": "tinyllama_jax.kernels.rms_norm:rms_norm_pallas",
    },
    "add_rms_norm": {
        "xla": "tinyllama_jax.kernels.rms_norm:add_rms_norm_ref",
        "pallas": "tinyllama_jax.kernels.rms_norm:add_rms_norm_pallas",
    },
    "rope": {
        "xla": "tinyllama_jax.kernels.rope:rope_ref",
    },
    "rope_qk": {
        "xla": "tinyllama_jax.kernels.rope:rope_qk_ref",
    },
    "swiglu": {
        "xla": "tinyllama_jax.kernels.swiglu:swiglu_ref",
    },
    "swiglu_packed": {
        "xla": "tinyllama_jax.kernels.swiglu:swiglu_packed_ref",
        "pallas": "tinyllama_jax.kernels.swiglu:swiglu_packed_pallas",
    },
    "cross_entropy": {
        "xla": "tinyllama_jax.kernels.cross_entropy:cross_entropy_ref",
        "chunked": "tinyllama_jax.kernels.cross_entropy:cross_entropy_chunked",
    },
}


def backends(op):
  return sorted(_TABLE[op])


def get(op, backend):
  """The function implementing `op` with `backend`; a clear error for an unknown pair."""
  if op not in _TABLE:
    raise ValueError(f"unknown fused op {op!r}; known: {', '.join(sorted(_TABLE))}")
  if backend not in _TABLE[op]:
    raise ValueError(f"op {op!r} has no backend {backend!r}; choose one of {backends(op)} "
                     f"(--config.model.kernels.{op}=...)")
  module, name = _TABLE[op][backend].split(":")
  return getattr(importlib.import_module(module), name)


def usable(op, backend, **call):
  """Whether the backend can run here: its module imports, its `available()` (where it has
  one: an optional dependency) says so, and its `supports(**call)` (where it has one: limits
  of shape or dtype, e.g. seq_len, head_dim, dtype) takes this call."""
  module = importlib.import_module(_TABLE[op][backend].split(":")[0])
  if not getattr(module, "available", lambda: True)():
    return False
  return getattr(module, "supports", lambda **_: True)(**call)


@functools.cache
def _auto_attention():
  with open(AUTO_ATTENTION_TABLE) as f:
    return json.load(f)["devices"]


def measured_attention(device_kind, head_dim, documents):
  """The attention backends measured within the bf16 band on this device kind at this head dim,
  with (documents) or without packed documents, fastest forward + backward first; [] when
  that case was not measured."""
  case = "documents" if documents else "no_documents"
  dims = _auto_attention().get(device_kind, {}).get("head_dims", {})
  return list(dims.get(str(head_dim), {}).get(case, []))


def register(op, backend, target):
  """Adds (or replaces) a backend: `target` is "module:function" with the op's signature."""
  _TABLE.setdefault(op, {})[backend] = target


def unregister(op, backend):
  """Removes a backend `register` added."""
  del _TABLE[op][backend]
