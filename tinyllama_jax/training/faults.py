"""What a run does when the world misbehaves: preemption signals, non-finite steps, full disks,
a second run on the same workdir, and the checks of the environment before step one.

The train loop asks three questions of this module: may I start (`check_environment`,
`WorkdirLock`; the config's own checks are config.validate), should I stop
(`Preemption.requested`), and was that step sound (`NonFiniteGuard`). The jitted step itself only
calls the pure helper `keep_if_nonfinite`.
"""

import fcntl
import os
import socket
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from absl import logging

EXIT_GRACE_EXPIRED = 124  # the grace period ran out before the checkpoint was written


class FaultError(RuntimeError):
  """The run stopped on purpose (non-finite steps): one line, the last checkpoint stays good."""


# ----------------------------------------------------------------------------- preflight


def _existing_ancestor(path):
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_workdir(workdir):
  probe = _existing_ancestor(workdir)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
    raise ValueError(f"workdir {workdir!r} is not writable ({probe} is not a writable "
                     f"directory): pass another --workdir")


def state_bytes(abstract_state):
  """Bytes one checkpoint of this state takes before compression (a PRNG key counts 8)."""
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def check_free_disk(directory, need_bytes):
  """Room for one more checkpoint (10% and 1 MiB of headroom for metadata); orbax writes the new
  one before it deletes the oldest, so this is the least a run needs."""
  free = shutil.disk_usage(_existing_ancestor(directory)).free
  need = int(need_bytes * 1.1) + 2**20
  if free < need:
    raise ValueError(f"{directory} has {free / 2**20:.1f} MiB free, a checkpoint needs about "
                     f"{need / 2**20:.1f} MiB: free disk space or pass a --workdir on a bigger "
                     "disk")


def check_environment(workdir, abstract_state):
  """The workdir takes files, and one more checkpoint, before anything is compiled."""
  if "://" in workdir:  # object storage (gs://...): no local permissions or free space to check
    return
  check_workdir(workdir)
  check_free_disk(os.path.join(workdir, "checkpoints"), state_bytes(abstract_state))


class WorkdirLock:
  """One writer per workdir: an exclusive flock on WORKDIR/.lock, held until release() or the
  process ends. The kernel drops it with the process, so a crashed or kill -9'd run leaves
  nothing stuck; the file keeps the holder's pid and host for the refusal's message."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, ".lock")
    os.makedirs(workdir, exist_ok=True)
    # A file object, not a bare descriptor: one dropped without release() closes, and unlocks,
    # when it is garbage collected. "a+" creates without truncating the holder's line.
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read(512).strip() or "another process"
      self.release()
      raise ValueError(f"workdir {workdir} is in use by {holder} (lock {self.path}): wait for "
                       "that run to end, or pass another --workdir") from None
    self._file.truncate(0)
    self._file.write(f"train pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    self._file.flush()

  def release(self):
    self._file.close()  # closing the file drops the flock


def data_error(error):
  """A missing or unreadable data path, as the one-line ValueError the CLI prints."""
  return ValueError(f"the training data cannot be read ({error}): check data.paths / data.source "
                    "and the files' permissions")


# ----------------------------------------------------------------------------- preemption


class Preemption:
  """SIGTERM / SIGINT set a flag: the loop finishes its step, saves and exits 0. A second signal
  exits at once (the last committed checkpoint is safe: orbax commits by rename). If the save
  outlasts the grace period the process exits anyway, before the scheduler's SIGKILL would."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, grace_period_s):
    self.grace_period_s = grace_period_s
    self.signum = None
    self.received_at = None
    self._previous = {}
    self._timer = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    if self._timer is not None:
      self._timer.cancel()

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      os.write(2, f"second {signal.Signals(signum).name}: exiting now, without saving\n".encode())
      os._exit(128 + signum)
    self.signum, self.received_at = signum, time.monotonic()
    logging.warning("received %s: finishing this step, saving a checkpoint, exiting within %.0f s "
                    "(send it again to exit at once, without saving)",
                    signal.Signals(signum).name, self.grace_period_s)
    self._timer = threading.Timer(self.grace_period_s, self._expire)
    self._timer.daemon = True
    self._timer.start()

  def _expire(self):
    os.write(2, (f"grace period of {self.grace_period_s:.0f} s ran out before the checkpoint was "
                 "written: exiting; the next start resumes from the last complete one\n").encode())
    os._exit(EXIT_GRACE_EXPIRED)

  def requested(self):
    """True once any process got a signal; processes agree, so all of them save the same step."""
    stop = self.signum is not None
    if jax.process_count() > 1:  # a tiny all-gather per step: noise next to a real step
      stop = bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
    return stop

  def seconds_since_signal(self):
    return time.monotonic() - self.received_at if self.received_at is not None else 0.0


# ----------------------------------------------------------------------------- non-finite steps


def keep_if_nonfinite(ok, new, old):
  """`new` where ok, else `old`, leaf by leaf: a NaN step never reaches params or optimizer."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


class NonFiniteGuard:
  """Host side of the NaN policy. The step already refused the update; this reads the per-step
  flags in batches (one transfer per log step or save, not per step), logs each bad step, and
  stops per policy: 'stop' at the first, 'skip' once more than max_skips were dropped."""

  def __init__(self, policy, max_skips):
    self.policy, self.max_skips = policy, max_skips
    self._pending = []

  def record(self, step, step_metrics):
    self._pending.append((step, {k: step_metrics[k] for k in
                                 ("train/skipped", "train/nan_skips", "train/loss",
                                  "train/grad_norm")}))

  def check(self, last_checkpoint):
    pending, self._pending = jax.device_get(self._pending), []
    for step, m in pending:
      if not m["train/skipped"]:
        continue
      total = int(m["train/nan_skips"])
      logging.error("step %d: non-finite loss (%s) or gradient norm (%s): update not applied "
                    "(%d skipped so far; policy %r, limit %d)", step, m["train/loss"],
                    m["train/grad_norm"], total, self.policy, self.max_skips)
      where = (f"checkpoint {last_checkpoint} is the last good one and a rerun resumes there"
               if last_checkpoint is not None else "no checkpoint was written yet")
      if self.policy == "stop":
        raise FaultError(f"non-finite loss or gradients at step {step} (train.nan_policy='stop'); "
                         f"{where}: lower optim.lr or raise optim.warmup_steps, or pass "
                         "--config.train.nan_policy=skip to drop such steps")
      if total > self.max_skips:
        raise FaultError(f"{total} steps with non-finite loss or gradients, the last at step "
                         f"{step}, more than train.max_nan_skips={self.max_skips}; {where}: "
                         "lower optim.lr, or check the data around these steps")
