"""Export against the real library: an imported random HF Llama (GQA) -> export -> reload in
transformers -> identical tensors and logits; the same from our own trained (sharded) checkpoint;
the exported tokenizer encodes like ours; bad input fails cleanly; the output folders export and
import write through (modes, signals, what killed writers leave). The import itself is
test_hf_import.py's."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import jax
import numpy as np
import pytest
import torch
import transformers

from tinyllama_jax import cli, config as config_lib
from tinyllama_jax.interop import export, hf_import
from tinyllama_jax.interop import hf
from tinyllama_jax.checkpoint import run as run_lib
from tinyllama_jax.data import tokenizer as tokenizer_lib
from hf_models import (REPO, TOKENS, hf_logits, imported, load_hf, our_logits,  # noqa: F401
                       stdlib_texts, tokenizer_file)  # (imported, tokenizer_file: fixtures)


# ----------------------------------------------------------------------------- export


def test_export_roundtrip_identical(imported, tmp_path):
  hf_dir, model, workdir = imported
  out = str(tmp_path / "out")
  report = export.export(workdir, out, dtype="fp32", max_shard_size="60KB")
  assert len(report["files"]) > 2
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  reloaded = load_hf(out)
  want, got = model.state_dict(), reloaded.state_dict()
  assert set(want) == set(got)
  for name in want:
    assert torch.equal(want[name], got[name]), name
  np.testing.assert_array_equal(hf_logits(reloaded, TOKENS), hf_logits(model, TOKENS))
  # A plain PyTorch state dict for users without transformers: the shards, HF names.
  from safetensors.torch import load_file
  state_dict = {}
  for f in report["files"]:
    state_dict.update(load_file(os.path.join(out, f)))
  assert set(state_dict) == set(want)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
  assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == 2


def test_export_bf16_single_file(imported, tmp_path):
  _, model, workdir = imported
  out = str(tmp_path / "out")
  assert export.export(workdir, out, dtype="bf16", max_shard_size="0")["files"] == [
      "model.safetensors"]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
  assert reloaded.dtype == torch.bfloat16
  for name, w in model.state_dict().items():
    assert torch.equal(w.to(torch.bfloat16), reloaded.state_dict()[name]), name


@pytest.mark.slow
def test_trained_sharded_checkpoint_roundtrip(tmp_path):
  """Our own trained run, its state sharded over 8 devices -> export -> transformers logits equal
  ours -> import back -> identical parameters."""
  from tinyllama_jax.training import loop as train_lib
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  m, t = cfg.model, cfg.train
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim = 64, 2, 4, 2, 16, 128
  m.vocab_size, m.max_seq_len = 512, 32
  cfg.data.tokenizer_vocab_size, cfg.data.tokenizer_train_bytes = 512, 200_000
  t.seq_len, t.global_batch, t.micro_batch_per_device = 32, 8, 1
  t.steps, t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 2, 1, 2, 2, 1
  t.sample_tokens, t.async_checkpoint = 0, False
  cfg.optim.warmup_steps = 1
  cfg.mesh.fsdp = 8
  run_dir, out, back = (str(tmp_path / n) for n in ("run", "out", "back"))
  train_lib.train(cfg, run_dir)
  params = run_lib.load_params(run_dir, 2, cfg.model)
  export.export(run_dir, out, dtype="fp32")
  tokens = TOKENS % 512
  diff = np.abs(hf_logits(load_hf(out), tokens) - our_logits(params, cfg.model, tokens)).max()
  assert diff <= 1e-4, diff
  hf_import.import_hf(out, back)
  jax.tree.map(np.testing.assert_array_equal, run_lib.load_params(back, 0, cfg.model), params)


# ----------------------------------------------------------------------------- tokenizer


def test_exported_tokenizer_encodes_like_ours(imported, tokenizer_file, tmp_path):
  _, _, workdir = imported
  out = str(tmp_path / "out")
  export.export(workdir, out, dtype="fp32")
  theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  ours = tokenizer_lib.Tokenizer(tokenizer_file)
  texts = stdlib_texts("*.py")[::6] + [
      " leading space", "  two", "   x", " ", "", "a   b  ", "\t\n  tab", "ünïcödé 中文 😀",
      "literal <s> and </s> stay text", "1234567 89"]
  for text in texts:
    assert theirs(text)["input_ids"] == [ours.bos_id] + ours.encode(text), text[:40]
    assert theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True) == text, text[:40]


def test_tokenizer_without_exact_json_falls_back(tmp_path):
  """A normalizing sentencepiece model has no exact tokenizer.json: transformers converts
  tokenizer.model itself, and the export says so."""
  import sentencepiece as spm
  model = str(tmp_path / "nfkc.model")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(stdlib_texts()), model_prefix=model[:-6],
                                 vocab_size=500, model_type="bpe", byte_fallback=True,
                                 normalization_rule_name="nmt_nfkc", minloglevel=2)
  out = tmp_path / "out"
  out.mkdir()
  said = []
  hf.write_tokenizer(str(out), model, add_bos=True, add_eos=False, max_len=64, log=said.append)
  assert said and "tokenizer.json not written" in said[0]
  assert not (out / "tokenizer.json").exists()
  theirs = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
  ours = tokenizer_lib.Tokenizer(model)
  assert theirs("def f(x): return x")["input_ids"] == [1] + ours.encode("def f(x): return x")


# ----------------------------------------------------------------------------- bad input


def leftovers(parent):
  return [n for n in os.listdir(parent) if ".tmp-" in n]


def test_bad_inputs_fail_cleanly(imported, tmp_path):
  _, _, workdir = imported
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match="does not exist"):
    export.export(str(tmp_path / "nope"), out)
  with pytest.raises(ValueError, match=r"no checkpoint for step 7.*\[0\]"):
    export.export(workdir, out, step=7)
  os.makedirs(out)
  open(os.path.join(out, "x"), "w").close()
  with pytest.raises(ValueError, match="not empty"):
    export.export(workdir, out)
  assert leftovers(tmp_path) == []


def test_damaged_checkpoint_is_one_line(imported, tmp_path):
  _, _, workdir = imported
  damaged = str(tmp_path / "damaged")
  shutil.copytree(workdir, damaged)
  state = os.path.join(damaged, "checkpoints", "0", "state")
  for name in os.listdir(state):  # the array data goes missing
    if name.startswith("ocdbt") or name == "d":
      shutil.rmtree(os.path.join(state, name), ignore_errors=True)
  with pytest.raises(ValueError, match="checkpoint 0 in .* cannot be read"):
    export.export(damaged, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out") and leftovers(tmp_path) == []


def _flip_one_bit(workdir, name):
  """Rewrites checkpoint 0's state with one bit of params/layers/<name> flipped and its metadata
  (the checksums) as saved: what orbax reads back, without complaint, from a flipped bit on disk."""
  import orbax.checkpoint as ocp
  state_dir = os.path.abspath(os.path.join(workdir, "checkpoints", "0", "state"))
  checkpointer = ocp.PyTreeCheckpointer()
  state = checkpointer.restore(state_dir)
  w = np.array(state["params"]["layers"][name])
  w.reshape(-1).view(np.uint32)[7] ^= 1 << 3
  state["params"]["layers"][name] = w
  shutil.rmtree(state_dir)
  checkpointer.save(state_dir, state)


def test_bit_flip_fails_export_cleanly(imported, tmp_path):
  """Export checks each parameter against the checksum training stored with it: a flipped bit is
  one line naming the parameter and the step (CLI: exit 2), and nothing is written."""
  _, _, workdir = imported
  damaged = str(tmp_path / "damaged")
  shutil.copytree(workdir, damaged)
  _flip_one_bit(damaged, "w_up")
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match=r"checkpoint 0 in .*: parameter layers/w_up does not match "
                     "the checksum"):
    export.export(damaged, out)
  with pytest.raises(ValueError, match="layers/w_up does not match"):  # generate, evaluate
    run_lib.load_params(damaged, 0, run_lib.run_config(damaged, 0).model)
  proc = subprocess.run([sys.executable, "-m", "tinyllama_jax.export", f"--workdir={damaged}",
                         f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "layers/w_up" in errors[0] and "checkpoint 0" in errors[0], errors
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(out) and leftovers(tmp_path) == []
  # The intact run still exports, verified.
  assert export.export(workdir, out, dtype="fp32")["step"] == 0


def test_full_disk_is_one_line_exit_3_and_leaves_nothing(imported, tmp_path, monkeypatch, capsys):
  """A write that fails midway (here: the disk fills in the second tensor) is one line naming the
  out dir and the room there is, exit status 3 (a fault), and no output or temp dir is left."""
  _, _, workdir = imported
  real_write, written = hf.ShardWriter.write, []

  def write_until_full(self, name, x):
    if written:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    written.append(name)
    real_write(self, name, x)
  monkeypatch.setattr(hf.ShardWriter, "write", write_until_full)
  out = str(tmp_path / "out")
  with pytest.raises(export.WriteError, match=r"could not write the export to .*/out \(no space "
                     r"left on device; [\d.]+ GiB free there, the weights take [\d.]+ GiB\): free "
                     "disk space or choose another --out; nothing was written"):
    export.export(workdir, out)
  assert os.listdir(tmp_path) == []
  written.clear()
  with pytest.raises(SystemExit) as exit_:  # as the command runs it (export.py: faults=WriteError)
    cli.run(lambda argv: export.export(workdir, out), faults=(export.WriteError,), argv=["export"])
  assert exit_.value.code == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: could not write the export to") and "Traceback" not in err
  assert os.listdir(tmp_path) == []


def test_output_modes_follow_the_umask(imported, tmp_path):
  """The export and an import are readable by whom the umask lets read (mkdtemp alone: 0700)."""
  hf_dir, _, workdir = imported
  old = os.umask(0o027)
  try:
    out, back = str(tmp_path / "out"), str(tmp_path / "back")
    export.export(workdir, out, dtype="fp32")
    hf_import.import_hf(hf_dir, back)
  finally:
    os.umask(old)
  for top in (out, back):
    assert os.stat(top).st_mode & 0o777 == 0o750, top
    for root, dirs, files in os.walk(top):
      for d in dirs:
        assert os.stat(os.path.join(root, d)).st_mode & 0o777 == 0o750, (root, d)
      for f in files:
        assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o640, (root, f)


def test_cli_one_line_errors(imported, tmp_path):
  _, _, workdir = imported
  for args in ([f"--workdir={workdir}", "--step=9", f"--out={tmp_path}/o"],
               [f"--from_hf={workdir}", f"--workdir={tmp_path}/w"]):
    proc = subprocess.run([sys.executable, "-m", "tinyllama_jax.export", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
  assert os.listdir(tmp_path) == []


def _import_process(hf_dir, workdir):
  return subprocess.Popen([sys.executable, "-m", "tinyllama_jax.export", f"--from_hf={hf_dir}",
                           f"--workdir={workdir}"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _wait_for_temp_dir(parent, proc):
  """Polls until the writer's temporary folder exists (it then compiles for seconds)."""
  while not leftovers(parent):
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_import_removes_the_temp_dir_in_one_line(imported, tmp_path, signum):
  """Before, a signal left `.OUT.tmp-*` behind for good, and Ctrl-C printed a traceback."""
  proc = _import_process(imported[0], tmp_path / "w")
  _wait_for_temp_dir(tmp_path, proc)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, err[-2000:]
  assert err.strip().splitlines()[-1].startswith(f"error: stopped by {signum.name}; nothing was "
                                                 "written")
  assert "Traceback" not in err
  assert os.listdir(tmp_path) == []


