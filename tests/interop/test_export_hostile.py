"""export given what a careless or hostile user gives it: one line naming the flag, exit 2, and
nothing written to --out."""

import os

import pytest

from tests import hostile
from tests.hostile import Probe

_ARGS = ("--workdir={tmp}/run", "--out={tmp}/out")

PROBES = [
    Probe("shard size not a number", (*_ARGS, "--max_shard_size=abc"), 2,
          "--max_shard_size=abc is not a size"),
    Probe("shard size overflowing", (*_ARGS, "--max_shard_size=1e400GB"), 2,
          "--max_shard_size=1e400GB is not a size"),
    Probe("negative shard size", (*_ARGS, "--max_shard_size=-5"), 2,
          "--max_shard_size=-5 is not a size"),
    Probe("shard size nan", (*_ARGS, "--max_shard_size=nanMB"), 2,
          "--max_shard_size=nanMB is not a size"),
]


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_export_refuses_bad_input_in_one_line(probe, tmp_path):
  hostile.check("export", probe, tmp_path)
  assert not os.path.exists(tmp_path / "out")
