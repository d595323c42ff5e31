"""Throughput, MFU, the metrics a run writes (tensorboard events, metrics.jsonl), the console line."""

import contextlib
import json
import os
import secrets
import socket
import struct
import sys
import time

import jax
from absl import logging


@contextlib.contextmanager
def _without_torch():
  """tensorboardX's package imports torch where it is installed (2.5 s of every train start on
  a CPU), only to accept torch tensors, which this module never passes: hidden while it loads."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    yield
  finally:
    if hide:
      del sys.modules["torch"]


with _without_torch():
  from tensorboardX import summary as tb_summary
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c

from tinyllama_jax import peak_flops  # noqa: E402
from tinyllama_jax.training import faults  # noqa: E402

METRICS_FILE = "metrics.jsonl"  # beside tb/ in every workdir: one JSON object of scalars a line

def peak_flops_per_device(override=0.0):
  """Peak from the config when set, else from the table; None when unknown (CPU): no MFU."""
  if override:
    return float(override)
  return peak_flops.peak_flops(jax.devices()[0].device_kind)


def peak_memory_bytes():
  """Peak bytes in use on this process's first device where the backend reports it (GPU, TPU), else None."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


class _EventFile:
  """A tensorboard event file written on the calling thread. tensorboardX's SummaryWriter writes
  from a thread of its own: when a write fails there (a full disk) that thread dies and the
  trainer blocks forever on its full queue, so a failure here raises where the run can stop."""

  def __init__(self, directory):
    os.makedirs(directory, exist_ok=True)
    # The pid keeps two starts within one second apart.
    self.path = os.path.join(directory, f"events.out.tfevents.{int(time.time())}."
                                        f"{socket.gethostname()}.{os.getpid()}")
    self._file = open(self.path, "ab")
    self.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def write(self, event):
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data +
                     struct.pack("<I", masked_crc32c(data)))

  def summary(self, step, summary):
    self.write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


class Writer:
  """A run's metrics, on process 0 only: tensorboard events under WORKDIR/tb, and the same
  scalars as one JSON object a line in WORKDIR/metrics.jsonl, which any tool reads without
  tensorboard. Each start appends a {"start_step": N} line first: a run resumed from checkpoint
  N recomputes the steps after N, so readers (read_metrics) drop the earlier values past N.
  Both are flushed at every call, on the caller's thread: a failed write raises WriteFailed."""

  def __init__(self, workdir, start_step=0, cfg=None):
    self._tb = self._jsonl = self._wandb = None
    self._failed = False
    if jax.process_index() == 0 and cfg is not None and cfg.train.get("wandb_project"):
      self._wandb = WandbRun(workdir, cfg)
    if jax.process_index() == 0:
      self._guarded(os.path.join(workdir, "tb"), self._open, workdir)
      self._write_line({"start_step": int(start_step), "time": time.time()})

  def _open(self, workdir):
    self._tb = _EventFile(os.path.join(workdir, "tb"))
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")

  def _guarded(self, path, fn, *args):
    try:
      fn(*args)
    except OSError as e:
      self._failed = True
      raise faults.WriteFailed(path, e) from e

  def _write_line(self, record):
    # one line, flushed: a kill -9 loses at most the line being written (readers skip it)
    def write():
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    self._guarded(self._jsonl.name, write)

  def _write_events(self, step, summaries):
    def write():
      for summary in summaries:
        self._tb.summary(step, summary)
      self._tb.flush()
    self._guarded(self._tb.path, write)

  def scalars(self, step, values):
    if self._tb is None:
      return
    values = {name: float(v) for name, v in values.items() if v is not None}
    self._write_events(step, [tb_summary.scalar(name, value) for name, value in values.items()])
    self._write_line({"step": int(step), "time": time.time(), **values})
    if self._wandb is not None:
      self._wandb.log(step, values)

  def text(self, step, name, value):
    if self._tb is not None:
      self._write_events(step, [tb_summary.text(name, value)])

  def close(self):
    """Closes both files; a failure raises, unless a write already failed (that one is the
    error the run reports)."""
    failure = None
    for f in (self._tb, self._jsonl):
      try:
        if f is not None:
          f.close()
      except OSError as e:
        failure = failure or faults.WriteFailed(getattr(f, "path", getattr(f, "name", "")), e)
    self._tb = self._jsonl = None
    if self._wandb is not None:
      wandb_run, self._wandb = self._wandb, None
      wandb_run.close()
    if failure is not None and not self._failed:
      self._failed = True
      raise failure


