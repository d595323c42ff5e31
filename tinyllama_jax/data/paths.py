"""Expanding the globs that name data (prepare --input, data.paths, data.mixture, evaluate --data).

Every real file is read once however many paths reach it: a symlinked alias of a folder
(`current -> v2`) or a link back up the tree (`v1/up -> ..`) would otherwise feed the same file
twice, or dozens of times, with no word. `**` walks into symlinked folders (as glob does) but
never into a folder that is its own ancestor, so a loop ends at once. What is left out is counted
and logged.
"""

import fnmatch
import glob
import os

from absl import logging


def expand(patterns: str, what: str, name: str, *, files_only: bool = True) -> list[str]:
  """The sorted paths matching comma-separated globs, each real file (or folder) once: of paths
  reaching one file, one without symlinks is kept, else the first in sorted order. `name` is the
  option the patterns came from (for the error when nothing matches); `files_only` leaves out
  folders."""
  skipped = {"loops": 0, "unreadable": 0}
  matched = {m for pattern in [p.strip() for p in patterns.split(",") if p.strip()]
             for m in _matches(os.path.expanduser(pattern), skipped)}
  found, seen, duplicates = [], set(), 0
  direct_first = sorted(matched, key=lambda p: (os.path.realpath(p) != os.path.abspath(p), p))
  for path in direct_first:
    if files_only and not os.path.isfile(path):
      continue
    real = os.path.realpath(path)
    if real in seen:
      duplicates += 1
      continue
    seen.add(real)
    found.append(path)
  if duplicates:
    logging.warning("%s=%r: left out %d matches that are files already matched through another "
                    "path (symlinks): each file is read once", name, patterns, duplicates)
  if skipped["loops"]:
    logging.warning("%s=%r: did not walk into %d symlinked folders that lead back to their own "
                    "parent folder (a loop)", name, patterns, skipped["loops"])
  if skipped["unreadable"]:
    logging.warning("%s=%r: left out %d folders that cannot be read (permissions)", name,
                    patterns, skipped["unreadable"])
  found.sort()
  if not found:
    raise FileNotFoundError(f"{name}={patterns!r} matches no {what}: check the path or glob "
                            "(quote it so the shell does not expand it)")
  return found


def matches(pattern: str) -> list[str]:
  """What one glob matches (no loop followed), before any file is left out."""
  return _matches(os.path.expanduser(pattern.strip()), {"loops": 0, "unreadable": 0})


def _matches(pattern: str, skipped: dict) -> list[str]:
  if "**" not in pattern:  # a fixed depth: glob cannot loop
    return glob.glob(pattern)
  parts = pattern.split(os.sep)
  fixed = 0
  while fixed < len(parts) - 1 and not glob.has_magic(parts[fixed]):
    fixed += 1
  root = os.sep.join(parts[:fixed]) or ("/" if pattern.startswith(os.sep) else "")
  if root and not os.path.isdir(root):
    return []
  rest = parts[fixed:]
  return [path for path, rel in _walk(root, {os.path.realpath(root or ".")}, (), skipped)
          if _match(rest, rel)]


def _walk(top: str, ancestors: set, rel: tuple, skipped: dict):
  """(path, its components below the walk's root) of everything under `top`; hidden names are left
  out, as glob leaves them out of wildcards."""
  try:
    names = sorted(os.listdir(top or "."))
  except OSError:  # unreadable, or gone since it was listed: counted, as glob does not
    skipped["unreadable"] += 1
    return
  for entry in names:
    if entry.startswith("."):
      continue
    path, entry_rel = os.path.join(top, entry), rel + (entry,)
    yield path, entry_rel
    if os.path.isdir(path):
      real = os.path.realpath(path)
      if real in ancestors:
        skipped["loops"] += 1
        continue
      yield from _walk(path, ancestors | {real}, entry_rel, skipped)


def _match(pattern_parts: list[str], path_parts: tuple) -> bool:
  """Whether a path's components match a glob's, `**` standing for any number of them."""
  if not pattern_parts:
    return not path_parts
  head, rest = pattern_parts[0], pattern_parts[1:]
  if head == "**":
    return any(_match(rest, path_parts[i:]) for i in range(len(path_parts) + 1))
  return (bool(path_parts) and fnmatch.fnmatchcase(path_parts[0], head)
          and _match(rest, path_parts[1:]))
