"""The train-time pipeline: documents -> tokens (lazily, per document) -> packed rows -> batches.

    names --shuffle(seed, per epoch)--> repeat --> read+tokenize --> [split long docs] --> pack
          --> batch --> final dict --> [mp_prefetch workers]

Every batch is a dict of numpy arrays of shape [batch_size, seq_len]:
  inputs, targets (int32), segment_ids (int32, 1.. per document, 0 = padding), positions (int32,
  within the document), loss_mask (float32, 0 on padding).
The iterator's state is a small JSON dict (grain's index bookkeeping, no buffers): set_state jumps
straight there, so resuming costs O(1) and the resumed stream equals the uninterrupted one.
"""

import json
import os

from absl import logging
import grain
from grain import experimental as grain_x
import ml_collections
import numpy as np

from tinyllama_jax.data import sources
from tinyllama_jax.data import tokenizer as tokenizer_lib
from tinyllama_jax.data.config import PACKINGS, SOURCES

_STATE_VERSION = 1
_DOCUMENT_SOURCES = ("stdlib",)


def _check_cfg(cfg: ml_collections.ConfigDict):
  if cfg.source not in SOURCES:
    raise ValueError(f"unknown data.source {cfg.source!r}: use one of {', '.join(SOURCES)}")
  if cfg.source not in _DOCUMENT_SOURCES + ("synthetic",):
    raise NotImplementedError(f"data.source={cfg.source!r} is not built yet: use 'stdlib' or "
                              "'synthetic'")
  if cfg.packing not in PACKINGS:
    raise ValueError(f"unknown data.packing {cfg.packing!r}: use one of {', '.join(PACKINGS)}")


# --- tokenizer -------------------------------------------------------------------------------


