"""Prepare a corpus: text files -> sentencepiece token shards + manifest.json.

  python -m tinyllama_jax.data.prepare --input='/data/slimpajama/train/*/*.jsonl.zst' \
      --tokenizer=tokenizer.model --out=/data/slim_prepared

Each input file is tokenized by one worker process into its own shards (`shard_tokens` tokens each,
the file's last one shorter), documents laid out as [BOS] text [EOS]. A document goes to the eval
split when a stable hash of (file name, document number) falls below --eval_fraction. Shards are
LITPKDS files (TinyLlama reads them too) plus a `.docs.npy` index of document starts, so packing can
respect document boundaries. A finished input leaves a `.done.json`; re-running skips it, and the
manifest is rewritten from those records at the end.
"""

import glob
import hashlib
import json
import multiprocessing
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from tinyllama_jax.data import formats
from tinyllama_jax.data import sources
from tinyllama_jax.data import tokenizer as tokenizer_lib


_ENCODE_BATCH_BYTES = 1 << 20  # documents are encoded in ~1 MB batches (one C++ call each)


def expand_inputs(patterns: str) -> list[str]:
  paths = sorted({p for pat in patterns.split(",") if pat.strip()
                  for p in glob.glob(os.path.expanduser(pat.strip()), recursive=True)
                  if os.path.isfile(p)})
  if not paths:
    raise FileNotFoundError(f"--input={patterns!r} matches no files: check the glob (quote it so "
                            "the shell does not expand it)")
  for p in paths:
    formats._suffix(p)  # pylint: disable=protected-access
  return paths


def _input_key(path: str) -> str:
  """A short stable name for an input: its base name + a hash of the full path (names may clash)."""
  base = os.path.basename(path).split(".")[0][:40]
  return f"{base}-{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]}"


class _ShardWriter:
  """Buffers one split's documents and writes full shards (tokens .bin + document starts .npy)."""

  def __init__(self, out_dir, key, split, shard_tokens, dtype):
    self._out, self._key, self._split = out_dir, key, split
    self._shard_tokens, self._dtype = shard_tokens, dtype
    self._docs, self._num_tokens = [], 0
    self.shards = []

  def add(self, ids: list[int]):
    self._docs.append(np.asarray(ids, self._dtype))
    self._num_tokens += len(ids)
    while self._num_tokens >= self._shard_tokens:
      self._write(self._shard_tokens)

  def flush(self):
    if self._num_tokens:
      self._write(self._num_tokens)

  def _write(self, n):
    # Cut exactly n tokens; a document straddling the cut continues in the next shard.
    tokens = np.concatenate(self._docs)
    starts = np.cumsum([0] + [len(d) for d in self._docs[:-1]])
    shard, rest = tokens[:n], tokens[n:]
    name = f"{self._key}.{self._split}.{len(self.shards):05d}"
    path = os.path.join(self._out, name + ".bin")
    formats.atomic_write(path + ".docs.npy",
                         lambda f: np.save(f, starts[starts < n].astype(np.int64)))
    formats.write_litpkds(path, shard)
    self.shards.append({"path": os.path.relpath(path, os.path.dirname(self._out)),
                        "split": self._split, "tokens": int(n),
                        "documents": int((starts < n).sum()),
                        "max_token": int(shard.max()) if n else -1})
    self._docs = [rest] if len(rest) else []
    self._num_tokens = len(rest)


def prepare_one(path: str, out_dir: str, tokenizer: tokenizer_lib.Tokenizer, options: dict) -> dict:
  """Tokenizes one input into its shards; returns its record (also saved as `<key>.done.json`)."""
  key = _input_key(path)
  done_path = os.path.join(out_dir, "shards", key + ".done.json")
  if os.path.exists(done_path):
    with open(done_path) as f:
      record = json.load(f)
    if record["options"] == options:
      return dict(record, skipped=True)
  dtype = formats.token_dtype(tokenizer.vocab_size)
  writers = {s: _ShardWriter(os.path.join(out_dir, "shards"), key, s, options["shard_tokens"],
                             dtype) for s in sources.SPLITS}
  bos = [tokenizer.bos_id] if options["add_bos"] else []
  eos = [tokenizer.eos_id] if options["add_eos"] else []
  stats = formats.ReadStats()
  batch, batch_bytes, doc_index = [], 0, 0

  def encode(batch, doc_index):
    for i, ids in enumerate(tokenizer.encode_batch(batch)):
      name = f"{os.path.basename(path)}:{doc_index + i}"
      split = "eval" if sources.hash_fraction(name) < options["eval_fraction"] else "train"
      writers[split].add(bos + ids + eos)

  for text in formats.iter_documents(path, options["text_field"], stats):
    batch.append(text)
    batch_bytes += len(text)
    if batch_bytes >= _ENCODE_BATCH_BYTES:
      encode(batch, doc_index)
      doc_index += len(batch)
      batch, batch_bytes = [], 0
  encode(batch, doc_index)
  for w in writers.values():
    w.flush()
  record = {"input": os.path.abspath(path), "input_bytes": os.path.getsize(path),
            "options": options, "stats": stats.__dict__,
            "shards": writers["train"].shards + writers["eval"].shards}
  formats.atomic_write(done_path, lambda f: json.dump(record, f, indent=1), mode="w")
  return dict(record, skipped=False)


