"""evaluate --tasks with bad input: one line, exit 2, nothing written (Probe rows, tests/hostile.py).
{tmp} holds local tasks (tasks/), a task file that does not parse (broken/) and a workdir without
checkpoints (empty_run/)."""

import dataclasses
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hostile import OLD_RUN, Probe, check  # noqa: E402
from bench import eval_speed  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
LOCAL = ("--include_path={tmp}/tasks", "--out={tmp}/out.json")

PROBES = [
    Probe("limit zero", ("--workdir={tmp}/empty_run", "--tasks=stdlib_mc", "--limit=0", *LOCAL),
          2, "--limit=0: use 1 or more"),
    Probe("negative fewshot", ("--workdir={tmp}/empty_run", "--tasks=stdlib_mc",
                               "--num_fewshot=-1", *LOCAL), 2, "--num_fewshot=-1: use 0 or more"),
    Probe("no task", ("--workdir={tmp}/empty_run", "--tasks=,", *LOCAL), 2, "--tasks=',' names no"),
    Probe("task file does not parse", ("--workdir={tmp}/empty_run", "--tasks=stdlib_mc",
                                       "--include_path={tmp}/broken", "--out={tmp}/out.json"),
          2, "task file {tmp}/broken/broken.yaml does not parse"),
    Probe("include path missing", ("--workdir={tmp}/empty_run", "--tasks=stdlib_mc",
                                   "--include_path={tmp}/nowhere"), 2, "--include_path="),
    Probe("run without checkpoints", ("--workdir={tmp}/empty_run", "--tasks=stdlib_mc", *LOCAL),
          2, "workdir '{tmp}/empty_run' has no checkpoint"),
    Probe("unknown task", ("--workdir={tmp}/empty_run", "--tasks=stdlib_mcq", *LOCAL), 2,
          "unknown lm-eval task 'stdlib_mcq' (did you mean stdlib_mc"),
    Probe("a run without a tokenizer", (f"--workdir={OLD_RUN}", "--tasks=stdlib_mc", *LOCAL), 2,
          f"the run in {OLD_RUN} has no tokenizer (synthetic data): lm-eval tasks are text"),
]


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_probe(probe, tmp_path, capfd):
  eval_speed.write_local_tasks(str(tmp_path / "tasks"), n_docs=2)
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "broken.yaml").write_text("task: broken\n  dataset_path: [json\n")
  (tmp_path / "empty_run").mkdir()
  probe = dataclasses.replace(probe, message=probe.message.replace("{tmp}", str(tmp_path)))
  check("evaluate", probe, tmp_path, capfd, env=OFFLINE)
  assert not (tmp_path / "out.json").exists()


def test_without_lm_eval_one_line_names_the_install(tmp_path, capfd):
  """lm-eval not installed (a package of its name that fails to import, first on the path): in
  a process of its own, whose imports have not met lm_eval yet."""
  shadow = tmp_path / "shadow" / "lm_eval"
  shadow.mkdir(parents=True)
  (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'lm_eval'\")\n")
  (tmp_path / "empty_run").mkdir()
  probe = Probe("no lm-eval", ("--workdir={tmp}/empty_run", "--tasks=tinyllama"), 2,
                '--tasks needs lm-evaluation-harness, which is not installed: pip install -e ".[eval]"',
                own_process=True)
  check("evaluate", probe, tmp_path, capfd,
        env={**OFFLINE, "PYTHONPATH": str(tmp_path / "shadow")})
