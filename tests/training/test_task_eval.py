"""lm-eval tasks during training: on the live parameters of an FSDP run over the 8 fake CPU
devices, logged to metrics.jsonl (and W&B, offline) at the steps asked; the scores equal
`evaluate --tasks`'s backend on the checkpoint of the same step; bad settings fail before the
compile."""

import json
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "inference"))

from lm_eval_runs import tiny_config  # noqa: E402
from wandb_records import offline_runs  # noqa: E402
from bench import eval_speed  # noqa: E402
from tinyllama_jax.checkpoint import run as run_lib  # noqa: E402
from tinyllama_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from tinyllama_jax.inference import lm_eval_backend, lm_eval_tasks  # noqa: E402
from tinyllama_jax.training import loop as train_lib, metrics, task_eval  # noqa: E402

TASKS = "stdlib_mc,stdlib_ppl"


def config(tasks_dir, **train):
  cfg = tiny_config(steps=4)
  t = cfg.train
  t.global_batch, t.micro_batch_per_device, t.checkpoint_every = 8, 1, 2
  t.eval_tasks, t.eval_tasks_every, t.eval_tasks_limit = TASKS, 2, 4
  t.eval_tasks_include_path = tasks_dir
  t.update(train)
  cfg.mesh.fsdp = 8
  return cfg


def test_tasks_during_training_on_live_params(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  tasks_dir = eval_speed.write_local_tasks(str(tmp_path / "tasks"), n_docs=4)
  workdir = str(tmp_path / "run")
  cfg = config(tasks_dir, wandb_project="tiny")
  train_lib.train(cfg, workdir)
  series, bad = metrics.read_metrics(workdir)
  assert bad == 0
  for name in ("tasks/stdlib_mc/acc", "tasks/stdlib_mc/acc_norm", "tasks/stdlib_ppl/bits_per_byte",
               "tasks/average"):
    assert [s for s, _ in series[name]] == [2, 4], name
  # the live parameters at step 4 are checkpoint 4's: the same scores from the checkpoint
  ckpt_cfg = run_lib.run_config(workdir, 4)
  lm = lm_eval_backend.JaxLM(jax.device_put(run_lib.load_params(workdir, 4, ckpt_cfg.model)),
                             ckpt_cfg, tokenizer_lib.Tokenizer(run_lib.tokenizer_path(ckpt_cfg,
                                                                                      workdir)))
  names = TASKS.split(",")
  results = lm_eval_tasks.evaluate(lm, names, lm_eval_tasks.task_manager(names, tasks_dir),
                                   limit=4, bootstrap_iters=0)
  for name, value in lm_eval_tasks.scalars(results).items():
    assert series[name][-1][1] == pytest.approx(value, rel=1e-5), name
  # W&B (offline) got the same scalars, in the run whose id the workdir keeps
  ((run_id, (history, wandb_config)),) = offline_runs(workdir).items()
  assert open(os.path.join(workdir, metrics.WANDB_ID_FILE)).read().strip() == run_id
  for name in ("tasks/average", "tasks/stdlib_mc/acc_norm", "train/loss"):
    assert history[name] == series[name], name
  assert "train" in wandb_config


@pytest.mark.parametrize("train, message", [
    (dict(eval_tasks="stdlib_mcq"), "unknown lm-eval task 'stdlib_mcq'"),
    (dict(eval_tasks_limit=-1), "train.eval_tasks_limit=-1"),
    (dict(eval_tasks_include_path="/nonexistent"), "train.eval_tasks_include_path='/nonexistent'"),
])
def test_bad_settings_fail_before_the_compile(tmp_path, monkeypatch, train, message):
  tasks_dir = eval_speed.write_local_tasks(str(tmp_path / "tasks"), n_docs=2)
  compiled = []
  monkeypatch.setattr(train_lib, "_compile_step", lambda prog: compiled.append(1) or 1 / 0)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
    train_lib.train(config(tasks_dir, **train), str(tmp_path / "run"))
  assert not compiled


def test_due_steps(tmp_path):
  cfg = config("", eval_tasks="")
  assert not task_eval.TaskEval(cfg, None, None).due(4)  # no tasks: never
  t = cfg.train
  t.eval_tasks, t.eval_tasks_every, t.steps = "x", 3, 7
  evals = task_eval.TaskEval.__new__(task_eval.TaskEval)
  evals.cfg, evals.names = cfg, ["x"]
  assert [s for s in range(1, 8) if evals.due(s)] == [3, 6, 7]
  t.eval_tasks_every = 0
  assert [s for s in range(1, 8) if evals.due(s)] == [7]
