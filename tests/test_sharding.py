"""Mesh from config, FSDP placement of the whole train state, batch sharding, local kernels, and
checkpoints that restore onto another mesh (8 fake CPU devices, see conftest.py)."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tinyllama_jax import config as config_lib, optim, sharding, train_state
from tinyllama_jax.checkpoint import manager as checkpoint
from tinyllama_jax import model as model_lib
from tinyllama_jax.training import program as program_lib

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
  init = train_state.make_init_fn(cfg, tx)
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
  graphdef = model_lib.graphdef(cfg.model)
  batch = {k: jnp.ones((8, 16), jnp.float32 if k == "loss_mask" else jnp.int32)
           for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  loss_sum = lambda p, b: program_lib.loss_sums(p, b, graphdef=graphdef, cfg=cfg)[0]
  grad_fn = jax.jit(jax.grad(loss_sum),
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


# --- FSDP's collectives in the compiled step (bench/NOTES.md, "FSDP on 2 devices") -------------
# Left to propagation, the embed-split weights made every layer run tensor-parallel over the whole
# global batch: [B, T, *] activations all-reduced and all-gathered, q/k/v all-to-all'd, and the
# chunked cross-entropy all-reduced each chunk's logits. These tests read the optimized HLO.

_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def hlo_collectives(hlo_text):
  """[(op, [(dtype, dims), ...], op_name)] for every collective of more than one device."""
  import re
  found = []
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (" + "|".join(_COLLECTIVES) + r")(?:-start)?\(",
                 line)
    if not m:
      continue
    groups = re.search(r"replica_groups=(\S+)", line)
    if groups and re.fullmatch(r"\{(\{\d+\},?)+\},?", groups.group(1)):
      continue  # groups of one device (a psum over a size-1 mesh axis): a no-op
    shapes = [(d, tuple(int(x) for x in dims.split(",") if x))
              for d, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))]
    name = re.search(r'op_name="([^"]*)"', line)
    found.append((m.group(2), shapes, name.group(1) if name else ""))
  return found


def compiled_step_hlo(n_devices, attention, T=48, micro=4, data=1):
  """train.py's step for a 2-layer model on a (data x) FSDP mesh of n_devices, lowered under it."""
  cfg = small_config()
  m = cfg.model
  m.vocab_size, m.max_seq_len, m.kernels.attention = 256, T, attention
  cfg.train.seq_len, cfg.train.micro_batch_per_device = T, micro
  cfg.train.global_batch = micro * n_devices
  mesh = sharding.make_mesh(mesh_cfg(data=data), devices=jax.devices()[:n_devices])
  tx, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
  init = train_state.make_init_fn(cfg, tx)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sh = sharding.tree_shardings(abstract, mesh)
  batch_sh = sharding.accum_batch_sharding(mesh)
  step = jax.jit(functools.partial(program_lib.train_step, graphdef=model_lib.graphdef(cfg.model),
                                   cfg=cfg, tx=tx, schedule=schedule),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
  batch = {k: jax.ShapeDtypeStruct((1, micro * n_devices, T), jnp.float32 if k == "loss_mask"
                                   else jnp.int32, sharding=batch_sh)
           for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  with jax.set_mesh(mesh):
    lowered = step.lower(checkpoint.abstract_like(abstract, state_sh), batch)
  return lowered.compile().as_text(), cfg.model, T


@pytest.mark.parametrize("n_devices, attention, data", [
    (2, "xla", 1), (2, "cudnn", 1), (4, "cudnn", 1),
    (8, "cudnn", 1), (8, "cudnn", 2)])  # the 8-GPU meshes: all-FSDP and data 2 x fsdp 4
def test_fsdp_step_gathers_weights_not_activations(monkeypatch, n_devices, attention, data):
  """Expected FSDP structure: each layer's weight matrices all-gathered whole, their gradients
  reduced; activations stay batch-split (no collective carries a [.., T, ..] float array); the
  only all-to-alls are the embedding lookup's (row gather on the D-split table, and its
  scatter-add). 'cudnn' is a stand-in (the jnp reference run through the per-device wrapper
  cuDNN gets), since cuDNN itself needs a GPU."""
  from tinyllama_jax import kernels
  if attention == "cudnn":
    monkeypatch.setitem(kernels._TABLE["attention"], "cudnn",
                        "tinyllama_jax.kernels.attention:attention_xla")
  hlo, m, T = compiled_step_hlo(n_devices, attention, data=data)
  found = hlo_collectives(hlo)
  floats = ("f32", "bf16", "f16")
  # T = 48 divides no weight dimension: a float dimension that is a multiple of it is a token
  # axis ([B, T, ..] activations, or [B * T, ..] rows such as the cross-entropy's logits).
  activation_like = [(op, s, name) for op, shapes, name in found for d, s in shapes
                     if d in floats and any(n % T == 0 for n in s) and op != "all-to-all"]
  assert not activation_like, activation_like
  # Layers are unrolled and nothing is accumulated: the only loops are the cross-entropy's chunk
  # scans, which must run on local rows (a weight gathered or a partial sum reduced per chunk
  # was the propagated plan).
  in_loops = [(op, shapes, name) for op, shapes, name in found if "/while/" in name]
  assert not in_loops, in_loops
  all_to_all = [(s, name) for op, s, name in found if op == "all-to-all"]
  assert all("_take" in name for _, name in all_to_all) and len(all_to_all) <= 2, all_to_all
  gathered = {s for op, shapes, _ in found if op == "all-gather" for _, s in shapes}
  D, H, K, Dh, F = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim
  # Fused projections concatenate the local shards first: one gather for q/k/v, one for gate/up.
  weights = ([(D, H + 2 * K, Dh), (H, Dh, D), (D, 2 * F), (F, D)] if m.fuse_projections else
             [(D, H, Dh), (D, K, Dh), (H, Dh, D), (D, F), (F, D)])
  for w in weights:
    assert w in gathered, (w, sorted(gathered))
  reduced = {s for op, shapes, _ in found if op in ("all-reduce", "reduce-scatter")
             for _, s in shapes}
  DF = weights[-2]
  assert DF in reduced or (D // (n_devices // data), DF[1]) in reduced, sorted(reduced)


def test_fsdp_hidden_states_stay_batch_split():
  """The model alone (no cross-entropy after it to pin the batch split): forward and backward of
  its hidden states move weights, never activations. Unpinned, the embedding lookup on the
  D-split table handed out D-split activations and every layer followed."""
  from flax import nnx
  from tinyllama_jax.model import Llama
  cfg, T = small_config(), 48
  cfg.model.max_seq_len = T
  mesh = sharding.make_mesh(mesh_cfg(), devices=jax.devices()[:2])
  abstract = nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(params=0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  params = nnx.to_pure_dict(params)
  shardings = sharding.tree_shardings(params, mesh)

  def loss(p, tokens):
    return jnp.sum(nnx.merge(graphdef, p).hidden(tokens) ** 2)

  tokens = jax.ShapeDtypeStruct((8, T), jnp.int32, sharding=sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss), in_shardings=(shardings, sharding.batch_sharding(mesh))).lower(
        checkpoint.abstract_like(params, shardings), tokens).compile().as_text()
  moved = [(op, s, name) for op, shapes, name in hlo_collectives(hlo) for d, s in shapes
           if d in ("f32", "bf16", "f16") and any(n % T == 0 for n in s) and op != "all-to-all"]
  assert not moved, moved


def test_chunked_cross_entropy_per_device_equals_global():
  """The chunked cross-entropy runs per device under a mesh: same loss, dx and dw (summed over
  devices) as on one device, with chunks smaller than a device's rows and a ragged last one."""
  from tinyllama_jax.kernels import cross_entropy as ce
  kx, kw, kt, kg = jax.random.split(jax.random.key(3), 4)
  N, D, V = 48, 16, 40
  x = jax.random.normal(kx, (N, D))
  w = jax.random.normal(kw, (D, V)) * 0.2
  t = jax.random.randint(kt, (N,), 0, V)
  g = jax.random.uniform(kg, (N,))

  def loss_and_grads(x, w):
    f = lambda x, w: jnp.sum(ce.cross_entropy_chunked(x, w, t, chunk=5) * g)
    return jax.value_and_grad(f, (0, 1))(x, w)

  want = jax.jit(loss_and_grads)(x, w)
  mesh = sharding.make_mesh(mesh_cfg(), devices=jax.devices()[:4])
  rows = NamedSharding(mesh, P(("data", "fsdp"), None))
  with jax.set_mesh(mesh):
    fn = jax.jit(loss_and_grads, in_shardings=(rows, NamedSharding(mesh, P("fsdp", None))))
    assert "shard_map" in str(jax.make_jaxpr(fn)(x, w))
    got = fn(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_constrain_is_the_identity_without_a_mesh():
  x = jnp.ones((4, 3))
  assert sharding.constrain(x, ("act_batch", None)) is x
  mesh = sharding.make_mesh(mesh_cfg(), devices=jax.devices()[:2])
  with jax.set_mesh(mesh):
    y = jax.jit(lambda x: sharding.constrain(x * 2, ("act_batch", None)))(x)
  assert y.sharding.spec[0] == "fsdp"


@pytest.mark.parametrize("data", [1, 2])
def test_eight_device_step_equals_one_device_step(data):
  """The 8-GPU meshes on 8 CPU devices (all-FSDP, data 2 x fsdp 4): one train step from the same
  state on the same global batch gives the loss, gradient norm and parameters of one device."""
  cfg = small_config()
  T, B = 32, 8
  cfg.train.seq_len, cfg.train.micro_batch_per_device, cfg.train.global_batch = T, 1, B
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (1, B, T + 1), dtype=np.int32)
  ones = np.ones((1, B, T), np.int32)
  host_batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": ones,
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), ones.shape).copy(),
                "loss_mask": ones.astype(np.float32)}
  tx, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
  results = []
  for mesh in (sharding.make_mesh(mesh_cfg(), devices=jax.devices()[:1]),
               sharding.make_mesh(mesh_cfg(data=data))):
    state, shardings = init_state(cfg, mesh)
    batch_sh = sharding.accum_batch_sharding(mesh)
    step = jax.jit(functools.partial(program_lib.train_step, graphdef=model_lib.graphdef(cfg.model),
                                     cfg=cfg, tx=tx, schedule=schedule),
                   in_shardings=(shardings, batch_sh), out_shardings=(shardings, None))
    with jax.set_mesh(mesh):
      new_state, metrics = step(state, jax.device_put(host_batch, batch_sh))
    results.append((metrics, jax.device_get(new_state["params"])))
  (m1, p1), (m8, p8) = results
  np.testing.assert_allclose(m8["train/loss"], m1["train/loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["train/grad_norm"], m1["train/grad_norm"], rtol=1e-4)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(path))
