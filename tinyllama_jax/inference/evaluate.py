"""Loss and perplexity on text: `python -m tinyllama_jax.evaluate --workdir=DIR --data=FILE`.

--data is a .jsonl, .jsonl.zst or .parquet file, read as prepare reads them (one document a
line or row, in --text_field; one that is empty or not UTF-8 is skipped and counted), any other
UTF-8 text file (the whole file is one document), a comma-separated list or glob of those; or, through the data pipeline (at most --batches batches of one pass over
the data, packed as the run packs: no token is scored twice): `split:eval` / `split:train` of the
run's own data, `prepared:DIR` (the --split of data written by tinyllama_jax.prepare) or
`litpkds:GLOB`. The command is tinyllama_jax/evaluate.py.

Files are scored document by document, as training tokenized them (BOS/EOS per the run's
data.add_bos / add_eos): a document longer than --seq_len is cut into windows that overlap by one
token, so every (input, target) pair counts exactly once and no window sees another document.
The loss is the mean over all scored tokens; perplexity is exp(loss).
"""

import functools
import itertools
import math
import os

import jax
import numpy as np
from absl import logging

from tinyllama_jax import model as model_lib
from tinyllama_jax.data import formats, pipeline
from tinyllama_jax.data import paths as paths_lib
from tinyllama_jax.training import program


def read_documents(spec, text_field="text"):
  """(documents, skipped) from files: .jsonl, .jsonl.zst and .parquet as prepare reads them
  (data/formats.py: a document a line or row; empty, non-UTF-8 and non-string ones skipped,
  counted and logged); any other file is one UTF-8 text document, or an error naming it."""
  for part in spec.split(","):
    matched = paths_lib.matches(part) if any(c in part for c in "*?[") else [part]
    if not matched or not all(os.path.isfile(p) for p in matched):
      raise ValueError(f"--data: {part!r} is not a file (give a .txt/.jsonl/.jsonl.zst/.parquet "
                       "file, a glob, or split:eval)")
  paths = paths_lib.expand(spec, "file", "--data")  # each real file once
  docs, stats = [], formats.ReadStats()
  for path in paths:
    if path.endswith(_RECORD_SUFFIXES):
      docs += formats.iter_documents(path, text_field, stats, text_field_flag="--text_field")
    else:
      text = _text_file(path)
      if text.strip():
        docs.append(text)
      else:
        stats.skipped_empty += 1
  skipped = stats.skipped_empty + stats.skipped_not_utf8 + stats.skipped_not_string
  if skipped:
    logging.warning("skipped %d documents: %d empty, %d not UTF-8, %d not a string", skipped,
                    stats.skipped_empty, stats.skipped_not_utf8, stats.skipped_not_string)
  if not docs:
    raise ValueError(f"--data={spec!r} holds no document to score ({skipped} skipped: "
                     f"{stats.skipped_empty} empty, {stats.skipped_not_utf8} not UTF-8, "
                     f"{stats.skipped_not_string} not a string in {text_field!r})")
  return docs, skipped


_RECORD_SUFFIXES = (".jsonl", ".jsonl.zst", ".parquet")


