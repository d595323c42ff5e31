"""What a run does when the world misbehaves: preemption signals, non-finite steps, full disks,
a second run on the same workdir, and the checks of the environment before step one.

The train loop asks three questions of this module: may I start (`check_environment`,
`workdir_lock`; the config's own checks are config.validate), should I stop
(`Preemption.requested`), and was that step sound (`NonFiniteGuard`). The jitted step itself only
calls the pure helper `keep_if_nonfinite`.
"""

import errno
import faulthandler
import logging as std_logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from absl import logging

from tinyllama_jax import folder_lock

EXIT_GRACE_EXPIRED = 124  # the grace period ran out before the checkpoint was written
EXIT_FAULT = 3  # docs/reliability.md: a fault the run stopped on


class FaultError(RuntimeError):
  """The run stopped on purpose (non-finite steps): one line, the last checkpoint stays good."""


def describe_os_error(error):
  if getattr(error, "errno", None) == errno.ENOSPC:
    return "no space left on device"
  return error.strerror or str(error) if isinstance(error, OSError) else str(error)


class WriteFailed(FaultError):
  """A file the run writes as it goes (metrics, events, config.json, the log) could not be
  written: the run stops on it rather than train on unrecorded."""

  def __init__(self, path, error):
    self.no_space = getattr(error, "errno", None) == errno.ENOSPC
    super().__init__(f"could not write {path} ({describe_os_error(error)})")

  def with_checkpoints(self, step, checkpoints):
    """The line the run stops with: the step, the fix, the checkpoints a rerun resumes from."""
    fix = ("free disk space or move --workdir to a bigger disk" if self.no_space else
           "check the disk holding --workdir")
    return FaultError(f"{self} at step {step}: {fix}; {checkpoints_note(checkpoints)}")


def checkpoints_note(checkpoints):
  """What a stopped run leaves to resume from."""
  return (f"the complete checkpoints {checkpoints} are intact and a rerun resumes from step "
          f"{checkpoints[-1]}" if checkpoints else "no checkpoint was written yet")


# ----------------------------------------------------------------------------- preflight


def _existing_ancestor(path):
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_workdir(workdir):
  """The workdir exists (created here) and takes files; a path no filesystem takes (a name
  longer than 255 bytes, a file on the way) is one line, not an OSError."""
  probe = _existing_ancestor(workdir)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
    raise ValueError(f"workdir {workdir!r} is not writable ({probe} is not a writable "
                     f"directory): pass another --workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} cannot be created ({describe_os_error(e)}): pass "
                     "another --workdir (at most 255 bytes a path component)") from None


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


def workdir_lock(workdir):
  """One train per workdir (folder_lock.FolderLock on WORKDIR/.lock)."""
  os.makedirs(workdir, exist_ok=True)
  return folder_lock.FolderLock(
      workdir, "train", lambda holder, path: f"workdir {workdir} is in use by {holder} (lock "
      f"{path}): wait for that run to end, or pass another --workdir")


def workdir_holder(workdir):
  """Who holds WORKDIR/.lock now, or None when no live process does (folder_lock.holder)."""
  return folder_lock.holder(workdir)


def data_error(error):
  """A missing or unreadable data path, as the one-line ValueError the CLI prints."""
  return ValueError(f"the training data cannot be read ({error}): check data.paths / data.source "
                    "and the files' permissions")


def check_xla_flags(xla_flags):
  """XLA aborts the process on a flag it does not know (a fatal line, exit 1) when its backend
  starts. A CPU-only child process starts one with these flags first, in about a second, so a
  typo in train.xla_flags is one line and exit 2."""
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
  if probe.returncode == 0:
    return
  lines = [l.strip() for l in probe.stderr.splitlines() if "flag" in l.lower()]
  # XLA's fatal line, less its glog prefix: "F1207 ... parse_flags_from_env.cc:234] Unknown ..."
  reason = (lines[-1].split("] ", 1)[-1][:300] if lines else
            f"the backend did not start, exit {probe.returncode}")
  raise ValueError(f"XLA refuses XLA_FLAGS={xla_flags!r} (train.xla_flags added to the "
                   f"environment's): {reason}; fix or remove the flag (XLA's flags are listed in "
                   "xla/debug_options_flags.cc)")


# ----------------------------------------------------------------------------- watchdogs


