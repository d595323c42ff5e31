"""Import a Hugging Face Llama as a run (the command is tinyllama_jax/export.py --from_hf; hf.py
holds the name and layout mapping).

Import writes a checkpoint `train` continues from (step 0, fresh AdamW state, empty data state:
the stream starts fresh), the tokenizer, and WORKDIR/config.py: the imported architecture on top
of --config, so `python -m tinyllama_jax.train --config=WORKDIR/config.py --workdir=WORKDIR`.
Everything is read and checked before anything is written, into a temporary sibling of --workdir
renamed at the end (export.py's output folders): a failure leaves nothing.
"""

import contextlib
import json
import logging as logging_std
import os
import shutil
import sys
import tempfile
import threading
import time

import jax
from absl import logging

from tinyllama_jax import config as config_lib, params as param_table, sharding
from tinyllama_jax.checkpoint import manager as checkpoint
from tinyllama_jax.checkpoint import run as run_lib
from tinyllama_jax.data import chat
from tinyllama_jax.data import formats, tokenizer as tokenizer_lib
from tinyllama_jax.interop import export, hf
from tinyllama_jax.training import program


def read_hf(hf_dir):
  """(model fields, HF config dict, reader) for a HF Llama directory, or a one-line error."""
  if not os.path.isdir(hf_dir):
    raise ValueError(f"--from_hf={hf_dir!r} is not a directory: give a Hugging Face model "
                     "directory")
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"{hf_dir} has no config.json: give a Hugging Face model directory")
  try:
    with open(config_path, encoding="utf-8") as f:
      hf_cfg = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_path} is not JSON ({e}): fix or download the file again") from None
  if not isinstance(hf_cfg, dict):
    raise ValueError(f"{config_path} is not a JSON object: give a Hugging Face config.json")
  fields = hf.model_fields_from_hf(hf_cfg, hf_dir)
  return fields, hf_cfg, hf.SafetensorsReader(hf_dir)


def check_tensors(reader, cfg_model, hf_cfg, hf_dir):
  """Every tensor present with its shape; returns get(name) (tied embeddings resolved)."""
  expected = hf.hf_shapes(cfg_model)
  have = set(reader.names())
  alias = {}
  lm_head, embed = param_table.BY_NAME["lm_head"].hf_name, param_table.BY_NAME["embed"].hf_name
  if lm_head not in have and hf_cfg.get("tie_word_embeddings"):
    logging.info("%s ties lm_head to the input embedding: importing it as two untied copies",
                 hf_dir)
    alias[lm_head] = embed
  missing = [n for n in expected if n not in have and n not in alias]
  if missing:
    raise ValueError(f"{hf_dir} lacks tensor {missing[0]} ({len(missing)} missing): not a "
                     "complete LlamaForCausalLM checkpoint")
  ignored = [n for n in have - set(expected) if n.endswith(hf.IGNORED_HF_SUFFIXES)]
  unknown = sorted(have - set(expected) - set(ignored))
  if unknown:
    raise ValueError(f"{hf_dir} has tensors a Llama does not ({unknown[0]}, {len(unknown)} in "
                     "all): not a plain LlamaForCausalLM checkpoint")
  if ignored:
    logging.info("skipping %d recomputable buffers (%s)", len(ignored), ignored[0])
  for name, shape in expected.items():
    got = tuple(reader.tensors[alias.get(name, name)][2]["shape"])
    if got != tuple(shape):
      raise ValueError(f"{hf_dir}: tensor {name} has shape {got}, config.json implies {shape}")
  return lambda name: reader.get_finite(alias.get(name, name))


def import_config(fields, base_config_path, tokenizer_file, hf_dir):
  """The run's config: the imported architecture and the HF directory's chat template on top of
  --config, refused (one line naming config.json) where config.validate refuses it."""
  cfg = (config_lib.load_config_file(base_config_path) if base_config_path
         else config_lib.base_config())
  for k, v in fields.items():
    cfg.model[k] = v
  cfg.data.tokenizer = tokenizer_file
  cfg.train.seq_len = min(cfg.train.seq_len, cfg.model.max_seq_len)
  template = hf_chat_template(hf_dir)
  if template:
    try:
      chat.check_template(template)
    except ValueError as e:
      raise ValueError(f"{hf_dir}'s chat template cannot be used: {e}") from None
    cfg.data.chat_template = template
    logging.info("imported %s's chat template into data.chat_template", hf_dir)
  try:
    config_lib.validate(cfg)
  except ValueError as e:
    raise ValueError(f"{os.path.join(hf_dir, 'config.json')} gives a config that cannot train: "
                     f"{e}") from None
  return cfg


