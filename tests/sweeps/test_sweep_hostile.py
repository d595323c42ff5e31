"""Hostile input to `sweep` (and `sweep summarize`): each row a command line a careless or
hostile user might give, and the one line and exit status it must get (tests/hostile.py). Every
row fails before a trainer starts."""

import dataclasses

import pytest

from hostile import Probe, check

ARGS = ("--config=configs/tiny.py", "--sweep={tmp}/lr.py")
LONG_NAME = "w" * 300  # one path component longer than any filesystem takes (255 bytes)

PROBES = [
    Probe("sweep file calling sys.exit(0)",
          ("--config=configs/tiny.py", "--sweep={tmp}/exits.py", "--workdir={tmp}/w"), 2,
          "sweep file {tmp}/exits.py called sys.exit(0)"),
    Probe("workdir that is a file", (*ARGS, "--workdir={tmp}/a_file"), 2,
          "the run directory '{tmp}/a_file/lr1e-03' cannot be created (Not a directory)"),
    Probe("300-character workdir name", (*ARGS, "--workdir={tmp}/" + LONG_NAME), 2,
          "the run directory '{tmp}/" + LONG_NAME + "/lr1e-03' cannot be created (File name too "
          "long)"),
    Probe("negative max_parallel", (*ARGS, "--workdir={tmp}/w", "--max_parallel=-1"), 2,
          "--max_parallel=-1: give 1 or more"),
    Probe("steps out of range for every run",
          (*ARGS, "--workdir={tmp}/w", "--config.train.steps=0"), 2,
          "run lr1e-03: train.steps=0 must be >= 1"),
    Probe("summarize a file", ("summarize", "--workdir={tmp}/a_file"), 2,
          "sweep directory '{tmp}/a_file' does not exist or is not a directory"),
]


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_sweep_probe(probe, tmp_path, capfd):
  (tmp_path / "lr.py").write_text("def get_sweep():\n  return {'optim.lr': [1e-3]}\n")
  (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
  (tmp_path / "a_file").write_text("not a directory\n")
  probe = dataclasses.replace(probe, message=probe.message.replace("{tmp}", str(tmp_path)))
  check("sweep", probe, tmp_path, capfd)
