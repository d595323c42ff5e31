"""Sweep launchers: run a planned sweep here (local), print its commands, or write a SLURM array.

tinyllama_jax.sweep plans the runs (names, bindings, resolved configs) and calls these; each run
object needs .name, .workdir, .cfg (its resolved config) and .train_args(config_path). A run's
state comes from its checkpoints and WORKDIR/<name>/sweep_run.json, so every launcher skips
finished runs and the trainer resumes interrupted ones.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from tinyllama_jax.data.formats import write_json_atomic
from tinyllama_jax.sweeps.summary import RUN_FILE, latest_checkpoint_step, read_run_file
from tinyllama_jax.training import faults

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_MODULE = ["-m", "tinyllama_jax.train"]
SLURM_SCRIPT = "sweep.sbatch"


# ----------------------------------------------------------------------------- run state


class Interrupted(Exception):
  """The sweep got SIGTERM, SIGINT or SIGHUP: its trainers were stopped too, saved and ended."""

  def __init__(self, signum):
    self.signum = signum
    super().__init__(f"interrupted by {signal.Signals(signum).name}")


def run_state(run):
  """(status, latest checkpoint step): finished | running | interrupted | failed | new.
  Running means a trainer holds the workdir's lock now: a recorded pid may be dead, or reused."""
  step = latest_checkpoint_step(run.workdir)
  if step is not None and step >= run.cfg.train.steps:
    return "finished", step
  record = read_run_file(run.workdir)
  if faults.workdir_holder(run.workdir) is not None:
    return "running", step
  if record.get("status") == "failed":
    return "failed", step
  return ("interrupted" if step is not None else "new"), step


def train_command(run, config_path, python):
  return [python, *TRAIN_MODULE, *run.train_args(config_path)]


# ----------------------------------------------------------------------------- launchers


def visible_gpus(env):
  if "CUDA_VISIBLE_DEVICES" in env:
    return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def device_slots(max_parallel, env):
  """One environment per concurrent run: the host's GPUs split into max_parallel equal sets."""
  if max_parallel < 1:
    raise ValueError(f"--max_parallel={max_parallel}: give 1 or more")
  if max_parallel == 1:
    return [{}]
  gpus = visible_gpus(env)
  if not gpus:
    print(f"no GPUs visible: {max_parallel} runs at a time share this host's devices", flush=True)
    return [{} for _ in range(max_parallel)]
  if max_parallel > len(gpus):
    raise ValueError(f"--max_parallel={max_parallel} is more than the {len(gpus)} visible GPUs "
                     f"({','.join(gpus)}): give at most {len(gpus)}")
  per = len(gpus) // max_parallel
  if per * max_parallel < len(gpus):
    print(f"{len(gpus) - per * max_parallel} of {len(gpus)} GPUs stay idle: {len(gpus)} do not "
          f"split evenly into {max_parallel} sets", flush=True)
  return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per:(i + 1) * per])}
          for i in range(max_parallel)]


def _update_record(run, **fields):
  path = os.path.join(run.workdir, RUN_FILE)
  record = read_run_file(run.workdir)
  record.update(fields, updated=time.strftime("%Y-%m-%d %H:%M:%S"))
  write_json_atomic(path, record, sort_keys=True)


def _tail(path, n=15):
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-n:])