class StepWatchdog:
  """A step that never ends (a collective waiting on a dead peer, a stalled file system, a
  writer blocked on a full disk) would hold the devices until the job's wall time. A thread
  checks when a step last completed; past timeout_s it writes every thread's stack to the log
  and exits 3 (the last complete checkpoint stays the latest). The loop calls beat() after each
  step, one store; saves and the final sample run under paused(); the compile is before start."""

  def __init__(self, timeout_s):
    self.timeout_s = timeout_s
    self._last = time.monotonic()
    self._paused = 0
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    if self.timeout_s:
      self.beat()
      self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()

  def beat(self):
    self._last = time.monotonic()

  def paused(self):
    return _Paused(self)

  def _watch(self):
    poll = min(max(self.timeout_s / 10, 0.05), 5.0)
    while not self._stop.wait(poll):
      if not self._paused and time.monotonic() - self._last > self.timeout_s:
        self._fire()

  def _fire(self):
    try:
      os.write(2, f"no training step completed in {self.timeout_s:.0f} s: the stack of every "
                  "thread follows\n".encode())
      faulthandler.dump_traceback(all_threads=True)
      os.write(2, (f"error: no training step completed in {self.timeout_s:.0f} s "
                   "(train.hang_timeout_s): a hung device, collective, file system or writer "
                   "(stacks above); the last complete checkpoint stays the latest and a rerun "
                   "resumes there; raise train.hang_timeout_s if steps are this slow\n").encode())
    except OSError:  # the log itself is what hangs or fails: the exit status still tells
      pass
    os._exit(EXIT_FAULT)


class _Paused:

  def __init__(self, watchdog):
    self._watchdog = watchdog

  def __enter__(self):
    self._watchdog._paused += 1  # pylint: disable=protected-access

  def __exit__(self, *exc):
    self._watchdog.beat()
    self._watchdog._paused -= 1  # pylint: disable=protected-access


class ConsoleWatch:
  """Python's logging reports a failed write of a log line (stderr redirected to a file on a
  full disk) by printing a traceback to that same stream and carrying on: the run would train
  with no log. This records the first failure instead; check() raises it as WriteFailed."""

  def __init__(self):
    self.error = None
    self._handlers = []

  def __enter__(self):
    for handler in std_logging.getLogger().handlers:
      handler = getattr(handler, "python_handler", handler)  # absl's wraps the stream handler
      handler.handleError = self._failed
      self._handlers.append(handler)
    return self

  def __exit__(self, *exc):
    for handler in self._handlers:
      del handler.handleError

  def _failed(self, record):
    del record
    if self.error is None:
      self.error = sys.exc_info()[1]

  def check(self):
    if self.error is not None:
      raise WriteFailed("the log (stderr)", self.error)


# ----------------------------------------------------------------------------- preemption


class Preemption:
  """SIGTERM / SIGINT set a flag: the loop finishes the step in progress, saves and exits 0. A
  second signal (another one, or the same one a second later) exits at once (the last committed
  checkpoint is safe: orbax commits by rename).
  If the save outlasts the grace period the process exits anyway, before the scheduler's
  SIGKILL would."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)
  SAME_REQUEST_WITHIN_S = 1.0  # the same signal again this soon is not a second one

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
    if (self.signum == signum and
        time.monotonic() - self.received_at < self.SAME_REQUEST_WITHIN_S):
      return  # one request sent twice: a scheduler signals every process, a sweep passes it on
    if self.signum is not None:
      os.write(2, f"second {signal.Signals(signum).name}: exiting now, without saving\n".encode())
      os._exit(128 + signum)
    self.signum, self.received_at = signum, time.monotonic()
    # The loop keeps at most one step queued behind the one running, so this is the whole
    # of what still runs before the save.
    logging.warning("received %s: finishing the step in progress (and the one queued behind it), "
                    "then saving a checkpoint and exiting within %.0f s (send it again to exit "
                    "at once, without saving)", signal.Signals(signum).name, self.grace_period_s)
    self._timer = threading.Timer(self.grace_period_s, self._expire)
    self._timer.daemon = True
    self._timer.start()

  def _expire(self):
    os.write(2, (f"grace period of {self.grace_period_s:.0f} s ran out before the checkpoint was "
                 "written: exiting; the next start resumes from the last complete one\n").encode())
    os._exit(EXIT_GRACE_EXPIRED)

  def requested(self, fault=False):
    """(stop, faulted): stop once any process got a signal, faulted the processes that hold a
    fault (`fault`: this one does). Processes agree, so all of them save, or stop, at the same
    step, instead of the others waiting in a collective for one that left."""
    mine = np.array([self.signum is not None, fault], np.int32)
    if jax.process_count() == 1:
      return bool(mine[0]), [0] if fault else []
    every = multihost_utils.process_allgather(mine)  # [P, 2]: noise next to a real step
    return bool(np.any(every[:, 0])), [int(p) for p in np.flatnonzero(every[:, 1])]

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
