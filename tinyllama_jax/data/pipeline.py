"""The train-time pipeline: documents -> tokens (lazily, per document) -> packed rows -> batches.

    names --shuffle(seed, per epoch)--> repeat --> read+tokenize --> [split long docs] --> pack
          --> batch --> final dict --> [mp_prefetch workers]

Every batch is a dict of numpy arrays of shape [batch_size, seq_len]:
  inputs, targets (int32), segment_ids (int32, 1.. per document, 0 = padding), positions (int32,
  within the document), loss_mask (float32, 0 on padding).
The iterator's state is a small JSON dict (grain's index bookkeeping, no buffers): set_state jumps
straight there, so resuming costs O(1) and the resumed stream equals the uninterrupted one.
"""

import functools
import hashlib
import json
import math
import os

from absl import logging
import grain
import ml_collections
import numpy as np

from tinyllama_jax.data import chat
from tinyllama_jax.data import corpus
from tinyllama_jax.data import formats
from tinyllama_jax.data import packing
from tinyllama_jax.data import paths as paths_lib
from tinyllama_jax.data import sources
from tinyllama_jax.data import tokenizer as tokenizer_lib
from tinyllama_jax.data.config import PACKINGS, SOURCES

_STATE_VERSION = 1
_TEXT_SOURCES = ("stdlib", "text")  # tokenized on the fly
_MIXABLE = ("stdlib", "text", "prepared", "litpkds")


def _check_cfg(cfg: ml_collections.ConfigDict):
  if cfg.source not in SOURCES:
    raise ValueError(f"unknown data.source {cfg.source!r}: use one of {', '.join(SOURCES)}")
  if cfg.packing not in PACKINGS:
    raise ValueError(f"unknown data.packing {cfg.packing!r}: use one of {', '.join(PACKINGS)}")
  if cfg.source in ("text", "prepared", "litpkds", "chat") and not cfg.paths:
    raise ValueError(f"data.source={cfg.source!r} needs data.paths (a glob, or the prepared folder)")


# --- tokenizer -------------------------------------------------------------------------------


