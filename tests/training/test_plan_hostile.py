"""Hostile input to `plan`: each row a command line a careless or hostile user might give, and the
one line and exit status it must get (tests/hostile.py)."""

import dataclasses

import pytest

from hostile import Probe, check

TINY = "--config=configs/tiny.py"

PROBES = [
    Probe("--json in a directory that does not exist", (TINY, "--json={tmp}/gone/plan.json"), 2,
          "--json={tmp}/gone/plan.json: give a file path in an existing directory"),
    Probe("--json that is a directory", (TINY, "--json={tmp}"), 2,
          "--json={tmp}: give a file path in an existing directory"),
    Probe("config file calling sys.exit(0)", ("--config={tmp}/exits.py",), 2,
          "config file {tmp}/exits.py called sys.exit(0)"),
    # plan sets jax_num_cpu_devices before this check: a process can, once, before jax starts
    Probe("steps out of range", (TINY, "--config.train.steps=0"), 2, "train.steps=0 must be",
          own_process=True),
]


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_plan_probe(probe, tmp_path, capfd):
  (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
  probe = dataclasses.replace(probe, message=probe.message.replace("{tmp}", str(tmp_path)))
  check("plan", probe, tmp_path, capfd)
