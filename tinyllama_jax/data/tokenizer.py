"""Sentencepiece tokenizers: load any .model (Llama-2's own too) or train a BPE on a corpus sample."""

import hashlib
import io
import os
from typing import Iterable

from absl import logging
import sentencepiece as spm

from tinyllama_jax.data import formats

# Llama-2's special ids: the model's embedding rows 0..2 keep the same meaning with our tokenizers.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Longest line the trainer learns from; longer lines (minified data, long literals) are skipped by
# sentencepiece, which only affects what merges are learned, never what can be encoded.
_MAX_TRAIN_LINE_BYTES = 16384
# A run's own copy of its tokenizer, relative to the workdir: what export, generate and evaluate
# read, wherever the tokenizer the run started from lives.
RUN_COPY = os.path.join("tokenizer", "tokenizer.model")


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


class Tokenizer:
  """A sentencepiece model plus its identity (path, sha256). Picklable for grain worker processes."""

  def __init__(self, path: str, flag: str = "data.tokenizer"):
    """`flag`: the option that named `path`, which the error messages tell the user to fix."""
    if not os.path.isfile(path):
      train_one = ", or to '' to train one on the corpus" if flag == "data.tokenizer" else ""
      raise FileNotFoundError(f"tokenizer file {path!r} not found: set {flag} to a sentencepiece "
                              f".model file{train_one}")
    with open(path, "rb") as f:
      proto = f.read()
    self._init(path, proto, flag)

  def _init(self, path: str, proto: bytes, flag: str = "data.tokenizer"):
    self.path = path
    self._proto = proto
    self.sha256 = hashlib.sha256(proto).hexdigest()
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except RuntimeError as e:
      raise ValueError(f"tokenizer file {path!r} is not a sentencepiece model ({e}): point "
                       f"{flag} at a .model file") from None
    self.vocab_size = self._sp.vocab_size()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    self.unk_id = self._sp.unk_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_proto(self, text: str):
    """sentencepiece's SentencePieceText of `text`: each piece's id and byte span (begin, end)."""
    return self._sp.encode(text, out_type="proto")

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def save(self, path: str):
    """Writes the model atomically (a temp file renamed): never a half-written `path`."""
    formats.atomic_write(path, lambda f: f.write(self._proto))

  def __getstate__(self):
    return {"path": self.path, "proto": self._proto}

  def __setstate__(self, state):
    self._init(state["path"], state["proto"])

  def __repr__(self):
    return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def train_tokenizer(texts: Iterable[str], path: str, vocab_size: int) -> Tokenizer:
  """Trains a byte-fallback BPE with Llama-2's settings on `texts` and writes it atomically to `path`.

  Settings follow Llama-2's tokenizer (identity normalisation, whitespace kept, digits split, byte
  fallback so every string is encodable) so that decode(encode(s)) == s for any text.
  """
  lines = (line for text in texts for line in text.split("\n")
           if line.strip() and len(line) <= _MAX_TRAIN_LINE_BYTES)
  model = io.BytesIO()
  # Sentencepiece reserves 256 byte pieces + 3 specials: below that there is nothing to learn.
  if vocab_size < 300:
    raise ValueError(f"tokenizer_vocab_size={vocab_size} is too small for a byte-fallback BPE: "
                     "use at least 300")
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
      byte_fallback=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
      normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
      allow_whitespace_only_pieces=True, character_coverage=0.99995,
      # A small corpus may not hold vocab_size merges; take what it has rather than fail.
      hard_vocab_limit=False, max_sentence_length=_MAX_TRAIN_LINE_BYTES,
      num_threads=os.cpu_count() or 1, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  formats.atomic_write(path, lambda f: f.write(model.getvalue()))
  tok = Tokenizer(path)
  logging.info("trained %s", tok)
  return tok