def test_a_signal_the_moment_the_temp_dir_exists_still_removes_it(tmp_path, monkeypatch):
  """A signal landing right after the folder's mkdir, before any write (the window that let the
  import test above leave `.w.tmp-*` behind on a busy machine): the folder is removed."""
  mkdir = os.mkdir

  def mkdir_then_signal(path, *args, **kwargs):
    mkdir(path, *args, **kwargs)
    raise export.Interrupted(signal.SIGTERM)

  monkeypatch.setattr(export.os, "mkdir", mkdir_then_signal)
  with pytest.raises(export.Interrupted):
    with export.staged_output_dir(tmp_path / "out", "--out"):
      pass
  assert os.listdir(tmp_path) == []


def test_a_later_import_removes_the_temp_dir_of_a_killed_one(imported, tmp_path):
  """kill -9 leaves the temporary folder; the next writer of the same output removes it (its
  pid is dead), and leaves one of a live writer or of another host alone."""
  proc = _import_process(imported[0], tmp_path / "w")
  _wait_for_temp_dir(tmp_path, proc)
  proc.kill()
  proc.wait()
  (stale,) = leftovers(tmp_path)
  live = tmp_path / f".w.tmp-{socket.gethostname()}.{os.getpid()}-live"
  other = tmp_path / ".w.tmp-elsewhere.1-other"
  live.mkdir(), other.mkdir()
  export.remove_stale_output_dirs(str(tmp_path / "w"))
  assert sorted(leftovers(tmp_path)) == sorted([live.name, other.name]), stale


