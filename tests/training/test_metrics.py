"""training/metrics.py: the tensorboard events and metrics.jsonl a run writes, read back; a write
that fails raises WriteFailed on the caller's thread. The W&B side (offline, no network): the
scalars metrics.jsonl gets at the same steps, the resolved config, a resumed run continuing the
same W&B run; without wandb installed, one line before anything compiles."""

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "inference"))

from lm_eval_runs import tiny_config  # noqa: E402
from wandb_records import offline_runs  # noqa: E402
from tinyllama_jax import config as config_lib
from tinyllama_jax.training import faults, metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_train_command_starts_without_importing_torch():
  """tensorboardX imports torch where it is installed (the test extras have it): 2.5 s of every
  train start; hidden while it loads, and importable after."""
  code = ("import sys, tinyllama_jax.train; assert 'torch' not in sys.modules, 'torch imported'; "
          "import torch; print(torch.__name__)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0 and proc.stdout.strip() == "torch", proc.stderr[-2000:]


def test_wandb_gets_the_scalars_and_a_resume_continues_its_run(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  cfg = tiny_config()
  cfg.train.wandb_project, cfg.train.wandb_run_name = "tiny", "lr-3e-3"
  workdir = str(tmp_path / "run")
  writer = metrics.Writer(workdir, start_step=0, cfg=cfg)
  writer.scalars(1, {"train/loss": 2.5, "tasks/stdlib_mc/acc": 0.25})
  writer.scalars(2, {"train/loss": 2.0})
  writer.close()
  resumed = metrics.Writer(workdir, start_step=2, cfg=cfg)
  resumed.scalars(3, {"train/loss": 1.5})
  resumed.close()
  runs = offline_runs(workdir)
  assert len(runs) == 1  # both starts wrote to the one run whose id the workdir keeps
  ((run_id, (history, config)),) = runs.items()
  assert open(f"{workdir}/{metrics.WANDB_ID_FILE}").read().strip() == run_id
  jsonl, _ = metrics.read_metrics(workdir)
  assert history["train/loss"] == jsonl["train/loss"] == [(1, 2.5), (2, 2.0), (3, 1.5)]
  assert history["tasks/stdlib_mc/acc"] == [(1, 0.25)]
  assert {"model", "train", "optim", "data"} <= config


def test_missing_wandb_is_one_line_before_the_compile(monkeypatch):
  cfg = tiny_config()
  cfg.train.wandb_project = "tiny"
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
  with pytest.raises(ValueError, match="train.wandb_project needs wandb, which is not installed: "
                                       "pip install wandb"):
    config_lib.validate(cfg)
  cfg.train.wandb_project, cfg.train.eval_tasks = "", "tinyllama"
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real(n, *a))
  with pytest.raises(ValueError, match=r'train.eval_tasks needs lm_eval.*pip install -e "\.\[eval\]"'):
    config_lib.validate(cfg)


def read_events(path):
  """Every Event in a TFRecord file, each record's two checksums verified."""
  events = []
  with open(path, "rb") as f:
    data = f.read()
  at = 0
  while at < len(data):
    header = data[at:at + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header)
    body = data[at + 12:at + 12 + length]
    assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == masked_crc32c(body)
    events.append(event_pb2.Event.FromString(body))
    at += 16 + length
  return events


def test_events_and_jsonl_read_back(tmp_path):
  writer = metrics.Writer(str(tmp_path), start_step=3)
  writer.scalars(4, {"train/loss": 2.5, "perf/mfu": None})
  writer.text(4, "sample", "def f():")
  writer.close()
  (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  events = read_events(path)
  assert events[0].file_version == "brain.Event:2"
  values = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value
            if v.HasField("simple_value")]
  assert values == [(4, "train/loss", 2.5)]
  assert any(v.tag.startswith("sample") for e in events for v in e.summary.value)
  lines = [json.loads(l) for l in (tmp_path / metrics.METRICS_FILE).read_text().splitlines()]
  assert lines[0]["start_step"] == 3 and lines[1]["step"] == 4 and lines[1]["train/loss"] == 2.5


@pytest.mark.parametrize("victim", ["events", "jsonl"])
def test_a_full_disk_under_a_writer_raises_write_failed(victim, tmp_path):
  writer = metrics.Writer(str(tmp_path))
  f = writer._tb._file if victim == "events" else writer._jsonl  # pylint: disable=protected-access
  full = os.open("/dev/full", os.O_WRONLY)
  os.dup2(full, f.fileno())  # every later write to that file fails with ENOSPC
  os.close(full)
  with pytest.raises(faults.WriteFailed, match=r"could not write .* \(no space left on device\)"):
    writer.scalars(1, {"train/loss": 1.0})
  writer.close()  # the failure is already told: closing adds no second error
