"""prepare given what a careless or hostile user gives it: one line naming the flag or the path,
exit 2, and nothing written to --out."""

import dataclasses
import os
import shutil

import pytest

from tests import hostile
from tests.hostile import Probe

_OK = ("--input={tmp}/in.txt", "--tokenizer={tmp}/tok.model")
_OUT = "--out={tmp}/out"

PROBES = [
    Probe("no input", ("--tokenizer={tmp}/tok.model", _OUT), 2, "--input is required"),
    Probe("input matching nothing", ("--input={tmp}/none/**/*.txt", "--tokenizer={tmp}/tok.model",
                                     _OUT), 2, "--input='{tmp}/none/**/*.txt' matches no files"),
    Probe("input of an unknown type", ("--input={tmp}/tok.model", "--tokenizer={tmp}/tok.model",
                                       _OUT), 2, "{tmp}/tok.model: unknown file type"),
    Probe("missing tokenizer", ("--input={tmp}/in.txt", "--tokenizer={tmp}/no.model", _OUT), 2,
          "tokenizer file"),
    Probe("negative shard size", (*_OK, _OUT, "--shard_tokens=-5"), 2,
          "--shard_tokens=-5 must be positive"),
    Probe("shard size not an integer", (*_OK, _OUT, "--shard_tokens=1e400"), 2,
          "flag --shard_tokens=1e400"),
    Probe("eval fraction nan", (*_OK, _OUT, "--eval_fraction=nan"), 2,
          "--eval_fraction=nan must be in [0, 1)"),
    Probe("eval fraction inf", (*_OK, _OUT, "--eval_fraction=inf"), 2,
          "--eval_fraction=inf must be in [0, 1)"),
    Probe("negative workers", (*_OK, _OUT, "--num_workers=-1"), 2, "--num_workers=-1 must be"),
    Probe("out that is a file", (*_OK, "--out={tmp}/in.txt"), 2,
          "--out={tmp}/in.txt is not a folder"),
    Probe("out name too long", (*_OK, "--out={tmp}/out/" + "o" * 300), 2,
          "--out={tmp}/out/" + "o" * 300 + ": a name in that path is too long"),
]


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_prepare_refuses_bad_input_in_one_line(probe, tok, tmp_path, capfd):
  shutil.copy(tok.path, tmp_path / "tok.model")
  (tmp_path / "in.txt").write_text("one small document")
  probe = dataclasses.replace(probe, message=probe.message.replace("{tmp}", str(tmp_path)))
  hostile.check("prepare", probe, tmp_path, capfd)
  assert not os.path.exists(tmp_path / "out")  # nothing written, not even the folder
