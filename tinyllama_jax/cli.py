"""What every command shares: its common flags, and one way to start that turns bad input into
one line and exit 2, and a fault into one line and exit 3 (docs/reliability.md's exit statuses),
with only the project's own INFO lines in the log.

The commands are the top-level modules (train, plan, export, generate, evaluate, sweep, prepare;
and config/__main__.py, the key listing, `python -m tinyllama_jax.config`): each defines its
flags when it runs as a command, never on import, and calls `run`. This module is of their layer:
no module below the commands imports it (tests/test_layout.py's LAYERS).
"""

import difflib
import logging as std_logging
import os
import signal
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from tinyllama_jax import config as config_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
# Source trees whose INFO lines a command shows: the package and the benchmarks beside it.
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_OWN_SOURCES = (_PACKAGE + os.sep, os.path.join(os.path.dirname(_PACKAGE), "bench") + os.sep)


def define_run_flags():
  """--config (a config file, with `--config.a.b=v` overrides), --workdir, --dry_run: the flags of
  the commands that build a run (train, plan, the bench worker). Once a process."""
  if "config" in flags.FLAGS:
    return
  config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, tb/, config.json.")
  flags.DEFINE_bool("dry_run", False, "Compile the step, print its memory plan, exit.")


def define_distributed_flags():
  """The flags distributed.initialize reads (its docstring says who decides, in which order)."""
  if "distributed" in flags.FLAGS:
    return
  flags.DEFINE_enum("distributed", "auto", ["auto", "jax", "off"],
                    "auto: flags, then JAX_* env, SLURM, TPU VM; jax: jax's own cluster "
                    "detection; off: a single process.")
  flags.DEFINE_string("coordinator", None, "host:port of process 0 (runs without a scheduler).")
  flags.DEFINE_integer("num_processes", None, "Processes in the run.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_integer("coordinator_port", 0,
                       "SLURM: the coordinator's port (0: derived from SLURM_JOB_ID).")


def run(main, *, faults=(), argv=None):
  """Runs `main` as absl's app.run does, after checking every flag name and config key in argv:
  a ValueError anywhere is one line and exit 2; an exception in `faults` one line and exit 3;
  Ctrl-C (KeyboardInterrupt) the line `interrupted` and exit 130."""
  argv = list(sys.argv if argv is None else argv)

  def start():
    check_override_keys(argv)
    try:
      app.run(_quietly(main), argv=argv, flags_parser=parse_flags)
    except faults as e:
      print_error(e)
      sys.exit(3)
    except BrokenPipeError:
      # The reader stopped (`| head`): exit as a program killed by SIGPIPE does, with no
      # traceback, and none from the flush at exit either.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      sys.exit(128 + signal.SIGPIPE)
  exit_on_interrupt(lambda: exit_on_error(start))


_REDELIVERY_S = 0.02


def exit_on_interrupt(fn):
  """Runs fn(); Ctrl-C anywhere in it is one line, `interrupted`, and exit status 130, not a
  traceback. A KeyboardInterrupt raised where Python drops exceptions (a gc callback: jax runs
  one at every collection) is not printed and forgotten: SIGINT comes to the main thread again,
  a moment later, once this hook has returned (a handler run inside it would be dropped too)."""
  def unraisable(u):
    if isinstance(u.exc_value, KeyboardInterrupt):
      threading.Timer(_REDELIVERY_S, signal.pthread_kill,
                      (threading.main_thread().ident, signal.SIGINT)).start()
    else:
      previous_hook(u)
  previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
  try:
    return fn()
  except KeyboardInterrupt:
    try:
      print("interrupted", file=sys.stderr, flush=True)
    except OSError:
      pass
    sys.exit(128 + signal.SIGINT)
  finally:
    sys.unraisablehook = previous_hook


class OwnInfoOnly(std_logging.Filter):
  """INFO lines from this project's sources; other libraries' from WARNING up. orbax logs ~5 lines
  a restore through absl (one logger for every library: no logger level can tell them apart),
  jax an INFO line for each platform it fails to start (no libtpu on a GPU or CPU host)."""

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING
            or os.path.normpath(record.pathname).startswith(_OWN_SOURCES))


def _quietly(main):
  """`main`, after OwnInfoOnly is on absl's handler (python logging's root hands it every
  record), unless --verbosity was given: asking for more then shows every library's lines."""
  def quiet_main(argv):
    handler = logging.get_absl_handler()
    if not flags.FLAGS["verbosity"].present and not any(
        isinstance(f, OwnInfoOnly) for f in handler.filters):
      handler.addFilter(OwnInfoOnly())
    return main(argv)
  return quiet_main


def check_flags(argv):
  """An unknown `--flag` in argv fails with one line naming the closest defined flags (absl's
  own message is two lines and exit 1). Call after the program defines its flags, before
  app.run. `--config=` / `--config.` arguments are check_override_keys' to check."""
  app.define_help_flags()  # --help, --helpshort, ... are defined by app.run otherwise
  known = set(flags.FLAGS)
  for arg in argv[1:]:
    if arg == "--":
      break
    if not arg.startswith("--") or arg.startswith(("--config=", "--config.")):
      continue
    name = arg[2:].split("=", 1)[0]
    if name in known or (name.startswith("no") and name[2:] in known):
      continue
    close = difflib.get_close_matches(name, sorted(known), n=3)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
    raise ValueError(f"unknown flag --{name}{hint} (--helpshort lists the flags)")


def check_override_keys(argv, flag="config"):
  """Validates `--config.a.b=...` overrides in argv before absl parses them, so a typo
  fails with the closest valid keys instead of a traceback; then every other flag's name."""
  check_flags(argv)
  path = None
  keys = []
  for arg, following in zip(argv[1:], argv[2:] + [None]):
    if arg.startswith(f"--{flag}="):
      path = arg.split("=", 1)[1]
    elif arg == f"--{flag}":  # absl also takes `--config FILE`
      path = following
    elif arg.startswith(f"--{flag}."):
      keys.append(arg[len(flag) + 3:].split("=", 1)[0])
  if path is None:
    return
  cfg = config_lib.load_config_file(path)
  valid = set(config_lib.flat_keys(cfg))
  for key in keys:
    if key not in valid:
      raise ValueError(config_lib.unknown_key_message(key, cfg))


def parse_flags(argv):
  """app.run's flags_parser: a value absl cannot parse (`--config.train.steps=abc`) is one line
  and exit 2, not absl's two lines and exit 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def exit_on_error(fn):
  """Runs fn(); a ValueError becomes one line on stderr and exit status 2."""
  try:
    return fn()
  except ValueError as e:
    print_error(e)
    sys.exit(2)


def print_error(error):
  """The one line on stderr; when stderr itself cannot be written (a log on a full disk) the
  exit status alone tells."""
  try:
    print(f"error: {error}", file=sys.stderr, flush=True)
  except OSError:
    pass
