import json
import os

import grain
import numpy as np
import pytest

from tinyllama_jax.data import packing as packing_lib
from tinyllama_jax.data import pipeline
from tinyllama_jax.data import sources

T, B = 64, 4


def _iterator(cfg, tok, split="train", seed=0, process_index=0, process_count=1, seq_len=T,
              batch_size=B, vocab_size=512):
  return pipeline.make_iterator(cfg, split=split, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                process_index=process_index, process_count=process_count,
                                tokenizer=tok, vocab_size=vocab_size)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("packing", ["concat", "first_fit", "best_fit"])
def test_batch_layout(packing, tok, small_cfg):
  it = _iterator(small_cfg(packing=packing), tok)
  batch = next(it)
  it.close()
  want = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
          "loss_mask": np.float32}
  assert {k: v.dtype for k, v in batch.items()} == want
  assert all(v.shape == (B, T) for v in batch.values())
  assert 0 <= batch["inputs"].min() and batch["inputs"].max() < 512


def test_concat_is_tinyllamas_concat_then_split(tok, small_cfg):
  """Eval rows are consecutive (T+1)-token cuts of BOS doc EOS BOS doc EOS ..., no masking."""
  cfg = small_cfg(packing="concat")
  batch = next(_iterator(cfg, tok, split="eval"))
  stream = []
  for name in sources.split_names(sources.stdlib_files(), "eval", cfg.eval_fraction):
    text = open(os.path.join(sources.stdlib_root(), name), encoding="utf-8").read()
    stream += [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    if len(stream) > B * (T + 1):
      break
  rows_BT1 = np.asarray(stream[:B * (T + 1)]).reshape(B, T + 1)
  np.testing.assert_array_equal(batch["inputs"], rows_BT1[:, :-1])
  np.testing.assert_array_equal(batch["targets"], rows_BT1[:, 1:])
  assert (batch["segment_ids"] == 1).all() and (batch["loss_mask"] == 1).all()
  np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(T), (B, T)))


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_packed_rows_never_cross_documents(packing, tok, small_cfg):
  for batch in _take(_iterator(small_cfg(packing=packing), tok), 20):
    for x, y, seg, pos, mask in zip(*(batch[k] for k in
                                      ("inputs", "targets", "segment_ids", "positions", "loss_mask"))):
      np.testing.assert_array_equal(mask, (seg != 0).astype(np.float32))
      used = int((seg != 0).sum())
      assert (seg[used:] == 0).all() and (seg[:used] > 0).all()  # padding only at the tail
      assert (x[used:] == 0).all() and (y[used:] == 0).all()     # and it is not BOS-filled
      assert (np.diff(seg[:used]) >= 0).all()
      for s in np.unique(seg[:used]):
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # positions restart per doc
        # Within a document, the target at t is the input at t+1: a shifted copy of one text.
        np.testing.assert_array_equal(y[idx[:-1]], x[idx[1:]])


def test_long_documents_are_split_not_dropped():
  """Every (input, target) pair of every document lands in exactly one packed row."""
  docs = [np.arange(100, 100 + n, dtype=np.int32) * (i + 1) for i, n in
          enumerate([3, 10, 40, 9, 2, 17, 100])]  # lengths up to 6x the row
  ds = grain.MapDataset.source([{"tokens": d} for d in docs]).to_iter_dataset()
  want = sorted((int(a), int(b)) for d in docs for a, b in zip(d[:-1], d[1:]))
  for packing in ["first_fit", "best_fit"]:
    got = []
    for row in packing_lib.pack_documents(ds, packing, seq_len=16, num_bins=3, seed=0):
      seg = row["inputs_segment_ids"]
      got += [(int(a), int(b)) for a, b, s in zip(row["inputs"], row["targets"], seg) if s]
      assert len(row["inputs"]) == 16
    assert sorted(got) == want, packing


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_resume_is_exact_and_o1(packing, tok, small_cfg):
  cfg = small_cfg(packing=packing)
  straight = _iterator(cfg, tok, seed=3)
  _take(straight, 7)
  state = json.loads(json.dumps(straight.get_state()))  # what a checkpoint stores
  assert len(json.dumps(state)) < 4096  # indices, not buffers of tokens
  expected = _take(straight, 5)
  resumed = _iterator(cfg, tok, seed=3)
  resumed.set_state(state)
  _assert_same(_take(resumed, 5), expected)


def test_resume_is_exact_with_worker_processes(tok, small_cfg):
  cfg = small_cfg(packing="first_fit", num_workers=2)
  straight = _iterator(cfg, tok, seed=1)
  try:
    _take(straight, 5)
    state = json.loads(json.dumps(straight.get_state()))
    expected = _take(straight, 4)
  finally:
    straight.close()
  resumed = _iterator(cfg, tok, seed=1)
  try:
    resumed.set_state(state)
    _assert_same(_take(resumed, 4), expected)
  finally:
    resumed.close()


def test_train_is_seeded_and_eval_is_fixed(tok, small_cfg):
  cfg = small_cfg(packing="first_fit")
  _assert_same(_take(_iterator(cfg, tok, seed=5), 2), _take(_iterator(cfg, tok, seed=5), 2))
  a, b = next(_iterator(cfg, tok, seed=5)), next(_iterator(cfg, tok, seed=6))
  assert not np.array_equal(a["inputs"], b["inputs"])
  _assert_same(_take(_iterator(cfg, tok, split="eval", seed=5), 3),
               _take(_iterator(cfg, tok, split="eval", seed=6), 3))


