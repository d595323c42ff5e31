"""Where documents come from, and which process reads which: splits and host shards.

Every source is a sorted, deterministic list of names; the eval split is a stable hash of each
name (so adding files never moves an old file between splits), and process p of P reads items
p, p+P, p+2P, ... of its split: disjoint across processes, and together they cover everything.
(TinyLlama shuffled its file list with a per-rank seed before striding, so ranks overlapped.)
"""

import functools
import hashlib
import os
import sysconfig

from absl import logging

SPLITS = ("train", "eval")
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
  """The running Python's standard library .py files (relative paths, sorted).

  Empty files and the few deliberately non-UTF-8 test files are left out here, once, and counted.
  """
  root = stdlib_root()
  names, num_empty, num_not_utf8 = [], 0, 0
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for f in sorted(filenames):
      if not f.endswith(".py"):
        continue
      path = os.path.join(dirpath, f)
      with open(path, "rb") as fh:
        raw = fh.read()
      if not raw:
        num_empty += 1
        continue
      try:
        raw.decode("utf-8")
      except UnicodeDecodeError:
        num_not_utf8 += 1
        continue
      names.append(os.path.relpath(path, root))
  if not names:
    raise FileNotFoundError(f"no .py files under the standard library {root!r}")
  logging.info("stdlib corpus: %d .py files under %s (left out: %d empty, %d not UTF-8)",
               len(names), root, num_empty, num_not_utf8)
  return tuple(sorted(names))


def hash_fraction(name: str) -> float:
  """A stable pseudo-random number in [0, 1) for `name` (same on every machine and Python)."""
  digest = hashlib.sha1(name.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") / 2.0**64


def split_names(names, split: str, eval_fraction: float) -> list[str]:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"data.eval_fraction={eval_fraction} must be in [0, 1)")
  want_eval = split == "eval"
  chosen = [n for n in names if (hash_fraction(n) < eval_fraction) == want_eval]
  if not chosen:
    raise ValueError(f"the {split!r} split is empty ({len(names)} items, "
                     f"eval_fraction={eval_fraction}): change data.eval_fraction")
  return chosen


def process_shard(items: list, process_index: int, process_count: int, what: str) -> list:
  """This process's disjoint share: items[p::P]. Items are never shuffled before striding."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if len(items) < process_count:
    raise ValueError(f"{what} has {len(items)} items, fewer than the {process_count} processes: "
                     "every process needs its own part; add data or use fewer processes")
  return items[process_index::process_count]


def read_utf8(path: str) -> str | None:
  """The file's text, or None (logged) when it is not UTF-8: skipped and counted by the caller."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    logging.warning("skipping %s: not UTF-8 (%s)", path, e)
    return None