def hf_chat_template(hf_dir):
  """The chat template a HF directory ships (chat_template.jinja, or tokenizer_config.json's
  chat_template: a string, or named templates of which 'default' is the one used), or ''."""
  jinja = os.path.join(hf_dir, "chat_template.jinja")
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8", errors="replace") as f:
      return f.read()
  path = os.path.join(hf_dir, "tokenizer_config.json")
  if not os.path.isfile(path):
    return ""
  try:
    with open(path, encoding="utf-8") as f:
      template = json.load(f).get("chat_template") or ""
  except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
    logging.warning("%s cannot be read (%s): no chat template imported", path, e)
    return ""
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default") or ""
    if not template:
      logging.warning("%s has named chat templates %s but no 'default': none imported (set "
                      "data.chat_template in %s/config.py)", path, sorted(map(str, named)), "WORKDIR")
  if not isinstance(template, str):
    raise ValueError(f"{path}: chat_template is a {type(template).__name__}, not a string: fix "
                     "the file")
  return template


def config_py(cfg, source):
  """A config file whose get_config() rebuilds `cfg`: base_config() plus the differing keys."""
  base = dict(config_lib.flat_items(config_lib.base_config()))
  lines = [f"c.{k} = {v!r}" for k, v in config_lib.flat_items(cfg) if base.get(k, object()) != v]
  body = "\n".join(f"  {line}" for line in lines)
  return (f'"""Written by `python -m tinyllama_jax.export --from_hf={source}`: the imported\n'
          'architecture and tokenizer on top of the defaults. Edit the training fields freely;\n'
          'the model fields must stay as they are to continue from the imported checkpoint."""\n\n'
          "from tinyllama_jax.config import base_config\n\n\n"
          f"def get_config():\n  c = base_config()\n{body}\n  return c\n")


def import_hf(hf_dir, workdir, *, base_config_path=None, tokenizer=None):
  """Writes a trainable run into `workdir` from the HF Llama in `hf_dir`; returns a report.
  Everything is read and checked (config.json through config.validate, the tokenizer, every
  tensor's header) before anything is written."""
  fields, hf_cfg, reader = read_hf(hf_dir)
  tok_src = tokenizer or os.path.join(hf_dir, "tokenizer.model")
  if not os.path.isfile(tok_src):
    raise ValueError(f"{hf_dir} has no tokenizer.model (sentencepiece), which training needs: pass "
                     "--tokenizer=PATH to the model's sentencepiece .model file")
  tok = tokenizer_lib.Tokenizer(tok_src, flag="--tokenizer")
  if tok.vocab_size > fields["vocab_size"]:
    raise ValueError(f"the tokenizer {tok_src} has {tok.vocab_size} pieces, more than the "
                     f"model's vocab_size {fields['vocab_size']}: pass the model's own tokenizer")
  final = os.path.abspath(workdir)
  cfg = import_config(fields, base_config_path, os.path.join(final, tokenizer_lib.RUN_COPY),
                      hf_dir)
  get = check_tensors(reader, cfg.model, hf_cfg, hf_dir)
  t0 = time.perf_counter()
  try:
    with export.staged_output_dir(final, "--workdir") as tmp:
      os.makedirs(os.path.join(tmp, "tokenizer"))
      shutil.copyfile(tok_src, os.path.join(tmp, tokenizer_lib.RUN_COPY))
      _write_checkpoint(tmp, cfg, get, tok.sha256)
      with open(os.path.join(tmp, "config.py"), "w") as f:
        f.write(config_py(cfg, hf_dir))
      with open(os.path.join(tmp, "config.json"), "w") as f:
        f.write(config_lib.to_json(cfg))
      formats.write_json_atomic(os.path.join(tmp, "imported_from.json"),
                                {"source": os.path.abspath(hf_dir), "hf_config": hf_cfg})
  except (OSError, checkpoint.CheckpointError) as e:
    raise export.WriteError(f"could not write the import to {final} ({_reason(e)}): free disk "
                            "space or choose another --workdir; nothing was written") from None
  report = {"workdir": final, "model": fields, "seconds": round(time.perf_counter() - t0, 2)}
  logging.info("imported %s: %s", hf_dir, report)
  return report


