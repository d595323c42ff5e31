"""The Llama-2 decoder (TinyLlama's architecture) as a Flax NNX module.

Its parameters are params.py's table (paths, shapes, logical axes, init); the module creates
exactly those.

`scan_layers` only changes how the block runs (a `lax.scan` over the stack, or a Python loop
over static slices, which XLA schedules better), never what is saved. The block itself is a pure
function of one layer's parameters.

One forward serves training and decoding: `Llama.forward` takes an optional KV cache
(`init_cache`). Without one it is the causal pass over whole rows that training runs; with one,
the tokens' keys and values are written into the cache at their positions and attention reads the
cache, which is prefill (a prompt) and decode (one token a row) alike.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tinyllama_jax import kernels, params, sharding
from tinyllama_jax.kernels import decode_layer, fp8, rope

# Remat policies by name. The tags are the checkpoint_name()s in `block`; a policy saves the
# tagged activations it names and recomputes everything else in the backward pass.
_TAGS_QKV = ("query_proj", "key_proj", "value_proj")
REMAT_POLICIES = {
    "none": None,  # no jax.checkpoint: keep every activation (TinyLlama's choice)
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn": jax.checkpoint_policies.save_only_these_names("attn_out"),
    "save_qkv_attn": jax.checkpoint_policies.save_only_these_names(*_TAGS_QKV, "attn_out"),
    "save_all_but_mlp": jax.checkpoint_policies.save_only_these_names(
        *_TAGS_QKV, "attn_out", "attn_proj"),
}



def compute_dtype(cfg_model):
  if cfg_model.compute_dtype == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return jnp.dtype(cfg_model.compute_dtype)


def resolve_attention(name, uses_segments, head_dim, seq_len=None, dtype=None):
  """'auto': splash attention on TPU; on a GPU the first usable backend of the measured table
  (kernels/attention_auto.json: per device kind, head dim and case, fastest first) that takes
  this call's seq_len and dtype, else cuDNN for one document a row and the Pallas flash kernel
  for packed rows; the reference otherwise."""
  if name != "auto":
    return name
  if jax.default_backend() == "tpu":
    return "splash"
  if jax.default_backend() != "gpu":
    return "xla"
  for backend in kernels.measured_attention(jax.devices()[0].device_kind, head_dim,
                                            uses_segments):
    if backend in kernels.backends("attention") and kernels.usable(
        "attention", backend, seq_len=seq_len, head_dim=head_dim, dtype=dtype):
      return backend
  return "pallas" if uses_segments else "cudnn"


# Activation layouts, for running a Pallas kernel per device (sharding.py maps the names).
_BTHD = ("act_batch", "act_seq", "act_heads", None)
_BTKD = ("act_batch", "act_seq", "act_kv_heads", None)
_BT = ("act_batch", "act_seq")
_BTX = ("act_batch", "act_seq", None)


def _per_device(op, backend, fn):
  """XLA cannot partition a Pallas custom call: on a sharded batch it would gather the whole
  batch onto every device. So Pallas backends run under shard_map on each device's local block
  (the identity when no mesh is set, or it has one device). cuDNN too: its partitioning rule
  refused q, k and v whose propagated shardings differed under FSDP on two H200s. That was a
  symptom: the activations were split on D, not on the batch (bench/NOTES.md, "FSDP on 2
  devices"); `block` now pins q, k, v to the batch split, so the shard_map boundary moves
  nothing (same collectives as the jnp reference without it) and only keeps cuDNN's
  partitioner out of the way."""
  if backend not in ("pallas", "cudnn", "splash", "mgpu"):
    return fn
  local = sharding.shard_map_local
  if op == "attention":
    def attention(q, k, v, segment_ids, *, causal):
      if segment_ids is None:
        return local(lambda q, k, v: fn(q, k, v, None, causal=causal), [_BTHD, _BTKD, _BTKD],
                     _BTHD)(q, k, v)
      return local(lambda q, k, v, s: fn(q, k, v, s, causal=causal), [_BTHD, _BTKD, _BTKD, _BT],
                   _BTHD)(q, k, v, segment_ids)
    return attention
  if op == "rms_norm":
    return lambda x, w, eps: local(lambda x, w: fn(x, w, eps), [_BTX, None], _BTX)(x, w)
  if op == "add_rms_norm":
    return lambda x, d, w, eps: local(lambda x, d, w: fn(x, d, w, eps), [_BTX, _BTX, None],
                                      [_BTX, _BTX])(x, d, w)
  if op == "swiglu_packed":
    return local(fn, [_BTX], _BTX)
  raise ValueError(f"no per-device layout for op {op!r}")


class Ops:
  """The fused ops the block uses, each from the backend its config names. `rms_norm` picks the
  backend of both norm forms (alone, and fused with the residual add); `rope` rotates q and k
  in one pass."""

  def __init__(self, cfg_kernels, uses_segments, head_dim, seq_len=None, dtype=None):
    def get(op, backend):
      return _per_device(op, backend, kernels.get(op, backend))
    self.attention = get("attention", resolve_attention(cfg_kernels.attention, uses_segments,
                                                        head_dim, seq_len, dtype))
    self.rms_norm = get("rms_norm", cfg_kernels.rms_norm)
    self.add_rms_norm = get("add_rms_norm", cfg_kernels.rms_norm)
    self.rope_qk = get("rope_qk", cfg_kernels.rope)
    swiglu = cfg_kernels.swiglu
    self.swiglu = get("swiglu", "xla")
    # Gate and up as one array (fused projections). 'auto': the Pallas kernel on GPU, which
    # writes d(gate_up) in one pass (1.4% of the 1b step on an H200, docs/kernels.md); separate
    # gate and up stay with XLA, whose fusions beat the Pallas pair (that kernel is retired).
    packed = ("pallas" if jax.default_backend() == "gpu" else "xla") if swiglu == "auto" else swiglu
    self.swiglu_packed = get("swiglu_packed", packed)
    # XLA alone: the Pallas cache kernels lost to it on an H200 (docs/kernels.md, "Retired"), so
    # a config saved with model.kernels.attention_cache or decode_gemv decodes with it too.
    self.attention_cache = kernels.get("attention_cache", "xla")


def projection(cfg_model):
  """The einsum of the block's dense projections: jnp's in the compute dtype, or with
  matmul_dtype='fp8' the FP8 GEMM of kernels/fp8.py (e4m3 forward, e5m2 gradients, current
  per-tensor scaling; no state). The embedding and the lm_head never take this path."""
  # .get: the saved config of a run from before the keys (generate, evaluate) reads as bf16
  if cfg_model.get("matmul_dtype", "bf16") != "fp8":
    return jnp.einsum
  return functools.partial(fp8.einsum, gemm_dtype=cfg_model.get("fp8_gemm_output", "float32"))


def _swiglu_down(w_down_FD, *gate_up, ops, proj):
  """down(swiglu(gate, up)); gate and up as one fused [.., 2F] array or as two."""
  if len(gate_up) == 1:
    act_BTF = ops.swiglu_packed(checkpoint_name(gate_up[0], "mlp_gate_up"))
  else:
    act_BTF = ops.swiglu(checkpoint_name(gate_up[0], "mlp_gate"),
                         checkpoint_name(gate_up[1], "mlp_up"))
  return proj("btf,fd->btd", act_BTF, w_down_FD)


def init_cache(cfg, batch, length, dtype):
  """An empty KV cache for `length` positions: one {"k", "v"} of [B, S, K, Dh] a layer (a tuple),
  or, when the layers are scanned, every layer's stacked, [L, B, S, K, Dh]. Per layer, because a
  loop over the stacked form reads layer i as a slice and writes it back with .at[i].set: inside
  the decode loop that copied the whole cache every layer, every token (bench/NOTES.md,
  2026-12-02, H200, 352dbab); separate arrays are each updated in place."""
  shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    shape = (cfg.n_layers,) + shape
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
               for _ in range(cfg.n_layers))


def write_cache(cache_BSKD, x_BTKD, positions_BT):
  """x written at its rows' positions. The positions of a row are consecutive (prefill, a decode
  step, a speculative round), so a row is one dynamic_update_slice at its first position: with
  one row, the update in place; with more, XLA makes the vmapped slices one scatter."""
  x_BTKD = x_BTKD.astype(cache_BSKD.dtype)
  write = lambda c_SKD, x_TKD, p: jax.lax.dynamic_update_slice(c_SKD, x_TKD, (p, 0, 0))
  if cache_BSKD.shape[0] == 1:
    return write(cache_BSKD[0], x_BTKD[0], positions_BT[0, 0])[None]
  return jax.vmap(write)(cache_BSKD, x_BTKD, positions_BT[:, 0])


def _attend(q_BTHK, k_BTGK, v_BTGK, positions_BT, segment_ids_BT, cache, ops):
  """(o_BTHK, the layer's cache or None): causal attention over the rows, or over the cache
  after writing these tokens' keys and values at their positions."""
  if cache is None:
    return ops.attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, causal=True), None
  cache = {"k": write_cache(cache["k"], k_BTGK, positions_BT),
           "v": write_cache(cache["v"], v_BTGK, positions_BT)}
  return ops.attention_cache(q_BTHK, cache["k"], cache["v"], positions_BT), cache


