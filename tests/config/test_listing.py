"""The key listing (config/listing.py): every key with its value, default, bound or choices and
comment; and one run of the command that prints it (config/__main__.py)."""

import os

from hostile import call
from tinyllama_jax import config as config_lib
from tinyllama_jax.config import listing

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny(**overrides):
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  cfg.update_from_flattened_dict(overrides)
  return cfg


def test_the_listing_has_every_key_its_choices_and_its_comment():
  cfg = tiny(**{"optim.lr": 1e-3})
  text = listing.listing(cfg)
  keys = [line.split(" = ")[0] for line in text.splitlines() if not line.startswith(" ")]
  assert keys == config_lib.flat_keys(cfg)
  lines = text.splitlines()
  lr = lines.index("optim.lr = 0.001  (default 0.0004)  [must be a finite number > 0]")
  assert lines.index("data.packing = 'concat'  [must be one of concat, first_fit, best_fit]") > 0
  comments = listing.key_comments()
  assert comments["train.nan_policy"].startswith("Non-finite loss or gradients: 'stop'")
  assert comments["model.kernels.rope"] == "XLA's fusion: the Pallas kernel lost"
  assert comments["data.packing"].startswith("'concat' is TinyLlama's concat-then-split")
  assert "seed" not in comments  # a key without a comment has none
  assert not lines[lr + 1].startswith(" ")  # optim.lr has no comment either


def test_matmul_dtype_is_a_model_key_bf16_by_default_listed_with_its_choices():
  assert config_lib.base_config().model.matmul_dtype == "bf16"
  assert config_lib.choices()["model.matmul_dtype"] == ("bf16", "fp8")
  cfg = tiny(**{"model.matmul_dtype": "fp8"})
  config_lib.validate(cfg)
  lines = listing.listing(cfg).splitlines()
  i = lines.index("model.matmul_dtype = 'fp8'  (default 'bf16')  [must be one of bf16, fp8]")
  assert lines[i + 1].startswith("    # The block's dense GEMMs")
  assert "model.matmul_dtype" in config_lib.flat_keys(cfg)  # a model key (the checkpoint's)


def test_the_listing_command(tmp_path, capfd):
  """The one run of the command: its exit status and what it prints."""
  proc = call("config", ("--config=configs/1b.py", "--config.model.remat=full"), tmp_path, capfd,
              timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert ("model.remat = 'full'  (default 'none')  [must be one of none, full, save_dots, "
          "save_attn, save_qkv_attn, save_all_but_mlp]") in lines
  i = lines.index("model.kernels.attention = 'auto'  [must be one of auto, cudnn, mgpu, pallas, "
                  "splash, xla]")
  assert lines[i + 1].startswith("    # auto: cuDNN on GPU")
  assert "train.grace_period_s = 60.0  [must be a finite number > 0]" in lines
