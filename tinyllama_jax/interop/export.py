"""Hugging Face / PyTorch interop: export a run's checkpoint (the command is
tinyllama_jax/export.py; hf.py holds the name and layout mapping, hf_import.py the import), and
the output folders both write through.

Export writes a directory that `AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` load offline; its model*.safetensors hold a plain PyTorch
state dict with HF names, so `safetensors.torch.load_file` is all a user without transformers
needs. Parameters are read from the orbax checkpoint one at a time onto the host, converted and
streamed into the safetensors files: a model sharded over many devices is never gathered whole.

Export and import write into a temporary sibling directory and rename it at the end: a failure
leaves nothing (exit status 2 for bad input, 3 when writing fails, e.g. on a full disk). The
output's modes are the umask's, as any file the user writes.
"""

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time

import ml_dtypes
import numpy as np
from absl import logging

from tinyllama_jax.checkpoint import run as run_lib
from tinyllama_jax.data import chat
from tinyllama_jax.data import formats
from tinyllama_jax.interop import hf

# ----------------------------------------------------------------------------- output dirs


@contextlib.contextmanager
def staged_output_dir(path, what):
  """Yields a temporary sibling of `path` to write into and renames it to `path` when the block
  ends; on any exception (an Interrupted too, wherever it lands) the folder is removed. Its name
  is chosen before it exists, inside the cleanup's reach: no moment leaves it behind. `path`
  must be absent or an empty directory."""
  path = os.path.abspath(path)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ValueError(f"{what} {path} already exists and is not empty: remove it or choose another")
  parent = os.path.dirname(path)
  tmp = os.path.join(parent, f"{_tmp_prefix(path)}{_HOST}.{os.getpid()}-{secrets.token_hex(4)}")
  try:
    try:
      os.makedirs(parent, exist_ok=True)
      remove_stale_output_dirs(path)
      os.mkdir(tmp)  # the umask's mode: the output is for a serving account or a colleague too
    except OSError as e:
      raise ValueError(f"{what} {path} cannot be created ({e.strerror}): choose a writable "
                       "place") from None
    yield tmp
    commit_output_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


_HOST = socket.gethostname().replace("/", "_")


def _tmp_prefix(path):
  return f".{os.path.basename(path)}.tmp-"


def remove_stale_output_dirs(path):
  """Removes the temporary siblings of `path` left by writers that died without cleaning up
  (kill -9, a lost node): each is named `.NAME.tmp-HOST.PID-XXXX`, and one of this host whose
  PID no longer runs is stale. Another host's, or a live writer's, are left alone. Earlier
  versions named them `.NAME.tmp-XXXXXXXX` (mkdtemp's 8 characters, no host or PID): one untouched
  for a day is stale; a younger one may be such a version's live writer, and is left alone."""
  parent, prefix = os.path.dirname(path), _tmp_prefix(path)
  removed, young = [], []
  for name in sorted(os.listdir(parent)):
    if not name.startswith(prefix):
      continue
    folder, rest = os.path.join(parent, name), name[len(prefix):]
    if _EARLIER_VERSIONS_SUFFIX.fullmatch(rest):
      try:
        idle_s = time.time() - _last_change(folder)
      except OSError:  # gone meanwhile (another run removed it), or not ours to read
        continue
      if idle_s < _EARLIER_VERSIONS_STALE_S:
        young.append(name)
        continue
      shutil.rmtree(folder, ignore_errors=True)
      logging.warning("removed %s: the temporary folder of an earlier version's writer, "
                      "unchanged for %.1f days", folder, idle_s / 86400)
      continue
    host, _, rest = rest.rpartition(".")
    pid = rest.split("-", 1)[0]
    if host == _HOST and pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(folder, ignore_errors=True)
      removed.append(name)
  if removed:
    logging.warning("removed %d temporary folder(s) of writers that died on this host: %s",
                    len(removed), ", ".join(removed))
  if young:
    logging.warning("left %d temporary folder(s) of an earlier version's writer in %s alone: "
                    "changed within a day, their writer may still run (%s); a later run removes "
                    "them once a day old", len(young), parent, ", ".join(young))


# tempfile.mkdtemp's random part, all an earlier version put after `.NAME.tmp-`.
_EARLIER_VERSIONS_SUFFIX = re.compile(r"[a-z0-9_]{8}")
_EARLIER_VERSIONS_STALE_S = 86400


def _last_change(folder):
  """The newest mtime in `folder` (itself included): a writer appending to a file inside leaves
  the folder's own mtime as it was."""
  newest = os.lstat(folder).st_mtime
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      with contextlib.suppress(OSError):
        newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
  return newest


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


class Interrupted(BaseException):
  """SIGTERM or SIGINT while writing: the temporary folder is removed on the way out. A
  BaseException, as KeyboardInterrupt: no `except Exception` on the way turns it into a fault."""

  def __init__(self, signum):
    self.signum = signum
    super().__init__(f"stopped by {signal.Signals(signum).name}; nothing was written (the "
                     "temporary folder is removed): rerun the same command to write it")


@contextlib.contextmanager
def signals_raise_interrupted():
  """SIGTERM and SIGINT raise Interrupted in the main thread, so the writer's cleanup runs and
  the command prints one line; a second signal, during that cleanup, ends the process at once
  (what it leaves, remove_stale_output_dirs removes on the next run)."""
  stop = (signal.SIGTERM, signal.SIGINT)

  def handler(signum, frame):
    del frame
    for s in stop:
      signal.signal(s, signal.SIG_DFL)
    _signalled.append(signum)
    raise Interrupted(signum)
  def unraisable(u):  # the dropped Interrupted is raised again at the commit: no traceback
    if not isinstance(u.exc_value, Interrupted):
      previous_hook(u)
  previous = {s: signal.signal(s, handler) for s in stop}
  previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
  try:
    yield
  finally:
    _signalled.clear()
    sys.unraisablehook = previous_hook
    for s, h in previous.items():
      signal.signal(s, h)