def decode_block(w, x_BTD, positions_BT, cache, *, cfg):
  """`block` for a few new tokens (at most 16 in all: a decode step, a speculative round) as
  kernels/decode_layer's five kernels, over the layer's weights in their decode layout
  (decode_layers)."""
  B, T, D = x_BTD.shape
  H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  if B * T > decode_layer.MAX_ROWS:
    raise ValueError(f"the fused decode layer runs at most {decode_layer.MAX_ROWS} tokens a "
                     f"step, not {B} x {T}: set model.kernels.decode_layer=xla")
  cos_BTF, sin_BTF = rope.cos_sin(positions_BT, Dh, cfg.rope_theta)
  x_MD = x_BTD.reshape(B * T, D)
  qkv_MND = decode_layer.norm_gemv(x_MD, w["attn_norm"], w["qkv_NK"], cfg.norm_eps)
  o_BTHD, k, v = decode_layer.attend(qkv_MND.reshape(B, T, H + 2 * K, Dh), cos_BTF, sin_BTF,
                                     cache["k"], cache["v"], positions_BT, H)
  x_MD = decode_layer.gemv_add(o_BTHD.reshape(B * T, H * Dh), w["o_NK"], x_MD)
  a_MF = decode_layer.norm_gemv_swiglu(x_MD, w["mlp_norm"], w["gate_up_NK"], cfg.norm_eps)
  x_MD = decode_layer.gemv_add(a_MF, w["down_NK"], x_MD)
  return x_MD.reshape(B, T, D), {"k": k, "v": v}


