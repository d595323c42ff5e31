"""Planning a sweep (the command is tinyllama_jax/sweep.py): grids of config overrides, one
workdir per run, resumable.

A sweep file defines `get_sweep()`, returning bindings ({dotted config key: value}) built with
`product`, `zipped` and `chain` below (a plain dict means its product), and optionally `FIXED`,
overrides every run gets that stay out of the run names. `--config.a.b=v` on the command line does
the same as FIXED and wins over it. Every binding is checked against the base config (key and
type) before anything starts, so a typo fails the whole sweep, not run 7 of 12 an hour in.

Each run lives in WORKDIR/<name>, the name made from its bindings (`lr4e-04_warmup_steps500`),
and trains with `python -m tinyllama_jax.train`, which resumes from the run's latest checkpoint;
rerunning the sweep therefore skips finished runs and resumes interrupted ones.
WORKDIR/<name>/sweep_run.json holds the bindings, the resolved config and the last launch status.
"""

import dataclasses
import hashlib
import json
import os
import re

from tinyllama_jax import config as config_lib
from tinyllama_jax.data.formats import write_json_atomic
from tinyllama_jax.sweeps.launch import train_command
from tinyllama_jax.sweeps.summary import (RUN_FILE, format_value, latest_checkpoint_step,
                                         read_run_file)


# ----------------------------------------------------------------------------- grids


def _axis(key, values, fn):
  if not isinstance(values, (list, tuple)) or not values:
    raise ValueError(f"{fn}() needs a non-empty list of values for {key!r}, got {values!r}: "
                     f"write {key!r}: [{values!r}]")
  return [{key: v} for v in values]


def _bindings(part, fn):
  """A dict of value lists (its product, first key outermost) or a list of bindings."""
  if isinstance(part, dict):
    out = [{}]
    for key, values in part.items():
      out = [{**a, **b} for a in out for b in _axis(key, values, fn)]
    return out
  if isinstance(part, (list, tuple)) and all(isinstance(b, dict) for b in part):
    return [dict(b) for b in part]
  raise ValueError(f"{fn}() takes dicts of value lists or lists of bindings, got {part!r}")


def product(*parts):
  """Every combination of the parts, the first outermost:
  product({'optim.lr': [1e-4, 1e-3]}, zipped({...})) -> len(lr) x len(zipped) bindings."""
  out = [{}]
  for part in parts:
    rows = _bindings(part, "product")
    for a in out:
      for b in rows:
        if a.keys() & b.keys():
          raise ValueError(f"product() binds {sorted(a.keys() & b.keys())[0]!r} in two parts: "
                           "give each key to one part")
    out = [{**a, **b} for a in out for b in rows]
  return out


def zipped(axes):
  """Lists walked together: zipped({'optim.lr': [1e-3, 3e-3], 'optim.min_lr': [1e-4, 3e-4]})."""
  lengths = {key: len(values) if isinstance(values, (list, tuple)) else None
             for key, values in axes.items()}
  rows = [_axis(key, values, "zipped") for key, values in axes.items()]
  if len(set(lengths.values())) > 1:
    raise ValueError(f"zipped() needs lists of one length, got lengths {lengths}")
  return [{k: v for b in row for k, v in b.items()} for row in zip(*rows)]


def chain(*parts):
  """The parts one after another: chain(product(...), [{'optim.lr': 1e-2}])."""
  return [b for part in parts for b in _bindings(part, "chain")]


def load_sweep_file(path):
  """(bindings, fixed) from a sweep file's get_sweep() and FIXED."""
  if not os.path.isfile(path):
    raise ValueError(f"sweep file {path!r} does not exist (try --sweep=configs/sweeps/tiny_lr.py)")
  sweep, module = config_lib.run_file_function(path, "get_sweep", "sweep file", "return e.g. "
                                               "product({'optim.lr': [1e-4, 1e-3]})")
  bindings = _bindings(sweep, "get_sweep")
  if not bindings:
    raise ValueError(f"sweep file {path!r}: get_sweep() returned no runs")
  fixed = getattr(module, "FIXED", {})
  if not isinstance(fixed, dict):
    raise ValueError(f"sweep file {path!r}: FIXED must be a dict of dotted key -> value")
  return bindings, dict(fixed)