def load_tokenizer(cfg: ml_collections.ConfigDict, workdir: str):
  """The tokenizer named by data.tokenizer or the prepared data's manifest (copied into the
  workdir), or one trained on this corpus and cached in workdir.

  Returns None for the synthetic source (it needs none). The cached tokenizer records what it was
  trained for; a workdir whose tokenizer was trained for another corpus or vocab size is an error
  rather than a silent retrain under a checkpoint that was trained with the old one.
  """
  _check_cfg(cfg)
  if cfg.source == "synthetic":
    return None
  for _, source, paths in components(cfg):  # before the eval split is looked at, whose message
    if source == "prepared":                # would point at --eval_fraction
      corpus.prepared_shards(paths, "train", option(cfg))
  if cfg.tokenizer:
    return _keep_a_copy(tokenizer_lib.Tokenizer(cfg.tokenizer), workdir)
  if cfg.source == "chat":  # fine-tuning keeps the tokenizer the model was trained with
    raise ValueError("data.source='chat' needs a tokenizer: set data.tokenizer to a sentencepiece "
                     ".model, or train.init_from to the run to fine-tune")
  manifest_path = tokenizer_manifest(cfg)
  if manifest_path is not None:  # the tokenizer the data was prepared with
    manifest, root = corpus.load_manifest(manifest_path, option(cfg))
    tok = tokenizer_lib.Tokenizer(corpus.manifest_tokenizer_path(manifest, root))
    corpus.check_tokenizer(manifest, manifest_path, tok)
    return _keep_a_copy(tok, workdir)
  if any(source == "litpkds" for _, source, _ in components(cfg)):
    raise ValueError("LITPKDS files do not name their tokenizer: set data.tokenizer to the "
                     ".model they were made with (Llama-2's for TinyLlama's files)")
  path = os.path.join(workdir, tokenizer_lib.RUN_COPY)
  info_path = os.path.join(workdir, "tokenizer", "trained_for.json")
  want = {"source": cfg.source, "paths": cfg.paths, "mixture": cfg.mixture, "vocab_size": cfg.tokenizer_vocab_size,
          "train_bytes": cfg.tokenizer_train_bytes, "eval_fraction": cfg.eval_fraction}
  if os.path.exists(path):
    have = _read_json(info_path)
    if have != want:
      raise ValueError(f"the cached tokenizer {path} was trained for {have}, but the config asks for "
                       f"{want}: use a new workdir, or delete {os.path.dirname(path)} to retrain")
    tok = tokenizer_lib.Tokenizer(path)
    logging.info("using the cached tokenizer %s", tok)
    return tok
  logging.info("training a %d-piece BPE tokenizer on %.1f MB of the %r corpus (first use only; "
               "cached at %s)", cfg.tokenizer_vocab_size, cfg.tokenizer_train_bytes / 1e6,
               cfg.source, path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # The record goes first: a crash between the two writes leaves no model, so the next run retrains.
  formats.write_json_atomic(info_path, want)
  return tokenizer_lib.train_tokenizer(_tokenizer_sample(cfg), path, cfg.tokenizer_vocab_size)


def tokenizer_manifest(cfg):
  """The manifest whose tokenizer a run without data.tokenizer uses: its first prepared data's
  (None when it has no prepared data)."""
  prepared = [paths for _, source, paths in components(cfg) if source == "prepared"]
  return corpus.expand_manifests(prepared[0], option(cfg))[0] if prepared else None


def option(cfg) -> str:
  """The config key that names the data's paths, for messages."""
  return "data.mixture" if cfg.source == "mixture" else "data.paths"


def _keep_a_copy(tok, workdir):
  """Copies `tok` into WORKDIR/tokenizer, so that the run stays readable (export, generate,
  evaluate) when the original moves or goes; a copy of another tokenizer already there means the
  workdir was trained with that one: an error, not a silent switch."""
  path = os.path.join(workdir, tokenizer_lib.RUN_COPY)
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tok.save(path)
    logging.info("copied the tokenizer %s to %s: the run keeps its own", tok.path, path)
  elif (have := tokenizer_lib.file_sha256(path)) != tok.sha256:
    raise ValueError(f"the workdir's tokenizer {path} is not {tok.path} (sha256 {have[:12]} vs "
                     f"{tok.sha256[:12]}): this workdir trained with another tokenizer; use a new "
                     f"--workdir, or point data.tokenizer at {path}")
  return tok


def _tokenizer_sample(cfg):
  """Texts of training-split documents in a stable pseudo-random order, up to the byte budget,
  shared among the text sources of a mixture by weight."""
  comps = components(cfg)
  total_weight = sum(w for w, _, _ in comps)
  for weight, source, paths in comps:
    items, tokenize = _documents(source, paths, cfg, "train")
    key = (lambda n: sources.hash_fraction(n)) if source == "stdlib" else (
        lambda d: sources.hash_fraction(d[0]))
    budget, total = cfg.tokenizer_train_bytes * weight / total_weight, 0
    for item in sorted(items, key=key):
      text = tokenize.text(item)
      if text is None:
        continue
      yield text
      total += len(text)
      if total >= budget:
        break


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# --- components: one (weight, source, paths) each; a mixture has several ------------------------


def components(cfg) -> list[tuple[float, str, str]]:
  if cfg.source != "mixture":
    return [(1.0, cfg.source, cfg.paths)]
  out = []
  for entry in [e.strip() for e in cfg.mixture.split(";") if e.strip()]:
    parts = entry.split(":", 2)
    try:
      weight = float(parts[0])
    except ValueError:
      weight = -1.0
    if len(parts) != 3 or not 0 < weight < math.inf or parts[1] not in _MIXABLE:
      raise ValueError(f"data.mixture entry {entry!r} is not 'weight:source:paths' with a finite "
                       f"weight > 0 and source in {_MIXABLE}")
    out.append((weight, parts[1], parts[2]))
  if not out:
    raise ValueError("data.source='mixture' needs data.mixture, e.g. "
                     "'0.693584:prepared:/data/slim;0.306416:prepared:/data/star'")
  return out


def _documents(source, paths, cfg, split):
  """(items, tokenize_fn) for a text source: items are names (stdlib) or (name, text) pairs."""
  if source == "stdlib":
    names = sources.split_names(sources.stdlib_files(), split, cfg.eval_fraction)
    return names, _TokenizeFile(sources.stdlib_root())
  if source == "text":
    docs = _text_documents(paths, cfg.text_field, option(cfg))
    chosen = [d for d in docs if (sources.hash_fraction(d[0]) < cfg.eval_fraction) == (split == "eval")]
    if not chosen:
      raise ValueError(f"the {split!r} split of {paths!r} is empty ({len(docs)} documents, "
                       f"eval_fraction={cfg.eval_fraction}): change data.eval_fraction")
    return chosen, _TokenizeText()
  raise AssertionError(source)


@functools.lru_cache(maxsize=4)
def _text_documents(paths, text_field, name):
  """All documents of raw text files, in memory (this source is for small data; prepare big data)."""
  files = paths_lib.expand(paths, "text file (.txt/.jsonl/.jsonl.zst/.parquet)", name)
  stats, docs = formats.ReadStats(), []
  for f in files:
    docs += [(f"{os.path.basename(f)}:{i}", text)
             for i, text in enumerate(formats.iter_documents(f, text_field, stats))]
  logging.info("text corpus %s: %d files, %s", paths, len(files), stats)
  return tuple(docs)


class _Tokenize:
  def bind(self, tokenizer, add_bos, add_eos):
    self._tok = tokenizer
    self._bos = [tokenizer.bos_id] if add_bos else []
    self._eos = [tokenizer.eos_id] if add_eos else []
    return self

  def _encode(self, text):
    ids = [] if text is None else self._bos + self._tok.encode(text) + self._eos
    return {"tokens": np.asarray(ids, np.int32)}


class _TokenizeFile(_Tokenize):
  """name -> {'tokens': int32 [n]}: read + encode one file, BOS/EOS added as configured."""

  def __init__(self, root):
    self._root = root

  def text(self, name):
    return sources.read_utf8(os.path.join(self._root, name))

  def __call__(self, name):
    return self._encode(self.text(name))


class _TokenizeText(_Tokenize):
  def text(self, name_text):
    return name_text[1]

  def __call__(self, name_text):
    return self._encode(name_text[1])


@functools.lru_cache(maxsize=2)
def _chat_conversations(paths, template, overflow, max_tokens, tokenizer):
  """Every valid conversation of the chat files, tokenized once with its loss mask (in memory:
  chat data sets are small next to pretraining corpora)."""
  files = paths_lib.expand(paths, "chat file (.jsonl/.jsonl.zst/.parquet)", "data.paths")
  convs, _ = chat.load_conversations(files, chat.ChatFormat(template, tokenizer), max_tokens,
                                     overflow)
  return tuple(convs)


def _chat_documents(paths, cfg, split, tokenizer, seq_len):
  convs = _chat_conversations(paths, cfg.chat_template, cfg.chat_overflow, seq_len + 1, tokenizer)
  chosen = [c for c in convs if (sources.hash_fraction(c[0]) < cfg.eval_fraction) == (split == "eval")]
  if not chosen:
    raise ValueError(f"the {split!r} split of {paths!r} is empty ({len(convs)} conversations, "
                     f"eval_fraction={cfg.eval_fraction}): change data.eval_fraction")
  return chosen


def _chat_row(name_ids_mask):
  return {"tokens": name_ids_mask[1], "loss_mask": name_ids_mask[2]}


def _token_files(source, paths, cfg, split, tokenizer):
  """(files, trim_token) of a tokenized source's split."""
  if source == "prepared":
    for p in corpus.expand_manifests(paths, option(cfg)):
      manifest, _ = corpus.load_manifest(p, option(cfg))
      corpus.check_tokenizer(manifest, p, tokenizer)
    return corpus.prepared_shards(paths, split, option(cfg)), None
  files = paths_lib.expand(paths, "LITPKDS .bin file", option(cfg))
  if cfg.eval_paths:  # TinyLlama kept validation files apart
    files = (paths_lib.expand(cfg.eval_paths, "LITPKDS .bin file", "data.eval_paths")
             if split == "eval" else files)
  else:
    files = sources.split_names(files, split, cfg.eval_fraction)
  return files, tokenizer.bos_id  # TinyLlama padded its last chunks with BOS


def _component(source, paths, cfg, *, split, seq_len, seed, process_index, process_count,
               tokenizer, repeat):
  """One source's stream: documents {'tokens': [n]} or, for concat, rows {'tokens': [T+1]}."""
  if source == "chat":
    items = _chat_documents(paths, cfg, split, tokenizer, seq_len)
    items = sources.process_shard(items, process_index, process_count, f"chat {split!r}")
    ds, map_fn = grain.MapDataset.source(items), _chat_row
  elif source in _TEXT_SOURCES:
    items, tokenize = _documents(source, paths, cfg, split)
    items = sources.process_shard(items, process_index, process_count, f"{source} {split!r}")
    ds = grain.MapDataset.source(items)
    map_fn = tokenize.bind(tokenizer, cfg.add_bos, cfg.add_eos)
  else:
    files, trim = _token_files(source, paths, cfg, split, tokenizer)
    store = corpus.TokenStore(files, trim_token=trim)
    if cfg.packing == "concat":
      ds = grain.MapDataset.source(corpus.RowSource(store, seq_len + 1, process_index,
                                                    process_count))
    else:
      ds = grain.MapDataset.source(corpus.DocumentSource(store, process_index, process_count))
    map_fn = None
  if split == "train":
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  if map_fn is not None:
    ds = ds.map(map_fn)
  # Text is tokenized by grain's reader threads; grain's default read-ahead (500 elements on 16
  # threads) would tokenize megabytes before the first batch, so text sources read ahead less.
  read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32) if map_fn else grain.ReadOptions()
  it_ds = ds.to_iter_dataset(read)
  if cfg.packing == "concat" and source in _TEXT_SOURCES:
    return packing.concat_rows(it_ds.filter(packing.has_a_target), seq_len, finite=not repeat)
  return it_ds if cfg.packing == "concat" else it_ds.filter(packing.has_a_target)


