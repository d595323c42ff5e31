"""orbax checkpoints of a run: train state, data-iterator position, config, versions, checksums.

Layout under `workdir/checkpoints/<step>/`: `state` (params, optimizer state, step, RNG, as
sharded arrays: restoring onto another mesh only needs other target shardings), `data` (the
iterator's JSON state: resuming costs O(1), no replay), `meta` (config, library versions and a
checksum of every state array and of the data state).

What can go wrong on disk, and what happens:
- A save cut short (kill -9, crash, full disk, a second signal): orbax writes into
  `<step>.orbax-checkpoint-tmp` and renames it only once complete, so the step is never listed.
  Such directories are counted and reported at start, then removed; never loaded.
- A committed step damaged later (files deleted or truncated, bits flipped; orbax restores flipped
  bits without complaint): the restore fails or its checksum disagrees. The run falls back to the
  newest checkpoint that verifies, says so, and moves the damaged ones to `checkpoints.corrupt/`.
  If none verifies it stops: it never starts from scratch over checkpoints it cannot read.
- A save that fails (full disk): one clear error; the checkpoints already written are untouched.
"""

import errno
import hashlib
import importlib.metadata
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from tinyllama_jax import config as config_lib

# The fields that fix the parameter shapes: a checkpoint only continues a run that agrees on them.
ARCH_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step not yet committed
# A different major.minor of these may read or compute differently: worth a warning on resume.
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none of the existing ones can be read."""


def versions():
  out = {}
  for pkg in VERSIONED:
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  return out


# ----------------------------------------------------------------------------- checksums


def _leaf_checksum(x):
  """Two wrapping uint32 sums of the leaf's bit patterns, the second position-weighted: exact
  (no float rounding), independent of reduction order, so equal on every mesh; one flipped bit or
  two swapped elements change it. Per-axis iotas instead of a flat index keep shardings intact."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8-byte: a trailing 2 axis
  weight = jnp.ones(bits.shape, jnp.uint32)
  for axis in range(bits.ndim):  # a distinct odd multiplier per axis (golden-ratio hashing)
    mix = jnp.uint32((0x9E3779B1 * (2 * axis + 1)) % 2**32)
    weight = weight + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * mix
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                    jnp.sum(bits * (weight | 1), dtype=jnp.uint32)])


@jax.jit
def _leaf_checksum_and_finite(x):
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.bool_(True)
  return _leaf_checksum(x), finite


def checksums(state):
  """([n_leaves][2] ints, all floats finite) of a state tree, computed where the arrays live.
  One leaf at a time: a single jit over the 1.1B state asked XLA:CPU for 29.7 GB of temporaries."""
  sums, finite = [], True
  for x in jax.tree.leaves(state):
    leaf_sum, leaf_finite = jax.device_get(_leaf_checksum_and_finite(x))
    sums.append(np.asarray(leaf_sum).tolist())
    finite = finite and bool(leaf_finite)
  return sums, finite


def leaf_checksum(x):
  """The checksum `checksums` stores for one array, as [int, int]: for checking a single leaf
  read back on its own (export), with the dtype it was saved in."""
  return np.asarray(jax.device_get(_leaf_checksum_and_finite(x)[0])).tolist()


def stored_checksums_by_path(meta, abstract_state):
  """{jax.tree_util.keystr(path): [int, int]} of a checkpoint's meta, each leaf of the train
  state's tree (e.g. jax.eval_shape of the trainer's init) paired with the checksum `save` stored
  for it (the order of jax.tree.leaves); None when the checkpoint has none (an older version)."""
  if "checksums" not in meta:
    return None
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract_state)]
  if len(paths) != len(meta["checksums"]):
    raise ValueError(f"its metadata holds {len(meta['checksums'])} checksums, the train state "
                     f"has {len(paths)} arrays: written by another version of the code")
  return dict(zip(paths, meta["checksums"]))


def _data_digest(data_state):
  return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def _all_data_states(data_state):
  """Every process's data-iterator state, as the one JSON item orbax writes (from process 0
  only): each process reads its own slice of the data, so a checkpoint must hold all of them.
  One process keeps the plain state (the single-process format, unchanged)."""
  if jax.process_count() == 1:
    return data_state
  raw = np.frombuffer(json.dumps(data_state, sort_keys=True).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(raw.size))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded)  # [processes, longest]
  return {"processes": [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]}


def _own_data_state(data):
  """This process's part of what _all_data_states saved. Another process count gets process 0's:
  the data pipeline's fingerprint check then names the difference."""
  per = data.get("processes") if isinstance(data, dict) else None
  if per is None:
    return data
  return per[jax.process_index()] if len(per) == jax.process_count() else per[0]


# ----------------------------------------------------------------------------- the checkpointer


def incomplete_saves(directory):
  return sorted(name for name in (os.listdir(directory) if os.path.isdir(directory) else ())
                if TMP_SUFFIX in name)


