import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tinyllama_jax import config as config_lib, kernels, model
from tinyllama_jax.kernels import attention as attn
from tinyllama_jax.model import Llama, graphdef, init_cache
from tinyllama_jax.params import param_count


def small_model_config(**overrides):
  c = config_lib.model_config()
  c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads = 97, 32, 3, 4, 2
  c.head_dim, c.ffn_dim, c.max_seq_len, c.compute_dtype = 8, 48, 32, "float32"
  for k, v in overrides.items():
    c[k] = v
  return c


def load_config(name):
  return config_lib.load_config_file(f"configs/{name}.py")


def test_1b_parameter_count_is_tinyllamas():
  cfg = load_config("1b").model
  assert param_count(cfg) == 1_100_048_384
  assert param_count(cfg, with_embedding=False) == 1_034_512_384
  # The module really holds that many (shapes only, nothing allocated).
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(params=0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert sum(int(np.prod(x.shape)) for x in leaves) == 1_100_048_384


def test_init_follows_tinyllama():
  cfg = small_model_config(d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32,
                           ffn_dim=512, vocab_size=1000)
  m = Llama(cfg, rngs=nnx.Rngs(params=0))
  np.testing.assert_allclose(np.std(m.layers.wq[...]), (2 / (5 * 256)) ** 0.5, rtol=0.05)
  np.testing.assert_allclose(np.std(m.layers.wo[...]), 1 / 256 ** 0.5 / 4, rtol=0.05)
  np.testing.assert_allclose(np.std(m.embed[...]), (2 / (5 * 256)) ** 0.5, rtol=0.05)
  assert np.all(m.layers.attn_norm[...] == 1) and np.all(m.final_norm[...] == 1)


@pytest.mark.parametrize("remat", ["none", "full", "save_dots", "save_qkv_attn"])
def test_scan_and_unrolled_agree(remat):
  x = jax.random.randint(jax.random.key(1), (2, 16), 0, 97)
  outs, grads = [], []
  for scan in (False, True):
    cfg = small_model_config(scan_layers=scan, remat=remat)
    m = Llama(cfg, rngs=nnx.Rngs(params=0))
    gd, params = nnx.split(m, nnx.Param)
    f = lambda p: nnx.merge(gd, p)(x).mean()
    outs.append(m(x))
    grads.append(jax.grad(f)(params)["layers"]["wq"][...])
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scan,fuse", [(False, True), (True, False)])
def test_forward_with_a_cache_equals_the_full_forward(scan, fuse):
  """Prefill (rows of different lengths) then one token a step through the model's own forward
  with a KV cache give the full causal pass's hidden states, row by row."""
  cfg = small_model_config(scan_layers=scan, fuse_projections=fuse)
  m = Llama(cfg, rngs=nnx.Rngs(params=0))
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 12), 0, 97))
  full = np.asarray(m.hidden(tokens))
  params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
  forward = jax.jit(lambda p, t, pos, c: nnx.merge(graphdef(cfg), p).forward(t, pos, cache=c))
  lengths = np.array([5, 3])  # row 1's prompt is shorter: it decodes from position 3
  prompt = np.where(np.arange(5)[None] < lengths[:, None], tokens[:, :5], 0)
  h, cache = forward(params, prompt, np.broadcast_to(np.arange(5), (2, 5)),
                     init_cache(cfg, 2, 16, jnp.float32))
  got = {0: list(np.asarray(h[0, :5])), 1: list(np.asarray(h[1, :3]))}
  pos = lengths.copy()
  for _ in range(12 - 5):
    h, cache = forward(params, tokens[np.arange(2), pos][:, None], pos[:, None], cache)
    for row in range(2):
      got[row].append(np.asarray(h[row, 0]))
    pos = pos + 1
  np.testing.assert_allclose(np.stack(got[0]), full[0, :12], atol=1e-5)
  np.testing.assert_allclose(np.stack(got[1]), full[1, :10], atol=1e-5)
  assert not np.allclose(full[0, 4], full[1, 4])  # the rows really differ


