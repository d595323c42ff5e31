"""Ctrl-C at a known moment: a command run as a subprocess gets SIGINT once a line it writes to
stderr shows it is where the test wants it (a compile it logs with JAX_LOG_COMPILES, a line of a
sweep file), which a loaded machine reaches as surely as an idle one."""

import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sigint_after(module, args, line, timeout=300, env=None):
  """Runs `python -m tinyllama_jax.<module> args` (CPU, compiles logged), sends SIGINT when a
  stderr line holds `line`; returns (exit status, the stderr after that line, stdout)."""
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1", **(env or {}))
  proc = subprocess.Popen([sys.executable, "-m", f"tinyllama_jax.{module}", *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
  seen = []
  for text in proc.stderr:
    seen.append(text)
    if line in text:
      proc.send_signal(signal.SIGINT)
      break
  else:
    proc.wait(timeout=timeout)
    raise AssertionError(f"never wrote {line!r} (exit {proc.returncode}):\n{''.join(seen)[-3000:]}")
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, err, out
