"""The whole sharding story: a mesh, two tables, and the functions that apply them.

Mesh axes: `data` (pure data parallel: replicas), `fsdp` (data parallel whose replicas also
split parameters, gradients and optimizer state), `tensor` (splits heads and the MLP width).
Nothing outside this file names a mesh axis.

Table 1 maps logical axes (params.py's table gives each parameter its own; `act_*` are
activations') to mesh axes. Table 2 is params.py's: a tree leaf whose path ends in a parameter's
path takes that parameter's logical axes. A dimension that does not divide by its mesh axes is
replicated. FSDP: parameters split on `embed`, so every device stores 1/fsdp of each matrix and
XLA all-gathers a layer's weights just before use (and reduce-scatters its gradients);
activations split on the batch, never on `embed`.
"""

import jax
from absl import logging
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tinyllama_jax import params

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_TO_MESH = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "head_dim": None,
    "norm": None,
    "act_batch": ("data", "fsdp"),
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
}

def make_mesh(cfg_mesh, devices=None):
  devices = jax.devices() if devices is None else devices
  sizes = [cfg_mesh[a] for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1 (the rest), got "
                     f"{dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  n = int(np.prod(sizes))
  if n > len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {n} devices, only "
                     f"{len(devices)} present: set --config.mesh.fsdp=-1 to use what there is")
  if n < len(devices):
    logging.warning("mesh %s uses %d of %d devices (--config.mesh.fsdp=-1 uses them all)",
                    dict(zip(MESH_AXES, sizes)), n, len(devices))
    devices = devices[:n]
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes, shape, mesh):
  """PartitionSpec for an array with these logical axes; indivisible dims stay replicated."""
  spec = []
  for axis, dim in zip(logical_axes, shape):
    mesh_axes = LOGICAL_TO_MESH[axis] if axis else None
    if mesh_axes is not None:
      names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
      names = tuple(n for n in names if mesh.shape[n] > 1)
      size = int(np.prod([mesh.shape[n] for n in names]))
      mesh_axes = (names[0] if len(names) == 1 else names) if names and dim % size == 0 else None
    spec.append(mesh_axes)
  return P(*spec)


def _path_keys(path):
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))) for k in path)


def tree_shardings(tree, mesh):
  """NamedShardings for a tree of (abstract) arrays: parameters and anything that mirrors them
  (gradients, Adam's moments) by their path; everything else (step, counts, RNG) replicated."""
  def one(path, leaf):
    param = params.lookup(_path_keys(path))
    if param is None or len(param.axes) != len(leaf.shape):  # e.g. a factored optimizer statistic
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(param.axes, leaf.shape, mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


def _current_mesh(mesh=None):
  """The mesh to shard over, or None where sharding is moot (no mesh set, or one device)."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty or mesh.size == 1 else mesh


def shards(logical_axis, mesh=None):
  """How many devices split one logical axis in the current mesh (1 with none)."""
  mesh = _current_mesh(mesh)
  names = LOGICAL_TO_MESH[logical_axis] if mesh is not None else None
  if names is None:
    return 1
  names = (names,) if isinstance(names, str) else names
  return int(np.prod([mesh.shape[n] for n in names if n in mesh.shape]))


def constrain(x, logical_axes, mesh=None):
  """x pinned to the sharding its logical axes name (an activation: act_batch, act_seq, ...).

  Why: left to propagation, FSDP's embed-sharded weights win. The embedding lookup on the
  [V, D] table split on D hands out x_BTD split on D (not on the batch), and every layer then
  ran as tensor parallelism over the whole global batch: norms and matmuls all-reduced
  [B, T, *] activations, attention all-gathered q/k/v (bench/NOTES.md, "FSDP on 2 devices").
  Pinning the activations to the batch makes XLA gather the weights instead. The constraint
  also binds the cotangent in the backward pass. The identity with no mesh or one device."""
  mesh = _current_mesh(mesh)
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh))
      if isinstance(mesh, jax.sharding.Mesh) else logical_to_spec(logical_axes, x.shape, mesh))


def shard_map_local(fn, in_logical, out_logical, mesh=None):
  """fn run per device on its local blocks (a Pallas kernel sees [B/n, T, H/t, D], not a global
  array it would otherwise be handed whole: XLA cannot partition a custom call, so it gathers).

  in_logical / out_logical: one tuple of logical axes (or None for a replicated input) per
  argument / output. mesh: the mesh, or None for the one `jax.set_mesh` made current; with no
  mesh, or one device, fn runs as is."""
  mesh = _current_mesh(mesh)
  if mesh is None:
    return fn

  def spec(axes):
    names = [None if a is None else LOGICAL_TO_MESH[a] for a in (axes or ())]
    return P(*[n if n is None or isinstance(n, str) else tuple(x for x in n if x in mesh.shape)
               for n in names])

  out_specs = (tuple(spec(a) for a in out_logical) if isinstance(out_logical, list)
               else spec(out_logical))
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a) for a in in_logical),
                       out_specs=out_specs, check_vma=False)


def batch_sharding(mesh, ndim=2):
  """Sequences split over data x fsdp; the rest of each array whole."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def accum_batch_sharding(mesh, ndim=3):
  """[accum, micro_batch, ...]: the accumulation axis stays whole on every device."""
  return NamedSharding(mesh, P(None, ("data", "fsdp"), *([None] * (ndim - 2))))


def batch_devices(mesh):
  return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch_array(local_batch, sharding):
  """This process's slice of a batch (numpy) -> one global jax.Array with `sharding`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
