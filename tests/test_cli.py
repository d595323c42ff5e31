"""How every command starts (cli.py): the libraries' INFO lines stay out of a command's log, its
own lines and every warning stay in; a closed stdout ends it without a traceback; flag names,
config keys and values absl cannot parse are one line each."""

import os
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

from hostile import OLD_RUN
from tinyllama_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_override_keys_are_checked_against_a_config_given_either_way(tmp_path, monkeypatch):
  """absl takes `--config FILE` as well as `--config=FILE`: both are loaded (one line if broken)
  and the overrides checked against them. (The flag names are check_flags' test.)"""
  monkeypatch.setattr(cli, "check_flags", lambda argv: None)
  tiny_py = os.path.join(REPO, "configs/tiny.py")
  for args in (["--config", str(tmp_path / "gone.py")], [f"--config={tmp_path / 'gone.py'}"]):
    with pytest.raises(ValueError, match="does not exist"):
      cli.check_override_keys(["x", *args])
  with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
    cli.check_override_keys(["x", "--config", tiny_py, "--config.optim.lrr=1"])


def test_an_unknown_flag_names_the_closest(monkeypatch):
  cli.check_flags(["x", "--helpshort", "--nologtostderr", "--config.a=1", "--", "--zz"])  # absl's own
  own = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=own)
  monkeypatch.setattr(flags, "FLAGS", own)
  with pytest.raises(ValueError, match=r"unknown flag --workdr; did you mean --workdir\?"):
    cli.check_flags(["x", "--workdr=runs/x"])


def test_a_value_absl_cannot_parse_is_one_line_and_exit_2(monkeypatch, capsys):
  argv = ["x", f"--config={REPO}/configs/tiny.py", "--config.train.steps=abc"]
  own = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=own, lock_config=True, sys_argv=argv)
  monkeypatch.setattr(flags, "FLAGS", own)
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--config.train.steps=abc" in err[0], err
  assert "invalid literal for int()" in err[0]


def test_ctrl_c_is_one_line_and_exit_130_even_where_python_drops_it(capsys):
  """A KeyboardInterrupt raised where Python drops exceptions (here a __del__; in the commands,
  jax's gc callback) was printed as `Exception ignored ...` and the command went on; it is
  delivered again, and ends the command as any Ctrl-C: `interrupted`, exit 130."""
  class DroppingItsInterrupt:
    def __del__(self):
      raise KeyboardInterrupt

  def main(argv):
    del argv
    DroppingItsInterrupt()
    time.sleep(5)  # the delivered interrupt ends this at once
    print("finished")

  start = time.monotonic()
  with pytest.raises(SystemExit) as exit_:
    cli.run(main, argv=["generate"])
  assert exit_.value.code == 130 and time.monotonic() - start < 4
  out, err = capsys.readouterr()
  assert (out, err) == ("", "interrupted\n")