def _reason(error):
  """The cause of a failed write in a few words (a CheckpointError's own message names the
  temporary folder and a rerun's hint, neither of which applies to an import)."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror.lower()
  if "no space left on device" in str(error):
    return "no space left on device"
  return " ".join(str(error.__cause__ or error).split())[:300]


class _WithoutOrbaxTracebacks(logging_std.Filter):
  """orbax logs the traceback of each of its writer threads' failures (82 on a full disk); the
  failure itself comes back as one CheckpointError, which the command reports in one line."""

  def filter(self, record):
    return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def _write_checkpoint(tmp, cfg, get, tokenizer_sha256):
  """Step 0 of a run holding the imported parameters. The trainer's own init fixes the state
  tree; its parameters and optimizer state are replaced by the imported ones, everything else
  (step, RNG, counters) is kept as init makes it."""
  prog = program.build_program(cfg, sharding.make_mesh(cfg.mesh))
  init, tx, shardings = prog.init, prog.tx, prog.state_shardings
  params = {}
  for path, shape in param_table.shapes(cfg.model):
    target, node = shardings["params"], params
    for key in path[:-1]:
      target, node = target[key], node.setdefault(key, {})
    # One parameter at a time: read, convert, place on the mesh, drop the host copy.
    node[path[-1]] = jax.device_put(hf.from_hf(path, shape, get), target[path[-1]])
  fresh = ("params", "opt_state")
  rest = jax.jit(lambda rng: {k: v for k, v in init(rng).items() if k not in fresh},
                 out_shardings={k: v for k, v in shardings.items() if k not in fresh})
  state = {**rest(jax.random.key(cfg.seed)), "params": params,  # init's params: dead code
           "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)}
  if jax.tree.structure(state) != jax.tree.structure(prog.abstract_state):
    raise AssertionError("the imported state does not match the trainer's state tree")
  ckpt = checkpoint.Checkpointer(run_lib.checkpoint_dir(tmp), keep=cfg.train.keep_checkpoints,
                                 async_save=False)
  quiet, absl_logger = _WithoutOrbaxTracebacks(), logging_std.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    with _tracebacks_held_back_on_failure():
      try:
        ckpt.save(0, state, {}, cfg, tokenizer_sha256=tokenizer_sha256)
        ckpt.wait()
      finally:
        ckpt.close()
  finally:
    absl_logger.removeFilter(quiet)


@contextlib.contextmanager
def _tracebacks_held_back_on_failure():
  """Holds back what is written to the stderr file descriptor meanwhile, and gives it back at the
  end, less its tracebacks when the block failed: after a failed write, tensorstore's pending
  callbacks find orbax's event loop closed and print one traceback each from C++ (none, or dozens,
  at random), past any Python filter; the failure itself is reported in one line."""
  sys.stderr.flush()
  saved = os.dup(2)
  failed = False
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      failed = True
      _drop_closed_loop_errors()
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      text = held.read().decode("utf-8", errors="replace")
      sys.stderr.write(_without_tracebacks(text) if failed else text)
      sys.stderr.flush()


# What the writer's leftover callbacks raise once a write failed: the closed loop, or the same
# failure again (a full disk).
_REPEATS = ("Event loop is closed", "RESOURCE_EXHAUSTED", "No space left on device")


def _repeats_the_failure(exc):
  return isinstance(exc, (RuntimeError, ValueError, OSError)) and any(
      s in str(exc) for s in _REPEATS)


def _drop_closed_loop_errors():
  """After a failed write some of those callbacks run later still, past the held-back window
  (as the process ends, from other threads): each raises 'Event loop is closed' or the write's
  own error again, as an unraisable exception, a thread's uncaught one, one printed from C++ or
  an asyncio 'never retrieved' record. They repeat the one failure already reported, so for the rest of the
  process they are dropped; any other error still prints."""
  unraisable, in_thread, printed = sys.unraisablehook, threading.excepthook, sys.excepthook
  sys.unraisablehook = lambda u: None if _repeats_the_failure(u.exc_value) else unraisable(u)
  threading.excepthook = lambda a: None if _repeats_the_failure(a.exc_value) else in_thread(a)
  # tensorstore's C++ threads print theirs with PyErr_Print, which calls sys.excepthook.
  sys.excepthook = lambda t, e, tb: None if _repeats_the_failure(e) else printed(t, e, tb)
  logging_std.getLogger("asyncio").addFilter(
      lambda r: not (r.exc_info and _repeats_the_failure(r.exc_info[1])))


def _without_tracebacks(text):
  """`text` less each `Traceback ...` block (its indented lines and the exception's line)."""
  out, inside = [], False
  for line in text.splitlines(keepends=True):
    if line.startswith("Traceback (most recent call last):"):
      inside = True
    elif inside and not line.startswith((" ", "\t")):
      inside = False  # the exception's own line ends the block
      continue
    if not inside:
      out.append(line)
  return "".join(out)
