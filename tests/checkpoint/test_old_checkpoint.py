"""A checkpoint written by the code before the package layout (commit 1dd0a59, see
tests/fixtures/ckpt_1dd0a59/README.txt) still restores, exports and resumes with the current code:
the exported tensors equal the old export's bit for bit, and one more training step gives the old
code's loss for it."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from tinyllama_jax import config as config_lib, params as params_table
from tinyllama_jax.checkpoint import run as run_lib
from tinyllama_jax.interop import export, hf
from tinyllama_jax.training import loop as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "ckpt_1dd0a59")
STEP = 2
# The overrides the fixture was trained with (README.txt's --config.* flags) on configs/tiny.py.
OVERRIDES = {
    "data.source": "synthetic", "data.tokenizer_vocab_size": 64,
    "model.vocab_size": 64, "model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2,
    "model.n_kv_heads": 1, "model.head_dim": 8, "model.ffn_dim": 32, "model.max_seq_len": 16,
    "train.seq_len": 16, "train.global_batch": 2, "train.micro_batch_per_device": 2,
    "train.log_every": 1, "train.eval_every": 2, "train.eval_batches": 1,
    "train.checkpoint_every": 2, "train.sample_tokens": 0, "optim.warmup_steps": 1,
}
# The old code's step 3, resumed from this checkpoint with --config.train.steps=3 (README.txt).
OLD_STEP3 = {"train/loss": 4.099252700805664, "train/grad_norm": 1.8763785362243652}


@pytest.fixture
def workdir(tmp_path):
  """A copy of the old run (resume writes into it; the fixture stays as committed)."""
  path = str(tmp_path / "run")
  shutil.copytree(os.path.join(FIXTURE, "run"), path)
  return path


def test_old_checkpoint_restores(workdir):
  assert run_lib.resolve_step(workdir) == STEP
  cfg = run_lib.run_config(workdir, STEP)
  params = run_lib.load_params(workdir, STEP, cfg.model)  # verifies every stored checksum
  old = load_file(os.path.join(FIXTURE, "export", "hf_fp32", "model.safetensors"))
  for path, _ in params_table.shapes(cfg.model):
    node = params
    for key in path:
      node = node[key]
    for name, x in hf.to_hf(path, node):
      np.testing.assert_array_equal(x, old[name], err_msg=name)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_old_checkpoint_exports_as_the_old_code_did(workdir, tmp_path, dtype):
  out = str(tmp_path / "hf")
  export.export(workdir, out, dtype=dtype)
  old_dir = os.path.join(FIXTURE, "export", f"hf_{dtype}")
  new, old = (load_file(os.path.join(d, "model.safetensors")) for d in (out, old_dir))
  assert sorted(new) == sorted(old)
  for name in old:
    assert new[name].dtype == old[name].dtype and new[name].shape == old[name].shape, name
    assert new[name].tobytes() == old[name].tobytes(), name
  for name in ("config.json", "generation_config.json"):
    with open(os.path.join(out, name)) as f, open(os.path.join(old_dir, name)) as g:
      assert json.load(f) == json.load(g), name


@pytest.mark.slow
def test_old_checkpoint_resumes_one_step(workdir):
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs", "tiny.py"))
  cfg.update_from_flattened_dict({**OVERRIDES, "train.steps": STEP + 1})
  out = train_lib.train(cfg, workdir)
  assert out["step"] == STEP + 1
  for key, value in OLD_STEP3.items():
    np.testing.assert_allclose(out[key], value, rtol=1e-5, err_msg=key)
  assert run_lib.resolve_step(workdir) == STEP + 1
