"""The train command with faults injected from outside it, for the fault suite:

  python tests/training/fault_train.py [--nan_steps=6,7] [--step_sleep_s=0.1] [--save_sleep_s=2] \
      --config=... --workdir=... [train's own flags]

wraps production functions by module attribute, then runs train's normal CLI entry; the
production code has no switch for any of this.
- nan_steps (1-based, comma-separated): those steps' loss and gradients become NaN inside the
  jitted step, before the NaN guard, which then does its work unchanged.
- step_sleep_s: every step waits this long before the loop asks whether a signal came, so a
  signal (or a kill) lands at a known step.
- save_sleep_s: every checkpoint commit waits this long after the step is written, so a kill
  lands inside the save (written, not committed).
- full_at_step, full_files (tb,metrics,log): after that step, the run's open tensorboard events,
  metrics.jsonl and/or stderr point at /dev/full: every later write fails with ENOSPC, as on a
  disk that filled between two checkpoints.
- stall_at_step: that step never ends (the main thread sleeps), as on a hung collective.
"""

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import orbax.checkpoint as ocp
from absl import logging

from tinyllama_jax import train
from tinyllama_jax.checkpoint import manager as checkpoint
from tinyllama_jax.training import faults, program


def inject_nan(steps):
  """program.train_step, but at `steps` every micro-batch's loss sum is multiplied by NaN: the
  loss and every gradient come out NaN, as a diverged step's would."""
  step_fn, loss_fn = program.train_step, program.loss_sums

  def train_step(state, batch, **kwargs):  # called once, while the step is traced
    factor = jnp.where(jnp.isin(state["step"] + 1, jnp.asarray(steps)), jnp.nan, 1.0)

    def loss_sums(*args, **kw):
      loss_sum, count = loss_fn(*args, **kw)
      return loss_sum * factor, count

    program.loss_sums = loss_sums  # train_step looks loss_sums up when it is traced
    try:
      return step_fn(state, batch, **kwargs)
    finally:
      program.loss_sums = loss_fn

  program.train_step = train_step  # Program.lower_step looks train_step up when it lowers


def sleep_each_step(seconds):
  """The loop asks Preemption.requested once per step, right after the step: sleeping there is
  a slow step, the signal is read after it."""
  requested = faults.Preemption.requested

  def slow_requested(self, *args, **kwargs):
    time.sleep(seconds)
    return requested(self, *args, **kwargs)

  faults.Preemption.requested = slow_requested


def after_step(n, action):
  """action() once, when the loop asks Preemption.requested after its n-th step (this process's)."""
  requested, calls = faults.Preemption.requested, itertools.count(1)

  def hooked(self, *args, **kwargs):
    if next(calls) == n:
      action()
    return requested(self, *args, **kwargs)

  faults.Preemption.requested = hooked


FULL_FILES = {"tb": lambda path: f"{os.sep}tb{os.sep}" in path,
              "metrics": lambda path: path.endswith("metrics.jsonl")}


def fill_disk(names):
  """The open files named (FULL_FILES, and 'log' for stderr) now write to /dev/full."""
  full = os.open("/dev/full", os.O_WRONLY)
  for fd in map(int, os.listdir("/proc/self/fd")):
    try:
      target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
      continue
    if any(FULL_FILES[n](target) for n in names if n in FULL_FILES) or (fd == 2 and "log" in names):
      logging.warning("fault_train: %s (fd %d) now writes to /dev/full", target, fd)
      os.dup2(full, fd)
  os.close(full)


def stall():
  logging.warning("fault_train: this step never ends")
  while True:
    time.sleep(3600)


def sleep_before_commit(seconds):
  """orbax writes a step into `<step>.orbax-checkpoint-tmp` and commits it by rename in
  finalize (local disks' default temporary path); this waits before that rename."""
  path_cls = ocp.path.atomicity.AtomicRenameTemporaryPath
  finalize = path_cls.finalize

  async def slow_finalize(self, *args, **kwargs):
    if checkpoint.TMP_SUFFIX not in self.get().parent.name:  # the step's commit, not an item's
      logging.info("fault_train: sleeping %.1f s before committing %s", seconds, self.get())
      time.sleep(seconds)
    return await finalize(self, *args, **kwargs)

  path_cls.finalize = slow_finalize


def main():
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--nan_steps", default="")
  parser.add_argument("--step_sleep_s", type=float, default=0.0)
  parser.add_argument("--save_sleep_s", type=float, default=0.0)
  parser.add_argument("--full_at_step", type=int, default=0)
  parser.add_argument("--full_files", default="tb,metrics,log")
  parser.add_argument("--stall_at_step", type=int, default=0)
  ours, rest = parser.parse_known_args()
  sys.argv = [sys.argv[0], *rest]  # train's own flags only
  if ours.nan_steps:
    inject_nan(tuple(int(s) for s in ours.nan_steps.split(",")))
  if ours.step_sleep_s:
    sleep_each_step(ours.step_sleep_s)
  if ours.save_sleep_s:
    sleep_before_commit(ours.save_sleep_s)
  if ours.full_at_step:
    after_step(ours.full_at_step, lambda: fill_disk(ours.full_files.split(",")))
  if ours.stall_at_step:
    after_step(ours.stall_at_step, stall)
  train.run_cli()


if __name__ == "__main__":
  main()
