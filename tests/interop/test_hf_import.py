"""Import against the real library: a random HF Llama (GQA) -> import -> our logits equal HF's,
tied embeddings untied, a run the trainer continues; the HF directory's chat template carried;
bad HF directories and a full disk fail cleanly, in one line, leaving nothing."""

import contextlib
import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import jax
import numpy as np
import pytest

from tinyllama_jax import cli, config as config_lib
from tinyllama_jax.interop import export, hf, hf_import
from tinyllama_jax.checkpoint import manager as checkpoint
from tinyllama_jax.checkpoint import run as run_lib
from hf_models import (TOKENS, hf_logits, imported, make_hf_llama, our_logits,  # noqa: F401
                       tokenizer_file)  # (imported, tokenizer_file: fixtures)


def test_import_logits_equal_hf(imported):
  _, model, workdir = imported
  cfg = run_lib.run_config(workdir, run_lib.resolve_step(workdir))
  assert (cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.rope_theta) == (4, 2, 500.0)
  params = run_lib.load_params(workdir, 0, cfg.model)
  diff = np.abs(our_logits(params, cfg.model, TOKENS) - hf_logits(model, TOKENS)).max()
  assert diff <= 1e-4, diff


def test_import_is_a_run_train_continues(imported):
  """The trainer's own Run restores the import: step 0, same params, fresh data stream."""
  from tinyllama_jax.training import loop as train_lib
  hf_dir, _, workdir = imported
  cfg = config_lib.load_config_file(os.path.join(workdir, "config.py"))
  assert cfg.data.tokenizer == os.path.join(workdir, "tokenizer", "tokenizer.model")
  assert os.path.isfile(cfg.data.tokenizer)
  run = train_lib.Run(cfg, workdir)
  state, data_state, step = run.initial_state()  # restores and verifies the checksums
  assert step == 0 and int(state["step"]) == 0 and data_state == {}
  reader = hf.SafetensorsReader(hf_dir)
  np.testing.assert_array_equal(np.asarray(state["params"]["layers"]["wk"][1]),
                                reader.get("model.layers.1.self_attn.k_proj.weight").T.reshape(
                                    64, 2, 16))
  assert jax.tree.structure(state) == jax.tree.structure(run.program.abstract_state)


def test_import_tied_embeddings(tmp_path, tokenizer_file):
  """A tied checkpoint (no lm_head.weight on disk) imports as two equal, untied matrices."""
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "run")
  model = make_hf_llama(hf_dir, tokenizer_file, tie_word_embeddings=True)
  hf_import.import_hf(hf_dir, workdir)
  cfg = run_lib.run_config(workdir, 0)
  params = run_lib.load_params(workdir, 0, cfg.model)
  np.testing.assert_array_equal(params["lm_head"], params["embed"].T)
  diff = np.abs(our_logits(params, cfg.model, TOKENS) - hf_logits(model, TOKENS)).max()
  assert diff <= 1e-4, diff


def test_bad_hf_directories_fail_cleanly(tmp_path):
  """Not a Llama, pickled weights, no tokenizer, no directory: one ValueError each, nothing
  written."""
  not_llama = str(tmp_path / "mistral")
  make_hf_llama(not_llama)
  config = json.load(open(os.path.join(not_llama, "config.json")))
  json.dump({**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"]},
            open(os.path.join(not_llama, "config.json"), "w"))
  with pytest.raises(ValueError, match="not a Llama model.*mistral"):
    hf_import.import_hf(not_llama, str(tmp_path / "w1"))

  pickled = str(tmp_path / "pickled")
  os.makedirs(pickled)
  json.dump(config, open(os.path.join(pickled, "config.json"), "w"))
  open(os.path.join(pickled, "pytorch_model.bin"), "wb").close()
  with pytest.raises(ValueError, match="pickle is refused.*save_pretrained"):
    hf_import.import_hf(pickled, str(tmp_path / "w2"))

  with pytest.raises(ValueError, match="no tokenizer.model"):
    hf_import.import_hf(_no_tokenizer(tmp_path), str(tmp_path / "w3"))
  with pytest.raises(ValueError, match="not a directory"):
    hf_import.import_hf(str(tmp_path / "missing"), str(tmp_path / "w4"))
  for name in ("w1", "w2", "w3", "w4"):
    assert not os.path.exists(tmp_path / name)
  assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def _no_tokenizer(tmp_path):
  d = str(tmp_path / "no_tok")
  make_hf_llama(d)
  return d


def test_a_full_disk_during_import_is_one_line_exit_3_and_leaves_nothing(imported, tmp_path,
                                                                          monkeypatch, capsys):
  """The checkpoint write failing (CheckpointError: a full disk) was 82 tracebacks, exit 1."""
  hf_dir = imported[0]

  def full(self, *args, **kwargs):
    raise checkpoint.CheckpointError("could not write checkpoint 0 (no space left on device)")
  monkeypatch.setattr(checkpoint.Checkpointer, "save", full)
  with pytest.raises(SystemExit) as exit_:  # as the command runs it (faults=WriteError)
    cli.run(lambda argv: hf_import.import_hf(hf_dir, str(tmp_path / "w")),
            faults=(export.WriteError,), argv=["export"])
  assert exit_.value.code == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == (f"error: could not write the import to {tmp_path}/w (no space left on "
                    "device): free disk space or choose another --workdir; nothing was written")
  assert os.listdir(tmp_path) == []


def test_import_carries_the_chat_template_of_the_hf_directory(imported, tmp_path):
  """A HF directory's template (chat_template.jinja first, then tokenizer_config.json's) becomes
  the run's data.chat_template, and its export's; before, it was dropped and the run chatted in
  Zephyr's."""
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(imported[0], hf_dir)
  template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
  with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"chat_template": [{"name": "default", "template": template},
                                 {"name": "tool_use", "template": "{{ 1 }}"}]}, f)
  hf_import.import_hf(hf_dir, str(tmp_path / "run"))
  assert run_lib.run_config(str(tmp_path / "run"), 0).data.chat_template == template
  export.export(str(tmp_path / "run"), str(tmp_path / "back"))  # and back out, to HF
  with open(tmp_path / "back" / "tokenizer_config.json") as f:
    assert json.load(f)["chat_template"] == template
  with open(os.path.join(hf_dir, "chat_template.jinja"), "w") as f:
    f.write(template + "!")
  assert hf_import.import_config({}, None, "tok", hf_dir).data.chat_template == template + "!"


def test_tracebacks_printed_during_a_failed_checkpoint_write_are_held_back(capfd):
  """What C++ callbacks print on fd 2 while a write fails (tensorstore's, on orbax's closed event
  loop) is given back without its tracebacks; after a write that succeeds, all of it."""
  lines = "I kept\nTraceback (most recent call last):\n  File \"x\", line 1\nRuntimeError: closed\n"
  for fails in (True, False):
    with contextlib.suppress(checkpoint.CheckpointError):
      with hf_import._tracebacks_held_back_on_failure():
        os.write(2, lines.encode())
        if fails:
          raise checkpoint.CheckpointError("no space left on device")
    assert capfd.readouterr().err == ("I kept\n" if fails else lines)