def test_causal_future_tokens_do_not_leak():
  m = Llama(small_model_config(), rngs=nnx.Rngs(params=0))
  x = jax.random.randint(jax.random.key(2), (1, 16), 0, 97)
  y = x.at[0, 10:].set((x[0, 10:] + 1) % 97)
  np.testing.assert_allclose(m(x)[0, :10], m(y)[0, :10], rtol=1e-5, atol=1e-6)
  assert not np.allclose(m(x)[0, 10:], m(y)[0, 10:])


def naive_attention(q, k, v, segment_ids):
  """Repeats K/V per group and masks with Python loops: slow but obviously right."""
  H, K = q.shape[2], k.shape[2]
  k = np.repeat(np.asarray(k, np.float64), H // K, axis=2)
  v = np.repeat(np.asarray(v, np.float64), H // K, axis=2)
  q = np.asarray(q, np.float64)
  B, T, _, D = q.shape
  out = np.zeros_like(q)
  for b in range(B):
    for t in range(T):
      allowed = [s for s in range(t + 1) if segment_ids is None or segment_ids[b, s] == segment_ids[b, t]]
      for h in range(H):
        logits = np.array([q[b, t, h] @ k[b, s, h] for s in allowed]) / np.sqrt(D)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[b, t, h] = sum(pi * v[b, s, h] for pi, s in zip(p, allowed))
  return out


@pytest.mark.parametrize("H,K", [(4, 4), (4, 1), (8, 2)])
def test_xla_attention_gqa_and_segments(H, K):
  keys = jax.random.split(jax.random.key(3), 3)
  B, T, D = 2, 9, 8
  q = jax.random.normal(keys[0], (B, T, H, D))
  k = jax.random.normal(keys[1], (B, T, K, D))
  v = jax.random.normal(keys[2], (B, T, K, D))
  segments = np.array([[1, 1, 1, 2, 2, 3, 4, 4, 4], [1] * 5 + [2] * 4], np.int32)
  for seg in (None, segments):
    got = attn.attention_xla(q, k, v, None if seg is None else jnp.asarray(seg))
    np.testing.assert_allclose(got, naive_attention(q, k, v, seg), rtol=1e-4, atol=1e-5)


def test_packed_documents_do_not_see_each_other():
  """With segment ids, the second document's logits do not depend on the first's tokens."""
  m = Llama(small_model_config(), rngs=nnx.Rngs(params=0))
  x = jax.random.randint(jax.random.key(4), (1, 16), 0, 97)
  seg = jnp.array([[1] * 6 + [2] * 10])
  pos = jnp.array([list(range(6)) + list(range(10))])
  y = x.at[0, :6].set((x[0, :6] + 5) % 97)
  np.testing.assert_allclose(m(x, pos, seg)[0, 6:], m(y, pos, seg)[0, 6:], rtol=1e-5, atol=1e-6)
  # And document 2 alone gives the same logits as inside the packed row.
  np.testing.assert_allclose(m(x[:, 6:])[0], m(x, pos, seg)[0, 6:], rtol=1e-4, atol=1e-5)


def test_cudnn_refuses_packed_documents():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="cannot mask packed documents"):
    attn.attention_cudnn(q, q, q, jnp.ones((1, 4), jnp.int32))


def test_sequence_longer_than_model_maximum_is_refused():
  m = Llama(small_model_config(max_seq_len=8), rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match="max_seq_len"):
    m(jnp.zeros((1, 9), jnp.int32))


def test_pallas_backends_run_per_device_on_a_sharded_batch():
  """All-Pallas model on a 4-device mesh (interpret mode on CPU) equals the all-XLA model: the
  kernels run under shard_map on local blocks instead of on a gathered batch."""
  from tinyllama_jax import sharding
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, devices=jax.devices()[:4])
  x = jax.random.randint(jax.random.key(5), (4, 16), 0, 97)
  seg = jnp.array([[1] * 5 + [2] * 11] * 4)
  pos = jnp.array([list(range(5)) + list(range(11))] * 4)
  outs = {}
  for backend in ("xla", "pallas"):
    cfg = small_model_config(n_layers=1, head_dim=16)
    for op in ("attention", "rms_norm", "swiglu"):
      cfg.kernels[op] = backend
    m = Llama(cfg, rngs=nnx.Rngs(params=0))
    gd, params = nnx.split(m, nnx.Param)
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
      fn = jax.jit(lambda p, x, pos, seg: nnx.merge(gd, p)(x, pos, seg),
                   in_shardings=(None, batch_sh, batch_sh, batch_sh))
      outs[backend] = fn(params, x, pos, seg)
      if backend == "pallas":
        assert "shard_map" in str(jax.make_jaxpr(fn)(params, x, pos, seg))
  np.testing.assert_allclose(outs["pallas"], outs["xla"], rtol=1e-4, atol=1e-4)


