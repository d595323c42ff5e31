"""How every command starts (cli.py): the libraries' INFO lines stay out of a command's log, its
own lines and every warning stay in; a closed stdout ends it without a traceback. The flag and
config-key checks are tested in test_config.py."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_RUN = os.path.join(REPO, "tests", "fixtures", "ckpt_1dd0a59", "run")  # step 2, no tokenizer
LIBRARY_LINES = ("event_tracking.py", "checkpointer.py", "async_io_engine.py", "orbax",
                 "Unable to initialize backend")


def _export(out, *extra):
  """The export command on the fixture run; JAX_PLATFORMS unset so jax probes its platforms."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  return subprocess.run([sys.executable, "-m", "tinyllama_jax.export", f"--workdir={OLD_RUN}",
                         f"--out={out}", "--dtype=fp32", *extra], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=env)


def test_export_logs_its_own_lines_and_warnings_but_no_library_info(tmp_path):
  proc = _export(tmp_path / "out")
  assert proc.returncode == 0, proc.stderr[-2000:]
  log = proc.stderr.splitlines()
  assert [line for line in log if any(s in line for s in LIBRARY_LINES)] == []
  assert any("the run has no tokenizer" in line and line.startswith("W") for line in log), log
  assert any("exported step 2 of" in line for line in log), log
  assert '"step": 2' in proc.stdout
  # --verbosity asks for everything: the same command then shows orbax's lines
  loud = _export(tmp_path / "loud", "--verbosity=0")
  assert loud.returncode == 0, loud.stderr[-2000:]
  assert sum("event_tracking.py" in line for line in loud.stderr.splitlines()) > 10


def test_a_reader_that_stops_early_gets_no_traceback():
  """`python -m tinyllama_jax.config ... | head`: the listing's reader closes the pipe first."""
  proc = subprocess.Popen([sys.executable, "-m", "tinyllama_jax.config",
                           "--config=configs/tiny.py"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  proc.stdout.close()  # before the command writes a byte
  err = proc.stderr.read()
  assert proc.wait(timeout=60) == 141 and err == "", err[-2000:]
