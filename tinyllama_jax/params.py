"""The parameter table: one row per parameter, the one place its layout is stated.

Each row gives the parameter's path in the state tree (the checkpoint's layout: old checkpoints
restore as long as these paths and shapes stay), its shape as config dimensions, its logical axes
(sharding.LOGICAL_TO_MESH maps them to the mesh), its init and its Hugging Face name and matrix
layout. The module (model.py), the parameter count, the FLOP count, the sharding rules
(sharding.py) and the HF mapping (interop/hf.py) are all read off it.

Parameters are fp32 and stacked over layers whatever the execution mode (`scan_layers` changes
how the block runs, never what is saved). `fuse_projections` adds no parameter either: the block
concatenates wq/wk/wv and w_gate/w_up at run time, so fused and unfused runs share checkpoints.

No jax here: the bench's parent process and its torch worker count FLOPs with this table and
must not load jax.
"""

import math
from typing import NamedTuple

# A dimension's letter -> its model config field.
DIMS = {"V": "vocab_size", "D": "d_model", "L": "n_layers", "H": "n_heads", "K": "n_kv_heads",
        "Dh": "head_dim", "F": "ffn_dim"}


class Param(NamedTuple):
  path: tuple  # in the state tree: ("embed",) or ("layers", "wq")
  dims: tuple  # DIMS letters, one a dimension
  axes: tuple  # logical axes, one a dimension
  init: str  # "ones", or "normal" with init_stds' std, or "normal_out" with its output std
  hf_name: str  # '{i}': the layer index (HF stores one tensor a layer)
  # Leading dims (after the layer axis) that form a PyTorch Linear's input: HF stores
  # x.reshape(prod(those), -1).T, [out, in]. None: stored as ours (norms, the embedding table).
  hf_in_dims: int | None


_LAYER = "model.layers.{i}."
PARAMS = (  # in init order: the params RNG draws follow it, so a seed gives today's weights
    Param(("embed",), ("V", "D"), ("vocab", "embed"), "normal", "model.embed_tokens.weight", None),
    Param(("layers", "attn_norm"), ("L", "D"), ("layers", "norm"), "ones",
          _LAYER + "input_layernorm.weight", None),
    Param(("layers", "wq"), ("L", "D", "H", "Dh"), ("layers", "embed", "heads", "head_dim"),
          "normal", _LAYER + "self_attn.q_proj.weight", 1),
    Param(("layers", "wk"), ("L", "D", "K", "Dh"), ("layers", "embed", "kv_heads", "head_dim"),
          "normal", _LAYER + "self_attn.k_proj.weight", 1),
    Param(("layers", "wv"), ("L", "D", "K", "Dh"), ("layers", "embed", "kv_heads", "head_dim"),
          "normal", _LAYER + "self_attn.v_proj.weight", 1),
    Param(("layers", "wo"), ("L", "H", "Dh", "D"), ("layers", "heads", "head_dim", "embed"),
          "normal_out", _LAYER + "self_attn.o_proj.weight", 2),
    Param(("layers", "mlp_norm"), ("L", "D"), ("layers", "norm"), "ones",
          _LAYER + "post_attention_layernorm.weight", None),
    Param(("layers", "w_gate"), ("L", "D", "F"), ("layers", "embed", "mlp"), "normal",
          _LAYER + "mlp.gate_proj.weight", 1),
    Param(("layers", "w_up"), ("L", "D", "F"), ("layers", "embed", "mlp"), "normal",
          _LAYER + "mlp.up_proj.weight", 1),
    Param(("layers", "w_down"), ("L", "F", "D"), ("layers", "mlp", "embed"), "normal_out",
          _LAYER + "mlp.down_proj.weight", 1),
    Param(("final_norm",), ("D",), ("norm",), "ones", "model.norm.weight", None),
    Param(("lm_head",), ("D", "V"), ("embed", "vocab"), "normal", "lm_head.weight", 1),
)
BY_NAME = {p.path[-1]: p for p in PARAMS}  # the last path key is unique
LAYER_PARAMS = tuple(p.path[1] for p in PARAMS if p.path[0] == "layers")


def _dim(cfg_model, letter):
  return cfg_model[DIMS[letter]] if isinstance(cfg_model, dict) else getattr(cfg_model,
                                                                             DIMS[letter])


def shape(param, cfg_model):
  """The parameter's shape under a model config (a ConfigDict, or a plain dict of its fields)."""
  return tuple(_dim(cfg_model, d) for d in param.dims)


def shapes(cfg_model):
  """[(path, shape)] of every parameter, in the table's order (also the HF files' order)."""
  return [(p.path, shape(p, cfg_model)) for p in PARAMS]


def lookup(path):
  """The row whose path ends `path` (a tuple of keys: parameters, and trees that mirror them,
  such as gradients and Adam's moments under their own prefix), or None."""
  param = BY_NAME.get(path[-1]) if path else None
  if param is None or tuple(path[-len(param.path):]) != param.path:
    return None
  return param


def init_stds(cfg_model):
  """TinyLlama's init: N(0, sqrt(2/(5d))) everywhere, N(0, 1/sqrt(d)/L) on the output
  projections (wo, w_down). Returns (std, out_std)."""
  std = cfg_model.init_std or math.sqrt(2.0 / (5 * cfg_model.d_model))
  return std, 1.0 / math.sqrt(cfg_model.d_model) / cfg_model.n_layers


def param_count(cfg_model, with_embedding=True):
  """Exact parameter count from the config (no arrays built)."""
  return sum(math.prod(shape(p, cfg_model)) for p in PARAMS
             if with_embedding or p.path != ("embed",))


def flops_per_token(cfg_model, seq_len):
  """Model FLOPs per trained token: 6N + 12*L*d*T, N without the input embedding (a lookup, not
  a matmul): the reference's formula, which reproduces TinyLlama's stated 56% MFU. The second
  term is attention's QK^T and AV, forward and backward, with d the model width."""
  L, D = _dim(cfg_model, "L"), _dim(cfg_model, "D")
  return 6 * param_count(cfg_model, with_embedding=False) + 12 * L * D * seq_len
