"""How a config key with a fixed set of values declares them, on its default's line:

    c.packing = choice("concat", PACKINGS)  # what the key does

`choice` returns the default itself, so a section function builds a ConfigDict of plain values
(locking, overrides, to_dict, config.json and checkpoint metadata see no difference). Only inside
`declaring()` does it return a `Choice`: that is how config.choices() reads every key's choices
off one base_config(). Imports nothing, so the data package and config.py can both use it.
"""

import contextlib
import threading

_state = threading.local()


class Choice:
  """A default and its allowed values: a tuple, or a function giving them when asked (the
  kernel backends, where a tool may register another)."""

  __slots__ = ("default", "values")

  def __init__(self, default, values):
    self.default, self.values = default, values

  def allowed(self):
    return tuple(self.values() if callable(self.values) else self.values)


def choice(default, values):
  return Choice(default, values) if getattr(_state, "declaring", False) else default


@contextlib.contextmanager
def declaring():
  """Inside: choice() returns Choice objects instead of plain defaults."""
  _state.declaring = True
  try:
    yield
  finally:
    _state.declaring = False
