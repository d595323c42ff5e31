"""The metrics writer's W&B side (offline, no network): the scalars metrics.jsonl gets at the same
steps, the resolved config, a resumed run continuing the same W&B run; without wandb installed,
one line before anything compiles."""

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "inference"))

from lm_eval_runs import tiny_config  # noqa: E402
from wandb_records import offline_runs  # noqa: E402
from tinyllama_jax import config as config_lib
from tinyllama_jax.training import metrics




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