def _loss_and_grads(cfg, x):
  gd, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)
  f = lambda p: (nnx.merge(gd, p)(x) ** 2).mean()
  return f, params, jax.value_and_grad(f)(params)


@pytest.mark.parametrize("fuse,recompute", [(True, False), (True, True), (False, True)])
def test_fused_projections_and_mlp_recompute_change_no_number(fuse, recompute):
  x = jax.random.randint(jax.random.key(2), (2, 16), 0, 97)
  _, _, (l_ref, g_ref) = _loss_and_grads(
      small_model_config(fuse_projections=False, recompute_mlp_act=False), x)
  _, _, (l, g) = _loss_and_grads(
      small_model_config(fuse_projections=fuse, recompute_mlp_act=recompute), x)
  np.testing.assert_allclose(l, l_ref, rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
    rel = np.linalg.norm(np.asarray(a - b)) / np.linalg.norm(np.asarray(b))
    assert rel < 1e-5, (path, rel)  # fp32; the fused GEMMs only reassociate sums


def test_mlp_recompute_keeps_gate_and_up_not_their_product():
  from jax._src.ad_checkpoint import saved_residuals  # no public name in jax 0.10
  x = jax.random.randint(jax.random.key(3), (2, 16), 0, 97)
  sizes = {}
  for recompute in (False, True):
    f, params, _ = _loss_and_grads(small_model_config(recompute_mlp_act=recompute), x)
    # [B, T, F] residuals per layer: gate+up (fused, 2F wide) plus, without recompute, the product.
    sizes[recompute] = sum(int(np.prod(a.shape)) for a, _ in saved_residuals(f, params)
                           if a.shape[-1:] in ((48,), (96,)) and len(a.shape) == 3)
  assert sizes[True] == 3 * (2 * 16 * 96)  # n_layers x the fused gate_up
  assert sizes[False] >= 3 * (2 * 16 * (96 + 48))  # also the product (and, at jax's level,
  # elementwise intermediates that XLA's fusions recompute anyway)


@pytest.mark.parametrize("fuse,gemm_output", [(True, "float32"), (False, "float32"),
                                               (True, "bfloat16")])
def test_fp8_matmuls_stay_close_to_fp32(fuse, gemm_output):
  """matmul_dtype='fp8' (emulated on CPU): loss and gradients within a loose band of fp32's,
  and really different (the block's GEMMs are rounded to fp8, the rest is untouched); with
  either GEMM output type (model.fp8_gemm_output)."""
  x = jax.random.randint(jax.random.key(2), (2, 16), 0, 97)
  _, _, (l_ref, g_ref) = _loss_and_grads(small_model_config(fuse_projections=fuse), x)
  _, _, (l, g) = _loss_and_grads(small_model_config(
      fuse_projections=fuse, matmul_dtype="fp8", fp8_gemm_output=gemm_output), x)
  assert 1e-5 < abs(float(l) / float(l_ref) - 1) < 0.05
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
    rel = np.linalg.norm(np.asarray(a - b)) / np.linalg.norm(np.asarray(b))
    # ~0.1 for most; ~0.2 for wq/wk, whose small gradients (near-uniform attention at init)
    # share one e5m2 scale with the larger ones around them
    assert rel < 0.3, (path, rel)


def test_fp8_matmuls_leave_the_embedding_and_lm_head_alone_and_the_remat_tags_in_place():
  """Exactly the block's four projections quantize: two e4m3 operands each a layer in the
  forward (the embedding gather and the lm_head's logits dot take none), and their backward
  one e5m2 gradient each. Every remat policy saves the same named tensors with fp8 as without."""
  from jax._src.ad_checkpoint import saved_residuals  # no public name in jax 0.10
  x = jax.random.randint(jax.random.key(3), (2, 16), 0, 97)
  cfg = small_model_config(matmul_dtype="fp8")
  f, params, _ = _loss_and_grads(cfg, x)

  def fp8_casts(jaxpr, counts):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "convert_element_type":
        name = jnp.dtype(eqn.params["new_dtype"]).name
        counts[name] = counts.get(name, 0) + 1
      for value in eqn.params.values():  # sub-jaxprs (jit, custom_vjp, remat), open or closed
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            fp8_casts(sub, counts)
    return counts

  forward = fp8_casts(jax.make_jaxpr(f)(params).jaxpr, {})
  assert forward.get("float8_e4m3fn") == 4 * 2 * cfg.n_layers and "float8_e5m2" not in forward
  both = fp8_casts(jax.make_jaxpr(jax.grad(f))(params).jaxpr, {})
  assert both.get("float8_e5m2") == 4 * cfg.n_layers
  assert both.get("float8_e4m3fn") == 4 * 2 * cfg.n_layers  # saved, not quantized again
  for remat in ("save_qkv_attn", "save_all_but_mlp", "save_attn"):
    names = {}
    for matmul_dtype in ("bf16", "fp8"):
      f, params, _ = _loss_and_grads(small_model_config(remat=remat, matmul_dtype=matmul_dtype), x)
      names[matmul_dtype] = sorted((why, a.shape) for a, why in saved_residuals(f, params)
                                   if why.startswith("named"))
    assert names["fp8"] == names["bf16"] and names["bf16"], remat


class _Device:
  def __init__(self, kind):
    self.device_kind = kind


@pytest.mark.parametrize("kind,head_dim,documents,want", [
    ("NVIDIA H200", 64, False, "cudnn"),  # the committed table's rows
    ("NVIDIA H200", 64, True, "pallas"),
    ("NVIDIA H200", 128, False, "cudnn"),
    ("Some Other GPU", 64, False, "cudnn"),  # not measured: the fixed rule
    ("Some Other GPU", 64, True, "pallas"),
    ("NVIDIA H200", 96, True, "pallas"),
])
def test_auto_attention_on_a_gpu_takes_the_measured_table(monkeypatch, kind, head_dim,
                                                          documents, want):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [_Device(kind)])
  assert model.resolve_attention("auto", uses_segments=documents, head_dim=head_dim) == want


