"""Drives the real train command for the fault suite (through tests/training/fault_train.py when faults
are injected): a micro model, one shared tokenizer and compilation cache, signals at a chosen
step, and bitwise checkpoint comparisons."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, EVERY = 16, 4  # every run ends at step 16; checkpoints every 4 steps
TMP_SUFFIX = ".orbax-checkpoint-tmp"

def process_env(cache_dir, **extra):
  """Environment of a train subprocess: CPU only, one compilation cache shared by the module."""
  out = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PLATFORMS="cpu",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="2", **extra)
  out.pop("XLA_FLAGS", None)
  return out


def micro_tokenizer(directory):
  """A 512-piece tokenizer trained once; every run names it (data.tokenizer). Returns its path."""
  from tinyllama_jax.data import pipeline
  from tinyllama_jax.data.config import data_config
  cfg = data_config()
  cfg.tokenizer_vocab_size, cfg.tokenizer_train_bytes = 512, 300_000
  return pipeline.load_tokenizer(cfg, str(directory)).path


# tests/test_train.py's micro_config as flags: compiles in seconds, a step takes ~20 ms on CPU.
# decay_steps is fixed so that runs of other lengths share one learning-rate schedule.
MICRO = {
    "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
    "model.head_dim": 16, "model.ffn_dim": 128, "model.vocab_size": 512, "model.max_seq_len": 64,
    "data.tokenizer_vocab_size": 512, "data.tokenizer_train_bytes": 300_000,
    "train.seq_len": 64, "train.global_batch": 8, "train.micro_batch_per_device": 4,
    "train.steps": STEPS, "train.log_every": 1, "train.eval_every": 1000,
    "train.checkpoint_every": EVERY, "train.eval_batches": 1, "train.sample_tokens": 0,
    "optim.warmup_steps": 5, "optim.decay_steps": 40, "optim.lr": 3e-3,
}
STEP_LINE = re.compile(r"step (\d+)/\d+ \|")


class Train:
  """One `python -m tinyllama_jax.train` process; its log (stderr) is read as it comes."""

  def __init__(self, workdir, env, args=(), inject=None, **overrides):
    """args: more command-line flags (--coordinator, --process_id, ...). inject: the faults of
    tests/training/fault_train.py ({"nan_steps": "6,7", "step_sleep_s": 0.1, "save_sleep_s": 2.0}),
    which then runs the train command; without, it is `python -m tinyllama_jax.train` itself."""
    flags = {**MICRO, **overrides}
    command = (["tests/training/fault_train.py", *(f"--{k}={v}" for k, v in inject.items())] if inject
               else ["-m", "tinyllama_jax.train"])
    args = [sys.executable, *command, "--config=configs/tiny.py", f"--workdir={workdir}",
            *args] + [f"--config.{k}={v}" for k, v in flags.items()]
    self.workdir = str(workdir)
    self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    self.lines = []
    self.last_step = 0
    self._changed = threading.Condition()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stderr:
      with self._changed:
        self.lines.append(line)
        m = STEP_LINE.search(line)
        if m:
          self.last_step = int(m.group(1))
        self._changed.notify_all()
    with self._changed:
      self._changed.notify_all()

  def wait_for_step(self, step, timeout=120):
    """Blocks until the log shows `step` (or later); fails if the process ends first."""
    deadline = time.monotonic() + timeout
    with self._changed:
      while self.last_step < step:
        assert self.proc.poll() is None or self._reader.is_alive(), self.log[-3000:]
        if not self._reader.is_alive():
          raise AssertionError(f"the run ended before step {step}:\n{self.log[-3000:]}")
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        self._changed.wait(0.5)
    return self.last_step

  def wait_for_path(self, path, timeout=120):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
      assert self.proc.poll() is None, f"the run ended before {path} appeared:\n{self.log[-3000:]}"
      assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
      time.sleep(0.02)

  def wait_for_incomplete_save(self, timeout=120):
    """Blocks until a save has started and is not committed; returns its directory name."""
    deadline = time.monotonic() + timeout
    while not incomplete(self.workdir):
      assert self.proc.poll() is None, f"the run ended before a save began:\n{self.log[-3000:]}"
      assert time.monotonic() < deadline, f"no save began within {timeout} s"
      time.sleep(0.02)
    return incomplete(self.workdir)[0]

  def signal(self, signum):
    self.proc.send_signal(signum)

  def wait(self, timeout=180):
    """The exit status; a process still running after `timeout` is killed and the test fails."""
    try:
      rc = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise AssertionError(f"still running after {timeout} s:\n{self.log[-3000:]}") from None
    self._reader.join(10)
    return rc

  @property
  def log(self):
    return "".join(self.lines)

  def last_line(self):
    return self.lines[-1].strip() if self.lines else ""

  def error_line(self):
    """The run's one-line error: its last line that starts with 'error: '. On a full disk
    orbax's async writer thread may print its own report of the same write after it."""
    return next((l.strip() for l in reversed(self.lines) if l.startswith("error: ")), "")


def run(workdir, env, **overrides):
  """Runs to the end; returns the finished Train (rc in .rc)."""
  t = Train(workdir, env, **overrides)
  t.rc = t.wait()
  return t


def committed_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def incomplete(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(n for n in os.listdir(d) if TMP_SUFFIX in n) if os.path.isdir(d) else []


def resumed_from(log):
  m = re.search(r"resuming from \S+/checkpoints/(\d+)", log)
  return int(m.group(1)) if m else None


def read_checkpoint(workdir, step=STEPS):
  """{'state': {path: numpy array}, 'data': the iterator state, 'meta': ...} of one step. A
  checkpoint of devices this process lacks (another process's) is read onto its first device."""
  options = ocp.CheckpointManagerOptions(read_only=True)
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options) as manager:
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=here), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))

  def host(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  state = {jax.tree_util.keystr(p): host(v)
           for p, v in jax.tree_util.tree_leaves_with_path(out["state"])}
  return {"state": state, "data": out["data"], "meta": out["meta"]}


def assert_same_checkpoint(got, want):
  """Bitwise: params, optimizer state (with its step count: the learning rate), RNG, step, data."""
  assert got["state"].keys() == want["state"].keys()
  for k in want["state"]:
    np.testing.assert_array_equal(got["state"][k], want["state"][k], err_msg=k)
  assert got["data"] == want["data"]


def dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def try_mount_tmpfs(path, size_bytes):
  """Mounts a small tmpfs (root only); returns the reason when the platform does not allow it."""
  os.makedirs(path, exist_ok=True)
  if shutil.which("mount") is None:
    return "no mount command"
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                        capture_output=True, text=True)
  return None if proc.returncode == 0 else f"cannot mount a tmpfs here: {proc.stderr.strip()}"


def fill(path):
  """Writes `path` until its disk is full, as another user's job would."""
  with open(path, "wb", buffering=0) as f:
    for size in (1 << 20, 4096):  # then the last pages
      try:
        while f.write(b"\0" * size):
          pass
      except OSError:
        pass


def umount(path):
  subprocess.run(["umount", str(path)], check=False, capture_output=True)


SIGNAL_EXIT = {s: 128 + s for s in (signal.SIGTERM, signal.SIGINT)}