def _one_line(error, limit=300):
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + "..."


def _no_space(error):
  """Whether a save failed for a full disk: orbax reports it as ValueError('RESOURCE_EXHAUSTED:
  ... No space left on device'), plain file writes as OSError(ENOSPC), possibly chained."""
  while error is not None:
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class Checkpointer:

  def __init__(self, directory, *, keep, async_save=True):
    # orbax's tensorstore writer refuses relative paths (`--workdir=runs/tiny` must work).
    self.directory = directory = directory if "://" in directory else os.path.abspath(directory)
    self.incomplete = incomplete_saves(directory)
    if self.incomplete:  # reported before orbax removes them (cleanup_tmp_directories)
      logging.warning("found %d incomplete checkpoint save(s) in %s (cut short by a kill, crash or "
                      "full disk): %s; never loaded, removing them", len(self.incomplete),
                      directory, ", ".join(self.incomplete))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(directory, options=options)
    # orbax removes old temporary dirs on a thread of its own: waited for here, so a run that
    # stops right after (bad data) exits after it, not while it runs (a traceback of orbax's at
    # interpreter shutdown under our one-line error). Private in orbax 0.12: skipped if gone.
    getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    self._saving = None  # the step an async save may still be writing

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state, cfg, data_identity=None, tokenizer_sha256=None):
    """Refuses a state with NaN/inf (the last good checkpoint stays the latest); a failed write
    becomes one CheckpointError naming the cause and the checkpoints still intact.
    data_identity: what the data is (data.pipeline.identity), checked when a run resumes.
    tokenizer_sha256: the tokenizer's, which export, generate and evaluate hold theirs to."""
    self.wait()  # a failed async save surfaces here, under its own step
    data_state = _all_data_states(data_state)
    sums, finite = checksums(state)
    if not finite:
      raise CheckpointError(f"refusing to save step {step}: the train state holds NaN or inf; "
                            f"{self._intact()}")
    meta = {"step": int(step), "config": cfg.to_dict(), "versions": versions(),
            "checksums": sums, "data_sha256": _data_digest(data_state),
            "data_identity": data_identity, "tokenizer_sha256": tokenizer_sha256}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # orbax reports a full disk as ValueError('RESOURCE_EXHAUSTED ...')
      self._save_failed(step, e)
    self._saving = step

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._save_failed(self._saving, e)
    self._saving = None

  def close(self):
    try:
      self.manager.close()
    except Exception as e:
      self._save_failed(self._saving, e)

  def _intact(self):
    self.manager.reload()
    steps = self.all_steps()
    return (f"the complete checkpoints {steps} are intact and a rerun resumes from step {steps[-1]}"
            if steps else "no complete checkpoint exists yet")

  def _save_failed(self, step, error):
    reason, hint = _one_line(error), "see the cause above"
    if _no_space(error):
      reason, hint = "no space left on device", "free disk space or move --workdir to a bigger disk"
    if step is not None and jax.process_index() == 0:  # give back the space the partial save took
      shutil.rmtree(os.path.join(self.directory, f"{step}{TMP_SUFFIX}"), ignore_errors=True)
    raise CheckpointError(f"could not write checkpoint {step} to {self.directory} ({reason}): "
                          f"{hint}; {self._intact()}") from error

  def latest_config(self):
    """The newest checkpoint's config, or None (no checkpoint, or its metadata is damaged:
    restore_latest reports that and falls back)."""
    step = self.latest_step()
    try:
      return None if step is None else self.read_meta(step)["config"]
    except Exception:  # pylint: disable=broad-except
      return None

  def read_meta(self, step):
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step, abstract_state):
    """abstract_state: a tree of jax.ShapeDtypeStruct with the target shardings. The data state
    as saved: of a multi-process run, {'processes': [one per process]}."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def _restore_verified(self, step, abstract_state, meta):
    state, data = self.restore(step, abstract_state)
    if meta.get("step") != step:
      raise ValueError(f"its metadata says step {meta.get('step')}")
    if "checksums" not in meta:
      logging.warning("checkpoint %d has no checksums (written by an older version): not verified",
                      step)
      return state, data
    sums, _ = checksums(state)
    bad = [jax.tree_util.keystr(path) for (path, _), have, want
           in zip(jax.tree_util.tree_leaves_with_path(state), sums, meta["checksums"])
           if have != want]
    if bad or len(sums) != len(meta["checksums"]):
      raise ValueError(f"checksum mismatch in {len(bad)} array(s): {', '.join(bad[:5])}")
    if _data_digest(data) != meta.get("data_sha256"):
      raise ValueError("checksum mismatch in the data-iterator state")
    return state, data

  def restore_latest(self, abstract_state, check_meta):
    """(step, state, data_state, meta) of the newest checkpoint that reads back and verifies, or
    None when there is none at all. check_meta(meta) runs first: its errors (another
    architecture) stop the run rather than skip the checkpoint."""
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        meta = self.read_meta(step)
      except Exception as e:
        damaged.append((step, f"unreadable metadata: {_one_line(e)}"))
        continue
      check_meta(meta)
      try:
        state, data = self._restore_verified(step, abstract_state, meta)
      except Exception as e:
        damaged.append((step, _one_line(e)))
        continue
      for bad_step, problem in damaged:
        logging.error("checkpoint %d is corrupt or incomplete (%s): skipped", bad_step, problem)
      if damaged:
        self._quarantine([s for s, _ in damaged])
        logging.warning("resuming from checkpoint %d, the newest that verifies (%d newer one(s) "
                        "were damaged; the steps since are trained again)", step, len(damaged))
      return step, state, _own_data_state(data), meta
    if damaged:
      raise CheckpointError(
          f"none of the {len(damaged)} checkpoints in {self.directory} can be read back ("
          + "; ".join(f"{s}: {p}" for s, p in damaged[:3])
          + "): restore them from a copy, or move the directory away to start from scratch")
    return None

  def _quarantine(self, steps):
    """Moves damaged steps aside (kept for inspection) so the run can save those steps again."""
    if jax.process_index() == 0:
      aside = self.directory.rstrip("/") + ".corrupt"
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(os.path.join(self.directory, str(step)), target)
        logging.warning("moved damaged checkpoint %d to %s", step, target)
    if jax.process_count() > 1:  # every process must list the steps without the moved ones
      multihost_utils.sync_global_devices("tinyllama_jax.checkpoint.quarantine")
    self.manager.reload()


# ----------------------------------------------------------------------------- loading checks


def check_architecture(saved_cfg, cfg_model, directory):
  """One clear error when a workdir's checkpoint was made by a different architecture."""
  saved = saved_cfg.get("model", {})
  diffs = [f"{k}: checkpoint {saved.get(k)} vs config {cfg_model[k]}"
           for k in ARCH_KEYS if saved.get(k) != cfg_model[k]]
  if diffs:
    raise ValueError(f"the checkpoint in {directory} is a different architecture "
                     f"({'; '.join(diffs)}): use a new --workdir or the config it was trained with")