def block(p, x_BTD, positions_BT, segment_ids_BT, cache=None, *, cfg, ops, dtype):
  """One pre-norm Llama layer: x + attn(norm(x)), then x + mlp(norm(x)). Returns (x, this
  layer's updated KV cache, or None without one). Weights in the decode layout
  (decode_layers) run the step as decode_block."""
  w = {k: v.astype(dtype) for k, v in p.items()}
  if "qkv_NK" in w:
    return decode_block(w, x_BTD, positions_BT, cache, cfg=cfg)
  H, K = cfg.n_heads, cfg.n_kv_heads
  proj = projection(cfg)
  # Concatenating tensor-split weights would interleave shards: fuse only without a tensor split.
  unsplit = sharding.shards("heads") == 1 and sharding.shards("mlp") == 1
  fuse = cfg.fuse_projections and unsplit
  x_BTD = sharding.constrain(x_BTD, _BTX)  # batch-split, whatever the weights' FSDP split
  h_BTD = ops.rms_norm(x_BTD, w["attn_norm"], cfg.norm_eps)
  if fuse:
    w_qkv = jnp.concatenate([w["wq"], w["wk"], w["wv"]], axis=1)  # [D, H + 2K, Dh]
    qkv_BTNK = proj("btd,dnk->btnk", h_BTD, w_qkv)
    q_BTHK, k_BTGK, v_BTGK = (qkv_BTNK[:, :, :H], qkv_BTNK[:, :, H:H + K],
                              qkv_BTNK[:, :, H + K:])
  else:
    q_BTHK = proj("btd,dhk->bthk", h_BTD, w["wq"])
    k_BTGK = proj("btd,dgk->btgk", h_BTD, w["wk"])
    v_BTGK = proj("btd,dgk->btgk", h_BTD, w["wv"])
  q_BTHK = checkpoint_name(q_BTHK, "query_proj")
  k_BTGK = checkpoint_name(k_BTGK, "key_proj")
  v_BTGK = checkpoint_name(v_BTGK, "value_proj")
  q_BTHK, k_BTGK = ops.rope_qk(q_BTHK, k_BTGK, positions_BT, cfg.rope_theta)
  # One sharding for q, k and v (cuDNN's partitioner refuses them otherwise).
  q_BTHK = sharding.constrain(q_BTHK, _BTHD)
  k_BTGK, v_BTGK = sharding.constrain(k_BTGK, _BTKD), sharding.constrain(v_BTGK, _BTKD)
  o_BTHK, cache = _attend(q_BTHK, k_BTGK, v_BTGK, positions_BT, segment_ids_BT, cache, ops)
  o_BTHK = checkpoint_name(o_BTHK, "attn_out")
  attn_BTD = checkpoint_name(proj("bthk,hkd->btd", o_BTHK, w["wo"]), "attn_proj")

  x_BTD, h_BTD = ops.add_rms_norm(x_BTD, attn_BTD, w["mlp_norm"], cfg.norm_eps)
  if fuse:
    gate_up = (proj("btd,df->btf", h_BTD, jnp.concatenate([w["w_gate"], w["w_up"]], 1)),)
  else:
    gate_up = (proj("btd,df->btf", h_BTD, w["w_gate"]),
               proj("btd,df->btf", h_BTD, w["w_up"]))
  mlp_down = functools.partial(_swiglu_down, ops=ops, proj=proj)
  if cfg.recompute_mlp_act:
    # Residuals: gate, up and the weight; the product is rebuilt in the backward for dW_down.
    mlp_down = jax.checkpoint(mlp_down, policy=jax.checkpoint_policies.nothing_saveable)
  return x_BTD + mlp_down(w["w_down"], *gate_up), cache


