"""Reading a run: its checkpoint steps, the config and tokenizer it trained with, its parameters.

export, generate and evaluate open a run with open_run and read its parameters with
iter_params / load_params: one-line errors for the usual slips (no such workdir or step, a
damaged checkpoint, a missing tokenizer), and every parameter checked against the checksum
training stored with it.
"""

import contextlib
import os
from typing import NamedTuple, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from tinyllama_jax import params as param_table, train_state
from tinyllama_jax.checkpoint import manager as checkpoint
from tinyllama_jax.data import corpus, tokenizer as tokenizer_lib
from tinyllama_jax.data import pipeline

def checkpoint_dir(workdir):
  return os.path.join(workdir, "checkpoints")


def resolve_step(workdir, step=None):
  """The checkpoint step to read (latest when None), with one-line errors for the usual slips."""
  if not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} does not exist: pass the --workdir of a training run")
  ckdir = checkpoint_dir(workdir)
  steps = sorted(int(n) for n in (os.listdir(ckdir) if os.path.isdir(ckdir) else [])
                 if n.isdigit() and os.path.isdir(os.path.join(ckdir, n, "state")))
  if not steps:
    raise ValueError(f"workdir {workdir!r} has no checkpoint under checkpoints/: train first, or "
                     "import one with --from_hf")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"workdir {workdir!r} has no checkpoint for step {step}; it has steps "
                     f"{steps}: pass one of them to --step")
  return step


class OpenRun(NamedTuple):
  step: int
  cfg: ml_collections.ConfigDict
  tokenizer: Optional[tokenizer_lib.Tokenizer]  # None: a run without one (synthetic data)


def open_run(workdir, step=None, *, tokenizer=None, allow_other_tokenizer=False, needs_text=None):
  """The run in `workdir` as a command reads it: its checkpoint step (latest when None), the
  config that checkpoint was saved with and its tokenizer (load_tokenizer's, `tokenizer` being
  the command's --tokenizer), each slip one line. `needs_text`: why the command needs text;
  given, a run without a tokenizer is refused in one line naming the run, that need and the fix."""
  step = resolve_step(workdir, step)
  cfg = run_config(workdir, step)
  tok = load_tokenizer(cfg, workdir, step, tokenizer, allow_other_tokenizer)
  if tok is None and needs_text:
    raise ValueError(f"the run in {workdir} has no tokenizer (synthetic data): {needs_text}: "
                     "pass --tokenizer=PATH (a sentencepiece .model with at most "
                     f"{cfg.model.vocab_size} pieces)")
  return OpenRun(step, cfg, tok)


def read_meta(workdir, step):
  """The checkpoint's `meta` item: config, versions, checksums."""
  with _readable(workdir, step):
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        os.path.abspath(os.path.join(checkpoint_dir(workdir), str(step), "meta")),
        args=ocp.args.JsonRestore())


def run_config(workdir, step):
  """The config the checkpoint was saved with (its `meta` item)."""
  return ml_collections.ConfigDict(read_meta(workdir, step)["config"])


@contextlib.contextmanager
def _readable(workdir, step):
  """A checkpoint orbax cannot read becomes one line naming it (not an orbax traceback)."""
  try:
    yield
  except Exception as e:  # orbax/tensorstore raise many types (ValueError too) for damaged files
    reason = " ".join(str(e).split())[:200]
    raise ValueError(f"checkpoint {step} in {workdir} cannot be read ({type(e).__name__}: "
                     f"{reason}): pass another --step") from None


def tokenizer_path(cfg, workdir, override=None):
  """The run's sentencepiece model, or None for a run without one (synthetic data).

  `override` (the commands' --tokenizer) first; then the copy train keeps in WORKDIR/tokenizer;
  then, for runs from before train kept one, where the run found it: the config's data.tokenizer
  or the prepared data's manifest. The config is the checkpoint's own: editing config.json
  changes nothing here, hence the flag.
  """
  if override:
    if not os.path.isfile(override):
      raise ValueError(f"--tokenizer={override!r} is not a file: give the sentencepiece .model "
                       "the run was trained with")
    return override
  if cfg.data.get("source") == "synthetic":
    return None
  tried = []
  for path, what in _tokenizer_candidates(cfg, workdir):
    if path is not None and os.path.isfile(path):
      return path
    tried.append(what if path is None else f"{path} ({what})")
  raise ValueError(f"the run's tokenizer is missing: looked for {'; '.join(tried)}: pass "
                   "--tokenizer=PATH (the sentencepiece .model the run was trained with)")


