"""Reading a run: a run trained on prepared data keeps its own tokenizer, so export, generate and
evaluate work after the original is gone; where the reader looks, and what it says when nothing
is there."""

import json
import os

import jax
import numpy as np
import pytest

from hf_models import REPO, STDLIB, make_tokenizer, swap_two_pieces
from hostile import OLD_RUN
from tinyllama_jax import config as config_lib
from tinyllama_jax.inference import generate
from tinyllama_jax.inference import evaluate
from tinyllama_jax.interop import export
from tinyllama_jax.checkpoint import run as run_lib
from tinyllama_jax.data import pipeline, prepare, tokenizer as tokenizer_lib


def prepare_docs(tok, out, names=("decoder.py", "encoder.py", "scanner.py", "tool.py")):
  docs = os.path.join(os.path.dirname(out), os.path.basename(out) + ".jsonl")
  with open(docs, "w") as f:
    for name in names:
      f.write(json.dumps({"text": open(os.path.join(STDLIB, "json", name)).read()}) + "\n")
  return prepare.prepare([docs], tok, out, eval_fraction=0.5, progress=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(tokenizer file, prepared data folder): the tokenizer lives next to the data, not in a run."""
  root = tmp_path_factory.mktemp("prepared")
  tok = make_tokenizer(str(root / "tok" / "tokenizer.model"))
  prepare_docs(tok, str(root / "data"))
  return tok.path, str(root / "data")


def run_cfg(**data):
  cfg = config_lib.base_config()
  cfg.data.update(data)
  return cfg


# ----------------------------------------------------------------------------- the run's copy


def test_train_keeps_a_copy_of_a_tokenizer_that_lives_elsewhere(prepared, tmp_path):
  tok_file, data = prepared
  want = tokenizer_lib.file_sha256(tok_file)
  for i, data_cfg in enumerate([
      run_cfg(source="prepared", paths=data).data,
      run_cfg(source="mixture", mixture=f"0.5:prepared:{data};0.5:prepared:{data}").data,
      run_cfg(source="litpkds", paths="unused", tokenizer=tok_file).data]):
    workdir = str(tmp_path / f"w{i}")
    assert pipeline.load_tokenizer(data_cfg, workdir).sha256 == want
    copy = os.path.join(workdir, "tokenizer", "tokenizer.model")
    assert tokenizer_lib.file_sha256(copy) == want
    assert pipeline.load_tokenizer(data_cfg, workdir).sha256 == want  # again: the same, no error
    assert os.listdir(os.path.dirname(copy)) == ["tokenizer.model"]  # no temp file left


def test_a_workdir_trained_with_another_tokenizer_is_refused(prepared, tmp_path):
  tok_file, data = prepared
  other = make_tokenizer(str(tmp_path / "other.model"), vocab_size=400)
  workdir = str(tmp_path / "w")
  pipeline.load_tokenizer(run_cfg(tokenizer=other.path).data, workdir)
  with pytest.raises(ValueError, match=r"the workdir's tokenizer .*tokenizer.model is not "
                     r".*tokenizer.model \(sha256 .*\): this workdir trained with another"):
    pipeline.load_tokenizer(run_cfg(source="prepared", paths=data).data, workdir)
  assert tokenizer_lib.file_sha256(os.path.join(workdir, tokenizer_lib.RUN_COPY)) == other.sha256


def test_the_copy_is_readable_as_the_umask_allows(prepared, tmp_path):
  """Not tempfile's 0600: a colleague or a serving account reads the run's tokenizer too."""
  old = os.umask(0o027)
  try:
    pipeline.load_tokenizer(run_cfg(tokenizer=prepared[0]).data, str(tmp_path))
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "tokenizer" / "tokenizer.model").st_mode & 0o777 == 0o640


# ------------------------------------------------------------------------- where the reader looks


def test_tokenizer_path_order_and_error(prepared, tmp_path):
  tok_file, data = prepared
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  cfg = run_cfg(source="prepared", paths=data)
  data_copy = os.path.join(data, "tokenizer.model")  # prepare keeps one beside the shards
  assert run_lib.tokenizer_path(cfg, workdir) == data_copy  # an old run: the manifest's
  mixture = run_cfg(source="mixture", mixture=f"1:stdlib:;1:prepared:{data}")
  assert run_lib.tokenizer_path(mixture, workdir) == data_copy
  assert run_lib.tokenizer_path(run_cfg(tokenizer=tok_file), workdir) == tok_file
  assert run_lib.tokenizer_path(run_cfg(source="synthetic"), workdir) is None
  pipeline.load_tokenizer(cfg.data, workdir)  # what train does: the run's own copy, found first
  copy = os.path.join(workdir, "tokenizer", "tokenizer.model")
  assert run_lib.tokenizer_path(cfg, workdir) == copy
  assert run_lib.tokenizer_path(run_cfg(tokenizer="/gone.model"), workdir) == copy
  assert run_lib.tokenizer_path(cfg, workdir, override=tok_file) == tok_file
  os.remove(copy)

  with pytest.raises(ValueError, match=r"looked for .*w/tokenizer/tokenizer.model \(the run's "
                     r"copy\); /gone.model \(the config's data.tokenizer\): pass --tokenizer=PATH"):
    run_lib.tokenizer_path(run_cfg(tokenizer="/gone.model"), workdir)
  with pytest.raises(ValueError, match=r"the prepared data's manifest \(no prepared manifest at "
                     r".*nope.*--tokenizer=PATH"):
    run_lib.tokenizer_path(run_cfg(source="prepared", paths=str(tmp_path / "nope")), workdir)
  with pytest.raises(ValueError, match=r"--tokenizer='/gone.model' is not a file"):
    run_lib.tokenizer_path(cfg, workdir, override="/gone.model")


def test_a_tokenizer_changed_since_prepare_is_not_taken(tmp_path):
  tok = make_tokenizer(str(tmp_path / "tok.model"))
  prepare_docs(tok, str(tmp_path / "data"), names=("tool.py",))
  make_tokenizer(str(tmp_path / "data" / "tokenizer.model"), vocab_size=400)  # the data's, retrained
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  with pytest.raises(ValueError, match=r"tokenizer.model \(named by .*data, but changed since the data "
                     "was prepared\).*--tokenizer=PATH"):
    run_lib.tokenizer_path(run_cfg(source="prepared", paths=str(tmp_path / "data")), workdir)


# ----------------------------------------------------------------------------- end to end


def micro_config(data):
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  m, t = cfg.model, cfg.train
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim = 64, 2, 4, 2, 16, 128
  m.vocab_size, m.max_seq_len = 512, 32
  cfg.data.source, cfg.data.paths, cfg.data.tokenizer_vocab_size = "prepared", data, 512
  t.seq_len, t.global_batch, t.micro_batch_per_device = 32, 4, 4
  t.steps, t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 1, 1, 1, 1, 1
  t.sample_tokens, t.async_checkpoint = 0, False
  cfg.optim.warmup_steps = 1
  return cfg


def test_a_run_on_prepared_data_reads_without_the_original_tokenizer(tmp_path):
  """Train on prepared data, delete the tokenizer it was prepared with: export, generate and
  evaluate still read the run (through its own copy)."""
  from tinyllama_jax.training import loop as train_lib
  tok = make_tokenizer(str(tmp_path / "tok" / "tokenizer.model"))
  data = str(tmp_path / "data")
  prepare_docs(tok, data)
  workdir = str(tmp_path / "run")
  train_lib.train(micro_config(data), workdir)
  os.remove(tok.path)

  step = run_lib.resolve_step(workdir)
  cfg = run_lib.run_config(workdir, step)
  tok_path = run_lib.tokenizer_path(cfg, workdir)
  assert tok_path == os.path.join(workdir, "tokenizer", "tokenizer.model")
  export.export(workdir, str(tmp_path / "hf"), dtype="fp32")
  assert tokenizer_lib.file_sha256(str(tmp_path / "hf" / "tokenizer.model")) == tok.sha256
  run_tok = tokenizer_lib.Tokenizer(tok_path)
  params = jax.device_put(run_lib.load_params(workdir, step, cfg.model))
  ids = [run_tok.bos_id] + run_tok.encode("def f(x):")
  assert len(generate.generate(params, cfg.model, [ids], max_new_tokens=4)[0]) == 4
  data_cfg, _ = evaluate.data_config_for(cfg, f"prepared:{data}")
  result = evaluate.evaluate_split(params, data_cfg, run_tok, "eval", seq_len=16, batch_size=2,
                                   batches=1)
  assert result["tokens"] == 32 and np.isfinite(result["loss"])


def test_a_trained_run_records_its_tokenizer_and_refuses_an_edited_copy(tmp_path):
  """The checkpoint records the sha256 of the tokenizer train used: the run's copy edited after
  (two pieces swapped: the same size, wrong text) is refused, or taken with a warning when
  allowed; without the record, generate and evaluate read it as if nothing had changed."""
  from tinyllama_jax.training import loop as train_lib
  tok = make_tokenizer(str(tmp_path / "tok" / "tokenizer.model"))
  data = str(tmp_path / "data")
  prepare_docs(tok, data)
  workdir = str(tmp_path / "run")
  train_lib.train(micro_config(data), workdir)
  step = run_lib.resolve_step(workdir)
  assert run_lib.read_meta(workdir, step)["tokenizer_sha256"] == tok.sha256
  cfg = run_lib.run_config(workdir, step)
  assert run_lib.load_tokenizer(cfg, workdir, step).sha256 == tok.sha256
  swap_two_pieces(tok.path, os.path.join(workdir, tokenizer_lib.RUN_COPY))
  with pytest.raises(ValueError, match=rf"tokenizer.model \(sha256 \w+\) is not the one "
                     rf"checkpoint {step} in .* trained with \(sha256 {tok.sha256[:12]}\): pass"):
    run_lib.load_tokenizer(cfg, workdir, step)
  assert run_lib.load_tokenizer(cfg, workdir, step, allow_other=True).sha256 != tok.sha256


# ----------------------------------------------------------------------------- opening a run



def test_open_run_refuses_a_run_without_a_tokenizer_only_where_text_is_needed():
  """What generate, evaluate and export call: a run without a tokenizer opens (export writes its
  weights alone) unless the command needs text, then one line names the run, why and the fix;
  the usual slips are resolve_step's lines."""
  step, cfg, tok = run_lib.open_run(OLD_RUN)
  assert (step, cfg.data.source, tok) == (2, "synthetic", None)
  with pytest.raises(ValueError, match=rf"^the run in {OLD_RUN} has no tokenizer \(synthetic "
                     r"data\): generate writes text: pass --tokenizer=PATH \(a sentencepiece "
                     r"\.model with at most 64 pieces\)$"):
    run_lib.open_run(OLD_RUN, needs_text="generate writes text")
  with pytest.raises(ValueError, match=r"has no checkpoint for step 5; it has steps \[2\]"):
    run_lib.open_run(OLD_RUN, 5)
