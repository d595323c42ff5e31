"""`export` and `export --from_hf` given what a careless or hostile user gives them: each row one
line and its exit status (tests/hostile.py), and nothing written to --out or --workdir. The run
is the imported random Llama of hf_models, once a module; each damaged HF directory is a copy of
its source, edited."""

import dataclasses
import json
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest

from hf_models import hostile_runs, tokenizer_file  # noqa: F401 (a fixture)
from hostile import Probe, check

R, H = "--workdir={tmp}/run", "--workdir={tmp}/new"
CONFIG_EDITS = {  # HF directory -> config.json's edited fields
    "heads0": {"num_attention_heads": 0}, "layers_float": {"num_hidden_layers": 2.0},
    "vocab_str": {"vocab_size": "1000"}, "theta_nan": {"rope_theta": float("nan")},
    "theta_inf": {"rope_theta": float("inf")}, "eps_negative": {"rms_norm_eps": -1e-5},
    "kv_heads_3": {"num_key_value_heads": 3}, "not_json": None,
}
PROBES = [
    Probe("shard size not a number", (R, "--out={tmp}/out", "--max_shard_size=abc"), 2,
          "--max_shard_size=abc is not a size"),
    Probe("shard size overflowing", (R, "--out={tmp}/out", "--max_shard_size=1e400GB"), 2,
          "--max_shard_size=1e400GB is not a size"),
    Probe("negative shard size", (R, "--out={tmp}/out", "--max_shard_size=-5"), 2,
          "--max_shard_size=-5 is not a size"),
    Probe("shard size nan", (R, "--out={tmp}/out", "--max_shard_size=nanMB"), 2,
          "--max_shard_size=nanMB is not a size"),
    Probe("export: tokenizer above the vocab", (R, "--out={tmp}/o", "--tokenizer={tmp}/big.model"),
          2, "the tokenizer {tmp}/big.model has 1024 pieces, more than the model's vocab_size"),
    Probe("export: the run's copy edited", ("--workdir={tmp}/edited", "--out={tmp}/o"), 2,
          "the tokenizer {tmp}/edited/tokenizer/tokenizer.model (sha256"),
    Probe("import: 0 heads", (H, "--from_hf={tmp}/heads0"), 2,
          "{tmp}/heads0/config.json: num_attention_heads=0 must be a positive integer"),
    Probe("import: a float layer count", (H, "--from_hf={tmp}/layers_float"), 2,
          "{tmp}/layers_float/config.json: num_hidden_layers=2.0 must be a positive integer"),
    Probe("import: a string vocab size", (H, "--from_hf={tmp}/vocab_str"), 2,
          "{tmp}/vocab_str/config.json: vocab_size=\"1000\" must be a positive integer"),
    Probe("import: rope_theta NaN", (H, "--from_hf={tmp}/theta_nan"), 2,
          "{tmp}/theta_nan/config.json: rope_theta=NaN must be a finite number > 0"),
    Probe("import: rope_theta inf", (H, "--from_hf={tmp}/theta_inf"), 2,
          "{tmp}/theta_inf/config.json: rope_theta=Infinity must be a finite number > 0"),
    Probe("import: rms_norm_eps < 0", (H, "--from_hf={tmp}/eps_negative"), 2,
          "{tmp}/eps_negative/config.json: rms_norm_eps=-1e-05 must be a finite number > 0"),
    Probe("import: a config config.validate refuses", (H, "--from_hf={tmp}/kv_heads_3"), 2,
          "{tmp}/kv_heads_3/config.json gives a config that cannot train: model.n_heads (4) must "
          "be a multiple of model.n_kv_heads (3)"),
    Probe("import: config.json not JSON", (H, "--from_hf={tmp}/not_json"), 2,
          "{tmp}/not_json/config.json is not JSON"),
    Probe("import: a tensor without dtype", (H, "--from_hf={tmp}/no_dtype"), 2,
          "{tmp}/no_dtype/model.safetensors: tensor lm_head.weight lacks dtype"),
    Probe("import: a header length of 2^62", (H, "--from_hf={tmp}/huge_header"), 2,
          "{tmp}/huge_header/model.safetensors: the header length field says 4611686018427387904"),
    Probe("import: NaN weights", (H, "--from_hf={tmp}/nan_weights"), 2,
          "{tmp}/nan_weights/model.safetensors: tensor model.norm.weight holds 1 NaN or inf"),
    Probe("import: a chat template that does not compile", (H, "--from_hf={tmp}/bad_template"),
          2, "{tmp}/bad_template's chat template cannot be used: data.chat_template is not a "
          "valid Jinja template"),
]


def _header(path):
  with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    return n, json.loads(f.read(n)), f.read()


def _write(path, header, data, length=None):
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def _damaged_copies(root):
  """The HF directories of PROBES: copies of root/hf, each with one thing wrong."""
  src = root / "hf"
  for name in [*CONFIG_EDITS, "no_dtype", "huge_header", "nan_weights", "bad_template"]:
    shutil.copytree(src, root / name)
  for name, edit in CONFIG_EDITS.items():
    cfg_path = root / name / "config.json"
    if edit is None:
      cfg_path.write_text("{not json")
    else:
      cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **edit}))
  n, header, data = _header(src / "model.safetensors")
  del header["lm_head.weight"]["dtype"]
  _write(root / "no_dtype/model.safetensors", header, data)
  n, header, data = _header(src / "model.safetensors")
  _write(root / "huge_header/model.safetensors", header, data, length=2**62)
  n, header, data = _header(src / "model.safetensors")
  begin = header["model.norm.weight"]["data_offsets"][0]
  data = data[:begin] + np.float32(np.nan).tobytes() + data[begin + 4:]
  _write(root / "nan_weights/model.safetensors", header, data)
  (root / "bad_template/tokenizer_config.json").write_text(
      json.dumps({"chat_template": "{% for m in messages %}{{ m.content }"}))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, tokenizer_file):  # noqa: F811
  root = hostile_runs(tmp_path_factory.mktemp("export_hostile"), tokenizer_file)
  _damaged_copies(root)
  return root


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_export_hostile(probe, tmp, capfd):
  check("export", dataclasses.replace(probe, message=probe.message.replace("{tmp}", str(tmp))),
        tmp, capfd)
  leftovers = [n for n in os.listdir(tmp) if n in ("o", "out", "new") or ".tmp-" in n]
  assert leftovers == [], leftovers


def test_import_onto_a_full_disk_is_one_line_exit_3(tmp, capfd):
  """A tmpfs too small for the checkpoint (root only, as tests/training's full-disk test): before,
  82 tracebacks of orbax's writer threads and one of the command, exit 1. A process of its own:
  what orbax's writer tasks leave is reported as the process ends (in the test's, long after)."""
  disk = tmp / "small_disk"
  disk.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)],
                         capture_output=True, text=True)
  if mount.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
  try:
    check("export", Probe("import: a full disk", ("--workdir={tmp}/small_disk/w",
                                                   "--from_hf={tmp}/hf"), 3,
                          f"could not write the import to {disk}/w (no space left on device)",
                          own_process=True), tmp, capfd)
    assert os.listdir(disk) == []
  finally:
    subprocess.run(["umount", str(disk)], check=False)
