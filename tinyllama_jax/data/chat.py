"""Chat data for supervised fine-tuning: conversations -> a chat template -> tokens + loss mask.

A row is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` in .jsonl,
.jsonl.zst or .parquet. The default template is TinyLlama-1.1B-Chat-v1.0's (Zephyr's): each
message renders as `<|role|>\\n{content}</s>\\n`, and the generation prompt appends
`<|assistant|>\\n`. `data.chat_template` takes any Jinja template, rendered as transformers
renders one (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks; the globals messages,
bos_token, eos_token, add_generation_prompt, raise_exception); the default is rendered in Python,
the same text, so jinja2 is needed only for a custom template.

What the loss sees: for every assistant message i, render(messages[:i], add_generation_prompt)
must be a prefix of render(messages[:i + 1]); the rest, less trailing whitespace (the newline
between turns), is the assistant's: its content and its closing eos. Every other token
(system, user, the `<|assistant|>\\n` header) gets loss_mask 0.

Token boundaries: the rendered text is cut at the literal bos/eos strings (they become the
special ids, as transformers does with split_special_tokens=False, which a chat run's export
writes); each piece between them is encoded whole with sentencepiece, and every token is the
assistant's when its first byte is. Encoding the pieces whole is what transformers does (its
normalizer prepends '▁' to each piece between special tokens), so the ids equal
`apply_chat_template`'s exactly, and no sentencepiece dummy prefix appears at a mask boundary.
A token that straddles a boundary (none do with byte-fallback tokenizers, whose '\\n' is a byte
piece) is counted in the stats.
"""

import dataclasses
import json
import time

import numpy as np
from absl import logging

from tinyllama_jax.data import formats
from tinyllama_jax.data.config import CHAT_OVERFLOWS as OVERFLOWS

ROLES = ("system", "user", "assistant")
CHAT_SUFFIXES = (".jsonl", ".jsonl.zst", ".parquet")

# TinyLlama-1.1B-Chat-v1.0's tokenizer_config.json chat_template (Zephyr's), character for
# character; `render` below gives the same text in Python.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}")


@dataclasses.dataclass
class ChatStats:
  """What reading and tokenizing conversations found; every skipped row is counted here."""
  conversations: int = 0
  tokens: int = 0
  assistant_tokens: int = 0
  skipped_invalid_json: int = 0
  skipped_not_a_list: int = 0  # no `messages` list of {"role", "content"} dicts
  skipped_unknown_role: int = 0
  skipped_not_string: int = 0  # a content that is not a string
  skipped_no_assistant: int = 0
  skipped_template_error: int = 0  # a custom template's raise_exception() refused the row
  overflow_dropped: int = 0  # longer than seq_len + 1 tokens, data.chat_overflow='drop'
  overflow_truncated: int = 0  # ... 'truncate': cut to seq_len + 1 tokens
  boundary_tokens: int = 0  # tokens straddling a prompt/assistant boundary (see the docstring)

  def skipped(self) -> int:
    return sum(v for k, v in dataclasses.asdict(self).items() if k.startswith("skipped_"))


# --- templates -------------------------------------------------------------------------------


def _render_zephyr(messages, eos_token, add_generation_prompt):
  out = [f"<|{m['role']}|>\n{m['content']}{eos_token}\n" for m in messages]
  if add_generation_prompt and messages:  # the template adds it inside its loop: not for []
    out.append("<|assistant|>\n")
  return "".join(out)


# A chat template renders one conversation: output past these bounds, or an operation building
# a value past them, is a template that loops or allocates without end (`{{'A'*10**10}}`),
# stopped in one line before it takes the memory or the time of the run.
MAX_RENDER_CHARS = 10_000_000
MAX_RENDER_SECONDS = 10.0


class TemplateUnbounded(ValueError):
  """A custom template went past MAX_RENDER_CHARS or MAX_RENDER_SECONDS: the template's fault,
  not one conversation's, so it ends the run (exit 2) rather than skipping a row."""