def test_train_and_eval_documents_are_disjoint(small_cfg):
  names = sources.stdlib_files()
  train = set(sources.split_names(names, "train", 0.02))
  evals = set(sources.split_names(names, "eval", 0.02))
  assert not train & evals and train | evals == set(names)
  assert 0.005 < len(evals) / len(names) < 0.05


@pytest.mark.parametrize("process_count", [1, 2, 3, 8])
def test_process_shards_are_disjoint_and_cover_everything(process_count):
  names = sources.split_names(sources.stdlib_files(), "train", 0.02)
  shards = [sources.process_shard(names, p, process_count, "train") for p in range(process_count)]
  seen = [n for s in shards for n in s]
  assert len(seen) == len(set(seen)) == len(names)
  assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_processes_read_different_streams(tok, small_cfg):
  cfg = small_cfg(packing="concat")
  a = next(_iterator(cfg, tok, split="eval", process_index=0, process_count=2))
  b = next(_iterator(cfg, tok, split="eval", process_index=1, process_count=2))
  assert not np.array_equal(a["inputs"], b["inputs"])


def test_synthetic_is_fast_shaped_and_resumable(small_cfg):
  cfg = small_cfg(source="synthetic")
  it = _iterator(cfg, None, seq_len=32, batch_size=2, vocab_size=100)
  first = _take(it, 3)
  assert first[0]["inputs"].shape == (2, 32) and first[0]["inputs"].max() < 100
  np.testing.assert_array_equal(first[0]["targets"][:, :-1], first[0]["inputs"][:, 1:])
  state = it.get_state()
  expected = _take(it, 2)
  resumed = _iterator(cfg, None, seq_len=32, batch_size=2, vocab_size=100)
  resumed.set_state(json.loads(json.dumps(state)))
  _assert_same(_take(resumed, 2), expected)


def test_bad_inputs_are_clear_errors(tok, small_cfg, tmp_path):
  with pytest.raises(ValueError, match="unknown data.source 'nope'.*stdlib"):
    _iterator(small_cfg(source="nope"), tok)
  with pytest.raises(ValueError, match="unknown data.source"):
    pipeline.load_tokenizer(small_cfg(source="nope"), str(tmp_path))
  with pytest.raises(ValueError, match="unknown data.packing 'zigzag'"):
    _iterator(small_cfg(packing="zigzag"), tok)
  with pytest.raises(ValueError, match="512 pieces.*vocab_size=256"):
    _iterator(small_cfg(), tok, vocab_size=256)
  with pytest.raises(ValueError, match="needs a tokenizer"):
    _iterator(small_cfg(), None)
  with pytest.raises(ValueError, match="process_index=2"):
    _iterator(small_cfg(), tok, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="fewer than the 100000 processes"):
    _iterator(small_cfg(), tok, split="eval", process_count=100000)


def test_resuming_another_stream_is_an_error(tok, small_cfg):
  it = _iterator(small_cfg(packing="concat"), tok, seed=1)
  next(it)
  other = _iterator(small_cfg(packing="concat"), tok, seed=2)
  with pytest.raises(ValueError, match="another data stream.*seed"):
    other.set_state(it.get_state())


def test_identity_sees_a_prepared_folder_prepared_again_and_files_added(small_cfg, tmp_path):
  """What a checkpoint records of its data: the shard list of a prepared folder (another prepare
  --eval_fraction into it moves documents between splits), the names and sizes of files."""
  from tinyllama_jax.data import formats
  manifest = {"format": formats.MANIFEST_FORMAT,
              "tokenizer": {"path": "tokenizer.model", "sha256": "0" * 64},
              "shards": [{"path": "shards/a.bin", "split": "train", "tokens": 1171 * 257}]}
  (tmp_path / formats.MANIFEST).write_text(json.dumps(manifest))
  prepared = small_cfg(source="prepared", paths=str(tmp_path))
  before = pipeline.identity(prepared)
  assert list(before) == [f"prepared:{tmp_path}"] and before == pipeline.identity(prepared)
  manifest["shards"][0]["tokens"] = 839 * 257
  (tmp_path / formats.MANIFEST).write_text(json.dumps(manifest))
  assert pipeline.identity(prepared) != before

  (tmp_path / "a.txt").write_text("one document")
  text = small_cfg(source="text", paths=str(tmp_path / "*.txt"))
  before = pipeline.identity(text)
  (tmp_path / "b.txt").write_text("another")
  assert pipeline.identity(text) != before
  assert pipeline.identity(small_cfg(source="synthetic")) == {}
  stdlib = pipeline.identity(small_cfg())
  assert stdlib != pipeline.identity(small_cfg(eval_fraction=0.5))


@pytest.mark.parametrize("weight", ["nan", "inf", "-1", "x"])
def test_mixture_weights_must_be_finite_and_positive(small_cfg, weight):
  with pytest.raises(ValueError, match=f"data.mixture entry '{weight}:prepared:/d' .* finite"):
    pipeline.components(small_cfg(source="mixture", mixture=f"{weight}:prepared:/d"))