# --- iterators -------------------------------------------------------------------------------


class DataIterator:
  """Wraps a grain iterator; the state carries a fingerprint so a mismatched resume is an error."""

  def __init__(self, grain_iter, fingerprint: dict):
    self._it = grain_iter
    self._fingerprint = fingerprint

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict:
    return {"version": _STATE_VERSION, "fingerprint": self._fingerprint,
            "grain": self._it.get_state()}

  def set_state(self, state: dict):
    _check_state(state, self._fingerprint)
    self._it.set_state(state["grain"])

  def close(self):
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


class SyntheticIterator:
  """Uniform random tokens; batch n is a pure function of (seed, process, split, n): O(1) resume."""

  def __init__(self, *, seq_len, batch_size, seed, process_index, split, vocab_size, fingerprint):
    self._shape = (batch_size, seq_len + 1)
    self._key = (seed, process_index, sources.SPLITS.index(split))
    self._vocab_size = vocab_size
    self._step = 0
    self._fingerprint = fingerprint
    ones_BT = np.ones((batch_size, seq_len), np.int32)
    self._fixed = {"segment_ids": ones_BT,
                   "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ones_BT.shape),
                   "loss_mask": ones_BT.astype(np.float32)}
    for v in self._fixed.values():
      v.flags.writeable = False

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng(self._key + (self._step,))
    self._step += 1
    rows_BT1 = rng.integers(0, self._vocab_size, self._shape, dtype=np.int32)
    return {"inputs": rows_BT1[:, :-1], "targets": rows_BT1[:, 1:], **self._fixed}

  def get_state(self):
    return {"version": _STATE_VERSION, "fingerprint": self._fingerprint, "step": self._step}

  def set_state(self, state):
    _check_state(state, self._fingerprint)
    self._step = int(state["step"])

  def close(self):
    pass