class _Forwarder:
  """SIGTERM / SIGINT to the sweep go on to its trainers at once (each finishes its step, saves
  and exits, as under a scheduler's signal); the sweep starts no more runs and waits for them.
  Trainers run in sessions of their own, so a terminal's Ctrl-C reaches them this way only, once:
  a second signal makes a trainer exit without saving. A second one to the sweep goes on too.
  SIGHUP (the terminal closed, an ssh connection dropped) stops them the same way, as SIGTERM (a
  trainer saves on SIGTERM and SIGINT only), and the sweep's own lines then go to /dev/null: a
  hung-up terminal fails every write, which would end the sweep before its trainers' saves."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

  def __init__(self):
    self.signum = None
    self._procs, self._previous, self._terminal_fds = [], {}, []

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    # Asked now: a hung-up terminal no longer answers isatty.
    self._terminal_fds = [fd for fd in (1, 2) if os.isatty(fd)]
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame):
    del frame
    self.signum = self.signum or signum
    if signum == signal.SIGHUP:
      self._leave_the_terminal()
    for proc in self._procs:
      if proc.poll() is None:
        proc.send_signal(_for_trainer(signum))

  def _leave_the_terminal(self):
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in self._terminal_fds:
      os.dup2(null, fd)
    os.close(null)
    self._terminal_fds = []

  def started(self, proc):
    self._procs.append(proc)
    if self.signum is not None:  # the signal came while it started
      proc.send_signal(_for_trainer(self.signum))


def _for_trainer(signum):
  return signal.SIGTERM if signum == signal.SIGHUP else signum


def _start(run, trainer, config_path, env, slot):
  status, step = run_state(run)
  verb = f"resume from step {step}" if step else "start"
  log_path = os.path.join(run.workdir, "train.log")
  devices = "".join(f" on {k}={v}" for k, v in slot.items())
  print(f"{verb} {run.name}{devices} (log: {log_path})", flush=True)
  with open(log_path, "a") as log:
    proc = subprocess.Popen(trainer + run.train_args(config_path), cwd=REPO_ROOT,
                            env={**env, **slot},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  _update_record(run, status="running", pid=proc.pid, host=socket.gethostname(),
                 returncode=None)
  return proc, log_path


def _ended(run, rc, signum):
  """(the record's status, the outcome printed) of a trainer that exited with rc."""
  step = latest_checkpoint_step(run.workdir) or 0
  if rc == 0 and step >= run.cfg.train.steps:
    return "finished", "finished"
  if signum is not None and rc == 0:
    return "interrupted", (f"interrupted by {signal.Signals(signum).name}, checkpoint {step} "
                           "saved")
  return "failed", (f"FAILED (exit {rc})" if rc else
                    f"FAILED (exit 0 at checkpoint {step} of {run.cfg.train.steps} steps)")


def launch_local(runs, config_path, max_parallel=1, trainer=None, env=None, poll_s=1.0):
  """Runs the unfinished runs, max_parallel at a time, each on its own set of GPUs, output in
  RUN/train.log; `trainer` is the command before the run's flags. Returns the failed runs' names.
  A run whose workdir a live trainer holds is skipped. SIGTERM / SIGINT: passed to the trainers,
  which save (SIGHUP: SIGTERM is); once they ended, Interrupted is raised."""
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  trainer = trainer or [sys.executable, *TRAIN_MODULE]
  todo = []
  for run in runs:
    status, step = run_state(run)
    if status in ("finished", "running"):
      print(f"skip {run.name}: {status} ({step or 0}/{run.cfg.train.steps} steps)", flush=True)
    else:
      todo.append(run)
  slots = device_slots(max_parallel, env) if todo else []
  free, active, failed, done = list(range(len(slots))), {}, [], 0
  with _Forwarder() as forwarder:
    while (todo and forwarder.signum is None) or active:
      while todo and free and forwarder.signum is None:
        run, slot = todo.pop(0), free.pop(0)
        proc, log_path = _start(run, trainer, config_path, env, slots[slot])
        forwarder.started(proc)
        active[proc.pid] = (run, proc, slot, time.time(), log_path)
      time.sleep(poll_s)
      for pid, (run, proc, slot, t0, log_path) in list(active.items()):
        rc = proc.poll()
        if rc is None:
          continue
        del active[pid]
        free.append(slot)
        done += 1
        status, outcome = _ended(run, rc, forwarder.signum)
        _update_record(run, status=status, returncode=rc)
        print(f"[{done}/{done + len(active) + len(todo)}] {run.name}: {outcome} in "
              f"{time.time() - t0:.0f} s", flush=True)
        if status == "failed":
          failed.append(run.name)
          print(f"--- last lines of {log_path}:\n{_tail(log_path)}---", flush=True)
  if forwarder.signum is not None:
    raise Interrupted(forwarder.signum)
  return failed


def _unfinished(runs):
  out = []
  for run in runs:
    status, step = run_state(run)
    if status == "finished":
      print(f"# skip {run.name}: finished ({step}/{run.cfg.train.steps} steps)", flush=True)
    else:
      out.append(run)
  return out


def launch_print(runs, config_path):
  """The train command of every unfinished run, one a line, to run from the repository root. The
  interpreter is this one (a venv's path), so the lines run as printed without activating it."""
  todo = _unfinished(runs)
  print(f"# {len(todo)} of {len(runs)} runs to go; run these from {REPO_ROOT}")
  for run in todo:
    print(shlex.join(train_command(run, config_path, sys.executable)))


def slurm_script(runs, config_path, workdir, max_parallel=0, options=(), job_name="sweep"):
  """A job array, one task per run; each task runs (or resumes) its run with the train command."""
  array = f"0-{len(runs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
  lines = ["#!/bin/bash",
           f"# Written by python -m tinyllama_jax.sweep: {len(runs)} runs of {os.path.abspath(workdir)}.",
           f"# Submit with: sbatch {os.path.join(os.path.abspath(workdir), SLURM_SCRIPT)}",
           "# Rerun the sweep command to rewrite it with only the runs still unfinished.",
           f"#SBATCH --job-name={job_name}",
           f"#SBATCH --array={array}",
           f"#SBATCH --output={os.path.join(os.path.abspath(workdir), 'slurm', '%A_%a.out')}",
           "#SBATCH --ntasks=1",
           *[f"#SBATCH {opt}" for opt in options],
           "set -euo pipefail",
           f"cd {shlex.quote(REPO_ROOT)}",
           f"export PYTHONPATH={shlex.quote(REPO_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}",
           'case "$SLURM_ARRAY_TASK_ID" in']
  for i, run in enumerate(runs):
    lines.append(f"  {i}) ARGS=({' '.join(shlex.quote(a) for a in run.train_args(config_path))}) ;;")
  lines += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac",
            '# PYTHON: the interpreter of the environment with tinyllama_jax\'s requirements',
            f'exec "${{PYTHON:-python}}" {" ".join(TRAIN_MODULE)} "${{ARGS[@]}}"', ""]
  return "\n".join(lines)


def launch_slurm(runs, config_path, workdir, max_parallel=0, options=()):
  todo = _unfinished(runs)
  path = os.path.join(workdir, SLURM_SCRIPT)
  if not todo:
    print(f"all {len(runs)} runs are finished: nothing to submit")
    return None
  os.makedirs(os.path.join(workdir, "slurm"), exist_ok=True)
  name = "sweep-" + os.path.basename(os.path.abspath(workdir))
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(slurm_script(todo, config_path, workdir, max_parallel, options, name))
  os.chmod(tmp, 0o755)
  os.replace(tmp, path)
  for i, run in enumerate(todo):
    print(f"# task {i}: {run.name}")
  print(f"wrote {path} ({len(todo)} of {len(runs)} runs): submit with  sbatch {path}")
  return path
