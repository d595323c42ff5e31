"""The KV-cached decoder: greedy equals transformers' greedy generate token for token on the
exported model, batched prompts of different lengths included; sampling and streaming."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_models import our_logits
from hostile import call
from interrupt import sigint_after
from tinyllama_jax import generate as generate_cli
from tinyllama_jax.inference import decode, generate
from tinyllama_jax import model as model_lib
from tinyllama_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def model(exported):
  return exported


def prompts(tok):
  texts = ["def f(x):\n    return", "import", "class Parser(object):\n    def __init__(self, s"]
  return [[tok.bos_id] + tok.encode(t) for t in texts]


def test_greedy_equals_transformers(model):
  params, cfg, tok, _, hf_model = model
  ids = prompts(tok)
  ours = generate.generate(params, cfg.model, ids, max_new_tokens=24, eos_id=tok.eos_id)
  for prompt, got in zip(ids, ours):
    with torch.no_grad():
      want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                               eos_token_id=tok.eos_id, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == want
  assert len(set(map(tuple, ours))) == len(ours)  # the rows really differ


def test_cached_forward_equals_model(model):
  """Prefill and one-token steps through the cache give the full forward's logits."""
  params, cfg, tok, _, _ = model
  tokens = np.array([sum(prompts(tok), [])[:12]])
  full = our_logits(params, cfg.model, tokens)[0]
  graphdef = model_lib.graphdef(cfg.model)
  forward = jax.jit(lambda p, t, pos, c: nnx.merge(graphdef, p).forward(t, pos, cache=c))
  cache = model_lib.init_cache(cfg.model, 1, 16, jnp.float32)
  h, cache = forward(params, tokens[:, :5], jnp.arange(5)[None], cache)
  steps = [decode.logits_of(params, h[:, i]) for i in range(5)]
  for t in range(5, 12):
    h, cache = forward(params, tokens[:, t:t + 1], jnp.array([[t]]), cache)
    steps.append(decode.logits_of(params, h[:, 0]))
  np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4)


def test_sampling(model):
  params, cfg, tok, _, _ = model
  ids = prompts(tok)[:2]
  greedy = generate.generate(params, cfg.model, ids, max_new_tokens=8)
  # A vanishing nucleus is greedy; a full one at temperature 1 is not, and seeds reproduce.
  tiny_p = generate.generate(params, cfg.model, ids, max_new_tokens=8, temperature=1.0,
                             top_p=1e-6, seed=3)
  assert tiny_p == greedy
  a = generate.generate(params, cfg.model, ids, max_new_tokens=8, temperature=1.5, seed=1,
                        n_valid=300)
  b = generate.generate(params, cfg.model, ids, max_new_tokens=8, temperature=1.5, seed=1,
                        n_valid=300)
  c = generate.generate(params, cfg.model, ids, max_new_tokens=8, temperature=1.5, seed=2,
                        n_valid=300)
  assert a == b and a != c
  assert max(max(row) for row in a + c) < 300


def test_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  sample = jax.jit(jax.vmap(lambda key: decode.sample(logits, key, 1.0, 0.7)[0]))
  draws = sample(jax.random.split(jax.random.key(0), 400))
  assert set(np.asarray(draws).tolist()) == {0, 1}  # 0.5 < 0.7 needs the second token, not a third


def test_stops_at_eos_and_streams(model):
  params, cfg, tok, _, _ = model
  ids = prompts(tok)[:1]
  free = generate.generate(params, cfg.model, ids, max_new_tokens=10)[0]
  stop = free[3]  # pretend the 4th generated token is EOS
  out = io.StringIO()
  streamer = generate_cli.Streamer(tok, ids[0], out=out)
  streamer.tok = type("T", (), {"decode": tok.decode, "eos_id": stop})()
  got = generate.generate(params, cfg.model, ids, max_new_tokens=10, eos_id=stop,
                          on_token=streamer)[0]
  assert got == free[:free.index(stop) + 1]
  body = got[:-1]
  assert out.getvalue() == tok.decode(ids[0] + body)[len(tok.decode(ids[0])):]


def test_cli_generates(model, tmp_path, capfd):
  _, _, _, workdir, _ = model
  proc = call("generate", (f"--workdir={workdir}", "--prompt=def f(x):", "--prompt=import",
                           "--max_new_tokens=5"), tmp_path, capfd, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count("--- [") == 2 and "def f(x):" in proc.stdout
  proc = call("generate", (f"--workdir={workdir}",), tmp_path, capfd, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: give")
  proc = call("generate", (f"--workdir={workdir}", "--prompt=x", "--max_new_tokens=-3"),
              tmp_path, capfd, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --max_new_tokens=-3: generate at")


def test_settings_out_of_range_are_one_line_errors():
  import ml_collections
  cfg_model = ml_collections.ConfigDict({"max_seq_len": 16})
  ok = dict(max_new_tokens=4, temperature=0.0, top_p=1.0)
  assert generate.check_request(cfg_model, [[1, 5], [1]], **ok).tolist() == [2, 1]
  for bad, match in ((dict(max_new_tokens=-3), r"--max_new_tokens=-3: generate at least 1"),
                     (dict(max_new_tokens=0), r"--max_new_tokens=0"),
                     (dict(temperature=-0.5), r"--temperature=-0.5: use 0 \(greedy\) or a "
                      r"value in \[0.001, 100\]"),
                     (dict(temperature=float("nan")), r"--temperature=nan"),
                     (dict(temperature=float("inf")), r"--temperature=inf"),  # uniform sampling
                     (dict(temperature=1e-45), r"--temperature=1e-45"),  # logits / T overflow
                     (dict(temperature=1000.0), r"--temperature=1000.0"),
                     (dict(top_p=0.0), r"--top_p=0.0: use a value in \(0, 1\]"),
                     (dict(top_p=1.5), r"--top_p=1.5"),
                     (dict(max_new_tokens=15), r"a prompt of 2 tokens and --max_new_tokens=15 do "
                      r"not fit the model's context of 16 tokens: lower --max_new_tokens to 14")):
    with pytest.raises(ValueError, match=match):
      generate.check_request(cfg_model, [[1, 5], [1]], **{**ok, **bad})
  with pytest.raises(ValueError, match="of 16 tokens: shorten the prompt"):
    generate.check_request(cfg_model, [list(range(16))], **ok)
  with pytest.raises(ValueError, match="at least one token"):
    generate.check_request(cfg_model, [[1], []], **ok)


def test_a_batch_keeps_the_space_between_prompt_and_continuation(tokenizer_file):
  """sentencepiece drops a text's leading space: the continuation of a prompt, decoded alone,
  lost the space after it (`And Jesus saidunto`); decoded with its prompt, it keeps it."""
  tok = tokenizer_lib.Tokenizer(tokenizer_file)
  prompt, full = tok.encode("import json"), tok.encode("import json as j")
  assert full[:len(prompt)] == prompt
  new = full[len(prompt):] + [tok.eos_id]
  assert generate_cli.continuation(tok, [tok.bos_id] + prompt, new) == " as j"
  assert tok.decode(new[:-1]) == "as j"  # what the batch printed after the prompt


def test_ctrl_c_while_compiling_is_one_line_and_exit_130(imported):  # noqa: F811
  """Before, a KeyboardInterrupt traceback (raised inside jax's compile), exit 1."""
  status, err, _ = sigint_after("generate", (f"--workdir={imported[2]}", "--prompt=def f",
                                             "--max_new_tokens=64"), "Compiling jit(prefill)")
  assert status == 130 and err.strip().splitlines()[-1] == "interrupted", (status, err[-3000:])
  assert "Traceback" not in err
