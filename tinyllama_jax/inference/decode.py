"""The decode loop on the device: one compiled call runs up to CHUNK new tokens for a batch.

A prefill writes the prompts' keys and values into the KV cache (model.Llama.forward, the code
that trains, with the config's kernels and fused projections); then each call is a
`lax.while_loop` over tokens with the sampling inside (greedy, temperature, top-p), a per-row
done mask (EOS), and the cache donated, so the host only wakes every CHUNK tokens (to stream),
and the loop stops early once every row is done. Each row writes at its own positions and
attends to cache slots up to its own position, so prompts of different lengths share a batch
exactly. Weights are cast to the compute dtype once (`cast_params`), not inside the loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinyllama_jax import model as model_lib

CHUNK = 32  # new tokens per device call: the host wakes (and streams) once a chunk
NO_TOKEN = -1  # an output slot with no token (the row was done), and "no EOS id"


def cast_params(params, cfg_model):
  """The params in the compute dtype. Decoding reads every weight once a token: casting fp32
  weights inside the loop would read them twice and write them once more, every token."""
  dtype = model_lib.compute_dtype(cfg_model)
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def round_up(n, multiple=64):
  """Cache and prompt lengths round up, so similar requests reuse compiled programs."""
  return -(-int(n) // multiple) * multiple


def logits_of(params, h_BD):
  return jnp.einsum("...d,dv->...v", h_BD, params["lm_head"].astype(h_BD.dtype),
                    preferred_element_type=jnp.float32)


def nucleus(logits_BV, temperature, top_p):
  """logits / temperature with everything outside the top-p nucleus at -inf (traced scalars)."""
  logits_BV = logits_BV / temperature
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  # Keep a token while the probability mass before it is below top_p (the first always stays).
  n_keep_B = jnp.maximum(jnp.sum(jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p, axis=-1), 1)
  cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[..., None] - 1, axis=-1)
  return jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)


def sample(logits_BV, key, temperature, top_p):
  """A draw from softmax(logits / temperature) cut to the top-p nucleus."""
  return jax.random.categorical(key, nucleus(logits_BV, temperature, top_p),
                                axis=-1).astype(jnp.int32)


def only_valid(logits_BV, n_valid):
  # Ids past the tokenizer's pieces have untrained embeddings and no text: never emit them.
  return jnp.where(jnp.arange(logits_BV.shape[-1]) < n_valid, logits_BV, -jnp.inf)


def for_decoding(cfg_model):
  """The model config decoding runs: FP8 matmuls (model.matmul_dtype=fp8) are a training-speed
  option whose per-tensor scales are computed from each tensor in the call; a decode step would
  quantize every weight again each token (reading the weights twice), so decoding a run trained
  in fp8 uses bf16 matmuls on the same master weights."""
  if cfg_model.get("matmul_dtype", "bf16") == "bf16":
    return cfg_model
  cfg_model = cfg_model.copy_and_resolve_references()
  with cfg_model.unlocked():
    cfg_model.matmul_dtype = "bf16"
  return cfg_model


def forward_fn(cfg_model):
  """(params, tokens_BT, positions_BT, cache[, layers]) -> (h_BTD, cache): the model's cached
  forward (for_decoding's config); a loop passes the layers' weights split once before it
  (model.split_layers)."""
  graphdef = model_lib.graphdef(for_decoding(cfg_model))

  def forward(params, tokens_BT, positions_BT, cache, layers=None):
    return nnx.merge(graphdef, params).forward(tokens_BT, positions_BT, cache=cache,
                                               layers=layers)
  return forward


def split_for_loop(params, cfg_model):
  """model.split_layers, where the forward slices per layer (not when it scans the layers)."""
  return None if cfg_model.scan_layers else model_lib.split_layers(params)


def prefill_fn(cfg_model, length):
  """(params, tokens_BT, lengths_B) -> (logits_BV at each prompt's last token, the cache)."""
  forward = forward_fn(cfg_model)

  def prefill(params, tokens_BT, lengths_B):
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cache = model_lib.init_cache(cfg_model, B, length, model_lib.compute_dtype(cfg_model))
    h_BTD, cache = forward(params, tokens_BT, positions_BT, cache)
    h_BD = jnp.take_along_axis(h_BTD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return logits_of(params, h_BD), cache
  return prefill


def knobs_for(cfg_model, *, max_new_tokens, eos_id, temperature, top_p, seed, n_valid):
  """The request's settings as device scalars: changing them recompiles nothing."""
  return {"temperature": jnp.float32(temperature or 1.0), "top_p": jnp.float32(top_p),
          "n_valid": jnp.int32(n_valid or cfg_model.vocab_size),
          "eos_id": jnp.int32(NO_TOKEN if eos_id is None else eos_id),
          "max_new": jnp.int32(max_new_tokens), "key": jax.random.key(seed)}


def pick_fn(greedy):
  def pick(logits_BV, knobs, key):
    logits_BV = only_valid(logits_BV, knobs["n_valid"])
    if greedy:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return sample(logits_BV, key, knobs["temperature"], knobs["top_p"])
  return pick


def fused_layers(cfg_model, tokens):
  """Whether a loop's steps of `tokens` tokens (rows x new tokens a row) run the fused decode
  layer: model.kernels.decode_layer=pallas up to 16 tokens, auto for one token on a GPU (where
  it wins: docs/kernels.md); both need a forward that loops over the layers (a cache a layer).
  Runs saved before auto existed keep their xla."""
  choice = cfg_model.kernels.get("decode_layer", "xla")
  if cfg_model.scan_layers or tokens > model_lib.decode_layer.MAX_ROWS:
    return False
  if choice == "auto":
    return tokens == 1 and jax.default_backend() == "gpu"
  return choice == "pallas"


def layout_fn(cfg_model, tokens):
  """params -> the loop's `layers` made once before it: the fused decode layer's transposed
  weights (model.decode_layers) where fused_layers, else None (the loop splits the stacked
  weights itself, which XLA fuses into their consumers)."""
  if fused_layers(cfg_model, tokens):
    return jax.jit(model_lib.decode_layers)
  return lambda params: None


class Decoder:
  """Compiled prefill and chunk for one (model, batch, cache length, greedy or not, chunk)."""

  def __init__(self, cfg_model, *, batch, length, greedy, chunk, compiler_options=None):
    forward, pick = forward_fn(cfg_model), pick_fn(greedy)
    prefill_logits = prefill_fn(cfg_model, length)

    def prefill(params, tokens_BT, lengths_B, knobs):
      logits_BV, cache = prefill_logits(params, tokens_BT, lengths_B)
      # Token n of every row draws with key fold_in(key, n): a seed reproduces, whatever CHUNK.
      first_B = pick(logits_BV, knobs, jax.random.fold_in(knobs["key"], 0))
      return {"cache": cache, "last": first_B, "positions": lengths_B,
              "done": first_B == knobs["eos_id"], "n": jnp.int32(1)}

    def run(params, layers, state, knobs):
      # The fused layer's weights come transposed (`layout`, once a decode call); the others
      # are split here, once a chunk, which XLA fuses into their consumers.
      layers = split_for_loop(params, cfg_model) if layers is None else layers

      def going(carry):
        i, s, _ = carry
        return (i < chunk) & (s["n"] < knobs["max_new"]) & ~jnp.all(s["done"])

      def step(carry):
        i, s, out_BC = carry
        h_B1D, cache = forward(params, s["last"][:, None], s["positions"][:, None], s["cache"],
                               layers)
        next_B = pick(logits_of(params, h_B1D[:, 0]), knobs,
                      jax.random.fold_in(knobs["key"], s["n"]))
        out_BC = out_BC.at[:, i].set(jnp.where(s["done"], NO_TOKEN, next_B))
        return i + 1, {"cache": cache, "last": next_B, "positions": s["positions"] + 1,
                       "done": s["done"] | (next_B == knobs["eos_id"]), "n": s["n"] + 1}, out_BC

      out_BC = jnp.full((state["last"].shape[0], chunk), NO_TOKEN, jnp.int32)
      # Loop-invariant work on the weights (the layers' split, fused projections'
      # concatenations) stays out of the loop: once a chunk, not once a token.
      _, state, out_BC = jax.lax.while_loop(going, step, (jnp.int32(0), state, out_BC))
      return state, out_BC

    # XLA options of these two programs only (bench.decode --xla_options measures them); the
    # training step compiles with the process's defaults.
    self.prefill = jax.jit(prefill, compiler_options=compiler_options)
    self.run = jax.jit(run, donate_argnums=2, compiler_options=compiler_options)
    self.layout = layout_fn(cfg_model, batch)


_DECODERS = {}


def cached(table, key, build):
  """Compiled programs, kept for reuse across calls of the same shapes (at most 4 a table)."""
  if key not in table:
    if len(table) >= 4:  # keep compiled code bounded: drop the oldest
      table.pop(next(iter(table)))
    table[key] = build()
  return table[key]


def prompt_batch(prompts, length):
  """The prompts as one [B, T] array, T the longest rounded up (within the cache length)."""
  T = min(round_up(max(len(p) for p in prompts)), length)
  tokens_BT = np.zeros((len(prompts), T), np.int32)
  for i, p in enumerate(prompts):
    tokens_BT[i, :len(p)] = p
  return tokens_BT


def decode(params, cfg_model, prompts, lengths, *, max_new_tokens, eos_id=None, temperature=0.0,
           top_p=1.0, seed=0, n_valid=None, on_token=None, chunk=CHUNK, compiler_options=None):
  """New tokens for each prompt (checked by the caller: generate.check_request), stopping after
  eos_id (kept) or max_new_tokens. on_token(i, token) sees each row's tokens once a chunk;
  compiler_options (XLA's, name -> value) compile the decode programs."""
  length = min(round_up(lengths.max() + max_new_tokens), cfg_model.max_seq_len)
  greedy = temperature == 0.0
  options = tuple(sorted((compiler_options or {}).items()))
  decoder = cached(_DECODERS, (cfg_model.to_json(), len(prompts), length, greedy, chunk, options),
                   lambda: Decoder(cfg_model, batch=len(prompts), length=length, greedy=greedy,
                                   chunk=chunk, compiler_options=compiler_options))
  params = cast_params(params, cfg_model)  # a no-op when the caller cast them at load
  knobs = knobs_for(cfg_model, max_new_tokens=max_new_tokens, eos_id=eos_id,
                    temperature=temperature, top_p=top_p, seed=seed, n_valid=n_valid)
  out = [[] for _ in prompts]

  def emit(tokens_BC):
    for i, row in enumerate(tokens_BC):
      for token in row[row != NO_TOKEN].tolist():
        out[i].append(token)
        if on_token is not None:
          on_token(i, token)

  layers = decoder.layout(params)
  state = decoder.prefill(params, prompt_batch(prompts, length), lengths, knobs)
  first_B, n, done_B = jax.device_get((state["last"], state["n"], state["done"]))
  emit(first_B[:, None])
  while n < max_new_tokens and not done_B.all():
    state, out_BC = decoder.run(params, layers, state, knobs)
    out_BC, n, done_B = jax.device_get((out_BC, state["n"], state["done"]))
    emit(out_BC)
  return out
