"""Prepare a corpus: text files -> sentencepiece token shards + manifest.json (the command is
tinyllama_jax/prepare.py).

Each input file is tokenized by one worker process into its own shards (`shard_tokens` tokens each,
the file's last one shorter), documents laid out as [BOS] text [EOS]. A document goes to the eval
split when a stable hash of (file name, document number) falls below --eval_fraction. Shards are
LITPKDS files (TinyLlama reads them too) plus a `.docs.npy` index of document starts, so packing can
respect document boundaries. An input's files are written into a hidden staging folder and moved
into shards/ only once the whole input is read, with a `.done.json` record last: a failure or
Ctrl-C leaves no partial files, and re-running skips the finished inputs. At the end the tokenizer
is copied to OUT/tokenizer.model (so the folder is self-contained and can move) and the manifest is
rewritten from the records.

A document longer than _PIECE_CHARS characters is tokenized in pieces cut before a space, so
memory stays bounded whatever its size; its tokens decode to the same text, but may differ from
one encoding of the whole text at the cuts. Each shard's sha256 (and its index's) is recorded in
the manifest: a run's data identity (corpus.shard_records) sees shards rewritten in place. One
prepare writes an output folder at a time (a flock on OUT/.lock).

Exit status: 0 done, 2 bad input, 3 cannot write (full disk), 130 interrupted (Ctrl-C), 128 + N
stopped by signal N (SIGTERM: 143).
"""

import ctypes
import errno
import glob
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys

from absl import logging
import numpy as np

from tinyllama_jax import folder_lock
from tinyllama_jax.data import formats
from tinyllama_jax.data import paths as paths_lib
from tinyllama_jax.data import progress as progress_lib
from tinyllama_jax.data import sources
from tinyllama_jax.data import tokenizer as tokenizer_lib


_ENCODE_BATCH_BYTES = 1 << 20  # documents are encoded in ~1 MB batches (one C++ call each)
_PIECE_CHARS = 1 << 20  # a longer document is encoded in pieces of at most this many characters
TOKENIZER = "tokenizer.model"  # the copy in the output folder that the manifest names
_DONE = ".done.json"


def expand_inputs(patterns: str) -> list[str]:
  paths = paths_lib.expand(patterns, "files", "--input")
  for p in paths:
    formats._suffix(p)  # pylint: disable=protected-access
  return paths


def _input_key(path: str) -> str:
  """A short stable name for an input: its base name + a hash of the full path (names may clash)."""
  base = os.path.basename(path).split(".")[0][:40]
  return f"{base}-{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]}"


def _staging_dir(shards_dir: str, key: str) -> str:
  return os.path.join(shards_dir, f".{key}.partial")


