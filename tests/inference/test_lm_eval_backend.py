"""The lm-eval backend equals lm-eval's own Hugging Face backend (HFLM) on our fp32 export of a
trained run: every request's log-likelihood within 1e-4, the same greedy flags, the same
accuracies and generations (multiple choice, rolling log-likelihood, generate_until)."""

import jax
import numpy as np
import pytest

from tinyllama_jax.checkpoint import run as run_lib
from tinyllama_jax.data import tokenizer as tokenizer_lib
from tinyllama_jax.inference import lm_eval_backend, lm_eval_tasks

TASKS = ["stdlib_mc", "stdlib_ppl", "stdlib_gen"]


def ours(workdir, batch_size=4):
  step = run_lib.resolve_step(workdir)
  cfg = run_lib.run_config(workdir, step)
  params = jax.device_put(run_lib.load_params(workdir, step, cfg.model))
  tok = tokenizer_lib.Tokenizer(run_lib.tokenizer_path(cfg, workdir))
  return lm_eval_backend.JaxLM(params, cfg, tok, batch_size=batch_size)


def run_tasks(lm, tasks_dir):
  manager = lm_eval_tasks.task_manager(TASKS, tasks_dir)
  return lm_eval_tasks.evaluate(lm, TASKS, manager, bootstrap_iters=0, log_samples=True)


def test_equals_lm_eval_hf_backend(lm_eval_run):
  from lm_eval.models.huggingface import HFLM
  mine = run_tasks(ours(lm_eval_run["workdir"]), lm_eval_run["tasks"])
  hf = HFLM(pretrained=lm_eval_run["hf"], device="cpu", dtype="float32", batch_size=4)
  theirs = run_tasks(hf, lm_eval_run["tasks"])
  for task in TASKS:
    a, b = mine["samples"][task], theirs["samples"][task]
    assert len(a) == len(b) == 8
    for doc_a, doc_b in zip(a, b):
      assert doc_a["arguments"] == doc_b["arguments"]
      for (x,), (y,) in zip(doc_a["resps"], doc_b["resps"]):
        if task == "stdlib_gen":
          assert x == y
        elif task == "stdlib_mc":
          assert abs(x[0] - y[0]) <= 1e-4 and x[1] == y[1], (x, y)
        else:
          assert abs(x - y) <= 1e-4, (x, y)
  for task, metric in (("stdlib_mc", "acc,none"), ("stdlib_mc", "acc_norm,none"),
                       ("stdlib_gen", "exact_match,none")):
    assert mine["results"][task][metric] == theirs["results"][task][metric]
  assert np.isclose(mine["results"]["stdlib_ppl"]["bits_per_byte,none"],
                    theirs["results"]["stdlib_ppl"]["bits_per_byte,none"], rtol=1e-6)
  # a trained model, not chance: the true continuation wins more often than 1 in 4
  assert mine["results"]["stdlib_mc"]["acc_norm,none"] > 0.25


def test_rolling_windows_score_every_token_once(lm_eval_run):
  """A text longer than the context: lm-eval's disjoint windows, summed, score each token once;
  the total equals scoring the same windows one by one."""
  lm = ours(lm_eval_run["workdir"], batch_size=2)
  text = open(lm_eval_backend.__file__).read()[:3000]
  ids = lm.tok_encode(text)
  assert len(ids) > 3 * lm.max_length

  class Request:
    args = (text,)
  (total,) = lm.loglikelihood_rolling([Request()])
  from lm_eval import utils
  windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
      ids, prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length, context_len=1)]
  assert sum(len(t) for _, t in windows) == len(ids)
  one_by_one = sum(lm.scorer.loglikelihoods([w])[0][0] for w in windows)
  assert total == pytest.approx(one_by_one, abs=1e-4)


def test_tokenization_follows_hf_backend(lm_eval_run):
  lm = ours(lm_eval_run["workdir"])
  tok = lm.tok
  assert lm.tok_encode("def f") == [tok.bos_id] + tok.encode("def f")
  assert lm.tok_encode("def f", add_special_tokens=False) == tok.encode("def f")
  assert lm.tok_encode("<s> x")[0] != tok.bos_id  # text that starts with BOS gets no second one
  # lm-eval's own pair split: the context's trailing space goes to the continuation
  ctx, cont = lm._encode_pair("Answer: ", "yes")
  assert ctx == lm.tok_encode("Answer:") and ctx + cont == lm.tok_encode("Answer: yes")


def test_missing_lm_eval_is_one_line(monkeypatch):
  monkeypatch.setattr(lm_eval_backend, "lm_utils", None)
  with pytest.raises(ValueError, match=r'--tasks needs lm-evaluation-harness.*pip install -e "\.\[eval\]"'):
    lm_eval_backend.require_lm_eval("--tasks")
