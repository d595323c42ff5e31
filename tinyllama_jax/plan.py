"""Memory planner: what one device holds for a config and mesh, before renting the devices.

    python -m tinyllama_jax.plan --config=configs/1b.py --devices=16 --device_memory_gib=40
    python -m tinyllama_jax.plan --config=configs/1b.py --devices=1 --device_memory_gib=24 \\
        --remat=none,full,save_dots

The command; training/plan.py says where each number comes from (--source).
"""

import contextlib
import dataclasses
import json
import math
import os

import jax
from absl import app, flags, logging

from tinyllama_jax import cli, model as model_lib
from tinyllama_jax.training import faults, plan as plan_lib


def define_flags():
  cli.define_run_flags()  # --config (with its overrides), --workdir, --dry_run, as train takes them
  flags.DEFINE_integer("devices", 1, "Devices in the mesh (the config's -1 axis takes what the "
                       "others leave).")
  flags.DEFINE_float("device_memory_gib", 80.0, "Memory per device, GiB (A100-40G: 40, "
                     "RTX 4090: 24, H200: 141).")
  flags.DEFINE_string("remat", "", "Comma-separated remat policies to plan ('' = the config's; "
                      "'all' = every policy in model.REMAT_POLICIES).")
  flags.DEFINE_enum("source", "auto", ["auto", "xla", "analytic"],
                    "Where the peak comes from (see training/plan.py's docstring).")
  flags.DEFINE_string("json", "", "Also write the plan here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  f = flags.FLAGS
  if f.devices < 1:
    raise ValueError(f"--devices={f.devices}: give a positive device count")
  if not (math.isfinite(f.device_memory_gib) and f.device_memory_gib > 0):
    raise ValueError(f"--device_memory_gib={f.device_memory_gib}: give the memory of one device "
                     "in GiB (A100-40G: 40, H200: 141)")
  where = os.path.dirname(os.path.abspath(f.json))
  if f.json and (os.path.isdir(f.json) or not os.path.isdir(where)):
    raise ValueError(f"--json={f.json}: give a file path in an existing directory")
  jax.config.update("jax_num_cpu_devices", f.devices)  # before any backend starts
  cfg = f.config
  remats = ([cfg.model.remat] if not f.remat else sorted(model_lib.REMAT_POLICIES)
            if f.remat == "all" else [r.strip() for r in f.remat.split(",")])
  for r in remats:
    if r not in model_lib.REMAT_POLICIES:
      raise ValueError(f"--remat: unknown policy {r!r}; choose from "
                       f"{', '.join(sorted(model_lib.REMAT_POLICIES))} or all")
  mesh, plans = plan_lib.plan(cfg, f.devices, remats, f.source)
  print(plan_lib.format_table(cfg, mesh, plans, f.device_memory_gib))
  if f.json:
    write_json(f.json, {
        "config": cfg.to_dict(), "mesh": dict(mesh.shape), "device_memory_gib": f.device_memory_gib,
        "runtime_reserve_gib": plan_lib.RUNTIME_RESERVE_GIB,
        "plans": [dataclasses.asdict(p) | {"fits": p.fits(f.device_memory_gib)} for p in plans]})


def write_json(path, obj):
  """Whole or not at all; a path that takes no file is bad input (2), a full disk a fault (3)."""
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as out:
      json.dump(obj, out, indent=1)
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    failed = faults.WriteFailed(path, e)
    if failed.no_space:
      raise failed from e
    raise ValueError(f"--json={path} cannot be written ({e.strerror}): pass a writable path") \
        from None


def run_cli():
  define_flags()
  cli.run(main, faults=(faults.FaultError,))


if __name__ == "__main__":
  run_cli()
