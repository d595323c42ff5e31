"""Mesh from config, FSDP placement of the whole train state, batch sharding, local kernels, and
checkpoints that restore onto another mesh (8 fake CPU devices, see conftest.py)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tinyllama_jax import checkpoint, config as config_lib, optim, sharding
from tinyllama_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mesh_cfg(data=1, fsdp=-1, tensor=1):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def small_config():
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  m = cfg.model
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim = 64, 2, 4, 2, 16, 128
  m.vocab_size, m.max_seq_len = 512, 64
  return cfg


def init_state(cfg, mesh):
  tx, _ = optim.make_optimizer(cfg.optim, cfg.train.steps)
  init = train_lib.make_init_fn(cfg, tx)
  shardings = sharding.tree_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
  return jax.jit(init, out_shardings=shardings)(jax.random.key(0)), shardings


def test_mesh_minus_one_takes_the_rest():
  assert dict(sharding.make_mesh(mesh_cfg()).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert dict(sharding.make_mesh(mesh_cfg(data=2)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert dict(sharding.make_mesh(mesh_cfg(data=-1, fsdp=2, tensor=2)).shape) == {
      "data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("cfg, match", [
    (mesh_cfg(data=-1, fsdp=-1), "at most one axis"),
    (mesh_cfg(data=3), "does not divide 8"),
    (mesh_cfg(data=4, fsdp=4), "needs 16 devices"),
])
def test_bad_mesh_is_a_clear_error(cfg, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(cfg)


def test_indivisible_dims_stay_replicated():
  mesh = sharding.make_mesh(mesh_cfg(fsdp=4, tensor=2))
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), (6, 3), mesh) == P(None, None)
  assert sharding.logical_to_spec(("act_batch", "act_seq"), (8, 5), mesh) == P("fsdp", None)


def test_state_is_fsdp_sharded():
  """Parameters and both Adam moments split 8 ways on `embed`; scalars replicated; no device
  holds a whole matrix."""
  mesh = sharding.make_mesh(mesh_cfg())
  state, _ = init_state(small_config(), mesh)
  params = state["params"]
  adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")]
  assert len(adam) == 1
  for tree in (params, adam[0].mu, adam[0].nu):
    assert tree["embed"].sharding.spec == P(None, "fsdp")
    assert tree["lm_head"].sharding.spec == P("fsdp", None)
    assert tree["layers"]["wq"].sharding.spec == P(None, "fsdp", None, None)
    assert tree["layers"]["w_down"].sharding.spec == P(None, None, "fsdp")
    w = tree["layers"]["w_gate"]
    assert w.addressable_shards[0].data.shape == (2, 64 // 8, 128)
    assert len({s.device for s in w.addressable_shards}) == 8
  assert state["step"].sharding.is_fully_replicated


def test_gradients_take_the_parameters_shardings():
  cfg = small_config()
  mesh = sharding.make_mesh(mesh_cfg(data=2))
  state, shardings = init_state(cfg, mesh)
  graphdef = train_lib.model_graphdef(cfg)
  batch = {k: jnp.ones((8, 16), jnp.float32 if k == "loss_mask" else jnp.int32)
           for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  grad_fn = jax.jit(jax.grad(lambda p, b: train_lib.loss_sums(p, b, graphdef=graphdef, cfg=cfg)[0]),
                    in_shardings=(shardings["params"], sharding.batch_sharding(mesh)),
                    out_shardings=shardings["params"])
  grads = grad_fn(state["params"], batch)
  assert grads["layers"]["wk"].sharding.spec == P(None, "fsdp", None, None)
  assert grads["layers"]["wk"].addressable_shards[0].data.shape == (2, 64 // 4, 2, 16)


def test_batch_is_split_over_data_and_fsdp():
  mesh = sharding.make_mesh(mesh_cfg(data=2))
  x = np.arange(16 * 3).reshape(16, 3)
  arr = sharding.global_batch_array({"x": x}, sharding.batch_sharding(mesh))["x"]
  assert arr.sharding.spec == P(("data", "fsdp"), None)
  assert {s.data.shape for s in arr.addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(arr), x)
  acc = sharding.accum_batch_sharding(mesh)
  assert acc.spec == P(None, ("data", "fsdp"), None)


def test_shard_map_local_hands_each_device_its_block():
  mesh = sharding.make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
  seen = []

  def kernel(q_BTHD):
    seen.append(q_BTHD.shape)
    return q_BTHD * 2

  axes = ("act_batch", "act_seq", "act_heads", None)
  fn = sharding.shard_map_local(kernel, [axes], axes, mesh=mesh)
  q = jnp.arange(8 * 3 * 4 * 2, dtype=jnp.float32).reshape(8, 3, 4, 2)
  out = jax.jit(fn)(q)
  assert seen == [(2, 3, 2, 2)]
  np.testing.assert_array_equal(out, q * 2)
  # No mesh in context: the function itself.
  assert sharding.shard_map_local(kernel, [axes], axes) is kernel


@pytest.mark.parametrize("n_devices", [4, 1])
def test_checkpoint_restores_onto_another_mesh(tmp_path, n_devices):
  """Saved from 8 devices (FSDP over 8), restored onto n_devices: same values, new sharding."""
  cfg = small_config()
  state8, shardings8 = init_state(cfg, sharding.make_mesh(mesh_cfg()))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=False)
  ckpt.save(3, state8, {"position": 3}, cfg)
  ckpt.wait()

  mesh = sharding.make_mesh(mesh_cfg(), devices=jax.devices()[:n_devices])
  abstract = jax.eval_shape(lambda s: s, state8)
  target = checkpoint.abstract_like(abstract, sharding.tree_shardings(abstract, mesh))
  restored = checkpoint.Checkpointer(str(tmp_path), keep=1).restore(3, target)[0]
  a, b = jax.tree_util.tree_leaves_with_path(state8), jax.tree.leaves(restored)
  assert len(a) == len(b)
  for (path, x), y in zip(a, b):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  wq = restored["params"]["layers"]["wq"]
  assert len(wq.sharding.device_set) == n_devices
  assert wq.addressable_shards[0].data.shape[1] == 64 // n_devices
  assert isinstance(wq.sharding, NamedSharding)
