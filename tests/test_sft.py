"""Supervised fine-tuning end to end on CPU: a tiny pretraining run on stdlib docstrings, then
data.source=chat from it (train.init_from): the held-out replies' loss falls, prompt tokens carry
no gradient, resume is bitwise, the export's chat template tokenizes as ours in transformers, and
another architecture is refused."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import sft_helpers  # noqa: E402
from tinyllama_jax import config as config_lib, sharding  # noqa: E402
from tinyllama_jax.checkpoint import run as run_lib  # noqa: E402
from tinyllama_jax.data import chat  # noqa: E402
from tinyllama_jax.interop import export, hf_import  # noqa: E402
from tinyllama_jax.training import loop as train_lib, program  # noqa: E402

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 128  # every conversation of the set but the longest fits


def micro_config(**overrides):
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  m, t = cfg.model, cfg.train
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim = 64, 2, 4, 2, 16, 128
  m.vocab_size, m.max_seq_len = 512, T
  t.seq_len, t.global_batch, t.micro_batch_per_device = T, 8, 4
  t.steps, t.log_every, t.eval_every, t.checkpoint_every = 20, 5, 0, 0
  t.sample_tokens, t.async_checkpoint = 0, False
  cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.decay_steps = 2, 3e-3, 40
  cfg.update_from_flattened_dict(overrides)
  return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("sft")
  chat_path, text_path = sft_helpers.write_data(str(root))
  tok = sft_helpers.make_tokenizer(root / "tokenizer.model")
  return root, chat_path, text_path, tok


@pytest.fixture(scope="module")
def base(data):
  """A tiny pretraining run on the docstrings' plain text."""
  root, _, text_path, tok = data
  workdir = str(root / "base")
  train_lib.train(micro_config(**{"data.source": "text", "data.paths": text_path,
                                  "data.tokenizer": tok.path}), workdir)
  return workdir


def sft_config(data, base, **overrides):
  _, chat_path, _, _ = data
  return micro_config(**{"data.source": "chat", "data.paths": chat_path,
                         "data.packing": "first_fit", "data.num_packing_bins": 8,
                         "data.eval_fraction": 0.15, "train.init_from": base,
                         "optim.lr": 2e-3, **overrides})


@pytest.fixture(scope="module")
def sft(data, base):
  root = data[0]
  cfg = sft_config(data, base, **{"train.steps": 40, "optim.decay_steps": 40})
  out = train_lib.train(cfg, str(root / "sft"))
  return cfg, str(root / "sft"), out


def held_out_loss(cfg, params, tok):
  prog = program.build_program(cfg, sharding.make_mesh(cfg.mesh))
  params = jax.device_put(params, prog.state_shardings["params"])
  cfg = cfg.copy_and_resolve_references()
  cfg.train.eval_batches = 4
  return train_lib.evaluate(prog.jit_eval(), params, cfg, tok, prog.micro_batch,
                            prog.eval_sharding)


def test_sft_from_a_pretrained_run_lowers_the_held_out_reply_loss(data, base, sft):
  cfg, workdir, out = sft
  tok = data[3]
  assert out["step"] == 40 and os.listdir(os.path.join(workdir, "checkpoints")) == ["40"]
  before = held_out_loss(cfg, run_lib.load_params(base, 20, cfg.model), tok)
  after = held_out_loss(cfg, out["params"], tok)
  assert after < 0.85 * before, (before, after)
  # the fine-tune encodes with its init_from run's tokenizer, and keeps a copy
  assert run_lib.tokenizer_path(run_lib.run_config(workdir, 40), workdir).startswith(workdir)


def test_prompt_tokens_carry_no_gradient(data, sft):
  """The loss of a real chat batch does not change when every target outside the assistant's
  tokens changes (nor does its gradient), and does when one assistant target does."""
  cfg, _, out = sft
  tok = data[3]
  batch = next(train_lib.make_iterator(cfg, "train", 4, tok))
  graphdef = program.model_lib.graphdef(cfg.model)
  params = jax.tree.map(np.asarray, out["params"])
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: program.loss_sums(
      p, b, graphdef=graphdef, cfg=cfg)[0]))
  loss, grads = grad_fn(params, batch)
  prompt = batch["loss_mask"] == 0
  assert prompt.sum() > batch["loss_mask"].sum() * 0.3  # there are prompt tokens to change
  other = dict(batch, targets=np.where(prompt, (batch["targets"] + 7) % 512, batch["targets"]))
  loss2, grads2 = grad_fn(params, other)
  assert float(loss) == float(loss2)
  jax.tree.map(np.testing.assert_array_equal, grads, grads2)
  r, c = np.argwhere(~prompt)[0]
  one = dict(batch, targets=batch["targets"].copy())
  one["targets"][r, c] = (one["targets"][r, c] + 7) % 512
  assert float(grad_fn(params, one)[0]) != float(loss)


