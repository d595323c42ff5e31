"""The parameter table (params.py) against what the module creates and what the code stated
before the table existed: counts, FLOPs, the checkpoint's paths and the sharding rules."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from tinyllama_jax import config as config_lib, optim, params, sharding, train_state
from tinyllama_jax.interop import hf
from tinyllama_jax.model import Llama

CONFIGS = ("tiny", "120m", "1b")

# The checkpoint layout: every stored checkpoint has exactly these parameter paths.
CHECKPOINT_PATHS = [
    ("embed",), ("final_norm",), ("layers", "attn_norm"), ("layers", "mlp_norm"),
    ("layers", "w_down"), ("layers", "w_gate"), ("layers", "w_up"), ("layers", "wk"),
    ("layers", "wo"), ("layers", "wq"), ("layers", "wv"), ("lm_head",)]

# sharding.py's rules before the table: regexes over the '/'-joined path, kept here as the spec
# the table's rules must reproduce.
_REGEX_RULES = (
    (r"(^|/)embed$", ("vocab", "embed")),
    (r"(^|/)layers/(attn_norm|mlp_norm)$", ("layers", "norm")),
    (r"(^|/)layers/wq$", ("layers", "embed", "heads", "head_dim")),
    (r"(^|/)layers/(wk|wv)$", ("layers", "embed", "kv_heads", "head_dim")),
    (r"(^|/)layers/wo$", ("layers", "heads", "head_dim", "embed")),
    (r"(^|/)layers/(w_gate|w_up)$", ("layers", "embed", "mlp")),
    (r"(^|/)layers/w_down$", ("layers", "mlp", "embed")),
    (r"(^|/)final_norm$", ("norm",)),
    (r"(^|/)lm_head$", ("embed", "vocab")),
)


def _regex_shardings(tree, mesh):
  def one(path, leaf):
    path_str = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))))
                        for k in path)
    axes = next((a for pattern, a in _REGEX_RULES if re.search(pattern, path_str)), None)
    if axes is None or len(axes) != len(leaf.shape):
      return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(axes, leaf.shape, mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


def _old_param_count(m, with_embedding=True):
  D, L, H, K, Dh, F, V = (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim,
                          m.vocab_size)
  per_layer = 2 * D + D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F
  return L * per_layer + D + D * V + (V * D if with_embedding else 0)


def load(name):
  return config_lib.load_config_file(f"configs/{name}.py")


def abstract_params(cfg_model):
  model = nnx.eval_shape(lambda: Llama(cfg_model, rngs=nnx.Rngs(params=0)))
  return nnx.state(model, nnx.Param)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_module_holds_the_tables_parameters(name, fuse):
  cfg = load(name).model
  cfg.fuse_projections = fuse
  leaves = jax.tree_util.tree_leaves_with_path(abstract_params(cfg))
  got = {tuple(str(k.key) for k in path if hasattr(k, "key")): tuple(x.shape)
         for path, x in leaves}
  assert sorted(got) == CHECKPOINT_PATHS
  assert got == {p.path: params.shape(p, cfg) for p in params.PARAMS}
  n = sum(int(np.prod(s)) for s in got.values())
  assert params.param_count(cfg) == n == _old_param_count(cfg)
  assert params.param_count(cfg, with_embedding=False) == _old_param_count(cfg, False)


@pytest.mark.parametrize("name", CONFIGS)
def test_flops_per_token_is_the_reference_formula(name):
  m = load(name).model
  for seq_len in (1, 2048, 4096):
    old = 6 * _old_param_count(m, False) + 12 * m.n_layers * m.d_model * seq_len
    assert params.flops_per_token(m, seq_len) == old
    # The bench's jax-free callers pass the model fields as a plain dict.
    assert params.flops_per_token(m.to_dict(), seq_len) == old


@pytest.mark.parametrize("mesh_sizes", [dict(fsdp=8), dict(fsdp=4, tensor=2),
                                        dict(data=2, fsdp=2, tensor=2)])
@pytest.mark.parametrize("name", CONFIGS)
def test_table_shardings_equal_the_regex_rules(name, mesh_sizes):
  """The whole train state (parameters, Adam's moments, scalars), not only the parameters."""
  cfg = load(name)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **mesh_sizes})
  tx, _ = optim.make_optimizer(cfg.optim, cfg.train.steps)
  state = jax.eval_shape(train_state.make_init_fn(cfg, tx), jax.random.key(0))
  new, old = sharding.tree_shardings(state, mesh), _regex_shardings(state, mesh)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(old)):
    assert a == b, jax.tree_util.keystr(path)
  assert jax.tree.structure(new) == jax.tree.structure(old)


def test_hf_names_and_shapes_are_llamas():
  """The table's HF rows spell transformers' LlamaForCausalLM state dict (as hf.py listed it
  before the table), in the file order export writes."""
  m = load("1b").model
  D, H, K, Dh, F, V = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim, m.vocab_size
  layer = {"input_layernorm": (D,), "self_attn.q_proj": (H * Dh, D),
           "self_attn.k_proj": (K * Dh, D), "self_attn.v_proj": (K * Dh, D),
           "self_attn.o_proj": (D, H * Dh), "post_attention_layernorm": (D,),
           "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}
  want = {"model.embed_tokens.weight": (V, D)}
  for name, s in layer.items():
    want.update({f"model.layers.{i}.{name}.weight": s for i in range(m.n_layers)})
  want.update({"model.norm.weight": (D,), "lm_head.weight": (V, D)})
  got = hf.hf_shapes(m)
  assert list(got.items()) == list(want.items())