WANDB_ID_FILE = "wandb_run_id"  # in the workdir: a resumed run continues the same W&B run


class WandbRun:
  """Weights & Biases beside tensorboard (train.wandb_project): the same scalars at the same
  steps, the resolved config, files under WORKDIR/wandb. The run id is kept in the workdir, so a
  resume continues the run (W&B's resume='allow'). A failing W&B call raises and ends the run, as
  the other writers do; init and finish wait at most timeout_s, never forever."""

  def __init__(self, workdir, cfg, timeout_s=120):
    import wandb  # the optional dependency: config.validate names its install before the compile
    t = cfg.train
    id_path = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(8)  # W&B ids: lowercase letters and digits
      os.makedirs(workdir, exist_ok=True)
      with open(id_path, "w") as f:
        f.write(run_id + "\n")
    self._run = wandb.init(
        project=t.wandb_project, entity=t.wandb_entity or None, name=t.wandb_run_name or None,
        id=run_id, resume="allow", dir=workdir, config=cfg.to_dict(),
        settings=wandb.Settings(init_timeout=timeout_s, finish_timeout=timeout_s, quiet=True,
                                console="off"))

  def log(self, step, values):
    self._run.log(dict(values), step=int(step))

  def close(self):
    self._run.finish()


def read_metrics(workdir):
  """({name: [(step, value)]}, unreadable lines) from WORKDIR/metrics.jsonl ({} if absent). At
  each {"start_step": N} line, the values logged past step N so far are dropped (recomputed)."""
  path = os.path.join(workdir, METRICS_FILE)
  series, bad = {}, 0
  if not os.path.exists(path):
    return {}, 0
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        record.pop("time", None)
        if "start_step" in record:
          start = int(record["start_step"])
          for points in series.values():
            for s in [s for s in points if s > start]:
              del points[s]
          continue
        step = int(record.pop("step"))
        values = {name: float(v) for name, v in record.items()}
      except (ValueError, KeyError, TypeError, AttributeError):  # cut short by a kill, or not ours
        bad += 1
        continue
      for name, value in values.items():
        series.setdefault(name, {})[step] = value
  return {name: sorted(points.items()) for name, points in series.items() if points}, bad


class Throughput:
  """Tokens/s, MFU and ETA over the steps since the last report."""

  def __init__(self, tokens_per_step, flops_per_token, n_devices, peak_flops, total_steps):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.n_devices = n_devices
    self.peak_flops = peak_flops
    self.total_steps = total_steps
    self._t = None
    self._step = None

  def start(self, step):
    self._t, self._step = time.perf_counter(), step

  def report(self, step):
    now = time.perf_counter()
    steps = step - self._step
    dt = now - self._t
    self._t, self._step = now, step
    if steps <= 0 or dt <= 0:
      return {}
    tokens_per_s = steps * self.tokens_per_step / dt
    out = {
        "perf/step_time_s": dt / steps,
        "perf/tokens_per_s": tokens_per_s,
        "perf/tokens_per_s_per_device": tokens_per_s / self.n_devices,
        "perf/eta_s": (self.total_steps - step) * dt / steps,
    }
    if self.peak_flops:
      out["perf/mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.n_devices)
    mem = peak_memory_bytes()
    if mem is not None:
      out["perf/peak_memory_gib"] = mem / 2**30
    return out


def _fmt_eta(seconds):
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def console_line(step, total, values):
  parts = [f"step {step}/{total}", f"loss {values['train/loss']:.4f}",
           f"lr {values['train/lr']:.2e}", f"gnorm {values['train/grad_norm']:.3f}"]
  if "perf/tokens_per_s" in values:
    parts.append(f"{values['perf/tokens_per_s']:,.0f} tok/s")
    if "perf/mfu" in values:
      parts.append(f"MFU {100 * values['perf/mfu']:.1f}%")
    if "perf/peak_memory_gib" in values:
      parts.append(f"mem {values['perf/peak_memory_gib']:.1f} GiB")
    parts.append(f"ETA {_fmt_eta(values['perf/eta_s'])}")
  logging.info(" | ".join(parts))
