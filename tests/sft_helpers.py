"""A small real conversation set made on the machine: questions about standard-library functions,
answered by the first paragraph of their docstrings; a tokenizer trained on them; run configs."""

import importlib
import inspect
import json
import os

from tinyllama_jax.data import chat
from tinyllama_jax.data import tokenizer as tokenizer_lib

MODULES = ("json", "os.path", "shutil", "textwrap", "string", "fnmatch", "glob", "base64",
           "posixpath", "copy", "heapq", "bisect", "functools", "random", "statistics",
           "difflib", "csv", "tempfile", "html", "zlib", "gzip", "operator", "keyword")


def qa_pairs():
  """[(question, answer)] for the public functions of MODULES that have a docstring."""
  pairs = []
  for name in MODULES:
    module = importlib.import_module(name)
    for fn_name in sorted(dir(module)):
      fn = getattr(module, fn_name)
      if fn_name.startswith("_") or not callable(fn) or inspect.isclass(fn):
        continue
      doc = inspect.getdoc(fn) or ""
      answer = doc.split("\n\n")[0].strip()
      if 20 <= len(answer) <= 300:
        pairs.append((f"What does {name}.{fn_name} do?", answer))
  return sorted(set(pairs))


def conversations():
  """Single- and multi-turn conversations (every third with a system turn)."""
  pairs, out = qa_pairs(), []
  for i, (q, a) in enumerate(pairs):
    messages = [{"role": "system", "content": "Answer from the docs."}] if i % 3 == 0 else []
    messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if i % 4 == 1 and i + 1 < len(pairs):  # a second turn
      q2, a2 = pairs[i + 1]
      messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    out.append(messages)
  return out


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


def make_tokenizer(path, vocab_size=512):
  """A byte-fallback BPE on the rendered conversations (the tags `<|user|>` etc. are text)."""
  fmt_texts = [chat._render_zephyr(m, "</s>", False) for m in conversations()]  # pylint: disable=protected-access
  return tokenizer_lib.train_tokenizer(fmt_texts, str(path), vocab_size)


def write_data(directory):
  """(chat .jsonl of all conversations, pretraining .jsonl of their plain text)."""
  convs = conversations()
  chat_path = write_jsonl(os.path.join(directory, "chat.jsonl"), [{"messages": m} for m in convs])
  text_path = write_jsonl(os.path.join(directory, "text.jsonl"),
                          [{"text": "\n".join(t["content"] for t in m)} for m in convs])
  return chat_path, text_path