def _jinja_renderer(template):
  """template -> render(messages, ...), compiled as transformers compiles chat templates."""
  try:
    import jinja2  # pylint: disable=g-import-not-at-top
    from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
  except ImportError:  # a ValueError: the command's one line (exit 2), as for a bad template
    raise ValueError("a custom data.chat_template needs jinja2, which is not installed: "
                     "pip install -r requirements.txt (or pip install 'jinja2>=3.1,<4')") from None

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = _bounded_environment(sandbox)(trim_blocks=True, lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
  env.globals["raise_exception"] = raise_exception
  try:
    compiled = env.from_string(template)
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f"data.chat_template is not a valid Jinja template ({e})") from None
  def render(messages, bos_token, eos_token, add_generation_prompt):
    env.deadline = time.monotonic() + MAX_RENDER_SECONDS
    out, n = [], 0
    try:
      for chunk in compiled.generate(messages=messages, bos_token=bos_token,
                                     eos_token=eos_token, add_generation_prompt=add_generation_prompt):
        out.append(chunk)
        n += len(chunk)
        env.check(n)
    except jinja2.exceptions.TemplateError as e:
      raise TemplateRefused(f"data.chat_template refused the conversation: {e}") from None
    except (MemoryError, OverflowError, RecursionError) as e:
      raise TemplateUnbounded(f"data.chat_template failed with {type(e).__name__} rendering a "
                              "conversation: make it build no values without bound") from None
    return "".join(out)
  return render


def _bounded_environment(sandbox):
  """transformers' ImmutableSandboxedEnvironment, plus MAX_RENDER_CHARS on the output and on what
  `*` and `**` build, and MAX_RENDER_SECONDS checked at every call, operator and attribute."""

  class Bounded(sandbox.ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])
    deadline = float("inf")

    def check(self, n=0):
      if n > MAX_RENDER_CHARS:
        raise TemplateUnbounded(f"data.chat_template rendered more than {MAX_RENDER_CHARS:,} "
                                "characters for one conversation: it loops or repeats without "
                                "bound; fix the template")
      if time.monotonic() > self.deadline:
        raise TemplateUnbounded(f"data.chat_template took more than {MAX_RENDER_SECONDS:g} s "
                                "for one conversation: it loops without bound; fix the template")

    def call_binop(self, context, operator, left, right):
      self.check()
      if operator == "*":
        for seq, times in ((left, right), (right, left)):
          if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
            self.check(len(seq) * times)
      elif isinstance(left, int) and isinstance(right, int) and right > 0:
        self.check(int(right * max(abs(left), 1).bit_length() / 3.3))  # the result's digits
      return super().call_binop(context, operator, left, right)

    def call(*args, **kwargs):  # pylint: disable=no-method-argument (jinja's own signature)
      args[0].check()
      return sandbox.ImmutableSandboxedEnvironment.call(*args, **kwargs)

    def getattr(self, obj, attribute):
      self.check()
      return super().getattr(obj, attribute)

  return Bounded


def check_template(template):
  """A custom template compiles (jinja2 is there, the syntax is valid): one line otherwise."""
  if template and template != ZEPHYR_TEMPLATE:
    _jinja_renderer(template)


class TemplateRefused(ValueError):
  """A custom template refused a conversation (its raise_exception): that row is skipped."""