# A signal whose Interrupted was raised where Python drops exceptions (a gc callback: jax's runs
# on every collection) would let the writer finish; commit_output_dir raises it again.
_signalled = []


def commit_output_dir(tmp, path):
  if _signalled:
    raise Interrupted(_signalled[-1])
  path = os.path.abspath(path)
  if os.path.isdir(path):
    os.rmdir(path)  # empty (checked up front)
  os.rename(tmp, path)


# ----------------------------------------------------------------------------- export

_EXPORT_DTYPES = {"bf16": ("bfloat16", np.dtype(ml_dtypes.bfloat16)),
                  "fp32": ("float32", np.dtype(np.float32))}


class WriteError(RuntimeError):
  """Writing the output failed (a full disk, an I/O error): a fault, exit status 3."""


def export(workdir, out, *, step=None, dtype="bf16", max_shard_size="5GB", tokenizer=None,
           allow_other_tokenizer=False):
  """Writes the HF directory `out` from the run in `workdir`; returns a small report dict.
  `tokenizer`: a sentencepiece .model to use instead of the run's own (run.load_tokenizer, which
  refuses one the run did not train with unless `allow_other_tokenizer`)."""
  if dtype not in _EXPORT_DTYPES:
    raise ValueError(f"--dtype={dtype!r}: choose bf16 or fp32")
  max_bytes = hf.parse_size(max_shard_size)
  step, cfg, tok = run_lib.open_run(workdir, step, tokenizer=tokenizer,
                                    allow_other_tokenizer=allow_other_tokenizer)
  tok_path = tok.path if tok else None
  dtype_name, np_dtype = _EXPORT_DTYPES[dtype]
  plan = hf.plan_shards(hf.hf_shapes(cfg.model), np_dtype, max_bytes)
  t0 = time.perf_counter()
  try:
    with staged_output_dir(out, "--out") as tmp:
      _write_export(tmp, workdir, step, cfg, tok_path, plan, dtype_name, np_dtype)
  except OSError as e:
    raise _write_error(out, e, plan, np_dtype) from e
  report = {"step": step, "out": os.path.abspath(out), "files": [f for f, _ in plan],
            "dtype": dtype_name, "seconds": round(time.perf_counter() - t0, 2)}
  logging.info("exported step %d of %s to %s", step, workdir, report)
  return report


def _write_export(tmp, workdir, step, cfg, tok_path, plan, dtype_name, np_dtype):
  bos_id, eos_id = 1, 2  # Llama-2's, which our tokenizers keep
  if tok_path is not None:
    bos_id, eos_id = hf.write_tokenizer(tmp, tok_path, add_bos=cfg.data.add_bos, add_eos=False,
                                        max_len=cfg.model.max_seq_len, log=logging.warning,
                                        extra=chat_tokenizer_config(cfg))
  else:
    logging.warning("the run has no tokenizer (data.source=%r): exporting the weights only",
                    cfg.data.source)
  hf_cfg = hf.hf_config(cfg.model, bos_id=bos_id, eos_id=eos_id, dtype_name=dtype_name)
  formats.write_json_atomic(os.path.join(tmp, "config.json"), hf_cfg)
  # No max_length: transformers warns when it meets max_new_tokens, the usual argument.
  formats.write_json_atomic(os.path.join(tmp, "generation_config.json"),
                            {"bos_token_id": bos_id, "eos_token_id": eos_id})
  writer = hf.ShardWriter(tmp, plan, np_dtype)
  try:
    for path, x in run_lib.iter_params(workdir, step, cfg.model):
      logging.info("writing %s %s", "/".join(path), x.shape)
      for name, w in hf.to_hf(path, x):
        writer.write(name, w)
  finally:
    writer.close()
  writer.check_complete()
  if len(plan) > 1:
    hf.write_index(tmp, plan, np_dtype)


def chat_tokenizer_config(cfg):
  """A chat run's keys for tokenizer_config.json: its template, and '</s>' written by the template
  read as EOS (split_special_tokens off), as the run's chat data was tokenized (data/chat.py);
  so `apply_chat_template(..., tokenize=True)` gives the run's own ids. A run with a template of
  its own (an import's) keeps it too. None for other runs."""
  if cfg.data.get("source") != "chat" and not cfg.data.get("chat_template"):
    return None
  return {"chat_template": cfg.data.get("chat_template") or chat.ZEPHYR_TEMPLATE,
          "split_special_tokens": False}


def _write_error(out, error, plan, np_dtype):
  """One line: what failed, the room there is and the room the export needs."""
  out = os.path.abspath(out)
  need = sum(int(np.prod(shape)) for _, tensors in plan for _, shape in tensors) * np_dtype.itemsize
  free = shutil.disk_usage(os.path.dirname(out)).free
  reason = error.strerror or str(error)
  return WriteError(f"could not write the export to {out} ({reason.lower()}; {_gib(free)} free "
                    f"there, the weights take {_gib(need)}): free disk space or choose another "
                    "--out; nothing was written")


def _gib(n):
  return f"{n / 2**30:.2f} GiB"