@jax.custom_vjp
def unstack_layers(x_L):
  """x_L[0], ..., x_L[L-1]: the unrolled loop's per-layer slices of a stacked parameter.

  Plain indexing gives the same values, but its transpose is a pad per layer and autodiff sums
  the L padded cotangents: XLA fused that chain into the gradient's consumers with L selects
  per element (1.9 ms a [22, 2048, 5632] weight on an H200, ~0.8 TB/s; bench/NOTES.md). Here
  the backward is one stack of the per-layer gradients, a concatenate."""
  return tuple(x_L[i] for i in range(x_L.shape[0]))


def _unstack_fwd(x_L):
  return unstack_layers(x_L), None


def _unstack_bwd(_, cts):
  return (jnp.stack(cts),)


unstack_layers.defvjp(_unstack_fwd, _unstack_bwd)


def _create(param, cfg, rngs):
  """One table row's initial value: ones, or normal with init_stds' std for its kind."""
  shape = params.shape(param, cfg)
  if param.init == "ones":
    return nnx.Param(jnp.ones(shape, jnp.float32))
  std, out_std = params.init_stds(cfg)
  std = out_std if param.init == "normal_out" else std
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class Layers(nnx.Module):
  """All L blocks' parameters, stacked on a leading layer axis."""

  def __init__(self, cfg, *, rngs):
    for param in params.PARAMS:
      if param.path[0] == "layers":
        setattr(self, param.path[1], _create(param, cfg, rngs))