class ChatFormat:
  """A template bound to a tokenizer: conversations -> (ids, loss mask). Picklable."""

  def __init__(self, template, tokenizer):
    self.template = template or ZEPHYR_TEMPLATE
    self.tokenizer = tokenizer
    self.bos_token = tokenizer.id_to_piece(tokenizer.bos_id)
    self.eos_token = tokenizer.id_to_piece(tokenizer.eos_id)
    # transformers reads these pieces in text as their ids (split_special_tokens off): so do we
    self._specials = {tokenizer.id_to_piece(i): i for i in
                      (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) if i >= 0}
    self._render = None

  def render(self, messages, add_generation_prompt=False) -> str:
    if self.template == ZEPHYR_TEMPLATE:
      return _render_zephyr(messages, self.eos_token, add_generation_prompt)
    if self._render is None:
      self._render = _jinja_renderer(self.template)
    return self._render(messages, self.bos_token, self.eos_token, add_generation_prompt)

  def __getstate__(self):
    return {"template": self.template, "tokenizer": self.tokenizer}

  def __setstate__(self, state):
    self.__init__(state["template"], state["tokenizer"])

  def assistant_spans(self, messages):
    """(rendered text, [(start, end) character spans the loss trains on])."""
    spans, turns = [], []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True)
      after = self.render(messages[:i + 1])
      if not after.startswith(before):
        raise ValueError("data.chat_template is not prefix-stable: the prompt rendered before an "
                         "assistant message is not the start of the conversation rendered with "
                         "it, so the assistant's tokens cannot be found; use a template whose "
                         "turns only append")
      spans.append((len(before), len(after.rstrip())))
      turns.append(after)
    text = self.render(messages)
    if not all(text.startswith(t) for t in turns):
      raise ValueError("data.chat_template is not prefix-stable (a later message changes the "
                       "text of earlier ones): use a template whose turns only append")
    return text, spans

  def encode(self, text, spans=(), stats=None):
    """(ids int32 [n], mask uint8 [n]: 1 where the token is inside a span)."""
    chars_C = np.zeros(len(text), np.uint8)
    for s, e in spans:
      chars_C[s:e] = 1
    ids, mask = [], []
    start = 0
    for piece, special_id in _split_specials(text, self._specials):
      end = start + len(piece)
      if special_id is not None:
        ids.append(special_id)
        mask.append(chars_C[start])
      elif piece:
        piece_ids, piece_mask = self._encode_piece(piece, chars_C[start:end], stats)
        ids += piece_ids
        mask.append(piece_mask)
      start = end
    mask = [np.atleast_1d(np.asarray(m, np.uint8)) for m in mask]
    return np.asarray(ids, np.int32), (np.concatenate(mask) if mask else np.zeros(0, np.uint8))

  def _encode_piece(self, piece, chars_C, stats):
    """(ids, mask) of text between special tokens; the mask of a token is its first byte's."""
    if chars_C.min() == chars_C.max():  # no boundary inside: the plain (fast) encoding
      ids = self.tokenizer.encode(piece)
      return ids, np.full(len(ids), chars_C[0], np.uint8)
    raw_B = np.frombuffer(piece.encode("utf-8"), np.uint8)
    char_of_B = np.cumsum((raw_B & 0xC0) != 0x80) - 1  # sentencepiece's offsets are bytes
    bytes_B = chars_C[char_of_B]
    pieces = self.tokenizer.encode_proto(piece).pieces
    begin_N = np.minimum([p.begin for p in pieces], len(raw_B) - 1)
    last_N = np.clip(np.asarray([p.end for p in pieces]) - 1, begin_N, None)
    mask_N = bytes_B[begin_N]
    if stats is not None:
      stats.boundary_tokens += int(np.sum(bytes_B[last_N] != mask_N))
    return [p.id for p in pieces], mask_N

  def conversation(self, messages, stats=None):
    """(ids, mask) of a whole conversation, trained on its assistant tokens."""
    text, spans = self.assistant_spans(messages)
    return self.encode(text, spans, stats)

  def prompt(self, messages):
    """The ids to decode a reply from: the conversation plus the generation prompt."""
    ids, _ = self.encode(self.render(messages, add_generation_prompt=True))
    return [int(i) for i in ids]


def _split_specials(text, specials):
  """[(piece, None) | (special string, its id)]: text cut at every special string."""
  out, i = [], 0
  while True:
    hits = [(text.find(s, i), s) for s in specials if s and text.find(s, i) >= 0]
    if not hits:
      out.append((text[i:], None))
      return out
    at, s = min(hits, key=lambda h: (h[0], -len(h[1])))
    out.append((text[i:at], None))
    out.append((s, specials[s]))
    i = at + len(s)


# --- rows ------------------------------------------------------------------------------------


