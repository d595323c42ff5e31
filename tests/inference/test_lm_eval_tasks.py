"""Task selection and results: the `tinyllama` preset, settings, the scalars a run logs, TinyLlama's
average; `evaluate --tasks` end to end on a trained run (lm-eval's table printed, its results dict
written as JSON, the same numbers as the backend in-process)."""

import json
import os

import pytest

from hostile import call
from tinyllama_jax.inference import lm_eval_tasks


RESULTS = {"results": {
    "piqa": {"alias": "piqa", "acc,none": 0.6, "acc_stderr,none": 0.01, "acc_norm,none": 0.5},
    "boolq": {"alias": "boolq", "acc,none": 0.3, "acc_stderr,none": "N/A"},
    "wikitext": {"alias": "wikitext", "word_perplexity,none": 20.0, "bits_per_byte,none": 1.1},
    "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": float("nan")},
}}


def test_names_and_the_tinyllama_preset():
  assert lm_eval_tasks.parse_names("tinyllama") == list(lm_eval_tasks.TINYLLAMA) == [
      "hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa"]
  assert lm_eval_tasks.parse_names(" piqa, tinyllama ,") == ["piqa", *lm_eval_tasks.TINYLLAMA[:-1]]
  with pytest.raises(ValueError, match="names no task"):
    lm_eval_tasks.parse_names(" , ")


@pytest.mark.parametrize("settings, message", [
    (dict(limit=0), "--limit=0"), (dict(num_fewshot=-1), "--num_fewshot=-1"),
    (dict(batch_size=0), "--batch_size=0"),
])
def test_settings_out_of_range(settings, message):
  with pytest.raises(ValueError, match=message):
    lm_eval_tasks.check_settings(**settings)
  lm_eval_tasks.check_settings(limit=1, num_fewshot=0, batch_size=1)


def test_scalars_and_headline():
  assert lm_eval_tasks.scalars(RESULTS) == {
      "tasks/piqa/acc": 0.6, "tasks/piqa/acc_norm": 0.5, "tasks/boolq/acc": 0.3,
      "tasks/wikitext/word_perplexity": 20.0, "tasks/wikitext/bits_per_byte": 1.1,
      "tasks/gsm8k/exact_match_strict-match": 0.25}
  average, picked = lm_eval_tasks.headline(RESULTS, ["piqa", "boolq", "wikitext"])
  assert picked == {"piqa": ("acc_norm", 0.5), "boolq": ("acc", 0.3)}
  assert average == pytest.approx(0.4)


def test_evaluate_command_end_to_end(lm_eval_run, tmp_path, capfd):
  out = tmp_path / "results.json"
  env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
  proc = call("evaluate", (f"--workdir={lm_eval_run['workdir']}", "--tasks=stdlib_mc,stdlib_ppl",
                           f"--include_path={lm_eval_run['tasks']}", "--limit=4", "--batch_size=4",
                           f"--out={out}"), tmp_path, capfd, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert set(results) == {"stdlib_mc", "stdlib_ppl"}
  assert 0 <= results["stdlib_mc"]["acc_norm,none"] <= 1
  assert results["stdlib_ppl"]["bits_per_byte,none"] > 0
  assert "|stdlib_mc |" in proc.stdout and "acc_norm" in proc.stdout  # lm-eval's table
  assert f"average of 1 (stdlib_mc acc_norm): {results['stdlib_mc']['acc_norm,none']:.4f}" in \
      proc.stdout
  assert [n for n in os.listdir(tmp_path) if n != "results.json"] == []  # no temp file left
