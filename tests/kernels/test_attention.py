"""kernels/attention.py's cudnn_packed: the segment-ids -> packed-layout conversion (pure jnp, on
CPU), its guards, and (gpu-marked) the cuDNN call against the fp32 jnp reference."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels_util
from tinyllama_jax import kernels
from tinyllama_jax.kernels import attention as attn


def _convert(rows, M):
  offsets, lengths, overflow = attn.packed_segments(jnp.asarray(rows, jnp.int32), M)
  return np.asarray(offsets).tolist(), np.asarray(lengths).tolist(), np.asarray(overflow).tolist()


def test_packed_segments_hand_built_rows():
  rows = [[1, 1, 1, 2, 2, 3, 0, 0],   # three documents, padding at the end
          [1, 1, 1, 1, 1, 1, 1, 1],   # one document, no padding
          [1, 2, 3, 3, 3, 3, 3, 3],   # length-1 documents first
          [1, 1, 1, 1, 1, 1, 1, 0]]   # one padding token
  offsets, lengths, overflow = _convert(rows, 4)
  assert offsets == [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1], [0, 1, 2, -1, -1], [0, 7, -1, -1, -1]]
  assert lengths == [[3, 2, 1, 2], [8, -1, -1, -1], [1, 1, 6, -1], [7, 1, -1, -1]]
  assert overflow == [False, False, False, False]


def test_packed_segments_exactly_full_and_overflowing_rows():
  rows = [[1, 1, 2, 2, 3, 3, 4, 0],   # 5 runs (padding counted) in 5 slots: exact
          [1, 2, 3, 4, 5, 6, 0, 0]]   # 7 runs: overflow, the last slot takes the tail
  offsets, lengths, overflow = _convert(rows, 5)
  assert offsets[0] == [0, 2, 4, 6, 7, -1] and lengths[0] == [2, 2, 2, 1, 1]
  assert offsets[1] == [0, 1, 2, 3, 4, -1] and lengths[1] == [1, 1, 1, 1, 4]
  assert overflow == [False, True]


def test_packed_segments_rebuild_the_reference_mask():
  """On random packed rows (documents of varied lengths, padding at the end, one-document rows),
  "same segment" from (offsets, lengths) equals the reference's ids-equal mask, every token is in
  exactly one segment, and the unused slots are -1."""
  rng = np.random.default_rng(0)
  B, T, M = 6, 96, 40
  seg_BT = np.array(kernels_util.packed_segments(rng, B, T, with_padding=True))
  seg_BT[1] = 1  # one document a row
  seg_BT[2, 50:] = 0  # padding after two documents
  offsets, lengths, overflow = (np.asarray(x) for x in attn.packed_segments(jnp.asarray(seg_BT), M))
  assert not overflow.any()
  t_T = np.arange(T)
  for b in range(B):
    used = lengths[b] >= 0
    assert (offsets[b, :-1][~used] == -1).all() and offsets[b, -1] == -1
    member_MT = ((t_T >= offsets[b, :-1, None]) & (t_T < (offsets[b, :-1] + lengths[b])[:, None])
                 & used[:, None])
    assert (member_MT.sum(0) == 1).all(), f"row {b}: a token outside or in two segments"
    slot_T = member_MT.argmax(0)
    np.testing.assert_array_equal(slot_T[:, None] == slot_T[None, :],
                                  seg_BT[b][:, None] == seg_BT[b][None, :])


def test_packed_segments_traces_under_jit():
  seg = jnp.asarray([[1, 1, 2, 0]], jnp.int32)
  offsets, lengths, _ = jax.jit(attn.packed_segments, static_argnums=1)(seg, 3)
  assert offsets.tolist() == [[0, 2, 3, -1]] and lengths.tolist() == [[2, 1, 1]]
  assert offsets.dtype == jnp.int32 and lengths.dtype == jnp.int32


def test_default_max_segments():
  assert attn.default_max_segments(2048) == 32
  assert attn.default_max_segments(64) == 2


def test_gqa_offsets_probe(monkeypatch):
  """The probe reads jax's own conversion: a fixed one (kv offsets strided by kv heads) says
  True, one striding both by the query heads (jax <= 0.11.0) says False, and so does one whose
  API changed (repeating kv heads is exact either way)."""
  def conversion(kv_stride_heads):
    def fix(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key):
      heads = key.shape[2] if kv_stride_heads else query.shape[2]
      return q_seqlen, kv_seqlen, q_offsets, kv_offsets * heads * key.shape[3]
    return fix
  for fixed in (True, False):
    monkeypatch.setattr(attn._cudnn_fa, "_fix_seqlen_offsets", conversion(fixed))
    attn.packed_gqa_offsets_fixed.cache_clear()
    assert attn.packed_gqa_offsets_fixed() is fixed
  monkeypatch.setattr(attn._cudnn_fa, "_fix_seqlen_offsets", lambda *a: None)  # a changed API
  attn.packed_gqa_offsets_fixed.cache_clear()
  assert attn.packed_gqa_offsets_fixed() is False
  attn.packed_gqa_offsets_fixed.cache_clear()
  monkeypatch.undo()
  if jax.__version__ in ("0.10.2", "0.11.0"):  # the installed copies known to lack the fix
    assert attn.packed_gqa_offsets_fixed() is False
  attn.packed_gqa_offsets_fixed.cache_clear()


def test_cudnn_packed_is_registered_and_guards_its_input():
  assert kernels.get("attention", "cudnn_packed") is attn.attention_cudnn_packed
  q = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
  seg = jnp.ones((1, 128), jnp.int32)
  with pytest.raises(ValueError, match="max_segments=1 must be >= 2"):
    attn.attention_cudnn_packed(q, q, q, seg, max_segments=1)
  with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of kv heads \(3\)"):
    attn.attention_cudnn_packed(q, q[:, :, :3], q[:, :, :3], seg)


# --- GPU: the cuDNN call itself ------------------------------------------------------------------

def _rows(B, T, lengths_per_row):
  """Rows of documents of the given lengths, ids 1, 2, ..., padding (0) after them."""
  rows = np.zeros((B, T), np.int32)
  for b in range(B):
    pos = 0
    for i, n in enumerate(lengths_per_row[b % len(lengths_per_row)]):
      rows[b, pos:pos + n] = i + 1
      pos += n
  return jnp.asarray(rows)


def _poison_device_memory(nbytes):
  """Frees NaN-filled buffers of the outputs' sizes just before the call, so an element cuDNN
  never writes reads as NaN (the allocator hands the freed blocks to the next outputs)."""
  for n in nbytes:
    x = jnp.full((n // 4 + 1,), jnp.nan, jnp.float32)
    x.block_until_ready()
    x.delete()


def _check_packed(B, T, H, K, D, seg, causal, seed, max_segments=None):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = kernels_util.normal(ks[0], (B, T, H, D), jnp.bfloat16)
  k = kernels_util.normal(ks[1], (B, T, K, D), jnp.bfloat16)
  v = kernels_util.normal(ks[2], (B, T, K, D), jnp.bfloat16)
  do = kernels_util.normal(ks[3], (B, T, H, D), jnp.bfloat16)

  def fwd_bwd(fn, dtype):
    def step(do, q, k, v):
      o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, causal=causal), q, k, v)
      return (o, *vjp(do))
    return jax.jit(step)(*(x.astype(dtype) for x in (do, q, k, v)))

  fn = lambda q, k, v, s, causal: attn.attention_cudnn_packed(q, k, v, s, causal=causal,
                                                               max_segments=max_segments)
  _poison_device_memory([q.nbytes * 2, q.nbytes * 2, k.nbytes * 2, v.nbytes * 2])
  got = jax.block_until_ready(fwd_bwd(fn, jnp.bfloat16))
  with jax.default_matmul_precision("highest"):
    ref = fwd_bwd(attn.attention_xla, jnp.float32)
  for name, x, r in zip(("o", "dq", "dk", "dv"), got, ref):
    assert x.dtype == jnp.bfloat16
    kernels_util.assert_close(x, r, jnp.bfloat16, f"{name} B{B} T{T} H{H}/{K} d{D}")


# Varied lengths a row (a row of one document, rows ending in padding, a length-1 document).
DOCS = [[300, 900, 120, 728], [2048], [1, 511, 700, 200], [64] * 20 + [128] * 4]


@pytest.mark.gpu
@pytest.mark.parametrize("H,K,D", [(32, 4, 64), (16, 2, 128)])
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_packed_matches_reference_gpu(on_gpu, H, K, D, causal):
  _check_packed(4, 2048, H, K, D, _rows(4, 2048, DOCS), causal, seed=H + D + causal)


@pytest.mark.gpu
def test_cudnn_packed_random_documents_gpu(on_gpu):
  rng = np.random.default_rng(3)
  seg = kernels_util.packed_segments(rng, 3, 1000, with_padding=True)
  _check_packed(3, 1000, 8, 2, 64, seg, True, seed=5, max_segments=1000 // 2)


@pytest.mark.gpu
def test_cudnn_packed_one_document_a_row_and_no_gqa_gpu(on_gpu):
  _check_packed(2, 512, 8, 8, 64, jnp.ones((2, 512), jnp.int32), True, seed=7)


@pytest.mark.gpu
def test_cudnn_packed_overflowing_row_is_nan_gpu(on_gpu):
  """Row 1 has 5 segments in 4 slots: its output and gradients are NaN (a non-finite step),
  never attended across documents; row 0 stays exact."""
  seg = _rows(2, 256, [[100, 156], [50, 50, 50, 50, 56]])
  ks = jax.random.split(jax.random.key(1), 3)
  q = kernels_util.normal(ks[0], (2, 256, 8, 64), jnp.bfloat16)
  k, v = (kernels_util.normal(x, (2, 256, 2, 64), jnp.bfloat16) for x in ks[1:])
  f = lambda q, k, v: attn.attention_cudnn_packed(q, k, v, seg, causal=True, max_segments=4)
  o, vjp = jax.vjp(f, q, k, v)
  dq, dk, dv = vjp(jnp.ones_like(o))
  for x in (o, dq, dk, dv):
    assert bool(jnp.isfinite(x[0]).all()) and bool(jnp.isnan(x[1]).all())
  kernels_util.assert_close(o[0], attn.attention_xla(q, k, v, seg, causal=True)[0],
                            jnp.bfloat16, "row 0")