class _ShardWriter:
  """Buffers one split's tokens and writes full shards (tokens .bin + document starts .npy)."""

  def __init__(self, staging_dir, key, split, shard_tokens, dtype):
    self._dir, self._key, self._split = staging_dir, key, split
    self._shard_tokens, self._dtype = shard_tokens, dtype
    # Buffered token runs; a run begins a document, or continues the one before it (the rest of a
    # document cut by the last shard, or the next piece of a long one).
    self._runs, self._begins, self._num_tokens = [], [], 0
    self.shards = []

  def add(self, ids, begins: bool = True):
    self._runs.append(np.asarray(ids, self._dtype))
    self._begins.append(begins)
    self._num_tokens += len(ids)
    while self._num_tokens >= self._shard_tokens:
      self._write(self._shard_tokens)

  def flush(self):
    if self._num_tokens:
      self._write(self._num_tokens)

  def _write(self, n):
    # Cut exactly n tokens; a document straddling the cut continues in the next shard.
    tokens = np.concatenate(self._runs)
    offsets = np.cumsum([0] + [len(r) for r in self._runs[:-1]])
    begins = offsets[np.asarray(self._begins, bool)]
    shard, rest = tokens[:n], tokens[n:]
    name = f"{self._key}.{self._split}.{len(self.shards):05d}.bin"
    path = os.path.join(self._dir, name)
    # The index lists every piece (a cut document's rest at 0 too: packing reads pieces); the
    # record counts the documents that begin here, so a cut document is counted once.
    index = np.union1d(begins[begins < n], [0]).astype(np.int64)
    buf = io.BytesIO()
    np.save(buf, index)
    formats.atomic_write(path + ".docs.npy", lambda f: f.write(buf.getvalue()))
    self.shards.append({"path": f"shards/{name}", "split": self._split, "tokens": int(n),
                        "documents": int((begins < n).sum()),
                        "max_token": int(shard.max()) if n else -1,
                        "sha256": formats.write_litpkds(path, shard),
                        "docs_sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
    self._runs, self._begins = ([rest], [False]) if len(rest) else ([], [])
    self._num_tokens = len(rest)


def _pieces(text: str):
  """`text` in pieces of at most _PIECE_CHARS characters, each cut before a space where there is
  one in the piece's second half."""
  start = 0
  while len(text) - start > _PIECE_CHARS:
    stop, half = start + _PIECE_CHARS, start + _PIECE_CHARS // 2
    cut = text.rfind(" ", half, stop)
    cut = cut if cut > half else stop
    yield text[start:cut]
    start = cut
  yield text[start:]


def prepare_one(path: str, out_dir: str, tokenizer: tokenizer_lib.Tokenizer, options: dict) -> dict:
  """Tokenizes one input into its shards; returns its record (also saved as `<key>.done.json`)."""
  key = _input_key(path)
  shards_dir = os.path.join(out_dir, "shards")
  done_path = os.path.join(shards_dir, key + _DONE)
  if os.path.exists(done_path):
    with open(done_path) as f:
      record = json.load(f)
    if record["options"] == options:
      return dict(record, skipped=True)
  staging = _staging_dir(shards_dir, key)
  shutil.rmtree(staging, ignore_errors=True)  # what a killed run left
  os.makedirs(staging)
  try:
    record = _tokenize(path, staging, key, tokenizer, options)
    formats.atomic_write(os.path.join(staging, key + _DONE),
                         lambda f: json.dump(record, f, indent=1), mode="w")
    _publish(staging, shards_dir, key)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return dict(record, skipped=False)


def _tokenize(path, staging, key, tokenizer, options) -> dict:
  dtype = formats.token_dtype(tokenizer.vocab_size)
  writers = {s: _ShardWriter(staging, key, s, options["shard_tokens"], dtype)
             for s in sources.SPLITS}
  bos = [tokenizer.bos_id] if options["add_bos"] else []
  eos = [tokenizer.eos_id] if options["add_eos"] else []
  stats = formats.ReadStats()
  batch, batch_bytes, doc_index = [], 0, 0
  # Llama's tokenizers start every encoded text with "▁" (a space): a piece of a long document cut
  # before a space is then encoded as it is in context.
  dummy_prefix = tokenizer.id_to_piece(tokenizer.encode("a")[0]).startswith("\u2581")

  def writer(index):
    name = f"{os.path.basename(path)}:{index}"
    return writers["eval" if sources.hash_fraction(name) < options["eval_fraction"] else "train"]

  def encode(batch, doc_index):
    for i, ids in enumerate(tokenizer.encode_batch(batch)):
      writer(doc_index + i).add(bos + ids + eos)

  for text in formats.iter_documents(path, options["text_field"], stats,
                                     text_field_flag="--text_field"):
    if len(text) > _PIECE_CHARS:  # encoded alone, piece by piece: bounded memory
      encode(batch, doc_index)
      doc_index += len(batch)
      batch, batch_bytes = [], 0
      w = writer(doc_index)
      w.add(bos)
      for i, piece in enumerate(_pieces(text)):
        if i and dummy_prefix and piece.startswith(" "):  # the prefix stands for the space
          piece = piece[1:]
        w.add(tokenizer.encode(piece), begins=False)
      w.add(eos, begins=False)
      doc_index += 1
      continue
    batch.append(text)
    batch_bytes += len(text)
    if batch_bytes >= _ENCODE_BATCH_BYTES:
      encode(batch, doc_index)
      doc_index += len(batch)
      batch, batch_bytes = [], 0
  encode(batch, doc_index)
  for w in writers.values():
    w.flush()
  return {"input": os.path.abspath(path), "input_bytes": os.path.getsize(path),
          "options": options, "stats": stats.__dict__,
          "shards": writers["train"].shards + writers["eval"].shards}


def _publish(staging, shards_dir, key):
  """Moves a finished input's files into shards/, its .done.json last (a crash before that leaves
  an input a rerun redoes), removing files of an earlier preparation that the new one does not
  have (other options, e.g. more shards). An earlier .done.json goes first: a publish cut short
  must not leave it vouching for files half replaced."""
  names = os.listdir(staging)
  done = os.path.join(shards_dir, key + _DONE)
  if os.path.exists(done):
    os.unlink(done)
  for old in glob.glob(os.path.join(glob.escape(shards_dir), glob.escape(key) + ".*")):
    if os.path.basename(old) not in names:
      os.unlink(old)
  for name in sorted(names, key=lambda n: n.endswith(_DONE)):
    os.replace(os.path.join(staging, name), os.path.join(shards_dir, name))


_worker_state = {}


def _init_worker(tokenizer, out_dir, options):
  _die_with_parent()
  _worker_state.update(tokenizer=tokenizer, out_dir=out_dir, options=options)


def _die_with_parent():
  """A worker whose parent is gone (kill -9) gets SIGTERM from the kernel, rather than tokenizing
  and publishing on for no one (Linux; elsewhere a no-op)."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


class Interrupted(KeyboardInterrupt):
  """SIGTERM (a scheduler's stop, `kill`) as the clean stop Ctrl-C is: workers stopped, partial
  files removed, one line."""

  def __init__(self, signum):
    super().__init__(signum)
    self.signum = signum


def stop_on_sigterm():
  """From here on, SIGTERM raises Interrupted in the main thread."""
  def handle(signum, frame):
    del frame
    raise Interrupted(signum)
  signal.signal(signal.SIGTERM, handle)


def out_lock(out_dir):
  """One prepare per output folder (folder_lock.FolderLock on OUT/.lock): two prepares into one
  folder would remove each other's staging folders."""
  return folder_lock.FolderLock(
      out_dir, "prepare", lambda holder, path: f"--out={out_dir} is being written by {holder} "
      f"(lock {path}): wait for it to end, or choose another --out")


def _work(path):
  s = _worker_state
  return prepare_one(path, s["out_dir"], s["tokenizer"], s["options"])


def _start_pool(num_workers, initargs):
  # Ctrl-C sends SIGINT to the whole process group: the workers ignore it (a spawned child keeps an
  # ignored SIGINT), so only the parent sees it; it stops them and removes their partial files.
  ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
  handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    return ctx.Pool(num_workers, _init_worker, initargs)
  finally:
    signal.signal(signal.SIGINT, handler)


def _check_options(eval_fraction, shard_tokens, num_workers):
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"--eval_fraction={eval_fraction} must be in [0, 1): the share of documents "
                     "held out for eval (0 = no eval split)")
  if shard_tokens < 1:
    raise ValueError(f"--shard_tokens={shard_tokens} must be positive")
  if num_workers < 0:
    raise ValueError(f"--num_workers={num_workers} must be >= 0 (0 or 1: tokenize in this process)")


def _check_name_lengths(out_dir: str):
  """Before any folder is made: a name too long half-way down would leave the ones above it."""
  existing = os.path.abspath(out_dir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  limit = os.pathconf(existing, "PC_NAME_MAX")
  longest = max(len(n.encode()) for n in os.path.abspath(out_dir).split(os.sep))
  if longest > limit:
    raise ValueError(f"--out={out_dir}: a name in that path is too long for the file system "
                     f"({longest} bytes, at most {limit}): choose a shorter --out")


def _make_out_dirs(out_dir: str) -> list[str]:
  """Creates OUT/shards; returns the folders it made, outermost first (removed on failure)."""
  _check_name_lengths(out_dir)
  made = []
  for d in (out_dir, os.path.join(out_dir, "shards")):
    if not os.path.isdir(d):
      try:
        os.makedirs(d)
      except (FileExistsError, NotADirectoryError):
        raise ValueError(f"--out={out_dir} is not a folder (a file is in the way): choose another "
                         "--out") from None
      made.append(d)
  return made


def prepare(inputs: list[str], tokenizer: tokenizer_lib.Tokenizer, out_dir: str, *,
            text_field="text", add_bos=True, add_eos=True, eval_fraction=0.001,
            shard_tokens=2049 * 1024, num_workers=1, progress=True) -> dict:
  """Prepares `inputs` into `out_dir`; returns the manifest (also written to out_dir)."""
  _check_options(eval_fraction, shard_tokens, num_workers)
  options = {"text_field": text_field, "add_bos": add_bos, "add_eos": add_eos,
             "eval_fraction": eval_fraction, "shard_tokens": shard_tokens,
             "tokenizer_sha256": tokenizer.sha256}
  made = _make_out_dirs(out_dir)
  lock = None
  try:
    lock = out_lock(out_dir)
    records = _prepare_inputs(inputs, tokenizer, out_dir, options, num_workers, progress)
    _copy_tokenizer(tokenizer, os.path.join(out_dir, TOKENIZER))
    manifest = _manifest(records, tokenizer, options)
    formats.atomic_write(os.path.join(out_dir, formats.MANIFEST),
                         lambda f: json.dump(manifest, f, indent=1), mode="w")
  except BaseException:
    if lock is not None:
      lock.release(remove=out_dir in made)
    for d in reversed(made):  # only while still empty: never another run's files
      try:
        os.rmdir(d)
      except OSError:
        pass
    raise
  lock.release()
  _warn_about(manifest["totals"], out_dir, eval_fraction)
  logging.info("prepared %d inputs (%d already done) into %s: %s", len(records),
               sum(r["skipped"] for r in records), out_dir, manifest["totals"])
  return manifest


def _warn_about(totals, out_dir, eval_fraction):
  skipped = {k: v for k, v in totals.items() if k.startswith("skipped_") and v}
  if skipped:
    logging.warning("left out documents that are empty, not UTF-8 or not a string: %s (counted in "
                    "%s's totals)", skipped, formats.MANIFEST)
  if not totals["train_tokens"]:
    logging.warning("%s has no training tokens (its inputs held no documents, or every one went "
                    "to eval): a training run on it is refused at start; prepare it from inputs "
                    "with text", out_dir)
  elif not totals["eval_documents"]:  # allowed (data only ever scored whole), but not for training
    logging.warning("%s has no eval split (--eval_fraction=%s held out no document): a training "
                    "run on it is refused at start unless it passes "
                    "--config.train.eval_every=0; prepare with a larger --eval_fraction unless it "
                    "is only evaluated whole (evaluate --split=train)", out_dir, eval_fraction)


def _prepare_inputs(inputs, tokenizer, out_dir, options, num_workers, progress) -> list[dict]:
  """Every input's record, sorted by input; on any failure no input is left half written."""
  bar = (progress_lib.Progress(sum(os.path.getsize(p) for p in inputs), len(inputs)) if progress
         else None)
  pool, records = None, []
  if num_workers > 1 and len(inputs) > 1:
    pool = _start_pool(min(num_workers, len(inputs)), (tokenizer, out_dir, options))
    results = pool.imap_unordered(_work, inputs)
  else:
    results = (prepare_one(p, out_dir, tokenizer, options) for p in inputs)
  try:
    for record in results:
      records.append(record)
      if bar is not None:
        bar.update(record)
  except BaseException:
    _stop(pool)  # a stopped worker cannot remove its own files: do it here
    _remove_unfinished(inputs, os.path.join(out_dir, "shards"))
    raise
  finally:
    _stop(pool)
    if bar is not None:
      bar.close()
  return sorted(records, key=lambda r: r["input"])


def _remove_unfinished(inputs, shards_dir):
  """Removes the staging folders of stopped workers, and what a worker stopped in the middle of
  publishing moved into shards/ (files of an input with no .done.json)."""
  for p in inputs:
    key = _input_key(p)
    shutil.rmtree(_staging_dir(shards_dir, key), ignore_errors=True)
    if not os.path.exists(os.path.join(shards_dir, key + _DONE)):
      for old in glob.glob(os.path.join(glob.escape(shards_dir), glob.escape(key) + ".*")):
        os.unlink(old)


def _stop(pool):
  if pool is not None:  # terminate + join again is a no-op
    pool.terminate()
    pool.join()


def _copy_tokenizer(tokenizer, path):
  with open(tokenizer.path, "rb") as f:
    proto = f.read()
  if hashlib.sha256(proto).hexdigest() != tokenizer.sha256:
    raise ValueError(f"--tokenizer={tokenizer.path} changed while prepare ran: rerun with the "
                     "tokenizer you mean")
  formats.atomic_write(path, lambda f: f.write(proto))


def _manifest(records, tokenizer, options):
  totals = {"inputs": len(records), "input_bytes": sum(r["input_bytes"] for r in records)}
  for k in formats.ReadStats().__dict__:  # records written before a counter existed lack it
    totals[k] = sum(r["stats"].get(k, 0) for r in records)
  shards = [s for r in records for s in r["shards"]]
  for split in sources.SPLITS:
    totals[f"{split}_tokens"] = sum(s["tokens"] for s in shards if s["split"] == split)
    totals[f"{split}_documents"] = sum(s["documents"] for s in shards if s["split"] == split)
  return {"format": formats.MANIFEST_FORMAT,
          "tokenizer": {"path": TOKENIZER, "copied_from": os.path.abspath(tokenizer.path),
                        "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
          "options": options, "totals": totals, "shards": shards,
          "inputs": [{k: r[k] for k in ("input", "input_bytes", "stats")} for r in records]}


def failure(error: BaseException, out_dir: str) -> tuple[str, int] | None:
  """(one line for stderr, exit status) for an error prepare stops on; None for a bug."""
  if isinstance(error, Interrupted):
    name = signal.Signals(error.signum).name
    return (f"stopped by {name}; rerun the same command to continue (finished inputs are kept)",
            128 + error.signum)
  if isinstance(error, KeyboardInterrupt):
    return "interrupted; rerun the same command to continue (finished inputs are kept)", 130
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    return (f"error: no space left on the device of --out={out_dir}: free space, then rerun the "
            "same command to continue (finished inputs are kept)", 3)
  if isinstance(error, OSError) and error.errno == errno.ENAMETOOLONG:
    return (f"error: --out={out_dir}: a name in that path is too long for the file system "
            f"({error.filename}): choose a shorter --out", 2)
  if isinstance(error, (ValueError, ImportError, OSError)):
    return f"error: {' '.join(str(error).split())}", 2
  return None


if __name__ == "__main__":  # the old spelling of the command, which lives above this layer
  print("error: the prepare command is `python -m tinyllama_jax.prepare` (the same flags); "
        "tinyllama_jax.data.prepare is its library", file=sys.stderr)
  sys.exit(2)