# ----------------------------------------------------------------------------- validation


def coerce(cfg, key, value, where):
  """`value` as the type of `cfg`'s field `key` (ml_collections' rules: an int may fill a float
  field; stricter in refusing a bool for a number), or a one-line error naming key and type."""
  if key not in config_lib.flat_keys(cfg):
    raise ValueError(f"{where}: {config_lib.unknown_key_message(key, cfg)}")
  base = cfg[key]
  if isinstance(value, (list, tuple, dict, set)) and not isinstance(base, (list, tuple)):
    raise ValueError(f"{where}: {key}={value!r} is {type(value).__name__}, but {key} takes one "
                     f"{type(base).__name__} (a list of values belongs in product() or zipped())")
  if base is None:
    return value
  want = type(base)
  ok = (isinstance(value, bool) if want is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool) if want is float
        else isinstance(value, int) and not isinstance(value, bool) if want is int
        else isinstance(value, want))
  if not ok:
    raise ValueError(f"{where}: {key}={value!r} is {type(value).__name__}, but {key} takes "
                     f"{want.__name__} values (base value {base!r})")
  return float(value) if want is float else value


def parse_override(cfg, arg):
  """'--config.optim.lr=3e-4' -> ('optim.lr', 0.0003), typed like the base field."""
  key, sep, text = arg[len("--config."):].partition("=")
  if not sep:
    raise ValueError(f"override {arg!r} has no value: write --config.{key}=VALUE")
  if key not in config_lib.flat_keys(cfg):
    raise ValueError(f"{arg}: {config_lib.unknown_key_message(key, cfg)}")
  base = cfg[key]
  try:
    if isinstance(base, bool):
      if text.lower() not in ("true", "false"):
        raise ValueError
      return key, text.lower() == "true"
    if isinstance(base, (int, float)):
      return key, type(base)(text)
  except ValueError:
    raise ValueError(f"{arg}: {key} takes {type(base).__name__} values (base value {base!r}); "
                     f"{text!r} is not one") from None
  return key, text


def resolve(base, overrides):
  cfg = base.copy_and_resolve_references()
  cfg.lock()
  for key, value in overrides.items():
    parent, _, leaf = key.rpartition(".")
    (cfg[parent] if parent else cfg)[leaf] = value
  return cfg


def check_run(cfg, name):
  """A bad value in one corner of the grid (a peak lr below min_lr, ...) fails the sweep before
  the first run: the checks train makes before it starts, less the device-dependent ones."""
  try:
    config_lib.validate(cfg)
  except ValueError as e:
    raise ValueError(f"run {name}: {e}") from None


# ----------------------------------------------------------------------------- names


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def binding_hash(binding):
  return hashlib.sha1(json.dumps(binding, sort_keys=True).encode()).hexdigest()[:6]


def run_name(binding):
  """A function of the binding alone (so names survive edits to the rest of the sweep): each key
  by its last part (the full dotted key where two share it), then the value; numbers follow the
  key directly, words after '-'. A short hash of the binding is added when the readable form had
  to drop characters or be cut short."""
  if not binding:
    return "base"
  leaves = [key.rpartition(".")[2] for key in binding]
  parts, lossy = [], False
  for (key, value), leaf in zip(binding.items(), leaves):
    label = leaf if leaves.count(leaf) == 1 else key
    text = format_value(value)
    safe = _UNSAFE.sub("-", text)[:40]
    lossy |= safe != text
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    parts.append(f"{label}{safe}" if numeric else f"{label}-{safe}")
  name = "_".join(parts)
  if lossy or len(name) > 120:
    name = f"{name[:100]}_{binding_hash(binding)}"
  return name


