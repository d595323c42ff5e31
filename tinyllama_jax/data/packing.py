"""Packing: token streams -> fixed-length rows, and packed rows -> the trainer's batch dict.

'concat' is TinyLlama's: rows of seq_len + 1 tokens cut from the concatenated documents,
inputs = row[:-1], targets = row[1:], documents run into each other. 'first_fit' / 'best_fit'
place whole documents (split into seq_len-pair chunks when longer) into rows with segment ids, so
no target is ever predicted across a document boundary; the rest of a row is padding (id 0,
segment 0, loss_mask 0), never BOS.
"""

import grain
from grain import experimental as grain_x
import numpy as np


class SplitIntoPairs(grain_x.FlatMapTransform):
  """tokens [n] -> chunks of at most seq_len (input, target) pairs: long documents are split, never
  dropped; the one-token overlap between chunks means every pair is trained on exactly once."""

  max_fan_out = 2**31  # only checked by the map-dataset flat_map; documents may be arbitrarily long

  def __init__(self, seq_len):
    self._seq_len = seq_len

  def flat_map(self, element):
    inputs, targets = element["tokens"][:-1], element["tokens"][1:]
    # A chat document's mask is per token; a pair trains when its target is the assistant's.
    mask = element["loss_mask"][1:] if "loss_mask" in element else None
    return [{"inputs": inputs[s:s + self._seq_len], "targets": targets[s:s + self._seq_len],
             **({} if mask is None else {"loss_mask": mask[s:s + self._seq_len]})}
            for s in range(0, len(inputs), self._seq_len)]


def has_a_target(element) -> bool:
  return len(element["tokens"]) >= 2


def concat_rows(docs: grain.IterDataset, seq_len: int, finite=False) -> grain.IterDataset:
  """Documents -> {'tokens': [seq_len + 1]} rows. A `finite` stream's last row is filled up with
  padding, which would count as tokens: it is left out, as RowSource leaves out a prepared
  stream's tail. (A repeating stream has no tail, and its iterator state stays as it was.)"""
  rows = grain_x.ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len + 1})
  if finite:
    rows = rows.filter(_no_padding)
  return rows.map(_tokens_only)  # the same structure as prepared rows, so sources can mix


def _no_padding(row) -> bool:
  return bool(row["tokens_segment_ids"].all())


def _tokens_only(row):
  return {"tokens": row["tokens"]}


def pack_documents(docs: grain.IterDataset, packing: str, seq_len: int, num_bins: int,
                   seed: int, with_loss_mask: bool = False) -> grain.IterDataset:
  """Documents -> rows of {'inputs', 'targets', '*_segment_ids', '*_positions'} [seq_len]
  (and 'loss_mask' when the documents carry one: chat data)."""
  pairs = grain_x.FlatMapIterDataset(docs, SplitIntoPairs(seq_len))
  pack_cls = {"first_fit": grain_x.FirstFitPackIterDataset,
              "best_fit": grain_x.BestFitPackIterDataset}[packing]
  length_struct = {"inputs": seq_len, "targets": seq_len}
  if with_loss_mask:
    length_struct["loss_mask"] = seq_len
  return pack_cls(pairs, length_struct=length_struct,
                  num_packing_bins=num_bins, seed=seed, shuffle_bins=True)


class Finalize:
  """Batched rows -> the trainer's dict; checks token ids against the model's vocab."""

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
      raise ValueError(f"token id {top} is beyond the model's vocab_size={self._vocab_size}: the "
                       "data was tokenized with a larger vocabulary; use a matching tokenizer, or "
                       "raise the model's vocab_size")
    loss_mask_BT = segment_ids_BT != 0
    if "loss_mask" in batch:  # chat: only the assistant's tokens
      loss_mask_BT &= batch["loss_mask"] != 0
    return {"inputs": np.ascontiguousarray(inputs_BT, np.int32),
            "targets": np.ascontiguousarray(targets_BT, np.int32),
            "segment_ids": segment_ids_BT, "positions": positions_BT,
            "loss_mask": loss_mask_BT.astype(np.float32)}
