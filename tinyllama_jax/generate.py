"""Sample text from a run: `python -m tinyllama_jax.generate --workdir=DIR --prompt="def fib(n):"`.

The command; inference/generate.py decodes (on the device, a chunk of tokens a call, through the
model's own forward with a KV cache). One prompt streams to the console as it is decoded; a batch
prints each completion at the end. With --draft_workdir=DRAFT --draft_tokens=K, speculative
decoding: the same output, fewer calls of the target (inference/speculative.py).
"""

import contextlib
import os
import sys
import time

import jax
from absl import app, flags, logging

from tinyllama_jax import cli
from tinyllama_jax.checkpoint import run as run_lib
from tinyllama_jax.data import chat as chat_lib
from tinyllama_jax.data import tokenizer as tokenizer_lib
from tinyllama_jax.inference import decode, speculative
from tinyllama_jax.inference import generate as generate_lib

FLAGS = flags.FLAGS


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


def continuation(tok, prompt_ids, new_ids):
  """The text `new_ids` add after the prompt. Decoded with the prompt: sentencepiece drops a
  text's leading space, so the continuation decoded alone would lose the one after the prompt."""
  new_ids = [t for t in new_ids if t != tok.eos_id]
  return tok.decode(list(prompt_ids) + new_ids)[len(tok.decode(list(prompt_ids))):]


def read_prompts(path):
  """The non-blank lines of --prompts_file, or one line naming the file and what is wrong."""
  try:
    with open(path, encoding="utf-8") as f:
      prompts = [line.rstrip("\n") for line in f if line.strip()]
  except OSError as e:
    raise ValueError(f"--prompts_file={path!r} cannot be read ({e.strerror})") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"--prompts_file={path!r} is not UTF-8 text (byte {e.start}): save it as "
                     "UTF-8, e.g. iconv -f latin1 -t utf-8") from None
  if not prompts:
    raise ValueError(f"--prompts_file={path!r} has no prompt (every line is blank): write one "
                     "prompt a line")
  return prompts


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
    new = generate_lib.generate(
        params, cfg.model, [ids], eos_id=tok.eos_id, n_valid=tok.vocab_size,
        on_token=Streamer(tok, ids, out),
        **{**sampling, "max_new_tokens": min(sampling["max_new_tokens"], room)})[0]
    out.write("\n")
    messages.append({"role": "assistant",
                     "content": tok.decode([t for t in new if t != tok.eos_id])})
    if prompt is not None:
      return messages


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
  flags.DEFINE_bool("allow_other_tokenizer", False, "Use --tokenizer even though its sha256 is "
                    "not the one the run trained with (a warning instead of an error).")
  flags.DEFINE_string("draft_workdir", None, "Speculative decoding: a smaller run (same tokenizer "
                      "and vocab) whose drafts --workdir's model checks; same output, faster.")
  flags.DEFINE_integer("draft_tokens", 4, "Speculative decoding: tokens the draft proposes a "
                       "round (the target scores them in one call).")
  flags.DEFINE_bool("chat", False, "Chat in the run's template (data.chat_template): a reply to "
                    "--prompt, or, without one on a terminal, a session (Ctrl-D ends it).")
  flags.DEFINE_string("system", None, "With --chat: a system message first.")


@contextlib.contextmanager
def naming_the_draft():
  """The run readers' errors name the target's flags (--step, --tokenizer): say which run failed."""
  try:
    yield
  except ValueError as e:
    raise ValueError(f"--draft_workdir={FLAGS.draft_workdir!r}: {e}") from None


