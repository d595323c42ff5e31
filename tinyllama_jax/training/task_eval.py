"""lm-evaluation-harness tasks during training: train.eval_tasks every train.eval_tasks_every steps
(and at the last step), on the live parameters (no export, no reload), through the same backend
as `evaluate --tasks` (inference/lm_eval_backend.py). Each metric is logged as
`tasks/<task>/<metric>` (tensorboard, metrics.jsonl, W&B), with `tasks/average`: TinyLlama's
average (acc_norm where a task has it, else acc).

Everything is checked when the run starts, before the compile: lm-eval installed, the names
known (train.eval_tasks_include_path: local task YAMLs), the settings in range.

Across processes: every process runs the forward on its share of each batch; lm-eval's
bookkeeping (requests, metrics) runs on process 0, which broadcasts each batch while the others
serve it (inference/scoring.py). Generation tasks need the decode loop on one process, so a
multi-process run refuses them at the start.
"""

import jax
from absl import logging

from tinyllama_jax import sharding
from tinyllama_jax.inference import lm_eval_backend, lm_eval_tasks

KEYS = "train.eval_tasks"


class TaskEval:
  """The run's task evaluation; `due(step)` says when, `run(params)` gives the scalars to log."""

  def __init__(self, cfg, tokenizer, mesh):
    t = cfg.train
    self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
    self.lm = None  # made at the first evaluation, kept: its compiled programs are reused
    self.names = lm_eval_tasks.parse_names(t.eval_tasks, flag=KEYS) if t.eval_tasks else []
    if not self.names:
      return
    lm_eval_backend.require_lm_eval(KEYS)
    lm_eval_tasks.check_settings(limit=t.eval_tasks_limit or None, prefix="train.eval_tasks_")
    if tokenizer is None:
      raise ValueError(f"{KEYS} needs text: the run's data has no tokenizer (synthetic data); "
                       "train on text or leave train.eval_tasks empty")
    self.manager = lm_eval_tasks.task_manager(self.names, t.eval_tasks_include_path or None,
                                              flag="train.eval_tasks_include_path")
    if jax.process_count() > 1:
      generating = [n for n, kind in lm_eval_tasks.output_types(self.manager, self.names).items()
                    if kind == "generate_until"]
      if generating:
        raise ValueError(f"{KEYS}: {', '.join(generating)} generate text, which a multi-process "
                         "run does not evaluate during training: run `evaluate --tasks` on a "
                         "checkpoint instead")
    self.batch_size = t.micro_batch_per_device * sharding.batch_devices(mesh)

  def due(self, step):
    t = self.cfg.train
    return bool(self.names) and (step == t.steps or (t.eval_tasks_every > 0 and
                                                     step % t.eval_tasks_every == 0))

  def run(self, params):
    """{'tasks/<task>/<metric>': value} on process 0 ({} elsewhere, after serving its batches)."""
    if self.lm is None:
      self.lm = lm_eval_backend.JaxLM(params, self.cfg, self.tokenizer,
                                      batch_size=self.batch_size, mesh=self.mesh)
    lm = self.lm
    lm.scorer.set_params(params)
    if jax.process_index() != 0:
      lm.scorer.serve()
      return {}
    try:
      results = lm_eval_tasks.evaluate(lm, self.names, self.manager,
                                       limit=self.cfg.train.eval_tasks_limit or None,
                                       bootstrap_iters=0)
    except BaseException:
      lm.scorer.stop_serving(failed=True)  # the others raise too, not wait in serve()
      raise
    lm.scorer.stop_serving()
    logging.info("lm-eval tasks:\n%s", lm_eval_tasks.table(results))
    out = lm_eval_tasks.scalars(results)
    average, _ = lm_eval_tasks.headline(results, self.names)
    if average is not None:
      out["tasks/average"] = average
    return out
