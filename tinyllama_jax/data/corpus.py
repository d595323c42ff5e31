"""Tokenized corpora on disk as grain random-access sources: prepared shards and LITPKDS files.

A TokenStore is the concatenated token stream of a list of shard files (memmapped lazily, so it
pickles cheaply into grain workers). RowSource serves fixed (seq_len + 1)-token rows of that stream
(TinyLlama's concat-then-split, with an exact global shuffle over rows); DocumentSource serves
whole documents (for first/best-fit packing), found through each prepared shard's .docs.npy.
Process p of P serves rows/documents p, p+P, ...: disjoint, and together complete.
"""

import bisect
import json
import os

from absl import logging
import numpy as np

from tinyllama_jax.data import formats
from tinyllama_jax.data import paths as paths_lib
from tinyllama_jax.data import tokenizer as tokenizer_lib


def load_manifest(path: str, name: str = "data.paths") -> tuple[dict, str]:
  """(manifest, its folder) from a manifest.json or the folder holding one (`name`: the option
  that named it). A manifest that is not prepare's (hand-edited, cut short) is one error naming the
  file and the field."""
  if os.path.isdir(path):
    path = os.path.join(path, formats.MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no prepared manifest at {path}: run python -m "
                            f"tinyllama_jax.prepare first, or point {name} at its --out folder")
  try:
    with open(path, "rb") as f:
      manifest = json.loads(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}): prepare the data again, or restore the "
                     "file") from None
  if not isinstance(manifest, dict) or manifest.get("format") != formats.MANIFEST_FORMAT:
    raise ValueError(f"{path} is not a {formats.MANIFEST_FORMAT} manifest (its 'format' field): "
                     "point data.paths at a folder written by prepare")
  _check_fields(manifest, path)
  return manifest, os.path.dirname(os.path.abspath(path))


def _check_fields(manifest: dict, path: str):
  def bad(field, want):
    raise ValueError(f"{path}: field {field!r} is missing or not {want}: prepare the data again, "
                     "or restore the file")
  tokenizer = manifest.get("tokenizer")
  if not isinstance(tokenizer, dict):
    bad("tokenizer", "an object")
  for key in ("path", "sha256"):
    if not isinstance(tokenizer.get(key), str):
      bad(f"tokenizer.{key}", "a string")
  shards = manifest.get("shards")
  if not isinstance(shards, list):
    bad("shards", "a list")
  for i, s in enumerate(shards):
    if not isinstance(s, dict):
      bad(f"shards[{i}]", "an object")
    if not isinstance(s.get("path"), str):
      bad(f"shards[{i}].path", "a string")
    if s.get("split") not in ("train", "eval"):
      bad(f"shards[{i}].split", "'train' or 'eval'")
    if not isinstance(s.get("tokens"), int) or isinstance(s["tokens"], bool) or s["tokens"] < 0:
      bad(f"shards[{i}].tokens", "a count of tokens")


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


def prepared_shards(paths: str, split: str, name: str = "data.paths") -> list[str]:
  """Shard files of `split` from every manifest named in `paths` (comma separated; `name` is the
  option they came from)."""
  shards = []
  for p in expand_manifests(paths, name):
    manifest, root = load_manifest(p, name)
    shards += [os.path.join(root, s["path"]) for s in manifest["shards"] if s["split"] == split]
  if not shards and split == "eval":
    raise ValueError(f"the prepared data {paths!r} has no 'eval' shards: prepare with "
                     "--eval_fraction > 0 for an eval split")
  if not shards:
    raise ValueError(f"the prepared data {paths!r} has no 'train' shards (its inputs held no "
                     "documents, or every one went to eval): prepare it again from inputs with "
                     "text, with a smaller --eval_fraction")
  return shards


def expand_manifests(paths: str, name: str = "data.paths") -> list[str]:
  """Prepared folders (or their manifest.json) named by `paths`, each real one once."""
  for p in paths.split(","):
    if p.strip() and not paths_lib.matches(p):
      load_manifest(os.path.expanduser(p.strip()), name)  # says what is missing, and the fix
  return paths_lib.expand(paths, "prepared folder or manifest", name, files_only=False)


def shard_records(path: str, hash_all: bool = False, name: str = "data.paths") -> list[dict]:
  """The manifest's shard records, each with the sha256 its files have now: what a run's data
  identity hashes, so that shards rewritten under a checkpoint are another identity.

  Hashing every shard at each start would read the whole corpus, so a file is hashed only when it
  may differ from what prepare recorded: it is not older than the manifest (prepare writes it
  after every shard), its size or header disagrees with its record, or `hash_all` (on demand).
  Data prepared by an earlier version records no checksums: its records are used as they are (the
  identity its checkpoints recorded), and a warning says the content is not verified. prepare
  never adds checksums to inputs finished earlier: that would change the identity under them."""
  manifest, root = load_manifest(path, name)
  shards = manifest["shards"]
  where = os.path.join(root, formats.MANIFEST)
  if not all(isinstance(s.get("sha256"), str) for s in shards):
    logging.warning("%s records no shard checksums (prepared by an earlier version): the shards' "
                    "content is not verified; prepare it again into a new folder to record them",
                    where)
    return shards
  since = os.stat(where).st_mtime_ns
  out = []
  for s in shards:
    out.append(dict(s))
    for key, suffix in (("sha256", ""), ("docs_sha256", ".docs.npy")):
      file = os.path.join(root, s["path"]) + suffix
      if key in s and (hash_all or os.stat(file).st_mtime_ns >= since or
                       (not suffix and _header_differs(file, s))):
        out[-1][key] = tokenizer_lib.file_sha256(file)
  changed = [s["path"] for s, now in zip(shards, out) if s != now]
  if changed:
    logging.warning("%d shards of %s differ from the checksums prepare recorded (first: %s)",
                    len(changed), root, changed[0])
  return out


def _header_differs(file: str, record: dict) -> bool:
  try:
    return len(formats.read_litpkds(file)) != record["tokens"]
  except ValueError:  # truncated or not a token file: its hash differs
    return True


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