def load_tokenizer(cfg: ml_collections.ConfigDict, workdir: str):
  """The tokenizer named by data.tokenizer, or one trained on this corpus and cached in workdir.

  Returns None for the synthetic source (it needs none). The cached tokenizer records what it was
  trained for; a workdir whose tokenizer was trained for another corpus or vocab size is an error
  rather than a silent retrain under a checkpoint that was trained with the old one.
  """
  _check_cfg(cfg)
  if cfg.source == "synthetic":
    return None
  if cfg.tokenizer:
    return tokenizer_lib.Tokenizer(cfg.tokenizer)
  path = os.path.join(workdir, "tokenizer", "tokenizer.model")
  info_path = os.path.join(workdir, "tokenizer", "trained_for.json")
  want = {"source": cfg.source, "vocab_size": cfg.tokenizer_vocab_size,
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
  _write_json(info_path, want)
  return tokenizer_lib.train_tokenizer(_tokenizer_sample(cfg), path, cfg.tokenizer_vocab_size)


def _tokenizer_sample(cfg):
  """Texts of training-split documents in a stable pseudo-random order, up to the byte budget."""
  root, names = _document_names(cfg, "train")
  names = sorted(names, key=sources.hash_fraction)
  total = 0
  for name in names:
    text = sources.read_utf8(os.path.join(root, name))
    if text is None:
      continue
    yield text
    total += len(text)
    if total >= cfg.tokenizer_train_bytes:
      return


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


# --- documents -------------------------------------------------------------------------------


def _document_names(cfg, split):
  """(root, sorted names of this split); names are relative so the split hash is machine-independent."""
  if cfg.source == "stdlib":
    return sources.stdlib_root(), sources.split_names(sources.stdlib_files(), split,
                                                      cfg.eval_fraction)
  raise AssertionError(cfg.source)


class _TokenizeFile:
  """name -> {'tokens': int32 [n]}: read + encode one document, BOS/EOS added as configured."""

  def __init__(self, root, tokenizer, add_bos, add_eos):
    self._root, self._tok = root, tokenizer
    self._bos = [tokenizer.bos_id] if add_bos else []
    self._eos = [tokenizer.eos_id] if add_eos else []

  def __call__(self, name):
    text = sources.read_utf8(os.path.join(self._root, name))
    ids = [] if text is None else self._bos + self._tok.encode(text) + self._eos
    return {"tokens": np.asarray(ids, np.int32)}


def _has_a_target(element) -> bool:
  return len(element["tokens"]) >= 2


class _SplitIntoPairs(grain_x.FlatMapTransform):
  """tokens [n] -> chunks of at most seq_len (input, target) pairs: long documents are split, never
  dropped, and the one-token overlap between chunks means every pair is trained on exactly once."""

  max_fan_out = 2**31  # only checked by the map-dataset flat_map; documents may be arbitrarily long

  def __init__(self, seq_len):
    self._seq_len = seq_len

  def flat_map(self, element):
    inputs, targets = element["tokens"][:-1], element["tokens"][1:]
    return [{"inputs": inputs[s:s + self._seq_len], "targets": targets[s:s + self._seq_len]}
            for s in range(0, len(inputs), self._seq_len)]


class _Finalize:
  """Packed batch -> the trainer's dict; checks token ids against the model's vocab."""

  def __init__(self, packing, seq_len, vocab_size):
    self._packing, self._vocab_size = packing, vocab_size
    self._positions_T = np.arange(seq_len, dtype=np.int32)

  def __call__(self, batch):
    if self._packing == "concat":
      rows_BT1 = batch["tokens"]
      inputs_BT, targets_BT = rows_BT1[:, :-1], rows_BT1[:, 1:]
      segment_ids_BT = np.ones(inputs_BT.shape, np.int32)
      positions_BT = np.broadcast_to(self._positions_T, inputs_BT.shape).copy()
    else:
      inputs_BT, targets_BT = batch["inputs"], batch["targets"]
      segment_ids_BT = batch["inputs_segment_ids"].astype(np.int32)
      positions_BT = batch["inputs_positions"].astype(np.int32)
    top = int(max(inputs_BT.max(), targets_BT.max()))
    if top >= self._vocab_size:
      raise ValueError(f"token id {top} is beyond the model's vocab_size={self._vocab_size}: use a "
                       "tokenizer with at most that many pieces, or raise the model's vocab_size")
    return {"inputs": np.ascontiguousarray(inputs_BT, np.int32),
            "targets": np.ascontiguousarray(targets_BT, np.int32),
            "segment_ids": segment_ids_BT, "positions": positions_BT,
            "loss_mask": (segment_ids_BT != 0).astype(np.float32)}


def _pack(ds: grain.IterDataset, packing: str, seq_len: int, num_bins: int, seed: int):
  if packing == "concat":
    # TinyLlama's rows: seq_len + 1 tokens cut from the concatenated stream, inputs = row[:-1],
    # targets = row[1:]. The stream never ends (repeat), so no padded tail exists.
    return grain_x.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
  ds = grain_x.FlatMapIterDataset(ds, _SplitIntoPairs(seq_len))
  pack_cls = {"first_fit": grain_x.FirstFitPackIterDataset,
              "best_fit": grain_x.BestFitPackIterDataset}[packing]
  return pack_cls(ds, length_struct={"inputs": seq_len, "targets": seq_len},
                  num_packing_bins=num_bins, seed=seed, shuffle_bins=True)


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


def make_iterator(cfg: ml_collections.ConfigDict, *, split: str, seq_len: int, batch_size: int,
                  seed: int, process_index: int, process_count: int, tokenizer, vocab_size: int):
  """This process's stream of [batch_size, seq_len] batches (see the module docstring).

  'train' repeats forever, reshuffled each epoch by `seed`; 'eval' is the same stream on every
  call (unshuffled, independent of `seed`), and repeats too.
  """
  _check_cfg(cfg)
  if split not in sources.SPLITS:
    raise ValueError(f"unknown split {split!r}: use one of {sources.SPLITS}")
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
  if split == "eval":
    seed = 0
  fingerprint = {"source": cfg.source, "packing": cfg.packing, "split": split, "seq_len": seq_len,
                 "batch_size": batch_size, "seed": seed, "process_index": process_index,
                 "process_count": process_count, "num_workers": cfg.num_workers,
                 "tokenizer_sha256": tokenizer.sha256 if tokenizer else None}
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
  root, names = _document_names(cfg, split)
  names = sources.process_shard(names, process_index, process_count, f"the {split!r} split")
  ds = grain.MapDataset.source(names)
  if split == "train":
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None).map(_TokenizeFile(root, tokenizer, cfg.add_bos, cfg.add_eos))
  it_ds = ds.to_iter_dataset().filter(_has_a_target)
  it_ds = _pack(it_ds, cfg.packing, seq_len, cfg.num_packing_bins, seed)
  it_ds = it_ds.batch(batch_size, drop_remainder=True).map(_Finalize(cfg.packing, seq_len,
                                                                      vocab_size))
  if cfg.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
  return DataIterator(iter(it_ds), fingerprint)
