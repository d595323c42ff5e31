"""Which lm-evaluation-harness tasks to run, and running them on a JaxLM (lm_eval_backend.py).

`tinyllama` names TinyLlama's seven (its EVAL.md: 0-shot, acc_norm where the task has it, acc
otherwise; their average is TinyLlama's headline number). Task names, --include_path (folders of
task YAMLs, read by lm-eval's own loader) and the settings are checked before any model loads:
an unknown name or a YAML that does not parse is one line naming it.

lm-eval's task registry imports `datasets` (seconds), so it is imported where a task is named,
not with this module (train and `evaluate --data` import it too).

Results are lm-eval's own (`simple_evaluate`'s dict, `results` keyed task -> "metric,filter");
`scalars` flattens them into the names a run logs (`tasks/<task>/<metric>`).
"""

import difflib
import glob
import math
import os

from absl import logging

from tinyllama_jax.inference import lm_eval_backend

TINYLLAMA = ("hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa")
PRESETS = {"tinyllama": TINYLLAMA}
HEADLINE_METRICS = ("acc_norm,none", "acc,none")  # TinyLlama's: acc_norm where the task has it


def parse_names(spec, flag="--tasks"):
  """Task names from a comma list; a preset name stands for its tasks."""
  names = []
  for part in (spec or "").split(","):
    part = part.strip()
    if part:
      names += PRESETS.get(part, (part,))
  if not names:
    raise ValueError(f"{flag}={spec!r} names no task: give lm-eval task names, comma-separated "
                     "(e.g. hellaswag,piqa), or 'tinyllama' for TinyLlama's seven")
  return list(dict.fromkeys(names))


def check_settings(*, limit=None, num_fewshot=None, batch_size=1, prefix="--"):
  """--limit, --num_fewshot and --batch_size in range (one line naming the flag)."""
  if batch_size < 1:
    raise ValueError(f"{prefix}batch_size={batch_size}: use 1 or more")
  if limit is not None and limit < 1:
    raise ValueError(f"{prefix}limit={limit}: use 1 or more documents a task (omit it for all)")
  if num_fewshot is not None and num_fewshot < 0:
    raise ValueError(f"{prefix}num_fewshot={num_fewshot}: use 0 or more examples (omit it for "
                     "each task's own)")


def _check_task_files(include_path, flag):
  from lm_eval.tasks import _yaml_loader  # lm-eval's reader of task YAMLs (`include`, `!function`)
  if not os.path.isdir(include_path):
    raise ValueError(f"{flag}={include_path!r} is not a directory: give a folder of lm-eval task "
                     "YAML files")
  for path in sorted(glob.glob(os.path.join(include_path, "**", "*.yaml"), recursive=True)):
    try:
      _yaml_loader.load_yaml(path, resolve_func=False, recursive=True)
    except Exception as e:  # yaml's errors, a missing include, a YAML that is not a mapping
      reason = " ".join(str(e).split())[:200]
      raise ValueError(f"task file {path} does not parse ({type(e).__name__}: {reason}): fix it, "
                       f"or move it out of {flag}") from None


def task_manager(names, include_path=None, flag="--include_path"):
  """lm-eval's TaskManager that knows every name, or a one-line error naming the unknown ones.
  Tasks all found under include_path skip indexing lm-eval's ~15k built-in ones (seconds)."""
  lm_eval_backend.require_lm_eval("--tasks")
  from lm_eval.tasks import TaskManager
  if include_path:
    _check_task_files(include_path, flag)
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(n in local.all_tasks for n in names):
      return local
  manager = TaskManager(include_path=include_path or None)
  unknown = [n for n in names if n not in manager.all_tasks]
  if unknown:
    hints = []
    for n in unknown:
      close = difflib.get_close_matches(n, manager.all_tasks, n=3)
      hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = f" or in {include_path}" if include_path else ""
    raise ValueError(f"unknown lm-eval task {'; '.join(hints)}: not among lm-eval's tasks{where} "
                     "(`lm_eval ls tasks` lists them; a local task goes in --include_path)")
  return manager


def output_types(manager, names):
  """{task: its output_type} from the task configs (nothing downloaded)."""
  loaded = manager.load(names)
  return {name: task.OUTPUT_TYPE for name, task in loaded["tasks"].items()}


def evaluate(lm, names, manager, *, num_fewshot=None, limit=None, bootstrap_iters=100000,
             seed=1234, log_samples=False):
  """lm-eval's simple_evaluate on `lm` (its results dict); log_samples keeps each document's
  requests and answers (results["samples"])."""
  import lm_eval
  return lm_eval.simple_evaluate(
      model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
      log_samples=log_samples, bootstrap_iters=bootstrap_iters, random_seed=seed,
      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def table(results):
  from lm_eval import utils as lm_utils
  return lm_utils.make_table(results)


def headline(results, names):
  """(TinyLlama's average over `names`, {task: (metric, value)}): acc_norm where the task has
  it, else acc; tasks with neither are left out of the average (and logged)."""
  picked = {}
  for name in names:
    row = results["results"].get(name, {})
    metric = next((m for m in HEADLINE_METRICS if m in row), None)
    if metric is None:
      logging.info("task %s has no acc/acc_norm: not in the average", name)
      continue
    picked[name] = (metric.split(",")[0], float(row[metric]))
  average = sum(v for _, v in picked.values()) / len(picked) if picked else None
  return average, picked


def scalars(results, prefix="tasks"):
  """{'tasks/<task>/<metric>': value} of every finite numeric metric, stderr left out (and the
  filter's name when it is 'none')."""
  out = {}
  for task, row in results["results"].items():
    for key, value in row.items():
      metric, _, filt = key.partition(",")
      if "stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      if math.isfinite(value):
        name = metric if filt in ("", "none") else f"{metric}_{filt}"
        out[f"{prefix}/{task}/{name}"] = float(value)
  return out
