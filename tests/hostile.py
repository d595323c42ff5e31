"""Hostile-input probes: a command run as a user runs it, with what a careless or hostile user
gives it, and what it must answer: an exit status and the first words of its one-line error.

A hostile test module (tests/**/test_*_hostile.py) is a table of `Probe` rows run by `check`, so
the next probe of its kind is one row. Exit statuses: 2 bad input, 3 a fault (docs/reliability.md).
"""

import dataclasses
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Probe:
  name: str          # what the row tries, for the test id
  args: tuple        # the command's arguments; "{tmp}" is replaced by the test's tmp_path
  exit_code: int     # 2 bad input, 3 a fault
  message: str       # the error line's first words, after "error: "


def run(module, args, tmp, timeout=300, env=None):
  """Runs `python -m tinyllama_jax.<module> args` in the repo; returns the CompletedProcess."""
  args = [a.replace("{tmp}", str(tmp)) for a in args]
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", f"tinyllama_jax.{module}", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=full_env)


def check(module, probe, tmp, **kw):
  """Runs one probe; asserts its exit status, a last stderr line `error: <message>...`, and no
  traceback."""
  proc = run(module, probe.args, tmp, **kw)
  lines = proc.stderr.strip().splitlines()
  last = lines[-1] if lines else ""
  assert proc.returncode == probe.exit_code, (probe.name, proc.returncode, proc.stderr[-2000:])
  assert last.startswith(f"error: {probe.message}"), (probe.name, last)
  assert "Traceback" not in proc.stderr, (probe.name, proc.stderr[-2000:])
  return proc
