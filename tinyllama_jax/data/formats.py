"""On-disk formats: TinyLlama's LITPKDS token files (read + write) and raw text corpora (read).

LITPKDS (the original's packed shards): 7-byte magic, u64 LE version (1), u8 dtype code, u64 LE
chunk size in tokens, then the tokens. Our prepared shards use the same layout (chunk size = the
tokens actually in the file, never padding), so TinyLlama's loader reads them and we read its files.
"""

import dataclasses
import hashlib
import json
import os
import secrets
import struct
from typing import Iterator

import numpy as np

MAGIC = b"LITPKDS"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32,
          7: np.float64, 8: np.uint16}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".parquet")
MANIFEST = "manifest.json"  # written by `python -m tinyllama_jax.prepare`
MANIFEST_FORMAT = "tinyllama_jax.prepared/1"
_ZSTD_READ_BYTES = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def atomic_write(path: str, write_fn, mode="wb"):
  """Writes through a temp file in the same folder and renames: never a half-written `path`.

  The temp file is created as a plain open() creates files, 0o666 less the umask in force (not
  mkstemp's 0o600: prepared data, tokenizers and exports are meant to be read by other users),
  under a fresh name (O_EXCL), so concurrent writers never share one. The kernel applies the
  umask: reading it would mean setting it, which races with other threads. The temp name keeps at
  most 64 characters of `path`'s, so any name the file system takes for `path` fits.
  """
  folder = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(folder, f".tmp-{secrets.token_hex(4)}-{os.path.basename(path)[:64]}")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, mode) as f:
      write_fn(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json_atomic(path, obj, sort_keys=False):
  """obj as indented JSON at path (its folder made if missing), through atomic_write: a reader
  never sees half a file, and concurrent writers never share a temp file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=sort_keys), mode="w")


def write_litpkds(path: str, tokens: np.ndarray) -> str:
  """Writes the file (atomically); returns its sha256, for the manifest."""
  tokens = np.ascontiguousarray(tokens)
  if tokens.dtype not in _CODES:
    raise ValueError(f"cannot write {tokens.dtype} tokens to a LITPKDS file")
  header = MAGIC + struct.pack("<QBQ", VERSION, _CODES[tokens.dtype], len(tokens))

  def write(f):
    f.write(header)
    f.write(tokens.data)
  atomic_write(path, write)
  digest = hashlib.sha256(header)
  digest.update(tokens.data)
  return digest.hexdigest()


def read_litpkds(path: str) -> np.ndarray:
  """The file's tokens as a read-only memmap (1-D); a clear error for anything but a whole file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    header = f.read(HEADER_BYTES)
  if len(header) < HEADER_BYTES or header[:len(MAGIC)] != MAGIC:
    raise ValueError(f"{path} is not a LITPKDS token file (bad magic {header[:7]!r}): point "
                     "data.paths at prepared .bin shards")
  version, code, count = struct.unpack("<QBQ", header[len(MAGIC):])
  if version != VERSION or code not in DTYPES or np.dtype(DTYPES[code]).kind == "f":
    raise ValueError(f"{path}: unsupported LITPKDS version {version} / dtype code {code}")
  dtype = np.dtype(DTYPES[code])
  want = HEADER_BYTES + count * dtype.itemsize
  if size != want:
    raise ValueError(f"{path} is truncated or corrupt: its header promises {count} tokens "
                     f"({want} bytes) but the file has {size} bytes; prepare it again")
  if count == 0:
    return np.zeros((0,), dtype)
  return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


# --- raw text --------------------------------------------------------------------------------


@dataclasses.dataclass
class ReadStats:
  """What reading found, including what it skipped (each skip is counted, never silent)."""
  documents: int = 0
  text_bytes: int = 0
  skipped_empty: int = 0
  skipped_not_utf8: int = 0
  skipped_not_string: int = 0  # a text field holding a number, null, a list, ...

  def add(self, other: "ReadStats"):
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _suffix(path: str) -> str:
  for s in TEXT_SUFFIXES:
    if path.endswith(s):
      return s
  raise ValueError(f"{path}: unknown file type; readable: {', '.join(TEXT_SUFFIXES)}")


def _optional(module: str, path: str):
  try:
    return __import__(module)
  except ImportError:
    raise ImportError(f"reading {path} needs the {module!r} package, which is not installed: "
                      f"pip install {module}") from None


def _blank(text) -> bool:
  """Empty or whitespace only (not text.strip(), which copies a document that may be huge)."""
  return not text or text.isspace()


def _utf8_bytes(text: str) -> int:
  return len(text) if text.isascii() else len(text.encode("utf-8"))  # isascii: no copy


def _decode(raw: bytes, stats: ReadStats) -> str | None:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    stats.skipped_not_utf8 += 1
    return None
  if _blank(text):
    stats.skipped_empty += 1
    return None
  return text


def _check_text(text, stats: ReadStats) -> bool:
  """Whether a field's value is a document; what is not is counted in `stats`."""
  if not isinstance(text, str):
    stats.skipped_not_string += 1
    return False
  if _blank(text):
    stats.skipped_empty += 1
    return False
  return True


def _zstd_chunks(path: str) -> Iterator[bytes]:
  """The decompressed bytes of every zstd frame in the file. A file that ends inside a frame (a cut
  download) is an error: zstandard's stream reader would just stop, as if the data ended there."""
  zstandard = _optional("zstandard", path)
  fix = "download or compress it again"
  with open(path, "rb") as f:
    frame, inside = zstandard.ZstdDecompressor().decompressobj(), False
    for raw in iter(lambda: f.read(_ZSTD_READ_BYTES), b""):
      while raw:
        try:
          out = frame.decompress(raw)
        except zstandard.ZstdError as e:
          raise ValueError(f"{path} is not valid zstd data ({e}): {fix}") from None
        yield out
        inside, raw = True, b""
        if frame.eof:  # the next frame, if any, starts in what this one left over
          raw, inside = frame.unused_data, False
          frame = zstandard.ZstdDecompressor().decompressobj()
  if inside:
    raise ValueError(f"{path} is truncated: it ends inside a zstd frame; {fix}")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
  parts = []  # the current line's pieces so far (a line may span many chunks)
  for chunk in chunks:
    *lines, last = chunk.split(b"\n")
    if lines:
      lines[0] = b"".join(parts + [lines[0]])
      yield from lines
      parts = []
    parts.append(last)
  if any(parts):
    yield b"".join(parts)


def jsonl_lines(path: str) -> Iterator[bytes]:
  if path.endswith(".zst"):
    yield from _split_lines(_zstd_chunks(path))
  else:
    with open(path, "rb") as f:
      yield from f


def parquet_column(path: str, text_field: str, text_field_flag: str) -> Iterator:
  pa = _optional("pyarrow", path)
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
      raise ValueError(f"{path} has no column {text_field!r} (columns: {pf.schema_arrow.names}): "
                       f"set {text_field_flag}")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
      yield from batch.column(0).to_pylist()
  except pa.ArrowException as e:  # pyarrow's messages do not name the file
    raise ValueError(f"{path} is truncated or not a parquet file ({e}): download or write it "
                     "again") from None


def iter_documents(path: str, text_field: str, stats: ReadStats, *,
                   text_field_flag: str = "data.text_field") -> Iterator[str]:
  """Yields the documents of one file: a .txt file is one document; .jsonl(.zst) one per line;
  .parquet one per row. Empty, non-UTF-8 and non-string documents are skipped and counted in
  `stats`; a missing text field, broken JSON or a damaged file is an error naming the file (and
  line), and `text_field_flag` (the option that sets `text_field`)."""
  kind = _suffix(path)
  if kind == ".txt":
    with open(path, "rb") as f:
      raw = f.read()
    num_bytes, text = len(raw), _decode(raw, stats)
    del raw  # a large file is not held twice while it is tokenized
    if text is not None:
      stats.documents += 1
      stats.text_bytes += num_bytes
      yield text
  elif kind == ".parquet":
    for text in parquet_column(path, text_field, text_field_flag):
      if _check_text(text, stats):
        stats.documents += 1
        stats.text_bytes += _utf8_bytes(text)
        yield text
  else:
    for lineno, line in enumerate(jsonl_lines(path), 1):
      if _blank(line):
        continue
      try:
        record = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if isinstance(e, UnicodeDecodeError):
          stats.skipped_not_utf8 += 1
          continue
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict) or text_field not in record:
        keys = list(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}:{lineno}: no {text_field!r} field (has {keys}): set "
                         f"{text_field_flag}")
      text = record[text_field]
      if not _check_text(text, stats):
        continue
      try:
        stats.text_bytes += _utf8_bytes(text)
      except UnicodeEncodeError:  # a lone surrogate escaped in the JSON
        stats.skipped_not_utf8 += 1
        continue
      stats.documents += 1
      yield text
