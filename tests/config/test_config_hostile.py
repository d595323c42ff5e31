"""The key listing command (`python -m tinyllama_jax.config`) given what a careless user types:
each row one line on stderr and exit 2, before anything is listed."""

import pytest

from hostile import Probe, check

PROBES = [
    Probe("a stray argument", ("--config=configs/tiny.py", "extra"), 2, "unexpected arguments"),
    Probe("a misspelt key", ("--config=configs/tiny.py", "--config.train.stepz=3"), 2,
          "unknown config key 'train.stepz'; did you mean train.steps"),
    Probe("no such config file", ("--config={tmp}/nope.py",), 2, "config file"),
    Probe("a value of the wrong type", ("--config=configs/tiny.py",
                                        "--config.train.steps=abc"), 2,
          "flag --config.train.steps=abc: invalid literal"),
    Probe("a misspelt flag", ("--config=configs/tiny.py", "--confg=x"), 2,
          "unknown flag --confg; did you mean --config?"),
]


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_config_refuses(probe, tmp_path, capfd):
  proc = check("config", probe, tmp_path, capfd, timeout=60)
  assert proc.stdout == ""