def run_names(bindings):
  """Names for a whole sweep: a repeated binding is an error; names that still collide (two
  keys sharing a last part in different runs) get the binding's hash."""
  seen = {}
  for i, b in enumerate(bindings):
    canon = json.dumps(b, sort_keys=True)
    if canon in seen:
      raise ValueError(f"the sweep lists the run {b} twice (runs {seen[canon]} and {i}): "
                       "drop one, or bind 'seed' to repeat it")
    seen[canon] = i
  names = [run_name(b) for b in bindings]
  return [f"{n}_{binding_hash(b)}" if names.count(n) > 1 else n for n, b in zip(names, bindings)]


# ----------------------------------------------------------------------------- plan and state


@dataclasses.dataclass
class Run:
  name: str
  binding: dict
  overrides: dict  # FIXED, then the command line, then the binding
  cfg: object
  workdir: str

  def train_args(self, config_path):
    args = [f"--config={os.path.abspath(config_path)}", f"--workdir={self.workdir}"]
    return args + [f"--config.{k}={v!r}" if isinstance(v, float) else f"--config.{k}={v}"
                   for k, v in self.overrides.items()]


def plan(config_path, bindings, fixed, cli_overrides, workdir):
  """Every run of the sweep, validated, with its resolved config: raises before anything runs."""
  base = config_lib.load_config_file(config_path)
  fixed = {k: coerce(base, k, v, "sweep FIXED") for k, v in fixed.items()}
  cli = dict(parse_override(base, arg) for arg in cli_overrides)
  typed = [{k: coerce(base, k, v, f"binding {b}") for k, v in b.items()} for b in bindings]
  swept = {k for b in typed for k in b}
  both = sorted(swept & (fixed.keys() | cli.keys()))
  if both:
    raise ValueError(f"{both[0]} is both swept and fixed (in FIXED or --config.{both[0]}): drop one")
  runs = []
  for binding, name in zip(typed, run_names(typed)):
    overrides = {**fixed, **cli, **binding}
    cfg = resolve(base, overrides)
    check_run(cfg, name)
    runs.append(Run(name, binding, overrides, cfg, os.path.join(os.path.abspath(workdir), name)))
  return runs


def _config_diff(old, new, prefix=""):
  diffs = []
  for key in sorted(old.keys() | new.keys()):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _config_diff(a, b, f"{prefix}{key}.")
    elif a != b:
      diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return diffs


def prepare_workdirs(runs, config_path, allow_config_change=False):
  """Creates each run's workdir and records its bindings and resolved config. A run that already
  trained under another config is an error: resuming it would silently mix two experiments."""
  for run in runs:
    old = read_run_file(run.workdir)
    new_cfg = run.cfg.to_dict()
    if old.get("config") and latest_checkpoint_step(run.workdir) is not None:
      diffs = _config_diff(old["config"], new_cfg)
      if diffs and not allow_config_change:
        raise ValueError(f"run {run.name} already trained with another config ({'; '.join(diffs[:3])}"
                         f"{'; ...' if len(diffs) > 3 else ''}): use a new --workdir, or pass "
                         "--allow_config_change to continue it under the new one")
  for run in runs:
    try:
      os.makedirs(run.workdir, exist_ok=True)
    except OSError as e:  # a file on the way, a name too long, no permission: the user's path
      raise ValueError(f"the run directory {run.workdir!r} cannot be created ({e.strerror}): "
                       "pass another --workdir (a writable directory, at most 255 bytes a path "
                       "component)") from None
    record = read_run_file(run.workdir)
    record.update(name=run.name, binding=run.binding, overrides=run.overrides,
                  config=run.cfg.to_dict(), command=train_command(run, config_path, "python"))
    record.setdefault("status", "new")
    write_json_atomic(os.path.join(run.workdir, RUN_FILE), record, sort_keys=True)