def check_messages(messages, stats):
  """Whether `messages` is a conversation to train on; what is not is counted in `stats`."""
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and "role" in m and "content" in m for m in messages):
    stats.skipped_not_a_list += 1
    return False
  if any(m["role"] not in ROLES for m in messages):
    stats.skipped_unknown_role += 1
    return False
  if any(not isinstance(m["content"], str) for m in messages):
    stats.skipped_not_string += 1
    return False
  if not any(m["role"] == "assistant" for m in messages):
    stats.skipped_no_assistant += 1
    return False
  return True


def iter_conversations(path, stats, field="messages"):
  """Yields (row number, [{"role", "content"}]) of one file; bad rows are skipped and counted."""
  if not path.endswith(CHAT_SUFFIXES):
    raise ValueError(f"{path}: not a chat file; data.source='chat' reads "
                     f"{', '.join(CHAT_SUFFIXES)} rows with a {field!r} list")
  if path.endswith(".parquet"):
    rows = enumerate(formats.parquet_column(path, field, "data.source='chat' rows"), 1)
  else:
    rows = _json_rows(path, field, stats)
  for lineno, messages in rows:
    if check_messages(messages, stats):
      yield lineno, [{"role": m["role"], "content": m["content"]} for m in messages]


def _json_rows(path, field, stats):
  for lineno, line in enumerate(formats.jsonl_lines(path), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
      stats.skipped_invalid_json += 1
      continue
    yield lineno, record.get(field) if isinstance(record, dict) else None


def fit(ids, mask, max_tokens, overflow, stats):
  """(ids, mask) within max_tokens per data.chat_overflow, or None (dropped); counted."""
  if len(ids) <= max_tokens:
    return ids, mask
  if overflow == "drop":
    stats.overflow_dropped += 1
    return None
  if overflow != "truncate":
    raise ValueError(f"data.chat_overflow={overflow!r}: use one of {', '.join(OVERFLOWS)}")
  if not mask[1:max_tokens].any():  # the cut leaves no assistant token to train on
    stats.overflow_dropped += 1
    return None
  stats.overflow_truncated += 1
  return ids[:max_tokens], mask[:max_tokens]


def load_conversations(files, fmt, max_tokens, overflow):
  """[(name, ids, mask)] of every valid conversation in `files` (tokenized once, in memory),
  and the stats; a file without one valid conversation is an error."""
  total, out = ChatStats(), []
  for f in files:
    stats = ChatStats()
    found = 0
    for lineno, messages in iter_conversations(f, stats):
      try:
        ids, mask = fmt.conversation(messages, stats)
      except TemplateRefused:
        stats.skipped_template_error += 1
        continue
      found += 1
      kept = fit(ids, mask, max_tokens, overflow, stats)
      if kept is None:
        continue
      stats.conversations += 1
      stats.tokens += len(kept[0])
      stats.assistant_tokens += int(kept[1][1:].sum())
      out.append((f"{f.rsplit('/', 1)[-1]}:{lineno}", *kept))
    if not found:
      raise ValueError(f"{f} has no valid conversation ({stats.skipped()} rows skipped: {stats}): "
                       "give rows like {\"messages\": [{\"role\": \"user\", \"content\": ...}, "
                       "{\"role\": \"assistant\", \"content\": ...}]}")
    for k, v in dataclasses.asdict(stats).items():
      setattr(total, k, getattr(total, k) + v)
  logging.info("chat data: %d files, %s", len(files), total)
  if total.skipped() or total.overflow_dropped or total.overflow_truncated:
    logging.warning("chat data: skipped %d malformed rows (invalid JSON %d, no messages list %d, "
                    "unknown role %d, content not a string %d, no assistant turn %d, refused by "
                    "the template %d); longer than %d tokens: %d dropped, %d truncated",
                    total.skipped(), total.skipped_invalid_json, total.skipped_not_a_list,
                    total.skipped_unknown_role, total.skipped_not_string,
                    total.skipped_no_assistant, total.skipped_template_error, max_tokens,
                    total.overflow_dropped, total.overflow_truncated)
  return out, total
