"""Tokenized corpora on disk as grain random-access sources: prepared shards and LITPKDS files.

A TokenStore is the concatenated token stream of a list of shard files (memmapped lazily, so it
pickles cheaply into grain workers). RowSource serves fixed (seq_len + 1)-token rows of that stream
(TinyLlama's concat-then-split, with an exact global shuffle over rows); DocumentSource serves
whole documents (for first/best-fit packing), found through each prepared shard's .docs.npy.
Process p of P serves rows/documents p, p+P, ...: disjoint, and together complete.
"""

import bisect
import glob
import json
import os

from absl import logging
import numpy as np

from tinyllama_jax.data import formats


def load_manifest(path: str) -> tuple[dict, str]:
  """(manifest, its folder) from a manifest.json or the folder holding one."""
  if os.path.isdir(path):
    path = os.path.join(path, formats.MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no prepared manifest at {path}: run python -m "
                            "tinyllama_jax.prepare first, or point data.paths at its --out")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != formats.MANIFEST_FORMAT:
    raise ValueError(f"{path} is not a {formats.MANIFEST_FORMAT} manifest")
  return manifest, os.path.dirname(os.path.abspath(path))


def manifest_tokenizer_path(manifest: dict, data_dir: str) -> str:
  """The tokenizer file a prepared dataset was made with: its own copy, DATA/tokenizer.model (the
  manifest records it relative to DATA, so the folder can move). Manifests written before prepare
  kept a copy record an absolute path, which is used as it is."""
  path = os.path.join(data_dir, manifest["tokenizer"]["path"])
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"the tokenizer of the prepared data {data_dir} is missing ({path}): re-run prepare into "
        f"it with the tokenizer it was made with (sha256 {manifest['tokenizer']['sha256'][:12]}), "
        "or pass that .model file as --config.data.tokenizer")
  return path


def check_tokenizer(manifest: dict, where: str, tokenizer):
  want = manifest["tokenizer"]["sha256"]
  if tokenizer is not None and tokenizer.sha256 != want:
    raise ValueError(f"{where} was prepared with tokenizer {manifest['tokenizer']['path']} "
                     f"(sha256 {want[:12]}), not {tokenizer.path} (sha256 {tokenizer.sha256[:12]}): "
                     "use the same tokenizer, or prepare the data again")


def prepared_shards(paths: str, split: str) -> list[str]:
  """Shard files of `split` from every manifest named in `paths` (comma separated)."""
  shards = []
  for p in expand(paths, "prepared manifest"):
    manifest, root = load_manifest(p)
    shards += [os.path.join(root, s["path"]) for s in manifest["shards"] if s["split"] == split]
  if not shards:
    raise ValueError(f"the prepared data {paths!r} has no {split!r} shards: prepare with "
                     "--eval_fraction > 0 for an eval split")
  return shards



def expand(paths: str, what: str) -> list[str]:
  found = sorted({f for pat in paths.split(",") if pat.strip()
                  for f in glob.glob(os.path.expanduser(pat.strip()), recursive=True)})
  if not found:
    raise FileNotFoundError(f"data.paths={paths!r} matches no {what}: check the path or glob")
  return found


class TokenStore:
  """The concatenation of shard files' tokens. `trim_token`: strip a trailing run of that token from
  each file (TinyLlama padded each writer's last chunk with BOS; those tokens must never train)."""

  def __init__(self, paths: list[str], trim_token: int | None = None):
    self.paths = list(paths)
    counts, trimmed = [], 0
    for p in self.paths:
      tokens = formats.read_litpkds(p)
      n = len(tokens)
      if trim_token is not None:
        while n and tokens[n - 1] == trim_token:
          n -= 1
        trimmed += len(tokens) - n
      counts.append(n)
    if trimmed:
      logging.info("left out %d trailing padding tokens (id %d) of %d LITPKDS files", trimmed,
                   trim_token, len(self.paths))
    self.counts = np.asarray(counts, np.int64)
    self.starts = np.concatenate([[0], np.cumsum(self.counts)])
    self.num_tokens = int(self.starts[-1])
    self._open = {}

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_open"}

  def __setstate__(self, state):
    self.__dict__.update(state, _open={})

  def file_tokens(self, i: int) -> np.ndarray:
    if i not in self._open:
      self._open[i] = formats.read_litpkds(self.paths[i])[:self.counts[i]]
    return self._open[i]

  def slice(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the stream as int32, crossing file boundaries as needed."""
    parts = []
    i = bisect.bisect_right(self.starts, start) - 1
    while start < stop:
      lo, hi = start - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
      parts.append(self.file_tokens(i)[lo:hi])
      start = self.starts[i] + hi
      i += 1
    return np.concatenate(parts).astype(np.int32) if len(parts) > 1 else parts[0].astype(np.int32)


class RowSource:
  """Row r = stream tokens [r*L, (r+1)*L) for this process's rows p, p+P, ...; the stream's tail
  shorter than a row is left out (logged): at most L - 1 tokens."""

  def __init__(self, store: TokenStore, row_len: int, process_index: int, process_count: int):
    self._store, self._row_len = store, row_len
    total_rows = store.num_tokens // row_len
    if total_rows < process_count:
      raise ValueError(f"{store.num_tokens} tokens make {total_rows} rows of {row_len}, fewer than "
                       f"the {process_count} processes: add data or shorten the sequence")
    self._p, self._num_p = process_index, process_count
    self._len = (total_rows - process_index + process_count - 1) // process_count
    logging.log_first_n(logging.INFO, "%d rows of %d tokens (%d tail tokens left out each epoch)",
                        1, total_rows, row_len, store.num_tokens - total_rows * row_len)

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    r = self._p + i * self._num_p
    return {"tokens": self._store.slice(r * self._row_len, (r + 1) * self._row_len)}


class DocumentSource:
  """Document d (of this process's p, p+P, ...) = its tokens, from the shards' .docs.npy starts.
  A document that a shard boundary cut shows up as two documents."""

  def __init__(self, store: TokenStore, process_index: int, process_count: int):
    self._store = store
    self._doc_counts = []
    for p in store.paths:
      index = p + ".docs.npy"
      if not os.path.exists(index):
        raise ValueError(f"{p} has no document index ({index}): use packing='concat' for LITPKDS "
                         "files, or prepare the data with tinyllama_jax.prepare")
      self._doc_counts.append(len(np.load(index, mmap_mode="r")))
    self._doc_starts = np.concatenate([[0], np.cumsum(self._doc_counts)])
    total = int(self._doc_starts[-1])
    if total < process_count:
      raise ValueError(f"{total} documents, fewer than the {process_count} processes")
    self._p, self._num_p = process_index, process_count
    self._len = (total - process_index + process_count - 1) // process_count
    self._index = {}

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_index"}

  def __setstate__(self, state):
    self.__dict__.update(state, _index={})

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    d = self._p + i * self._num_p
    f = bisect.bisect_right(self._doc_starts, d) - 1
    if f not in self._index:
      self._index[f] = np.load(self._store.paths[f] + ".docs.npy", mmap_mode="r")
    starts, k = self._index[f], d - self._doc_starts[f]
    lo = int(starts[k])
    hi = int(starts[k + 1]) if k + 1 < len(starts) else int(self._store.counts[f])
    return {"tokens": self._store.file_tokens(f)[lo:hi].astype(np.int32)}
