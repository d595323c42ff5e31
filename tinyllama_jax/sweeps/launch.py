"""Sweep launchers: run a planned sweep here (local), print its commands, or write a SLURM array.

tinyllama_jax.sweep plans the runs (names, bindings, resolved configs) and calls these; each run
object needs .name, .workdir, .cfg (its resolved config) and .train_args(config_path). A run's
state comes from its checkpoints and WORKDIR/<name>/sweep_run.json, so every launcher skips
finished runs and the trainer resumes interrupted ones.
"""

import os
import shlex
import socket
import subprocess
import sys
import time

from tinyllama_jax.data.formats import write_json_atomic
from tinyllama_jax.sweeps.summary import RUN_FILE, latest_checkpoint_step, read_run_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_MODULE = ["-m", "tinyllama_jax.train"]
SLURM_SCRIPT = "sweep.sbatch"


# ----------------------------------------------------------------------------- run state


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, someone else's
    pass
  return True


def run_state(run):
  """(status, latest checkpoint step): finished | running | interrupted | failed | new."""
  step = latest_checkpoint_step(run.workdir)
  if step is not None and step >= run.cfg.train.steps:
    return "finished", step
  record = read_run_file(run.workdir)
  if (record.get("status") == "running" and record.get("host") == socket.gethostname()
      and _pid_alive(record.get("pid", -1))):
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


def launch_local(runs, config_path, max_parallel=1, trainer=None, env=None, poll_s=1.0):
  """Runs the unfinished runs, max_parallel at a time, each on its own set of GPUs, output in
  RUN/train.log; `trainer` is the command before the run's flags. Returns the failed runs' names."""
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
  try:
    while todo or active:
      while todo and free:
        run, slot = todo.pop(0), free.pop(0)
        status, step = run_state(run)
        verb = f"resume from step {step}" if step else "start"
        log_path = os.path.join(run.workdir, "train.log")
        devices = "".join(f" on {k}={v}" for k, v in slots[slot].items())
        print(f"{verb} {run.name}{devices} (log: {log_path})", flush=True)
        with open(log_path, "a") as log:
          proc = subprocess.Popen(trainer + run.train_args(config_path), cwd=REPO_ROOT,
                                  env={**env, **slots[slot]}, stdout=log, stderr=subprocess.STDOUT)
        _update_record(run, status="running", pid=proc.pid, host=socket.gethostname(),
                       returncode=None)
        active[proc.pid] = (run, proc, slot, time.time(), log_path)
      time.sleep(poll_s)
      for pid, (run, proc, slot, t0, log_path) in list(active.items()):
        rc = proc.poll()
        if rc is None:
          continue
        del active[pid]
        free.append(slot)
        done += 1
        step = latest_checkpoint_step(run.workdir) or 0
        finished = rc == 0 and step >= run.cfg.train.steps
        _update_record(run, status="finished" if finished else "failed", returncode=rc)
        outcome = ("finished" if finished else f"FAILED (exit {rc})" if rc else
                   f"FAILED (exit 0 at checkpoint {step} of {run.cfg.train.steps} steps)")
        print(f"[{done}/{done + len(active) + len(todo)}] {run.name}: {outcome} in "
              f"{time.time() - t0:.0f} s", flush=True)
        if not finished:
          failed.append(run.name)
          print(f"--- last lines of {log_path}:\n{_tail(log_path)}---", flush=True)
  except KeyboardInterrupt:
    for run, proc, _, _, _ in active.values():
      proc.terminate()  # each trainer saves nothing more; rerunning resumes from its checkpoint
    for run, proc, _, _, _ in active.values():
      proc.wait()
      _update_record(run, status="interrupted", returncode=proc.returncode)
    raise
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