def test_auto_attention_skips_a_measured_backend_that_is_not_installed(monkeypatch):
  table = {"GPU X": {"head_dims": {"64": {"no_documents": ["splash", "pallas", "cudnn"]}}}}
  monkeypatch.setattr(kernels, "_auto_attention", lambda: table)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [_Device("GPU X")])
  monkeypatch.setattr(kernels, "usable", lambda op, b, **call: b != "splash")
  assert model.resolve_attention("auto", uses_segments=False, head_dim=64) == "pallas"


@pytest.mark.parametrize("seq_len,dtype,want", [
    (2048, jnp.bfloat16, "mgpu"), (1000, jnp.bfloat16, "cudnn"), (2048, jnp.float32, "cudnn")])
def test_auto_attention_skips_a_backend_that_cannot_take_the_call(monkeypatch, seq_len, dtype,
                                                                  want):
  table = {"GPU X": {"head_dims": {"64": {"no_documents": ["mgpu", "cudnn"]}}}}
  monkeypatch.setattr(kernels, "_auto_attention", lambda: table)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [_Device("GPU X")])
  assert model.resolve_attention("auto", uses_segments=False, head_dim=64, seq_len=seq_len,
                                 dtype=dtype) == want


def test_the_auto_attention_table_names_registered_backends_only():
  with open(kernels.AUTO_ATTENTION_TABLE) as f:
    devices = json.load(f)["devices"]
  for kind, entry in devices.items():
    for dim, cases in entry["head_dims"].items():
      assert set(cases) <= {"documents", "no_documents"}, (kind, dim)
      for backends in cases.values():
        assert set(backends) <= set(kernels.backends("attention")), (kind, dim, backends)
