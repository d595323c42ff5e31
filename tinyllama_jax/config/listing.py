"""The key listing: every key, its value in a config, its default where the config changes it,
what validate holds it to (its choices, its bound), and its help: the comments beside its default
in the section functions of config/__init__.py (the one on its line, after the block right above
it). `python -m tinyllama_jax.config --config=F [--config.a.b=v]` prints it (__main__.py)."""

import ast
import inspect
import io
import textwrap
import tokenize

from tinyllama_jax import config as config_lib


def key_comments():
  """{dotted key: its comment in the source of base_config() and the sections it calls}."""
  comments = {}
  _section_comments(config_lib.base_config, "", comments)
  return comments


def _section_comments(function, prefix, out):
  lines, first = inspect.getsourcelines(function)
  source = textwrap.dedent("".join(lines))
  own_line, trailing = {}, {}  # line number -> comment text
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      text = tok.string.lstrip("#").strip()
      (own_line if tok.line.lstrip().startswith("#") else trailing)[tok.start[0]] = text
  for node in ast.walk(ast.parse(source)):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    key = _attribute_key(node.targets[0])
    if key is None:
      continue
    value = node.value
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
      section = function.__globals__.get(value.func.id)
      if section is not None and section.__name__.endswith("_config"):
        _section_comments(section, f"{prefix}{key}.", out)
        continue
    above, line = [], node.lineno - 1
    while line in own_line:
      above.insert(0, own_line[line])
      line -= 1
    text = " ".join(above + [trailing[n] for n in range(node.lineno, node.end_lineno + 1)
                             if n in trailing])
    if text:
      out[prefix + key] = text


def _attribute_key(target):
  """'a.b' for the target `c.a.b`; None for any other."""
  parts = []
  while isinstance(target, ast.Attribute):
    parts.insert(0, target.attr)
    target = target.value
  return ".".join(parts) if parts and isinstance(target, ast.Name) else None


def listing(cfg):
  """One entry a key: `key = value`, `(default X)` where cfg changes it, what validate holds it
  to (its choices, its bound), and below, the comment beside its default."""
  defaults = dict(config_lib.flat_items(config_lib.base_config()))
  requirements = config_lib.requirements()
  comments = key_comments()
  out = []
  for key, value in config_lib.flat_items(cfg):
    line = f"{key} = {value!r}"
    if key in defaults and defaults[key] != value:
      line += f"  (default {defaults[key]!r})"
    if key in requirements:
      line += f"  [{requirements[key]}]"
    out.append(line)
    if key in comments:
      out += textwrap.wrap(comments[key], 100, initial_indent="    # ",
                           subsequent_indent="    # ")
  return "\n".join(out)
