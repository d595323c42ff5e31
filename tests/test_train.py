"""The train loop end to end on the stdlib corpus: loss falls, resume is exact, bad input fails
cleanly. Shapes are tiny so each run compiles and trains in seconds. A bad config is one line
before anything starts: config.validate's and the shared flag checks' unit tests are in
test_config.py; here one run of the command checks its exit status."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tinyllama_jax import config as config_lib
from tinyllama_jax.training import faults
from tinyllama_jax.training import loop as train_lib

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro_config(**overrides):
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  m, t = cfg.model, cfg.train
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim = 64, 2, 4, 2, 16, 128
  m.vocab_size, m.max_seq_len = 512, 64
  cfg.data.tokenizer_vocab_size = 512
  cfg.data.tokenizer_train_bytes = 300_000
  t.seq_len, t.global_batch, t.micro_batch_per_device = 64, 8, 4  # 2 accumulated micro-batches
  t.steps, t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 30, 5, 30, 30, 2
  t.sample_tokens, t.async_checkpoint = 0, False
  cfg.optim.warmup_steps, cfg.optim.lr = 5, 3e-3
  cfg.update_from_flattened_dict(overrides)
  return cfg


def flat(params):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def test_tiny_run_loss_falls_and_writes_workdir(tmp_path):
  out = train_lib.train(micro_config(), str(tmp_path))
  assert out["step"] == 30
  assert out["train/loss"] < 0.8 * np.log(512)  # well below the uniform guess
  assert np.isfinite(out["eval/loss"])
  assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 64
  assert os.listdir(tmp_path / "tb")  # tensorboard events
  assert (tmp_path / "checkpoints" / "30").is_dir()


def test_resume_is_bitwise_exact(tmp_path):
  """6 steps, restart, 6 more == 12 straight: parameters, optimizer and data position. Eval and
  periodic checkpoints off (0): no eval, and only the final checkpoint of each run."""
  common = {"optim.decay_steps": 12, "train.checkpoint_every": 0, "train.eval_every": 0}
  straight = train_lib.train(micro_config(**common, **{"train.steps": 12}), str(tmp_path / "a"))
  train_lib.train(micro_config(**common, **{"train.steps": 6}), str(tmp_path / "b"))
  resumed = train_lib.train(micro_config(**common, **{"train.steps": 12}), str(tmp_path / "b"))
  assert "eval/loss" not in straight and "eval/loss" not in resumed
  assert os.listdir(tmp_path / "a" / "checkpoints") == ["12"]
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["12", "6"]
  a, b = flat(straight["params"]), flat(resumed["params"])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert straight["train/loss"] == resumed["train/loss"]


def test_fp8_matmuls_train_and_resume_bitwise_exact(tmp_path):
  """model.matmul_dtype=fp8 (emulated on CPU): the loss is finite and falls, and 6 steps +
  restart + 6 equals 12 straight, bitwise: the scales come from each step's tensors, so there
  is no fp8 state to save or lose."""
  common = {"optim.decay_steps": 12, "train.checkpoint_every": 0, "train.eval_every": 0,
            "train.log_every": 1, "model.matmul_dtype": "fp8"}
  straight = train_lib.train(micro_config(**common, **{"train.steps": 12}), str(tmp_path / "a"))
  train_lib.train(micro_config(**common, **{"train.steps": 6}), str(tmp_path / "b"))
  resumed = train_lib.train(micro_config(**common, **{"train.steps": 12}), str(tmp_path / "b"))
  with open(tmp_path / "a" / "metrics.jsonl") as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  assert len(losses) == 12 and np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.5 and np.mean(losses[-3:]) < np.mean(losses[:3])
  a, b = flat(straight["params"]), flat(resumed["params"])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert straight["train/loss"] == resumed["train/loss"]
  bf16 = train_lib.train(micro_config(**{**common, "model.matmul_dtype": "bf16"},
                                      **{"train.steps": 12}), str(tmp_path / "c"))
  assert straight["train/loss"] != bf16["train/loss"]  # fp8 really ran
  assert abs(straight["train/loss"] / bf16["train/loss"] - 1) < 0.05


def test_steps_trained_before_a_failing_eval_are_checkpointed(tmp_path, monkeypatch):
  def broken_eval(*args, **kwargs):
    raise RuntimeError("eval broke")
  monkeypatch.setattr(train_lib, "evaluate", broken_eval)
  cfg = micro_config(**{"train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 0})
  with pytest.raises(RuntimeError, match="eval broke"):
    train_lib.train(cfg, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == ["2"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  """A 512-piece tokenizer trained once for the module (here, not from tests/training: that folder
  is not on the import path when this file runs alone)."""
  from tinyllama_jax.data import pipeline
  data = micro_config().data
  return pipeline.load_tokenizer(data, str(tmp_path_factory.mktemp("tokenizer"))).path


def write_tokens(path, n, seed=0):
  from tinyllama_jax.data import formats
  rng = np.random.default_rng(seed)
  formats.write_litpkds(str(path), rng.integers(3, 512, n).astype(np.uint16))


def litpkds(directory, tokenizer_path):
  return {"data.source": "litpkds", "data.paths": str(directory / "train*.bin"),
          "data.eval_paths": str(directory / "eval*.bin"), "data.tokenizer": tokenizer_path}


def test_an_eval_split_too_small_for_one_row_fails_before_compiling(tmp_path, tokenizer_path,
                                                                   caplog):
  write_tokens(tmp_path / "train0.bin", 20_000)
  write_tokens(tmp_path / "eval0.bin", 30)  # not one row of seq_len + 1 = 65 tokens
  with pytest.raises(ValueError, match=r"cannot evaluate on this data's eval split \(30 tokens "
                                       r"make 0 rows of 65.*--config.train.eval_every=0"):
    train_lib.train(micro_config(**litpkds(tmp_path, tokenizer_path)), str(tmp_path / "w"))
  assert "compiling" not in caplog.text
  assert os.listdir(tmp_path / "w" / "checkpoints") == []


def test_resuming_onto_changed_data_is_refused_unless_allowed(tmp_path, tokenizer_path, caplog):
  """Changed data under a checkpoint (here a file added to the glob; another prepare into the
  same folder alike): its data position would land elsewhere in another stream."""
  write_tokens(tmp_path / "train0.bin", 20_000)
  write_tokens(tmp_path / "eval0.bin", 2_000)
  data = litpkds(tmp_path, tokenizer_path)
  common = {**data, "train.eval_every": 0, "train.checkpoint_every": 0, "optim.decay_steps": 4}
  train_lib.train(micro_config(**common, **{"train.steps": 2}), str(tmp_path / "w"))
  write_tokens(tmp_path / "train1.bin", 20_000, seed=1)
  with pytest.raises(ValueError, match=r"the training data \(litpkds:.*\) changed since "
                                       r"checkpoint 2 .*train.allow_data_change=True"):
    train_lib.train(micro_config(**common, **{"train.steps": 4}), str(tmp_path / "w"))
  out = train_lib.train(micro_config(**common, **{"train.steps": 4,
                                                  "train.allow_data_change": True}),
                        str(tmp_path / "w"))
  assert out["step"] == 4
  assert "the data stream restarts from its beginning" in caplog.text


def test_a_bad_config_key_is_one_line_and_exit_2_before_anything_runs(tmp_path):
  """The one run of the command for its exit status on bad input (every other one-line error is a
  unit test: test_config.py)."""
  proc = subprocess.run([sys.executable, "-m", "tinyllama_jax.train", "--config=configs/tiny.py",
                         f"--workdir={tmp_path}/w", "--config.optim.lrr=1e-3"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: unknown config key 'optim.lrr'; did you mean optim.lr, optim.min_lr, optim.b2?")
  assert not (tmp_path / "w").exists()


def test_unwritable_workdir_is_refused(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ValueError, match=f"workdir '{a_file}/run' is not writable"):
    train_lib.train(micro_config(), str(a_file / "run"))


def test_checkpoint_of_other_architecture_is_refused(tmp_path):
  train_lib.train(micro_config(**{"train.steps": 2, "train.checkpoint_every": 2}), str(tmp_path))
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(ValueError, match="different architecture.*d_model"):
    train_lib.train(micro_config(**{"model.d_model": 96, "train.steps": 4}), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == before
  faults.workdir_lock(str(tmp_path)).release()  # the refused run let go of the workdir


def test_a_second_run_on_a_workdir_is_refused_before_it_touches_it(tmp_path):
  lock = faults.workdir_lock(str(tmp_path))  # another train process, as far as train can tell
  try:
    with pytest.raises(ValueError, match=f"workdir {tmp_path} is in use by train pid"):
      train_lib.train(micro_config(), str(tmp_path))
  finally:
    lock.release()
  assert os.listdir(tmp_path) == [".lock"]


def test_relative_workdir_trains_and_checkpoints(tmp_path):
  """The README's quick start passes --workdir=runs/tiny: a path relative to the current dir."""
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "tinyllama_jax.train", f"--config={REPO}/configs/tiny.py",
       "--workdir=runs/rel", "--config.train.steps=2", "--config.train.checkpoint_every=2",
       "--config.train.eval_batches=1", "--config.train.sample_tokens=0",
       "--config.data.tokenizer_vocab_size=512", "--config.model.vocab_size=512",
       "--config.data.tokenizer_train_bytes=300000"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "2").is_dir()