def config_differences(saved_cfg, cfg_dict):
  saved, now = dict(config_lib.flat_items(saved_cfg)), dict(config_lib.flat_items(cfg_dict))
  return [f"{k}: {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}"
          for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def version_differences(saved_versions):
  """Packages whose major.minor differs between the checkpoint and this run."""
  now = versions()
  minor = lambda v: ".".join(str(v).split(".")[:2]) if v else None
  return [f"{pkg} {saved_versions.get(pkg)} -> {now.get(pkg)}" for pkg in VERSIONED
          if minor(saved_versions.get(pkg)) != minor(now.get(pkg))]


def check_resume(meta, cfg, directory, data_identity=None):
  """Another architecture is an error; other config or library differences are warnings; so is
  changed data under train.allow_data_change (else an error; not checked without data_identity)."""
  check_architecture(meta.get("config", {}), cfg.model, directory)
  if data_identity is not None:
    check_data_identity(meta, data_identity, cfg.train.allow_data_change)
  diffs = config_differences(meta.get("config", {}), cfg.to_dict())
  if diffs:
    logging.warning("resuming checkpoint %s with a different config (%d keys): %s",
                    meta.get("step"), len(diffs), "; ".join(diffs))
  changed = version_differences(meta.get("versions", {}))
  if changed:
    logging.warning("checkpoint %s was written with other library versions (%s): resuming, but "
                    "results may not match the uninterrupted run bitwise", meta.get("step"),
                    "; ".join(changed))


def same_data(meta, data_identity):
  """Whether the checkpoint's data position applies to this data; a checkpoint without the record
  (an older version's, an imported model's), or no data_identity to compare, cannot tell, and
  keeps its position."""
  return data_identity is None or meta.get("data_identity") in (None, data_identity)


def check_data_identity(meta, data_identity, allow_change):
  step, saved = meta.get("step"), meta.get("data_identity")
  if saved is None:
    logging.warning("checkpoint %s records no data identity (an older version's or an imported "
                    "model's): cannot check that its data position is for this data", step)
    return
  if saved == data_identity:
    return
  changed = ", ".join(sorted(k for k in saved.keys() | data_identity.keys()
                             if saved.get(k) != data_identity.get(k)))
  if not allow_change:
    raise ValueError(f"the training data ({changed}) changed since checkpoint {step} was written, "
                     "so its data position means another place in another stream: train on the "
                     "data it was trained on, pass a new --workdir, or pass "
                     "--config.train.allow_data_change=True to restart the data stream")
  logging.warning("the training data (%s) changed since checkpoint %s; train.allow_data_change: "
                  "the data stream restarts from its beginning", changed, step)


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