def _check_state(state, fingerprint):
  if state.get("version") != _STATE_VERSION:
    raise ValueError(f"data iterator state version {state.get('version')} is not "
                     f"{_STATE_VERSION}: this checkpoint was written by another data pipeline")
  saved = state.get("fingerprint")
  if saved != fingerprint:
    diff = {k: (saved.get(k) if saved else None, v) for k, v in fingerprint.items()
            if not saved or saved.get(k) != v}
    raise ValueError(f"the data iterator state was saved for another data stream (saved, now): "
                     f"{diff}; resume with the same data config, batch size, seed and processes")


def identity(cfg: ml_collections.ConfigDict) -> dict[str, str]:
  """{component: sha256} of what the data is beyond its config, for a checkpoint to record (the
  iterator's fingerprint holds the config side): a prepared folder's shard records with the
  checksums its files have now (corpus.shard_records: preparing again, or shards rewritten in
  place, change it); the names and sizes of raw text, LITPKDS or stdlib files, with the eval
  split's fraction. Empty for synthetic data."""
  _check_cfg(cfg)
  out = {}
  for _, source, paths in ([] if cfg.source == "synthetic" else components(cfg)):
    if source == "prepared":
      record = [corpus.shard_records(p, cfg.verify_shards, option(cfg))
                for p in corpus.expand_manifests(paths, option(cfg))]
    else:
      if source == "stdlib":
        root, names = sources.stdlib_root(), sources.stdlib_files()
      else:
        root, names = "", paths_lib.expand(paths, "data file", option(cfg))
        if source == "litpkds" and cfg.eval_paths:
          names += paths_lib.expand(cfg.eval_paths, "LITPKDS .bin file", "data.eval_paths")
      record = [cfg.eval_fraction, [(n, os.path.getsize(os.path.join(root, n))) for n in names]]
    out[f"{source}:{paths}"] = hashlib.sha256(json.dumps(record).encode()).hexdigest()
  return out


