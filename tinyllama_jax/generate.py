"""Sample text from a run: `python -m tinyllama_jax.generate --workdir=DIR --prompt="def fib(n):"`.

A jitted decoder over the model's own forward with a KV cache (model.Llama.forward, the same
code that trains, with the config's kernels and fused projections): one prefill over the prompts,
then one compiled step per new token. Prompts of different lengths share a batch without left
padding: each row writes its keys/values at its own positions and attends to cache slots up to
its own position, so every row sees exactly what it would see alone (and greedy decoding equals
transformers' token for token). Greedy (temperature 0), temperature, and top-p (nucleus)
sampling. One prompt streams to the console as it is decoded; a batch prints each completion at
the end.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from tinyllama_jax import cli
from tinyllama_jax import model as model_lib
from tinyllama_jax.data import chat as chat_lib


def logits_of(params, h_BD):
  return jnp.einsum("bd,dv->bv", h_BD, params["lm_head"].astype(h_BD.dtype),
                    preferred_element_type=jnp.float32)


def sample(logits_BV, key, temperature, top_p):
  """softmax(logits / temperature) cut to the top-p nucleus (both may be traced scalars)."""
  logits_BV = logits_BV / temperature
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  # Keep a token while the probability mass before it is below top_p (the first always stays).
  n_keep_B = jnp.maximum(jnp.sum(jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p, axis=-1), 1)
  cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
  logits_BV = jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


class Decoder:
  """Compiled prefill and step for one (model, batch, cache length, greedy or not); sampling
  settings are arguments, so changing them recompiles nothing."""

  def __init__(self, cfg_model, *, batch, length, greedy):
    self.dtype = model_lib.compute_dtype(cfg_model)
    graphdef = model_lib.graphdef(cfg_model)

    def fwd(params, tokens_BT, positions_BT, cache):
      return nnx.merge(graphdef, params).forward(tokens_BT, positions_BT, cache=cache)

    def pick(logits_BV, knobs):
      # Ids past the tokenizer's pieces have untrained embeddings and no text: never emit them.
      valid_V = jnp.arange(logits_BV.shape[-1]) < knobs["n_valid"]
      logits_BV = jnp.where(valid_V, logits_BV, -jnp.inf)
      if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
      return sample(logits_BV, knobs["key"], knobs["temperature"], knobs["top_p"])

    def prefill(params, tokens_BT, lengths_B, knobs):
      B, T = tokens_BT.shape
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      cache = model_lib.init_cache(cfg_model, B, length, self.dtype)
      h_BTD, cache = fwd(params, tokens_BT, positions_BT, cache)
      h_BD = jnp.take_along_axis(h_BTD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
      return pick(logits_of(params, h_BD), knobs), cache

    def step(params, cache, tokens_B, positions_B, knobs):
      h_B1D, cache = fwd(params, tokens_B[:, None], positions_B[:, None], cache)
      return pick(logits_of(params, h_B1D[:, 0]), knobs), cache

    self.prefill = jax.jit(prefill)
    self.step = jax.jit(step, donate_argnums=1)


_DECODERS = {}


def decoder_for(cfg_model, batch, length, greedy):
  key = (cfg_model.to_json(), batch, length, greedy)
  if key not in _DECODERS:
    if len(_DECODERS) >= 4:  # keep compiled code bounded: drop the oldest
      _DECODERS.pop(next(iter(_DECODERS)))
    _DECODERS[key] = Decoder(cfg_model, batch=batch, length=length, greedy=greedy)
  return _DECODERS[key]


def check_settings(*, max_new_tokens, temperature, top_p):
  """Sampling settings outside their ranges: one line naming the flag (before anything loads)."""
  if max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={max_new_tokens}: generate at least 1 token")
  if not temperature >= 0:  # NaN too
    raise ValueError(f"--temperature={temperature}: use 0 (greedy) or more")
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

  on_token(i, token) is called as soon as row i's next token is known (for streaming).
  """
  lengths = check_request(cfg_model, prompts, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p)
  limit = cfg_model.max_seq_len
  B = len(prompts)
  # Cache and prompt lengths round up to multiples of 64, so similar requests reuse compiles.
  length = min(-(-int(lengths.max() + max_new_tokens) // 64) * 64, limit)
  T = min(-(-int(lengths.max()) // 64) * 64, length)
  tokens_BT = np.zeros((B, T), np.int32)
  for i, p in enumerate(prompts):
    tokens_BT[i, :len(p)] = p
  decoder = decoder_for(cfg_model, B, length, temperature == 0.0)
  key = jax.random.key(seed)
  knobs = {"temperature": jnp.float32(temperature or 1.0), "top_p": jnp.float32(top_p),
           "n_valid": jnp.int32(n_valid or cfg_model.vocab_size)}
  out = [[] for _ in range(B)]
  done = np.zeros(B, bool)
  positions_B = lengths.copy()
  next_B, cache = decoder.prefill(params, tokens_BT, lengths,
                                  {**knobs, "key": jax.random.fold_in(key, 0)})
  for n in range(max_new_tokens):
    next_np = np.asarray(next_B)
    for i in np.flatnonzero(~done):
      out[i].append(int(next_np[i]))
      if on_token is not None:
        on_token(i, int(next_np[i]))
      done[i] = eos_id is not None and next_np[i] == eos_id
    if done.all() or n == max_new_tokens - 1:
      break
    next_B, cache = decoder.step(params, cache, next_B, positions_B,
                                 {**knobs, "key": jax.random.fold_in(key, n + 1)})
    positions_B = positions_B + 1
  return out


class Streamer:
  """Prints one row's text as it grows; waits while a multi-byte character is half decoded."""

  def __init__(self, tokenizer, prompt_ids, out=sys.stdout):
    self.tok, self.ids, self.out = tokenizer, list(prompt_ids), out
    self.printed = len(tokenizer.decode(self.ids))

  def __call__(self, row, token):
    del row
    if token == self.tok.eos_id:
      return
    self.ids.append(token)
    text = self.tok.decode(self.ids)
    if not text.endswith("\ufffd"):
      self.out.write(text[self.printed:])
      self.out.flush()
      self.printed = len(text)


def chat(params, cfg, tok, *, prompt=None, system=None, read=input, out=sys.stdout, **sampling):
  """A conversation in the run's chat template (data.chat_template; '' = Zephyr's): one reply to
  `prompt`, or, without one, a session reading user lines from `read` until EOF (Ctrl-D), the
  history kept. Each reply streams until </s>; returns the messages."""
  fmt = chat_lib.ChatFormat(cfg.data.get("chat_template", ""), tok)
  messages = [{"role": "system", "content": system}] if system else []
  while True:
    try:
      text = prompt if prompt is not None else read("> ")
    except EOFError:
      out.write("\n")
      return messages
    messages.append({"role": "user", "content": text})
    ids = fmt.prompt(messages)
    room = cfg.model.max_seq_len - len(ids)
    if room < 1:
      raise ValueError(f"the conversation ({len(ids)} tokens) no longer fits the model's context "
                       f"of {cfg.model.max_seq_len} tokens: start a new one")
    new = generate(params, cfg.model, [ids], eos_id=tok.eos_id, n_valid=tok.vocab_size,
                   on_token=Streamer(tok, ids, out),
                   **{**sampling, "max_new_tokens": min(sampling["max_new_tokens"], room)})[0]
    out.write("\n")
    messages.append({"role": "assistant",
                     "content": tok.decode([t for t in new if t != tok.eos_id])})
    if prompt is not None:
      return messages


# ----------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "Run directory (train's --workdir, or an import).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch.")
  flags.DEFINE_string("prompts_file", None, "A file with one prompt per line (a batch).")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy; otherwise sample from softmax(logits / T).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the smallest set of tokens with this "
                     "much probability (1: all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("tokenizer", None, "Sentencepiece .model instead of the run's own "
                      "(WORKDIR/tokenizer/tokenizer.model).")
  flags.DEFINE_bool("chat", False, "Chat in the run's template (data.chat_template): a reply to "
                    "--prompt, or, without one on a terminal, a session (Ctrl-D ends it).")
  flags.DEFINE_string("system", None, "With --chat: a system message first.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from tinyllama_jax.checkpoint import run as run_lib
  from tinyllama_jax.data import tokenizer as tokenizer_lib
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # the console is for the generated text
  if not FLAGS.workdir:
    raise ValueError("--workdir is required")
  prompts = list(FLAGS.prompt)
  if FLAGS.prompts_file:
    try:
      with open(FLAGS.prompts_file) as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
      raise ValueError(f"--prompts_file={FLAGS.prompts_file!r} cannot be read ({e.strerror})")
  if FLAGS.chat and (len(prompts) > 1 or (not prompts and not sys.stdin.isatty())):
    raise ValueError("--chat takes one --prompt=TEXT, or none for a session on a terminal")
  if not prompts and not FLAGS.chat:
    raise ValueError("give --prompt=TEXT (repeatable) or --prompts_file=FILE")
  check_settings(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                 top_p=FLAGS.top_p)
  step = run_lib.resolve_step(FLAGS.workdir, FLAGS.step)
  cfg = run_lib.run_config(FLAGS.workdir, step)
  tok_path = run_lib.tokenizer_path(cfg, FLAGS.workdir, FLAGS.tokenizer)
  if tok_path is None:
    raise ValueError(f"the run in {FLAGS.workdir} has no tokenizer (synthetic data): nothing to "
                     "decode text with (--tokenizer=PATH names one)")
  tok = tokenizer_lib.Tokenizer(tok_path)
  if FLAGS.chat:
    chat(jax.device_put(run_lib.load_params(FLAGS.workdir, step, cfg.model)), cfg, tok,
         prompt=prompts[0] if prompts else None, system=FLAGS.system,
         max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
         seed=FLAGS.seed)
    return
  prompt_ids = [([tok.bos_id] if cfg.data.add_bos else []) + tok.encode(p) for p in prompts]
  check_request(cfg.model, prompt_ids, max_new_tokens=FLAGS.max_new_tokens,
                temperature=FLAGS.temperature, top_p=FLAGS.top_p)
  params = jax.device_put(run_lib.load_params(FLAGS.workdir, step, cfg.model))
  stream = Streamer(tok, prompt_ids[0]) if len(prompts) == 1 else None
  if stream:
    sys.stdout.write(prompts[0])
  outs = generate(params, cfg.model, prompt_ids, max_new_tokens=FLAGS.max_new_tokens,
                  eos_id=tok.eos_id, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                  seed=FLAGS.seed, n_valid=tok.vocab_size, on_token=stream)
  if stream:
    sys.stdout.write("\n")
    return
  for i, (prompt, ids) in enumerate(zip(prompts, outs)):
    print(f"--- [{i}]\n{prompt}{tok.decode([t for t in ids if t != tok.eos_id])}")


def run_cli():
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run_cli()