_worker_state = {}


def _init_worker(tokenizer, out_dir, options):
  _worker_state.update(tokenizer=tokenizer, out_dir=out_dir, options=options)


def _work(path):
  s = _worker_state
  return prepare_one(path, s["out_dir"], s["tokenizer"], s["options"])


def prepare(inputs: list[str], tokenizer: tokenizer_lib.Tokenizer, out_dir: str, *,
            text_field="text", add_bos=True, add_eos=True, eval_fraction=0.001,
            shard_tokens=2049 * 1024, num_workers=1, progress=True) -> dict:
  """Prepares `inputs` into `out_dir`; returns the manifest (also written to out_dir)."""
  if shard_tokens < 1:
    raise ValueError(f"shard_tokens={shard_tokens} must be positive")
  os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
  options = {"text_field": text_field, "add_bos": add_bos, "add_eos": add_eos,
             "eval_fraction": eval_fraction, "shard_tokens": shard_tokens,
             "tokenizer_sha256": tokenizer.sha256}
  total_bytes = sum(os.path.getsize(p) for p in inputs)
  records, done_bytes, start = [], 0, time.time()
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", file=sys.stderr)
  if num_workers > 1 and len(inputs) > 1:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    pool = ctx.Pool(min(num_workers, len(inputs)), _init_worker, (tokenizer, out_dir, options))
    results = pool.imap_unordered(_work, inputs)
  else:
    pool = None
    results = (prepare_one(p, out_dir, tokenizer, options) for p in inputs)
  try:
    for record in results:
      records.append(record)
      done_bytes += record["input_bytes"]
      if bar is not None:
        docs = sum(r["stats"]["documents"] for r in records if not r["skipped"])
        elapsed = max(time.time() - start, 1e-9)
        bar.set_postfix(docs_per_s=f"{docs / elapsed:.0f}", refresh=False)
        bar.update(record["input_bytes"])
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
    if bar is not None:
      bar.close()
  records.sort(key=lambda r: r["input"])
  manifest = _manifest(records, tokenizer, options)
  formats.atomic_write(os.path.join(out_dir, formats.MANIFEST),
                       lambda f: json.dump(manifest, f, indent=1), mode="w")
  skipped = sum(r["skipped"] for r in records)
  logging.info("prepared %d inputs (%d already done) into %s: %s", len(records), skipped, out_dir,
               manifest["totals"])
  return manifest


def _manifest(records, tokenizer, options):
  totals = {"inputs": len(records), "input_bytes": sum(r["input_bytes"] for r in records)}
  for k in formats.ReadStats().__dict__:
    totals[k] = sum(r["stats"][k] for r in records)
  shards = [s for r in records for s in r["shards"]]
  for split in sources.SPLITS:
    totals[f"{split}_tokens"] = sum(s["tokens"] for s in shards if s["split"] == split)
    totals[f"{split}_documents"] = sum(s["documents"] for s in shards if s["split"] == split)
  return {"format": formats.MANIFEST_FORMAT,
          "tokenizer": {"path": os.path.abspath(tokenizer.path), "sha256": tokenizer.sha256,
                        "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                        "eos_id": tokenizer.eos_id},
          "options": options, "totals": totals, "shards": shards,
          "inputs": [{k: r[k] for k in ("input", "input_bytes", "stats")} for r in records]}


def _define_flags():
  """CLI flags, defined only when run as a program (importing this module defines none)."""
  flags.DEFINE_string("input", None, "glob(s) of .txt/.jsonl/.jsonl.zst/.parquet files, comma "
                      "separated")
  flags.DEFINE_string("tokenizer", None, "sentencepiece .model file")
  flags.DEFINE_string("out", None, "output folder (shards/ + manifest.json)")
  flags.DEFINE_string("text_field", "text", ".jsonl key / .parquet column holding the text")
  flags.DEFINE_bool("add_bos", True, "start each document with BOS")
  flags.DEFINE_bool("add_eos", True, "end each document with EOS")
  flags.DEFINE_float("eval_fraction", 0.001, "share of documents held out for eval")
  flags.DEFINE_integer("shard_tokens", 2049 * 1024, "tokens per shard (TinyLlama's chunk)")
  flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "tokenizer processes")


def main(argv):
  del argv
  f = flags.FLAGS
  for name in ("input", "tokenizer", "out"):
    if not f[name].value:
      raise app.UsageError(f"--{name} is required")
  try:
    tokenizer = tokenizer_lib.Tokenizer(f.tokenizer)
    inputs = expand_inputs(f.input)
    manifest = prepare(inputs, tokenizer, f.out, text_field=f.text_field, add_bos=f.add_bos,
                       add_eos=f.add_eos, eval_fraction=f.eval_fraction,
                       shard_tokens=f.shard_tokens, num_workers=f.num_workers)
  except (FileNotFoundError, ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(manifest["totals"], indent=1))


if __name__ == "__main__":
  _define_flags()
  from tinyllama_jax import config as config_lib
  config_lib.exit_on_error(lambda: config_lib.check_flags(sys.argv))
  app.run(main)