class Llama(nnx.Module):

  def __init__(self, cfg, *, rngs):
    if cfg.n_heads % cfg.n_kv_heads:
      raise ValueError(f"model.n_heads ({cfg.n_heads}) must be a multiple of model.n_kv_heads "
                       f"({cfg.n_kv_heads})")
    if cfg.head_dim % 2:
      raise ValueError(f"model.head_dim ({cfg.head_dim}) must be even for RoPE")
    self.cfg = cfg
    # In the table's order, which the RNG draws follow (the layers' rows are consecutive).
    for param in params.PARAMS:
      if param.path[0] != "layers":
        setattr(self, param.path[0], _create(param, cfg, rngs))
      elif not hasattr(self, "layers"):
        self.layers = Layers(cfg, rngs=rngs)

  def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """The final-normed hidden states h_BTD in the compute dtype (the lm_head's input)."""
    return self.forward(tokens_BT, positions_BT, segment_ids_BT)[0]

  def forward(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, layers=None):
    """(h_BTD, cache): the final-normed hidden states in the compute dtype, and the KV cache
    (init_cache: per layer, or stacked with scan_layers) with these tokens' keys and values
    written at their positions (None without a cache). positions_BT default to 0..T-1; with a
    cache each row gives its own. layers: the layers' weights already split (split_layers), used
    instead of slicing the stacked ones."""
    cfg = self.cfg
    dtype = compute_dtype(cfg)
    B, T = tokens_BT.shape
    if T > cfg.max_seq_len:
      raise ValueError(f"sequence length {T} exceeds model.max_seq_len={cfg.max_seq_len}")
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ops = Ops(cfg.kernels, uses_segments=segment_ids_BT is not None, head_dim=cfg.head_dim,
              seq_len=T, dtype=dtype)
    x_BTD = sharding.constrain(jnp.take(self.embed[...], tokens_BT, axis=0).astype(dtype), _BTX)

    layer_fn = functools.partial(block, cfg=cfg, ops=ops, dtype=dtype)
    if cfg.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown model.remat {cfg.remat!r}; choose one of "
                       f"{sorted(REMAT_POLICIES)}")
    if cfg.remat != "none" and cache is None:
      # Outside a scan, XLA's CSE would merge the recomputation back into the forward pass and
      # quietly undo the remat; inside one it cannot, and the barrier only costs speed.
      layer_fn = jax.checkpoint(layer_fn, policy=REMAT_POLICIES[cfg.remat],
                                prevent_cse=not cfg.scan_layers)
    stacked = {name: getattr(self.layers, name)[...] for name in params.LAYER_PARAMS}
    if cfg.scan_layers:
      def scan_body(x, inputs):
        p, layer_cache = inputs
        return layer_fn(p, x, positions_BT, segment_ids_BT, layer_cache)
      x_BTD, cache = jax.lax.scan(scan_body, x_BTD, (stacked, cache))
    else:
      if layers is None:
        per_layer = {k: unstack_layers(v) for k, v in stacked.items()}
        layers = [{k: v[i] for k, v in per_layer.items()} for i in range(cfg.n_layers)]
      caches = [None] * cfg.n_layers if cache is None else cache
      if isinstance(caches, dict) or len(caches) != cfg.n_layers:
        raise ValueError("the forward's cache is stacked (scan_layers' layout): make it with "
                         "model.init_cache for a config of scan_layers=False")
      new_caches = []
      for i in range(cfg.n_layers):
        x_BTD, layer_cache = layer_fn(layers[i], x_BTD, positions_BT, segment_ids_BT, caches[i])
        new_caches.append(layer_cache)
      cache = None if cache is None else tuple(new_caches)
    return ops.rms_norm(x_BTD, self.final_norm[...].astype(dtype), cfg.norm_eps), cache

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    """Logits in fp32, [B, T, V]. Training uses `hidden` + the fused cross-entropy instead."""
    h_BTD = self.hidden(tokens_BT, positions_BT, segment_ids_BT)
    return jnp.einsum("btd,dv->btv", h_BTD, self.lm_head[...].astype(h_BTD.dtype),
                      preferred_element_type=jnp.float32)


def split_layers(params):
  """The layers' weights one dict a layer, from a params tree's stacked [L, ...] arrays. A loop
  around the forward (decoding) splits them once, before it: a slice of a stacked weight inside
  a loop body is a copy of that weight every iteration (1.1B decode: 0.9 of 2.6 ms a token)."""
  stacked = params["layers"]
  n_layers = next(iter(stacked.values())).shape[0]
  return [{k: v[i] for k, v in stacked.items()} for i in range(n_layers)]


def decode_layers(params):
  """split_layers' dicts in the fused decode layer's layout (decode_layer.layer_weights): the
  forward's `layers` for decode steps with model.kernels.decode_layer=pallas."""
  return [decode_layer.layer_weights(p) for p in split_layers(params)]


def graphdef(cfg):
  """The model's structure without arrays: nnx.merge(graphdef(cfg), params) is the model over a
  params tree (a checkpoint's, or the train state's)."""
  return nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(params=0))))
