"""What a compiled while loop runs each iteration: the ops of its body in the optimized HLO text
(`jax.jit(f).lower(...).compile().as_text()`), fusions named by their kind and root op.

The decode loop is launch-bound on a GPU (bench/NOTES.md, 2026-12-02, H200, 4273ef6: ~660 kernels a token, 1.6
ms of gaps between them), so the body's op count is a proxy for its speed that a CPU can measure:
after fusion, each op of the body is about one kernel (the CPU's fusion differs from the GPU's in
detail, not in what a copy of the whole cache or a per-layer recomputation costs).
"""

import collections
import re

# Free ops: they name or forward values and launch nothing.
FREE = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast"})
_OP = re.compile(r"= (?:\([^()]*\)|\S+) ([a-z][\w\-]*)\(")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def computations(hlo_text):
  """{name: [instruction lines]} of an HLO module's text."""
  comps, name = {}, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      name, comps[header.group(1)] = header.group(1), []
    elif line == "}":
      name = None
    elif name is not None:
      comps[name].append(line.strip())
  return comps


def opcode(line):
  match = _OP.search(line)
  return match.group(1) if match else "?"


def _label(line, comps):
  op = opcode(line)
  if op != "fusion":
    return op
  kind = re.search(r"kind=(\w+)", line).group(1)
  called = comps[re.search(r"calls=%?([\w.\-]+)", line).group(1)]
  root = next(x for x in called if x.startswith("ROOT"))
  return f"fusion:{kind}:{opcode(root)}"


def while_bodies(comps):
  """The body computations' names of every while loop, in the text's order."""
  return [re.search(r"body=%?([\w.\-]+)", line).group(1)
          for lines in comps.values() for line in lines if " while(" in line]


def body_ops(hlo_text, which=-1):
  """Counter of the ops one while body runs (the last loop by default: an outer loop's body
  holds the inner loop as one `while` op), free ops left out."""
  comps = computations(hlo_text)
  bodies = while_bodies(comps)
  if not bodies:
    raise ValueError("the HLO has no while loop: pass a compiled program that loops")
  return collections.Counter(_label(line, comps) for line in comps[bodies[which]]
                             if opcode(line) not in FREE)


def body_shapes(hlo_text, op, which=-1):
  """The result shapes of one op (a label of body_ops) in a while body, counted."""
  comps = computations(hlo_text)
  body = comps[while_bodies(comps)[which]]
  return collections.Counter(line.split("= ", 1)[1].split(" ", 1)[0] for line in body
                             if opcode(line) not in FREE and _label(line, comps) == op)


def _numbered(hlo_text, section):
  """{id: text} of a numbered section of the HLO text (FileNames, FileLocations, ...)."""
  out, inside = {}, False
  for line in hlo_text.splitlines():
    if line == section:
      inside = True
    elif inside:
      match = re.match(r"^(\d+) (.*)$", line)
      if not match:
        return out
      out[int(match.group(1))] = match.group(2)
  return out


def _frames(hlo_text):
  """{stack frame id: "file:line function" of its innermost location}."""
  files, funcs = _numbered(hlo_text, "FileNames"), _numbered(hlo_text, "FunctionNames")
  locs, frames = _numbered(hlo_text, "FileLocations"), _numbered(hlo_text, "StackFrames")
  field = lambda text, key: int(re.search(rf"{key}=(\d+)", text).group(1))
  out = {}
  for frame_id, frame in frames.items():
    loc = locs[field(frame, "file_location_id")]
    path = files[field(loc, "file_name_id")].strip('"')
    out[frame_id] = (f"{'/'.join(path.split('/')[-2:])}:{field(loc, 'line')} "
                     f"{funcs[field(loc, 'function_name_id')].strip(chr(34))}")
  return out


def _source(line, comps, frames):
  """The frame of an instruction's metadata; a fusion without one: its root's, else the first
  of its instructions that has one."""
  lines = [line]
  if opcode(line) == "fusion":
    called = comps[re.search(r"calls=%?([\w.\-]+)", line).group(1)]
    lines += sorted(called, key=lambda x: not x.startswith("ROOT"))
  for x in lines:
    match = re.search(r"stack_frame_id=(\d+)", x)
    if match:
      return frames.get(int(match.group(1)), "?")
  return "?"


def body_sources(hlo_text, op, which=-1):
  """Where one op (a label of body_ops) of a while body comes from: the Python line of its
  metadata (the innermost frame jax kept), counted; "?" where the text has none."""
  comps, frames = computations(hlo_text), _frames(hlo_text)
  body = comps[while_bodies(comps)[which]]
  return collections.Counter(_source(line, comps, frames) for line in body
                             if opcode(line) not in FREE and _label(line, comps) == op)


def table(counts, top=25):
  lines = [f"{n:6d}  {label}" for label, n in counts.most_common(top)]
  return "\n".join(lines + [f"{sum(counts.values()):6d}  total"])