def _text_file(path):
  """A plain text file's text; UTF-16, Latin-1 or binary data is an error naming the file (a
  file of one document is all or nothing: there is no line to skip alone)."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"--data: {path} is not UTF-8 text (byte {e.start}: {_guess(raw)}): convert "
                     "it to UTF-8, or give a .jsonl/.jsonl.zst/.parquet file") from None
  if "\0" in text:
    raise ValueError(f"--data: {path} holds NUL bytes ({_guess(raw)}): give a text file, or a "
                     ".jsonl/.jsonl.zst/.parquet file")
  return text


def _guess(raw):
  if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or raw[1:200:2].count(0) > 50:
    return "UTF-16 text?"
  if raw[:4] == b"(\xb5/\xfd":
    return "zstd data: name it .jsonl.zst"
  if raw[:4] == b"PAR1":
    return "parquet data: name it .parquet"
  return "binary data or another encoding"


def document_rows(token_docs, seq_len):
  """[(inputs, targets)] windows of at most seq_len pairs, overlapping by one token."""
  rows = []
  for ids in token_docs:
    for s in range(0, len(ids) - 1, seq_len):
      window = ids[s:s + seq_len + 1]
      rows.append((window[:-1], window[1:]))
  return rows


def row_batches(rows, batch_size, seq_len):
  """Right-padded [batch_size, seq_len] batches (padding rows and tokens have loss_mask 0)."""
  for b in range(0, len(rows), batch_size):
    batch = {k: np.zeros((batch_size, seq_len), np.int32) for k in ("inputs", "targets")}
    batch["loss_mask"] = np.zeros((batch_size, seq_len), np.float32)
    for i, (inputs, targets) in enumerate(rows[b:b + batch_size]):
      batch["inputs"][i, :len(inputs)] = inputs
      batch["targets"][i, :len(targets)] = targets
      batch["loss_mask"][i, :len(inputs)] = 1.0
    batch["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                         (batch_size, seq_len)).copy()
    yield batch


def evaluate_batches(params, cfg, batches, *, use_segments=False):
  fn = jax.jit(functools.partial(program.loss_sums, graphdef=model_lib.graphdef(cfg.model),
                                 cfg=cfg, use_segments=use_segments))
  loss_sum, count, n = 0.0, 0.0, 0
  for batch in batches:
    s, c = fn(params, batch)
    loss_sum, count, n = loss_sum + float(s), count + float(c), n + 1
  if count == 0:
    raise ValueError("nothing to score: the data has no document of two or more tokens")
  loss = loss_sum / count
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count),
          "batches": n}


def evaluate_files(params, cfg, tokenizer, spec, *, seq_len, batch_size, text_field="text"):
  docs, skipped = read_documents(spec, text_field)
  bos = [tokenizer.bos_id] if cfg.data.get("add_bos", True) else []
  eos = [tokenizer.eos_id] if cfg.data.get("add_eos", True) else []
  token_docs = [bos + ids + eos for ids in tokenizer.encode_batch(docs)]
  rows = document_rows(token_docs, seq_len)
  result = evaluate_batches(params, cfg, row_batches(rows, batch_size, seq_len))
  return {**result, "documents": len(docs), "skipped_documents": skipped, "rows": len(rows)}


PIPELINE_SOURCES = ("prepared", "litpkds")


def reads_pipeline(spec):
  """Whether --data=`spec` is a pipeline form (split:NAME, prepared:DIR, ...), not text files."""
  return spec.partition(":")[0] in ("split", *PIPELINE_SOURCES)


def data_config_for(cfg, spec):
  """(run config whose data section reads `spec`, split) for the pipeline forms of --data, or
  None for files."""
  kind, _, rest = spec.partition(":")
  if kind == "split":
    return cfg, rest
  if kind in PIPELINE_SOURCES:
    cfg = cfg.copy_and_resolve_references()
    cfg.data.source, cfg.data.paths, cfg.data.mixture = kind, rest, ""
    return cfg, None
  return None


def evaluate_split(params, cfg, tokenizer, split, *, seq_len, batch_size, batches):
  """Scores up to `batches` batches of one pass over the split: never a token twice (the stream
  ends with the data; the report's `end_of_data` says whether it did)."""
  try:
    it = pipeline.make_iterator(cfg.data, split=split, seq_len=seq_len, batch_size=batch_size,
                                seed=cfg.seed, process_index=0, process_count=1,
                                tokenizer=tokenizer, vocab_size=cfg.model.vocab_size,
                                repeat=False)
  except FileNotFoundError as e:  # the pipeline's message names the path and the fix
    raise ValueError(str(e)) from None
  try:
    taken = [_padded(batch, batch_size) for batch in itertools.islice(it, batches)]
  finally:
    it.close()
  result = evaluate_batches(params, cfg, taken, use_segments=cfg.data.packing != "concat")
  result["end_of_data"] = len(taken) < batches
  if result["end_of_data"]:
    logging.warning("the %r split ended after %d of --batches=%d batches: scored all of it, "
                    "%d tokens, each once", split, len(taken), batches, result["tokens"])
  return result


def _padded(batch, batch_size):
  """The short last batch of a pass, filled up with padding rows (loss_mask 0): one compile."""
  n = len(batch["inputs"])
  return {k: np.pad(v, [(0, batch_size - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def check_flags(cfg, *, seq_len, batch_size, batches):
  """The window length to use (0: the run's train.seq_len), or a one-line error naming the flag."""
  seq_len = seq_len or cfg.train.seq_len
  if not 1 <= seq_len <= cfg.model.max_seq_len:
    raise ValueError(f"--seq_len={seq_len}: use 1 to the model's max_seq_len "
                     f"({cfg.model.max_seq_len}), or 0 for the run's train.seq_len "
                     f"({cfg.train.seq_len})")
  for name, value in (("batch_size", batch_size), ("batches", batches)):
    if value < 1:
      raise ValueError(f"--{name}={value}: use 1 or more")
  return seq_len
