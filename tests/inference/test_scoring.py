"""Scoring requests in sorted, bucketed, padded batches: the answers are each request's alone (the
model's own logits), few programs compile, lm-eval's left cut past the context; and across two
processes (process 0 broadcasting, process 1 serving) the answers are one process's."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from decoding_models import tiny_model
from tinyllama_jax.inference import scoring

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_distributed import free_port, wait_all  # noqa: E402


def requests(n=7, seed=0, vocab=64, longest=40):
  rng = np.random.default_rng(seed)
  return [(rng.integers(1, vocab, int(rng.integers(1, longest))).tolist(),
           rng.integers(1, vocab, int(rng.integers(1, 6))).tolist()) for _ in range(n)]


def reference(params, cfg_model, reqs):
  """Each request's answer from the model's fp32 logits of its ids (one batch, right padded to
  max_seq_len: the forward is causal), the log-softmax and sums in numpy float64."""
  from flax import nnx
  from tinyllama_jax import model as model_lib
  T = cfg_model.max_seq_len
  wholes = [(c + x)[-(T + 1):] for c, x in reqs]
  tokens = np.zeros((len(reqs), T), np.int32)
  for i, whole in enumerate(wholes):
    tokens[i, :len(whole) - 1] = whole[:-1]
  model = nnx.merge(model_lib.graphdef(cfg_model), jax.device_put(params))
  logits = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens)).astype(np.float64)
  out = []
  for row, whole, (_, continuation) in zip(logits, wholes, reqs):
    n, end = len(continuation), len(whole) - 1
    logp = row[end - n:end] - np.logaddexp.reduce(row[end - n:end], axis=-1, keepdims=True)
    targets = whole[-n:]
    out.append((float(sum(lp[t] for lp, t in zip(logp, targets))),
                bool(all(lp.argmax() == t for lp, t in zip(logp, targets)))))
  return out


def test_batched_answers_are_each_request_alone():
  params, cfg_model = tiny_model(0)
  reqs = requests() + [([5] * 200, [7, 8])]  # longer than the context: cut from the left
  scorer = scoring.Scorer(params, cfg_model, batch_size=3)
  got = scorer.loglikelihoods(reqs)
  for (lp, greedy), (want_lp, want_greedy) in zip(got, reference(params, cfg_model, reqs)):
    assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
  assert scorer.batches == 3
  assert scorer._fn._cache_size() <= 3  # one program a bucket length, not one a request length


def test_answers_that_cannot_be_scored_are_one_line():
  params, cfg_model = tiny_model(0)
  scorer = scoring.Scorer(params, cfg_model, batch_size=2)
  for continuation in ([], [1] * (cfg_model.max_seq_len + 1)):
    with pytest.raises(ValueError, match=f"answer is {len(continuation)} tokens: it must be 1 to"):
      scorer.loglikelihoods([([1, 2], [3]), ([1], continuation)])
  assert scorer.batches == 0


def test_bucket_lengths():
  assert [scoring.bucket_length(n, 128) for n in (1, 32, 33, 48, 49, 64, 65, 96, 97, 128)] == \
      [32, 32, 48, 48, 64, 64, 96, 96, 128, 128]
  assert scoring.bucket_length(300, 256) == 256 and scoring.bucket_length(129, 2048) == 192
  lengths = range(1, 2049)  # a handful of programs cover every length, none padded past 1.5x
  buckets = {scoring.bucket_length(n, 2048) for n in lengths}
  assert len(buckets) == 13
  assert all(scoring.bucket_length(n, 2048) <= max(32, 1.5 * n) for n in lengths)
  assert scoring.model_inputs([1, 2, 3], [4, 5], max_len=3) == ([2, 3, 4], [3, 4, 5], 2)


def test_two_processes_score_as_one(tmp_path):
  params, cfg_model = tiny_model(0)
  reqs = requests(n=5, seed=1, longest=20)  # one bucket: one program
  path = tmp_path / "requests.json"
  path.write_text(json.dumps(reqs))
  port = free_port()
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scoring_process.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, script, str(port), str(i), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(2)]
  wait_all(procs, timeout=240)
  logs = [p.stdout.read() for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  answers = json.loads(next(line for line in logs[0].splitlines()
                            if line.startswith("ANSWERS "))[len("ANSWERS "):])
  assert "SERVED 2" in logs[1]  # 5 requests, 4 rows a batch (3 rounded up to the 4 devices)
  assert "FAILED a task's answer is 0 tokens" in logs[0]
  assert "SERVING FAILED the lm-eval tasks failed on process 0" in logs[1]
  alone = scoring.Scorer(params, cfg_model, batch_size=4).loglikelihoods(reqs)
  for (lp, greedy), (want_lp, want_greedy) in zip(answers, alone):
    assert lp == pytest.approx(want_lp, abs=1e-5) and greedy == want_greedy