def load_draft(cfg, tok_path, prompt_ids):
  """(params, config) of --draft_workdir's latest checkpoint, once it can draft for the target."""
  if not os.path.isdir(FLAGS.draft_workdir):
    raise ValueError(f"--draft_workdir={FLAGS.draft_workdir!r} does not exist: pass a run "
                     "directory (train's --workdir, or an import)")
  with naming_the_draft():
    step = run_lib.resolve_step(FLAGS.draft_workdir)
    cfg_d = run_lib.run_config(FLAGS.draft_workdir, step)
    draft_tok = run_lib.tokenizer_path(cfg_d, FLAGS.draft_workdir)
  same = (draft_tok is not None
          and tokenizer_lib.file_sha256(draft_tok) == tokenizer_lib.file_sha256(tok_path))
  speculative.check_draft(cfg.model, cfg_d.model, draft_tokens=FLAGS.draft_tokens,
                          same_tokenizer=same)
  generate_lib.check_request(cfg_d.model, prompt_ids, max_new_tokens=FLAGS.max_new_tokens,
                temperature=FLAGS.temperature, top_p=FLAGS.top_p)
  with naming_the_draft():
    params = run_lib.load_params(FLAGS.draft_workdir, step, cfg_d.model)
  return decode.cast_params(jax.device_put(params), cfg_d.model), cfg_d.model


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # the console is for the generated text
  if not FLAGS.workdir:
    raise ValueError("--workdir is required")
  prompts = list(FLAGS.prompt) + (read_prompts(FLAGS.prompts_file) if FLAGS.prompts_file else [])
  if FLAGS.chat and (len(prompts) > 1 or (not prompts and not sys.stdin.isatty())):
    raise ValueError("--chat takes one --prompt=TEXT, or none for a session on a terminal")
  if not prompts and not FLAGS.chat:
    raise ValueError("give --prompt=TEXT (repeatable) or --prompts_file=FILE")
  generate_lib.check_settings(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                 top_p=FLAGS.top_p)
  step, cfg, tok = run_lib.open_run(FLAGS.workdir, FLAGS.step, tokenizer=FLAGS.tokenizer,
                                    allow_other_tokenizer=FLAGS.allow_other_tokenizer,
                                    needs_text="generate writes text")
  tok_path = tok.path
  if FLAGS.chat:
    params = jax.device_put(run_lib.load_params(FLAGS.workdir, step, cfg.model))
    chat(decode.cast_params(params, cfg.model), cfg, tok,
         prompt=prompts[0] if prompts else None, system=FLAGS.system,
         max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
         seed=FLAGS.seed)
    return
  prompt_ids = [([tok.bos_id] if cfg.data.add_bos else []) + tok.encode(p) for p in prompts]
  lengths = generate_lib.check_request(cfg.model, prompt_ids, max_new_tokens=FLAGS.max_new_tokens,
                          temperature=FLAGS.temperature, top_p=FLAGS.top_p)
  draft = load_draft(cfg, tok_path, prompt_ids) if FLAGS.draft_workdir else None
  # In the compute dtype once, at load: the decode loop then reads each weight once a token.
  params = decode.cast_params(jax.device_put(run_lib.load_params(FLAGS.workdir, step, cfg.model)),
                              cfg.model)
  stream = Streamer(tok, prompt_ids[0]) if len(prompts) == 1 else None
  if stream:
    sys.stdout.write(prompts[0])
  settings = dict(max_new_tokens=FLAGS.max_new_tokens, eos_id=tok.eos_id,
                  temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed,
                  n_valid=tok.vocab_size, on_token=stream)
  start = time.perf_counter()
  if draft:
    outs, stats = speculative.decode(params, cfg.model, *draft, prompt_ids, lengths,
                                     draft_tokens=FLAGS.draft_tokens, **settings)
  else:
    outs = generate_lib.generate(params, cfg.model, prompt_ids, **settings)
  seconds = time.perf_counter() - start
  if stream:
    sys.stdout.write("\n")
  else:
    for i, (prompt, ids) in enumerate(zip(prompts, outs)):
      print(f"--- [{i}]\n{prompt}{continuation(tok, prompt_ids[i], ids)}")
  if draft:
    print(f"speculative: {stats['acceptance']:.1%} of draft tokens accepted, "
          f"{stats['tokens_per_call']:.2f} tokens per target call, "
          f"{sum(map(len, outs)) / seconds:.1f} tokens/s (compiles included)")


def run_cli():
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run_cli()