def test_xla_flags_are_appended_unless_the_environment_names_them():
  from tinyllama_jax.distributed import apply_xla_flags
  env = {}
  assert apply_xla_flags("--xla_a= --xla_b=1", env) == "--xla_a= --xla_b=1"
  env = {"XLA_FLAGS": "--xla_b=2 --xla_c"}
  assert apply_xla_flags("--xla_a= --xla_b=1", env) == "--xla_b=2 --xla_c --xla_a="
  env = {"XLA_FLAGS": "--xla_a=x"}
  assert apply_xla_flags("", env) == "--xla_a=x"


def test_the_sample_prompt_is_the_config_key_or_the_start_of_an_eval_document(tmp_path,
                                                                             tokenizer_path):
  from tinyllama_jax.data import sources
  cfg = micro_config(**{"data.tokenizer": tokenizer_path})
  tokenizer = train_lib.load_tokenizer(cfg, str(tmp_path))
  prompt = train_lib.data_prompt(cfg, tokenizer, 4)
  assert len(tokenizer.encode(prompt)) >= train_lib.SAMPLE_PROMPT_TOKENS // 2, prompt
  eval_files = sources.split_names(sources.stdlib_files(), "eval", cfg.data.eval_fraction)
  root = sources.stdlib_root()
  texts = [sources.read_utf8(os.path.join(root, f)) or "" for f in eval_files]
  assert any(text.startswith(prompt) for text in texts), prompt
  cfg.train.sample_prompt = "import os"
  assert train_lib.data_prompt(cfg, tokenizer, 4) == "import os"


