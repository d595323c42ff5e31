"""orbax checkpoints of a run: train state, data-iterator position, config and versions.

Layout under `workdir/checkpoints/<step>/`: `state` (params, optimizer state, step, RNG, as
sharded arrays: restoring onto another mesh only needs other target shardings), `data` (the
iterator's JSON state: resuming costs O(1), no replay), `meta` (config, library versions).
orbax writes each step into a temporary directory and renames it when complete, so a save cut
short is never listed, never loaded.
"""

import importlib.metadata

import jax
import orbax.checkpoint as ocp

# The fields that fix the parameter shapes: a checkpoint only continues a run that agrees on them.
ARCH_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")


def versions():
  out = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  return out


class Checkpointer:

  def __init__(self, directory, *, keep, async_save=True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state, cfg, force=False):
    meta = {"step": int(step), "config": cfg.to_dict(), "versions": versions()}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=force)

  def read_meta(self, step):
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step, abstract_state):
    """abstract_state: a tree of jax.ShapeDtypeStruct with the target shardings."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def check_architecture(saved_cfg, cfg_model, directory):
  """One clear error when a workdir's checkpoint was made by a different architecture."""
  saved = saved_cfg.get("model", {})
  diffs = [f"{k}: checkpoint {saved.get(k)} vs config {cfg_model[k]}"
           for k in ARCH_KEYS if saved.get(k) != cfg_model[k]]
  if diffs:
    raise ValueError(f"the checkpoint in {directory} is a different architecture "
                     f"({'; '.join(diffs)}): use a new --workdir or the config it was trained with")


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
