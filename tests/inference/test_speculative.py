"""Speculative decoding: greedy output is the target's own, token for token, whatever the draft;
sampled output is distributed as the target's (a wrong accept/reject rule fails the bound);
rows of different lengths; bad drafts are one-line errors; the CLI."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from decoding_models import REPO, random_prompts, tiny_model
from hf_models import make_hf_llama
from hostile import call
from tinyllama_jax.interop import hf_import
from tinyllama_jax import model as model_lib
from tinyllama_jax.inference import decode, speculative


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_is_the_targets_greedy(target, draft, k):
  prompts, lengths = random_prompts([3, 12, 25, 7])
  want = decode.decode(*target, prompts, lengths, max_new_tokens=30)
  got, stats = speculative.decode(*target, *draft, prompts, lengths, draft_tokens=k,
                                  max_new_tokens=30)
  assert got == want
  assert stats["acceptance"] < 0.5  # an unrelated draft: the target corrects most tokens
  same, stats = speculative.decode(*target, *target, prompts, lengths, draft_tokens=k,
                                   max_new_tokens=30)
  assert same == want
  assert stats["acceptance"] == 1.0 and stats["tokens_per_call"] > k  # K+1 a call but the last


def test_the_fused_decode_layer_verifies_and_drafts(target, draft):
  """model.kernels.decode_layer=pallas (interpreted): the target's K+1-token verify pass and the
  draft's steps run the fused kernels; greedy output is still the target's own."""
  fused = lambda cfg: tiny_model(0, **dict(cfg.to_dict(), kernels=dict(
      cfg.kernels.to_dict(), decode_layer="pallas")))[1]
  prompts, lengths = random_prompts([3, 12, 25])
  want = decode.decode(*target, prompts, lengths, max_new_tokens=12)
  # 3 rows x (K + 1 = 4) tokens a verify pass: within the fused layer's 16 (4 x 5 is not)
  assert decode.fused_layers(fused(target[1]), 3 * 4)
  assert not decode.fused_layers(fused(target[1]), 4 * 5)
  got, _ = speculative.decode(target[0], fused(target[1]), draft[0], fused(draft[1]), prompts,
                              lengths, draft_tokens=3, max_new_tokens=12)
  assert got == want


def test_greedy_stops_at_each_rows_eos(target, draft):
  prompts, lengths = random_prompts([5, 9, 14])
  free = decode.decode(*target, prompts, lengths, max_new_tokens=16)
  eos = free[1][5]
  want = decode.decode(*target, prompts, lengths, max_new_tokens=16, eos_id=eos)
  for d in (draft, target):
    got, _ = speculative.decode(*target, *d, prompts, lengths, draft_tokens=4, max_new_tokens=16,
                                eos_id=eos)
    assert got == want


def exact_marginals(params, cfg, prompt, n_new, temperature, top_p):
  """The target's own distribution of each of the first n_new tokens after prompt (all V^n
  continuations through the full forward, no cache)."""
  V = cfg.vocab_size
  model = nnx.merge(model_lib.graphdef(cfg), params)
  seqs = np.array(np.meshgrid(*[np.arange(V)] * (n_new - 1), indexing="ij")).reshape(
      n_new - 1, -1).T
  tokens = np.concatenate([np.broadcast_to(prompt, (len(seqs), len(prompt))), seqs], axis=1)
  logits = model(tokens)[:, len(prompt) - 1:]
  probs = np.asarray(jax.nn.softmax(decode.nucleus(logits, temperature, top_p), axis=-1))
  path = np.ones(len(seqs))  # the probability of each continuation's prefix
  marginals = []
  for i in range(n_new):
    marginals.append((path[:, None] * probs[:, i]).sum(0) / (V ** (n_new - 1 - i)))
    if i < n_new - 1:
      path = path * probs[np.arange(len(seqs)), i, seqs[:, i]]
  return np.array(marginals)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_sampling_has_the_targets_distribution(temperature, top_p):
  """4 tokens from 6000 rows of one prompt at K=2: the first is the target's prefill, the
  second a draft or a correction, the third often the second draft, the fourth often the bonus.
  Their frequencies are within a total variation of 0.04 of the target's exact marginals (the
  sampling noise is about 0.02); the draft's own are far."""
  t_params, t_cfg = tiny_model(0, vocab_size=12)
  d_params, d_cfg = tiny_model(3, vocab_size=12, n_layers=1)
  prompt = [3, 7, 1]
  rows = 6000
  prompts, lengths = [prompt] * rows, np.full(rows, len(prompt), np.int32)
  got, stats = speculative.decode(t_params, t_cfg, d_params, d_cfg, prompts, lengths,
                                  draft_tokens=2, max_new_tokens=4, temperature=temperature,
                                  top_p=top_p, seed=1)
  assert 0.1 < stats["acceptance"] < 0.9  # both branches of the rule are exercised
  counts = np.stack([np.bincount(np.array(got)[:, i], minlength=12) for i in range(4)]) / rows
  want = exact_marginals(t_params, t_cfg, prompt, 4, temperature, top_p)
  draft_own = exact_marginals(d_params, d_cfg, prompt, 4, temperature, top_p)
  tv = 0.5 * np.abs(counts - want).sum(1)
  assert tv.max() < 0.04, tv
  assert (0.5 * np.abs(draft_own - want).sum(1))[1:].min() > 0.2