def test_a_sample_asked_of_a_run_without_a_tokenizer_is_refused_aloud(caplog):
  cfg = micro_config(**{"data.source": "synthetic", "train.sample_tokens": 8})
  with caplog.at_level("WARNING"):
    assert not train_lib.sample_wanted(cfg, None)
  assert "train.sample_tokens=8: no sample, data.source='synthetic' has no tokenizer" in caplog.text
  cfg.train.sample_tokens = 0
  caplog.clear()
  assert not train_lib.sample_wanted(cfg, None) and caplog.text == ""


def test_a_run_ends_saying_where_everything_went_and_its_rerun_exits_before_compiling(
    tmp_path, tokenizer_path):
  """The closing lines name the checkpoint, metrics.jsonl, tb/, the losses and the wall time; a
  rerun of the finished run says it is already there, exits 0 and compiles nothing."""
  workdir = tmp_path / "w"
  flags = [f"--config={REPO}/configs/tiny.py", f"--workdir={workdir}",
           f"--config.data.tokenizer={tokenizer_path}", "--config.train.steps=2",
           "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
           "--config.train.eval_batches=1", "--config.train.sample_tokens=0"]
  flags += [f"--config.{k}={v}" for k, v in {
      "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
      "model.head_dim": 16, "model.ffn_dim": 128, "model.vocab_size": 512,
      "model.max_seq_len": 64, "train.seq_len": 64, "train.global_batch": 8,
      "train.micro_batch_per_device": 4}.items()]
  command = [sys.executable, "-m", "tinyllama_jax.train", *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  tail = [line.split("] ", 1)[-1] for line in first.stderr.splitlines()[-4:]]
  assert tail[0].startswith("done: step 2 of 2 in ") and "train loss" in tail[0], tail
  assert "eval loss" in tail[0], tail
  assert tail[1:] == [f"  checkpoint   {workdir}/checkpoints/2",
                      f"  metrics      {workdir}/metrics.jsonl",
                      f"  tensorboard  {workdir}/tb  (tensorboard --logdir={workdir}/tb)"]
  metrics_before = (workdir / "metrics.jsonl").read_text()
  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "already at step 2 of 2: nothing to train" in again.stderr, again.stderr[-2000:]
  assert f"checkpoint   {workdir}/checkpoints/2" in again.stderr
  assert "compil" not in again.stderr, again.stderr[-2000:]
  assert (workdir / "metrics.jsonl").read_text() == metrics_before  # nothing appended
  # A final checkpoint that does not verify is no finished run: none left to resume, exit 3.
  shutil.rmtree(workdir / "checkpoints" / "2" / "state")
  damaged = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert damaged.returncode == 3, damaged.stderr[-2000:]
  assert damaged.stderr.splitlines()[-1].startswith("error: none of the 1 checkpoints"), \
      damaged.stderr[-2000:]
