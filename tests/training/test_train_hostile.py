"""Hostile input to `train`: each row a command line a careless or hostile user might give, and
the one line and exit status it must get (tests/hostile.py). Every row fails before a compile."""

import dataclasses

import pytest

from hostile import Probe, check

TINY = "--config=configs/tiny.py"
LONG_NAME = "w" * 300  # one path component longer than any filesystem takes (255 bytes)

PROBES = [
    Probe("config file calling sys.exit(0)", ("--config={tmp}/exits.py", "--workdir={tmp}/w"), 2,
          "config file {tmp}/exits.py called sys.exit(0)"),
    Probe("unknown XLA flag",
          (TINY, "--workdir={tmp}/w", "--config.train.xla_flags=--xla_nonsense=1"), 2,
          "XLA refuses XLA_FLAGS='--xla_nonsense=1' (train.xla_flags added to the environment's): "
          "Unknown flag in XLA_FLAGS: --xla_nonsense=1"),
    Probe("negative hang timeout", (TINY, "--workdir={tmp}/w", "--config.train.hang_timeout_s=-1"),
          2, "train.hang_timeout_s=-1.0 must be a finite number >= 0"),
    Probe("workdir that is a file", (TINY, "--workdir={tmp}/a_file"), 2,
          "workdir '{tmp}/a_file' is not writable"),
    Probe("300-character workdir name", (TINY, "--workdir={tmp}/" + LONG_NAME), 2,
          "workdir '{tmp}/" + LONG_NAME + "' cannot be created (File name too long)"),
]


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_train_probe(probe, tmp_path, capfd):
  (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
  (tmp_path / "a_file").write_text("not a directory\n")
  probe = dataclasses.replace(probe, message=probe.message.replace("{tmp}", str(tmp_path)))
  check("train", probe, tmp_path, capfd)
