"""Decoding a batch of prompts (the command is tinyllama_jax/generate.py).

A compiled decoder over the model's own forward with a KV cache (model.Llama.forward, the same
code that trains, with the config's kernels and fused projections): one prefill over the prompts,
then the decode loop on the device, CHUNK tokens a call (inference/decode.py). Prompts of
different lengths share a batch without left padding: each row writes its keys/values at its own
positions and attends to cache slots up to its own position, so every row sees exactly what it
would see alone (and greedy decoding equals transformers' token for token). Greedy (temperature
0), temperature, and top-p (nucleus) sampling; `on_token` streams a chunk at a time. With a
draft model, speculative decoding (inference/speculative.py): the same output, fewer target calls.
"""

import numpy as np

from tinyllama_jax.inference import decode

# Below this, logits / T overflows float32 (1e-45 gives inf, then NaN, not greedy); above it the
# distribution is uniform for any logits a model gives: neither is sampling from the model.
TEMPERATURE_RANGE = (1e-3, 100.0)


def check_settings(*, max_new_tokens, temperature, top_p):
  """Sampling settings outside their ranges: one line naming the flag (before anything loads)."""
  if max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={max_new_tokens}: generate at least 1 token")
  low, high = TEMPERATURE_RANGE
  if not (temperature == 0 or low <= temperature <= high):  # NaN and inf too
    raise ValueError(f"--temperature={temperature}: use 0 (greedy) or a value in [{low:g}, "
                     f"{high:g}]")
  if not 0 < top_p <= 1:
    raise ValueError(f"--top_p={top_p}: use a value in (0, 1] (1: no nucleus cut)")


def check_request(cfg_model, prompts, *, max_new_tokens, temperature, top_p):
  """The prompts' lengths, once settings and prompts fit the model's context (one-line errors)."""
  check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (the BOS counts)")
  lengths = np.array([len(p) for p in prompts], np.int32)
  longest, limit = int(lengths.max()), cfg_model.max_seq_len
  if longest + max_new_tokens > limit:
    room = (f"lower --max_new_tokens to {limit - longest} or less" if longest < limit
            else "shorten the prompt")
    raise ValueError(f"a prompt of {longest} tokens and --max_new_tokens={max_new_tokens} do not "
                     f"fit the model's context of {limit} tokens: {room}")
  return lengths


def generate(params, cfg_model, prompts, *, max_new_tokens, eos_id=None, temperature=0.0,
             top_p=1.0, seed=0, n_valid=None, on_token=None):
  """New tokens for each prompt (lists of ids), stopping after eos_id (kept) or max_new_tokens.
  n_valid: the tokenizer's vocab size when it is below the model's (only those ids are sampled).

  on_token(i, token) is called as soon as row i's next token is on the host (for streaming:
  once a chunk of decode.CHUNK tokens, which the device runs without the host).
  """
  lengths = check_request(cfg_model, prompts, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p)
  return decode.decode(params, cfg_model, prompts, lengths, max_new_tokens=max_new_tokens,
                       eos_id=eos_id, temperature=temperature, top_p=top_p, seed=seed,
                       n_valid=n_valid, on_token=on_token)