def test_sft_resume_is_bitwise_and_ignores_init_from(data, base, tmp_path, caplog):
  common = {"optim.decay_steps": 8}
  straight = train_lib.train(sft_config(data, base, **common, **{"train.steps": 8}),
                             str(tmp_path / "a"))
  train_lib.train(sft_config(data, base, **common, **{"train.steps": 4}), str(tmp_path / "b"))
  resumed = train_lib.train(sft_config(data, base, **common, **{"train.steps": 8}),
                            str(tmp_path / "b"))
  assert "train.init_from=" in caplog.text and "is ignored" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight["params"]),
               jax.device_get(resumed["params"]))
  assert straight["train/loss"] == resumed["train/loss"]


def test_init_from_another_architecture_is_one_line(data, base, tmp_path, caplog):
  cfg = sft_config(data, base, **{"model.d_model": 96, "model.ffn_dim": 256})
  with pytest.raises(ValueError, match=r"train.init_from=.* is a different architecture "
                     r"\(d_model: 64 there vs 96 here; ffn_dim: 128 there vs 256 here\)"):
    train_lib.train(cfg, str(tmp_path / "w"))
  assert "compiling" not in caplog.text
  with pytest.raises(ValueError, match=r"train.init_from='.*nope': workdir .* does not exist"):
    train_lib.train(sft_config(data, str(tmp_path / "nope")), str(tmp_path / "w2"))


def test_exported_chat_template_tokenizes_as_ours_in_transformers(data, sft, tmp_path):
  import transformers
  cfg, workdir, _ = sft
  tok = data[3]
  out = str(tmp_path / "hf")
  export.export(workdir, out, dtype="fp32")
  theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  fmt = chat.ChatFormat(cfg.data.chat_template, tok)
  convs = sft_helpers.conversations()[:40] + [[{"role": "user", "content": " leading  spaces"},
                                               {"role": "assistant", "content": "ünï 中文\n\nok"}],
                                              [{"role": "user", "content": "say <s>, <unk>, </s>"},
                                               {"role": "assistant", "content": "<s><unk></s> x"}]]
  for messages in convs:
    prompt = messages[:-1]
    ids = theirs.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == fmt.prompt(prompt), messages
    whole = theirs.apply_chat_template(messages, tokenize=True)
    whole = whole["input_ids"] if not isinstance(whole, list) else whole
    assert whole == fmt.conversation(messages)[0].tolist()
  assert theirs.chat_template == chat.ZEPHYR_TEMPLATE


def test_generate_chat_one_reply_and_a_session(data, sft):
  import io
  from tinyllama_jax import generate
  from tinyllama_jax.inference import generate as generate_lib
  cfg, workdir, _ = sft
  tok = data[3]
  params = jax.device_put(run_lib.load_params(workdir, 40, cfg.model))
  out = io.StringIO()
  question = sft_helpers.conversations()[0][1]["content"]
  messages = generate.chat(params, cfg, tok, prompt=question, system="Answer from the docs.",
                           out=out, max_new_tokens=24)
  assert [m["role"] for m in messages] == ["system", "user", "assistant"]
  assert out.getvalue() == messages[-1]["content"] + "\n" and messages[-1]["content"]
  # the reply is the greedy continuation of exactly the template's prompt
  fmt = chat.ChatFormat("", tok)
  ids = fmt.prompt(messages[:2])
  want = generate_lib.generate(params, cfg.model, [ids], max_new_tokens=24, eos_id=tok.eos_id,
                           n_valid=tok.vocab_size)[0]
  assert messages[-1]["content"] == tok.decode([t for t in want if t != tok.eos_id])
  lines = iter(["What does json.dumps do?", "And json.loads?"])

  def read(_):
    try:
      return next(lines)
    except StopIteration:
      raise EOFError from None
  session = generate.chat(params, cfg, tok, read=read, out=io.StringIO(), max_new_tokens=8)
  assert [m["role"] for m in session] == ["user", "assistant", "user", "assistant"]


def test_init_from_an_hf_import_starts_from_its_parameters(data, tmp_path):
  """A workdir that `export --from_hf` wrote is an init_from like any run: its parameters, step
  0, a fresh (zero) optimizer state, and its tokenizer."""
  from hf_models import make_hf_llama
  tok = data[3]
  hf_dir, imported = str(tmp_path / "hf"), str(tmp_path / "imported")
  make_hf_llama(hf_dir, tok.path, intermediate_size=128, max_position_embeddings=T)
  hf_import.import_hf(hf_dir, imported)
  cfg = sft_config(data, imported)
  run = train_lib.Run(cfg, str(tmp_path / "w"))
  try:
    state, data_state, step = run.initial_state()
  finally:
    run.release()
  assert step is None and data_state is None and int(state["step"]) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]),
               run_lib.load_params(imported, 0, cfg.model))
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(state["opt_state"])
             if np.asarray(x).ndim)
  assert train_lib.load_tokenizer(cfg, str(tmp_path / "w")).sha256 == tok.sha256
