"""Hostile-input probes: a command run as a user runs it, with what a careless or hostile user
gives it, and what it must answer: an exit status and the first words of its one-line error.

A hostile test module (tests/**/test_*_hostile.py) is a table of `Probe` rows run by `check`, so
the next probe of its kind is one row. Exit statuses: 2 bad input, 3 a fault (docs/reliability.md).

A row runs the command's own entry (`run_cli`, what `python -m tinyllama_jax.<command>` runs) in
the test's process with the row's argv: a process start costs ~2.5 s of CPU importing jax, the
row itself a fraction of that. The process-wide state a command sets (flags, logging, env, cwd,
signal handlers, jax config) is put back after each row. A row that needs a process of its own
says so (`own_process`, with why: e.g. plan sets jax_num_cpu_devices, which a process sets once,
before jax starts) and runs as `python -m`.
"""

import contextlib
import dataclasses
import faulthandler
import importlib
import logging as std_logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import warnings

import jax
from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A run saved by an earlier version, trained on synthetic data: step 2, no tokenizer.
OLD_RUN = os.path.join(REPO, "tests", "fixtures", "ckpt_1dd0a59", "run")
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
            signal.SIGPIPE, signal.SIGALRM)


@dataclasses.dataclass(frozen=True)
class Probe:
  name: str          # what the row tries, for the test id
  args: tuple        # the command's arguments; "{tmp}" is replaced by the test's tmp_path
  exit_code: int     # 2 bad input, 3 a fault
  message: str       # the error line's first words, after "error: "
  own_process: bool = False  # run as `python -m`, for a row a used process cannot run


@dataclasses.dataclass
class Result:
  """What a command left: its exit status and what it wrote (subprocess.CompletedProcess's)."""
  returncode: int
  stdout: str
  stderr: str


def run(module, args, tmp, timeout=300, env=None):
  """Runs `python -m tinyllama_jax.<module> args` in the repo; returns the CompletedProcess."""
  args = [a.replace("{tmp}", str(tmp)) for a in args]
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", f"tinyllama_jax.{module}", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=full_env)


def call(module, args, tmp, capfd, timeout=300, env=None):
  """Runs the command `python -m tinyllama_jax.<module> args` runs, in this process, from the
  repo; returns its Result. A call still running after `timeout` ends this process (as a hung
  subprocess fails the row, the worker's death fails it); a thread the command left running that
  would keep a process from exiting fails the row."""
  entry = importlib.import_module(f"tinyllama_jax.{module}")
  if not hasattr(entry, "run_cli"):  # a package command: its __main__
    entry = importlib.import_module(f"tinyllama_jax.{module}.__main__")
  argv = [entry.__file__, *(a.replace("{tmp}", str(tmp)) for a in args)]
  threads = set(threading.enumerate())
  capfd.readouterr()
  with _isolated(argv, env or {}):
    faulthandler.dump_traceback_later(timeout, exit=True, file=sys.__stderr__)
    try:
      entry.run_cli()
      code = 0
    except SystemExit as e:
      code = _exit_status(e.code)
    finally:
      faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = capfd.readouterr()
  _assert_nothing_left_running(threads)
  return Result(code, out, err)


def _exit_status(code):
  """The status a process exits with on SystemExit(code); a message is printed, as Python does."""
  if code is None or isinstance(code, int):
    return code or 0
  print(code, file=sys.stderr)
  return 1


def _assert_nothing_left_running(before):
  for t in set(threading.enumerate()) - before:
    if not t.daemon:
      t.join(30)  # a process's exit waits for it too
      assert not t.is_alive(), f"thread {t.name} still runs: the process would not exit"
  children = multiprocessing.active_children()
  assert children == [], f"child processes left running: {children}"


@contextlib.contextmanager
def _isolated(argv, env):
  """The state a process starts with and a command may change, put back afterwards: flags (the
  command's definitions removed, absl's unparsed), logging, env, cwd, argv, sys.path, signal
  handlers, warning filters and jax's config."""
  app.define_help_flags()  # once a process: kept, as a process keeps them
  flag_names = set(flags.FLAGS)
  flags.FLAGS.unparse_flags()
  handler = logging.get_absl_handler()
  saved = dict(env=dict(os.environ), cwd=os.getcwd(), argv=sys.argv, path=list(sys.path),
               signals={s: signal.getsignal(s) for s in _SIGNALS},
               root=(std_logging.root.level, list(std_logging.root.handlers)),
               absl=(logging.get_absl_logger().level, list(handler.filters),
                     handler.python_handler.stream),
               jax=dict(jax.config.values))
  os.environ.update({"JAX_PLATFORMS": "cpu", **env})
  os.chdir(REPO)
  sys.argv = argv
  logging.use_absl_handler()  # as app.run's first call in a process does
  handler.python_handler.stream = sys.stderr  # the captured one, as a process's own stderr
  try:
    with warnings.catch_warnings():
      yield
  finally:
    for name in set(flags.FLAGS) - flag_names:
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    flags.FLAGS.mark_as_parsed()  # as tests/conftest.py leaves them
    os.environ.clear()
    os.environ.update(saved["env"])
    os.chdir(saved["cwd"])
    sys.argv, sys.path[:] = saved["argv"], saved["path"]
    for s, h in saved["signals"].items():
      signal.signal(s, h)
    std_logging.root.setLevel(saved["root"][0])
    std_logging.root.handlers[:] = saved["root"][1]
    logging.get_absl_logger().setLevel(saved["absl"][0])
    handler.filters[:] = saved["absl"][1]
    handler.python_handler.stream = saved["absl"][2]
    for name, value in saved["jax"].items():
      if jax.config.values.get(name) != value:
        jax.config.update(name, value)


def check(module, probe, tmp, capfd, **kw):
  """Runs one probe; asserts its exit status, a last stderr line `error: <message>...`, and no
  traceback."""
  if probe.own_process:
    proc = run(module, probe.args, tmp, **kw)
  else:
    proc = call(module, probe.args, tmp, capfd, **kw)
  lines = proc.stderr.strip().splitlines()
  last = lines[-1] if lines else ""
  assert proc.returncode == probe.exit_code, (probe.name, proc.returncode, proc.stderr[-2000:])
  assert last.startswith(f"error: {probe.message}"), (probe.name, last)
  assert "Traceback" not in proc.stderr, (probe.name, proc.stderr[-2000:])
  return proc