def _tokenizer_candidates(cfg, workdir):
  """(path or None, what it is) in the order tokenizer_path tries them."""
  yield os.path.join(workdir, tokenizer_lib.RUN_COPY), "the run's copy"
  if cfg.data.get("tokenizer"):
    yield cfg.data.tokenizer, "the config's data.tokenizer"
    return
  try:
    manifest_path = pipeline.tokenizer_manifest(cfg.data)
    if manifest_path is None:
      return
    manifest, root = corpus.load_manifest(manifest_path)
  except (OSError, ValueError) as e:
    yield None, f"the prepared data's manifest ({e})"
    return
  # relative to the data folder (its own copy); manifests from before the copy hold an absolute path
  path = os.path.join(root, manifest["tokenizer"]["path"])
  sha256 = manifest["tokenizer"]["sha256"]
  if os.path.isfile(path) and tokenizer_lib.file_sha256(path) != sha256:
    yield None, f"{path} (named by {manifest_path}, but changed since the data was prepared)"
    return
  yield path, f"named by {manifest_path}"


def param_checksums(workdir, step):
  """{param path: the checksum the trainer stored for it} (checkpoint.py's own pairing of the
  state's leaves with meta["checksums"]), or None for a checkpoint saved without checksums."""
  meta = read_meta(workdir, step)
  cfg = ml_collections.ConfigDict(meta["config"])
  try:
    by_path = checkpoint.stored_checksums_by_path(meta, train_state.state_tree(cfg))
  except ValueError as e:
    raise ValueError(f"checkpoint {step} in {workdir} cannot be verified ({e})") from None
  if by_path is None:
    logging.warning("checkpoint %d in %s has no checksums (written by an older version): its "
                    "parameters are not verified", step, workdir)
    return None
  keystr = lambda path: jax.tree_util.keystr(tuple(map(jax.tree_util.DictKey, path)))
  return {path: by_path[keystr(("params",) + path)] for path, _ in param_table.shapes(cfg.model)}


def iter_params(workdir, step, cfg_model, *, verify=True):
  """Yields (path, fp32 numpy array) for each parameter, one restored at a time on the host;
  with `verify`, each is checked (in the dtype it was saved in) against its stored checksum: orbax
  restores flipped bits without complaint."""
  state_dir = os.path.abspath(os.path.join(checkpoint_dir(workdir), str(step), "state"))
  checkpointer = ocp.PyTreeCheckpointer()
  sums = param_checksums(workdir, step) if verify else None
  for path, shape in param_table.shapes(cfg_model):
    item = {"params": _nest(path, 0)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with _readable(workdir, step):
      out = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))["params"]
    for key in path:
      out = out[key]
    if sums is not None and checkpoint.leaf_checksum(out) != sums[path]:
      raise ValueError(f"checkpoint {step} in {workdir}: parameter {'/'.join(path)} does not match "
                       "the checksum saved with it (its data changed on disk after it was written): "
                       "restore the checkpoint from a copy, or pass another --step")
    x = np.asarray(out, np.float32)
    if x.shape != tuple(shape):
      raise ValueError(f"checkpoint parameter {'/'.join(path)} has shape {x.shape}, the config "
                       f"says {shape}: the checkpoint and its meta config disagree")
    yield path, x


def _nest(path, value):
  for key in reversed(path):
    value = {key: value}
  return value


def load_params(workdir, step, cfg_model):
  """All parameters as a nested dict of numpy arrays (for generate/evaluate)."""
  params = {}
  for path, x in iter_params(workdir, step, cfg_model):
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = x
  return params


def load_tokenizer(cfg, workdir, step, override=None, allow_other=False):
  """The run's Tokenizer (tokenizer_path's), or None for a run without one; one line when it
  cannot be the one the run trained with: more pieces than the model has rows (ids past the
  embedding: garbage, NaN, a crash in transformers), or a sha256 other than the one the
  checkpoint records (another tokenizer, or the run's copy edited since). `allow_other` lets the
  second through with a warning: the first can never work."""
  path = tokenizer_path(cfg, workdir, override)
  if path is None:
    return None
  tok = tokenizer_lib.Tokenizer(path, flag="--tokenizer")
  if tok.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"the tokenizer {path} has {tok.vocab_size} pieces, more than the model's "
                     f"vocab_size {cfg.model.vocab_size}: pass the tokenizer the run trained with "
                     "(--tokenizer=PATH)")
  trained = read_meta(workdir, step).get("tokenizer_sha256")
  if trained is None and override and os.path.isfile(os.path.join(workdir, tokenizer_lib.RUN_COPY)):
    trained = tokenizer_lib.file_sha256(os.path.join(workdir, tokenizer_lib.RUN_COPY))
  if trained is None or trained == tok.sha256:
    return tok
  what = (f"the tokenizer {path} (sha256 {tok.sha256[:12]}) is not the one checkpoint {step} in "
          f"{workdir} trained with (sha256 {trained[:12]})")
  if not allow_other:
    raise ValueError(f"{what}: pass that tokenizer with --tokenizer=PATH, or "
                     "--allow_other_tokenizer to use this one anyway")
  logging.warning("%s; --allow_other_tokenizer: using it anyway, the text may be wrong", what)
  return tok