def test_bad_drafts_are_one_line_errors(target):
  _, cfg = target
  _, other_vocab = tiny_model(0, vocab_size=80)
  with pytest.raises(ValueError, match=r"^--draft_tokens=0: draft at least 1 token a round$"):
    speculative.check_draft(cfg, cfg, draft_tokens=0, same_tokenizer=True)
  with pytest.raises(ValueError, match=r"the draft's vocab_size \(80\) differs from the target's "
                                       r"\(64\): --draft_workdir"):
    speculative.check_draft(cfg, other_vocab, draft_tokens=4, same_tokenizer=True)
  with pytest.raises(ValueError, match="the draft's tokenizer differs from the target's"):
    speculative.check_draft(cfg, cfg, draft_tokens=4, same_tokenizer=False)


@pytest.fixture(scope="module")
def draft_workdir(tmp_path_factory, tokenizer_file):  # noqa: F811
  """An import of a smaller HF Llama with the target's tokenizer (one layer, narrower)."""
  root = tmp_path_factory.mktemp("draft")
  make_hf_llama(str(root / "hf"), tokenizer_file, hidden_size=32, intermediate_size=48,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
  hf_import.import_hf(str(root / "hf"), str(root / "run"),
                   base_config_path=os.path.join(REPO, "configs/tiny.py"))
  return str(root / "run")


def test_cli_speculative(imported, draft_workdir, tmp_path, capfd):  # noqa: F811
  _, _, workdir = imported

  def generate_cli(*args):
    return call("generate", args, tmp_path, capfd, timeout=180)

  prompts = ["--prompt=def f(x):", "--prompt=import os, sys\nclass A:"]
  plain = generate_cli(f"--workdir={workdir}", *prompts, "--max_new_tokens=12")
  assert plain.returncode == 0, plain.stderr[-2000:]
  for draft in (draft_workdir, workdir):
    spec = generate_cli(f"--workdir={workdir}", f"--draft_workdir={draft}", "--draft_tokens=3",
                        *prompts, "--max_new_tokens=12")
    assert spec.returncode == 0, spec.stderr[-2000:]
    text, stats = spec.stdout.rsplit("speculative: ", 1)
    assert text == plain.stdout and "tokens per target call" in stats and "tokens/s" in stats
  bad_tokens = generate_cli(f"--workdir={workdir}", f"--draft_workdir={draft_workdir}",
                            "--draft_tokens=0", prompts[0], "--max_new_tokens=4")
  missing = generate_cli(f"--workdir={workdir}", f"--draft_workdir={tmp_path / 'nope'}",
                         prompts[0], "--max_new_tokens=4")
  (tmp_path / "empty").mkdir()
  empty = generate_cli(f"--workdir={workdir}", f"--draft_workdir={tmp_path / 'empty'}",
                       prompts[0], "--max_new_tokens=4")
  other_tok = str(tmp_path / "other")
  shutil.copytree(draft_workdir, other_tok)
  with open(os.path.join(other_tok, "tokenizer", "tokenizer.model"), "ab") as f:
    f.write(b"\0")
  changed = generate_cli(f"--workdir={workdir}", f"--draft_workdir={other_tok}", prompts[0],
                         "--max_new_tokens=4")
  long = generate_cli(f"--workdir={workdir}", f"--draft_workdir={draft_workdir}",
                      "--prompt=" + "x " * 200, "--max_new_tokens=4")
  for proc, start in ((bad_tokens, "error: --draft_tokens=0: draft at least 1"),
                      (missing, "error: --draft_workdir="),
                      (empty, f"error: --draft_workdir='{tmp_path / 'empty'}': workdir"),
                      (changed, "error: the draft's tokenizer differs"),
                      (long, "error: a prompt of")):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(start), proc.stderr[-500:]