def test_temp_dirs_of_earlier_versions_are_removed_once_a_day_old(tmp_path, caplog):
  """Earlier versions named the temporary folder `.w.tmp-XXXXXXXX` (no host or pid): never
  removed before. One unchanged for a day is removed and logged; a younger one (its folder old,
  a file in it written now: a live writer) is left and counted; other names are not touched."""
  day_and_more = time.time() - 86400 - 60
  old, fresh, written_in, other = (tmp_path / n for n in (
      ".w.tmp-ab_12xyz", ".w.tmp-k3j9q0zz", ".w.tmp-7fh2m1pq", ".w.tmp-my-notes"))
  for folder in (old, fresh, written_in, other):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
  for path in (old / "model.safetensors", old, written_in, other / "model.safetensors", other):
    os.utime(path, (day_and_more, day_and_more))
  caplog.set_level("WARNING")
  export.remove_stale_output_dirs(str(tmp_path / "w"))
  assert sorted(os.listdir(tmp_path)) == sorted([fresh.name, written_in.name, other.name])
  assert f"removed {old}: the temporary folder of an earlier version's writer, unchanged for " \
      "1.0 days" in caplog.text
  assert (f"left 2 temporary folder(s) of an earlier version's writer in {tmp_path} alone: "
          f"changed within a day, their writer may still run ({written_in.name}, {fresh.name})"
          in caplog.text), caplog.text