def make_iterator(cfg: ml_collections.ConfigDict, *, split: str, seq_len: int, batch_size: int,
                  seed: int, process_index: int, process_count: int, tokenizer, vocab_size: int,
                  repeat: bool = True):
  """This process's stream of [batch_size, seq_len] batches (see the module docstring).

  'train' repeats forever, reshuffled each epoch by `seed`; 'eval' is the same stream on every
  call (unshuffled, independent of `seed`), and repeats too. With repeat=False the stream ends
  after one pass (each token at most once; the last batch may be short): for scoring a split.
  """
  _check_cfg(cfg)
  if split not in sources.SPLITS:
    raise ValueError(f"unknown split {split!r}: use one of {sources.SPLITS}")
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
  if split == "eval":
    seed = 0
  fingerprint = {"source": cfg.source, "paths": cfg.paths, "mixture": cfg.mixture,
                 "packing": cfg.packing, "split": split, "seq_len": seq_len,
                 "batch_size": batch_size, "seed": seed, "process_index": process_index,
                 "process_count": process_count, "num_workers": cfg.num_workers,
                 "tokenizer_sha256": tokenizer.sha256 if tokenizer else None}
  if cfg.source == "chat":  # another template or overflow rule is another stream
    fingerprint["chat"] = [cfg.chat_template, cfg.chat_overflow]
  if cfg.source == "synthetic":
    return SyntheticIterator(seq_len=seq_len, batch_size=batch_size, seed=seed,
                             process_index=process_index, split=split, vocab_size=vocab_size,
                             fingerprint=fingerprint)
  if tokenizer is None:
    raise ValueError(f"data.source={cfg.source!r} needs a tokenizer: call load_tokenizer first")
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than "
                     f"the model's vocab_size={vocab_size}: raise model vocab_size or use a smaller "
                     "tokenizer")
  comps = components(cfg)
  streams = [_component(source, paths, cfg, split=split, seq_len=seq_len,
                        seed=(seed + i) % 2**32, process_index=process_index,
                        process_count=process_count, tokenizer=tokenizer, repeat=repeat)
             for i, (_, source, paths) in enumerate(comps)]
  ds = streams[0] if len(streams) == 1 else grain.IterDataset.mix(
      streams, [w for w, _, _ in comps])
  if cfg.packing != "concat":
    ds = packing.pack_documents(ds, cfg.packing, seq_len, cfg.num_packing_bins, seed,
                                with_loss_mask=cfg.source == "chat")
  ds = ds.batch(batch_size, drop_remainder=repeat).map(packing.Finalize(cfg.packing, seq_len,
                                                                      vocab_size))
  if cfg.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
  return DataIterator(iter(ds), fingerprint)
