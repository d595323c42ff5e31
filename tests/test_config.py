"""config.validate (every bound, declared choice and cross-field rule, one line naming the key),
and the loading of config files (whatever goes wrong in one is one line naming the file). Unit
calls; the key listing is tests/config/test_listing.py's, the flag checks tests/test_cli.py's."""

import os

import pytest

from tinyllama_jax import config as config_lib, kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  cfg.update_from_flattened_dict(overrides)
  return cfg


@pytest.mark.parametrize("name", ["tiny", "120m", "1b"])
def test_shipped_configs_are_valid(name):
  config_lib.validate(config_lib.load_config_file(os.path.join(REPO, "configs", f"{name}.py")),
                      n_batch_devices=1)


@pytest.mark.parametrize("overrides, fragment", [
    ({"train.steps": 0}, "train.steps=0 must be >= 1"),
    ({"train.steps": -5}, "train.steps=-5 must be >= 1"),
    ({"optim.lr": -1e-3}, "optim.lr=-0.001 must be a finite number > 0"),
    ({"optim.lr": 0.0}, "optim.lr=0.0 must be a finite number > 0"),
    ({"optim.lr": float("nan")}, "optim.lr=nan must be a finite number > 0"),
    ({"optim.lr": float("inf")}, "optim.lr=inf must be a finite number > 0"),
    ({"optim.min_lr": -1.0}, "optim.min_lr=-1.0 must be a finite number >= 0"),
    ({"optim.min_lr": 1.0}, "optim.min_lr (1.0) is above optim.lr (0.003)"),
    ({"optim.warmup_steps": -1}, "optim.warmup_steps=-1 must be >= 0"),
    ({"optim.decay_steps": -1}, "optim.decay_steps=-1 must be >= 0"),
    ({"optim.b1": 1.0}, "optim.b1=1.0 must be in [0, 1)"),
    ({"optim.b2": -0.1}, "optim.b2=-0.1 must be in [0, 1)"),
    ({"optim.eps": 0.0}, "optim.eps=0.0 must be a finite number > 0"),
    ({"optim.weight_decay": -0.1}, "optim.weight_decay=-0.1 must be a finite number >= 0"),
    ({"optim.clip_norm": -1.0}, "optim.clip_norm=-1.0 must be a finite number >= 0"),
    ({"train.eval_batches": 0}, "train.eval_batches=0 must be >= 1 while train.eval_every > 0 "
                                "(turn eval off with train.eval_every=0)"),
    ({"train.eval_every": -1}, "train.eval_every=-1 must be >= 0"),
    ({"train.checkpoint_every": -1}, "train.checkpoint_every=-1 must be >= 0"),
    ({"train.log_every": 0}, "train.log_every=0 must be >= 1"),
    ({"train.global_batch": 0}, "train.global_batch=0 must be >= 1"),
    ({"train.micro_batch_per_device": 0}, "train.micro_batch_per_device=0 must be >= 1"),
    ({"train.global_batch": 24}, "train.global_batch (24) must be a multiple of "
                                 "train.micro_batch_per_device (16)"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints=0 must be >= 1"),
    ({"train.seq_len": 4096}, "train.seq_len (4096) exceeds model.max_seq_len (256)"),
    ({"train.nan_policy": "ignore"}, "train.nan_policy='ignore' must be one of stop, skip"),
    ({"train.grace_period_s": 0.0}, "train.grace_period_s=0.0 must be a finite number > 0"),
    ({"model.n_layers": 0}, "model.n_layers=0 must be >= 1"),
    ({"model.vocab_size": 0}, "model.vocab_size=0 must be >= 1"),
    ({"model.n_kv_heads": 3}, "model.n_heads (4) must be a multiple of model.n_kv_heads (3)"),
    ({"model.head_dim": 33}, "model.head_dim (33) must be even for RoPE"),
    ({"model.remat": "some"}, "model.remat='some' must be one of none, full, save_dots"),
    ({"model.compute_dtype": "fp8"}, "model.compute_dtype='fp8' must be one of auto, bfloat16"),
    ({"model.matmul_dtype": "fp16"}, "model.matmul_dtype='fp16' must be one of bf16, fp8"),
    ({"model.fp8_gemm_output": "fp16"}, "model.fp8_gemm_output='fp16' must be one of float32, "
                                        "bfloat16"),
    ({"model.kernels.attention": "flash"}, "model.kernels.attention='flash' must be one of auto, "
                                           "cudnn, mgpu, pallas"),  # + plan's stand-in once registered
    ({"model.kernels.cross_entropy": "x"}, "model.kernels.cross_entropy='x' must be one of "
                                           "chunked, xla"),
    ({"data.tokenizer_vocab_size": 4096}, "data.tokenizer_vocab_size (4096) exceeds "
                                          "model.vocab_size (2048)"),
    ({"data.tokenizer_vocab_size": 4096, "data.source": "text", "data.paths": "x"},
     "data.tokenizer_vocab_size (4096) exceeds"),
    ({"data.source": "web"}, "data.source='web' must be one of stdlib, synthetic"),
    ({"data.packing": "fit"}, "data.packing='fit' must be one of concat, first_fit, best_fit"),
    ({"data.source": "text"}, "data.source='text' needs data.paths"),
    ({"data.eval_fraction": 1.0}, "data.eval_fraction=1.0 must be in [0, 1)"),
    ({"data.packing": "first_fit", "model.kernels.attention": "cudnn"}, "cannot"),
    ({"model.kernels.attention": "splash", "train.seq_len": 100}, "needs train.seq_len (100) to "
                                                                 "be a multiple of 128"),
    ({"model.kernels.attention": "mgpu", "train.seq_len": 100}, "'mgpu' needs train.seq_len "
                                                               "(100) to be a multiple of 128"),
    ({"data.packing": "first_fit", "model.kernels.attention": "mgpu"}, "'mgpu' cannot"),
    ({"model.kernels.decode_layer": "pallas", "model.scan_layers": True},
     "decode_layer='pallas' needs model.scan_layers=False"),
    ({"mesh.fsdp": 0}, "mesh.fsdp=0 must be -1 (all remaining devices) or >= 1"),
    ({"seed": -1}, "seed=-1 must be >= 0"),
    ({"train.steps": None}, "train.steps=None must be >= 1"),
    ({"peak_flops": -1.0}, "peak_flops=-1.0 must be a finite number >= 0"),
])
def test_validate_names_the_key_and_the_bound(overrides, fragment):
  with pytest.raises(ValueError) as e:
    config_lib.validate(tiny(**overrides))
  assert fragment in str(e.value)
  assert "\n" not in str(e.value)


# A value out of each kind of bound, typed as the key's default is.
_OUT_OF_BOUNDS = {config_lib._POSITIVE: 0, config_lib._NON_NEGATIVE: -1,
                  config_lib._POSITIVE_REAL: 0.0, config_lib._NON_NEGATIVE_REAL: -1.0,
                  config_lib._FRACTION: 1.0, config_lib._MESH_AXIS: 0}


@pytest.mark.parametrize("key, rule, hint", config_lib._BOUNDS, ids=[r[0] for r in config_lib._BOUNDS])
def test_every_bound_names_the_key_the_bound_and_the_hint(key, rule, hint):
  bad = _OUT_OF_BOUNDS[rule]
  with pytest.raises(ValueError) as e:
    config_lib.validate(tiny(**{key: bad}))
  assert str(e.value) == f"{key}={bad!r} {rule[1]}" + (f" ({hint})" if hint else "")


def test_every_declared_choice_is_checked_and_its_default_is_one_of_them():
  defaults = dict(config_lib.flat_items(config_lib.base_config()))
  declared = config_lib.choices()
  assert {"model.remat", "model.compute_dtype", "model.kernels.attention", "train.nan_policy",
          "data.source", "data.packing"} <= declared.keys()
  for key, allowed in declared.items():
    assert defaults[key] in allowed, key
    with pytest.raises(ValueError) as e:
      config_lib.validate(tiny(**{key: "nope"}))
    assert str(e.value) == f"{key}='nope' must be one of {', '.join(allowed)}"


def test_declared_choices_are_the_ones_the_code_acts_on():
  from tinyllama_jax import kernels, model
  assert set(config_lib.REMATS) == set(model.REMAT_POLICIES)
  assert config_lib.choices()["model.kernels.rope"] == tuple(kernels.backends("rope"))
  kernels.register("rope", "test_backend", "tinyllama_jax.kernels.rope:rope_ref")
  try:  # a backend registered later (plan's attention stand-in) is a choice from then on
    assert "test_backend" in config_lib.choices()["model.kernels.rope"]
    config_lib.validate(tiny(**{"model.kernels.rope": "test_backend"}))
  finally:
    kernels.unregister("rope", "test_backend")


def test_retired_kernels_are_no_choice():
  """The kernels measured slower than XLA or cuDNN on every card (docs/kernels.md, "Retired")
  are gone: an override naming them is an unknown key or an unknown choice."""
  choices = config_lib.choices()
  assert "model.kernels.decode_gemv" not in choices
  assert "model.kernels.attention_cache" not in choices
  assert "tokamax" not in choices["model.kernels.attention"]
  assert choices["model.kernels.rope"] == ("xla",)
  assert kernels.backends("swiglu") == ["xla"]  # separate gate and up: the Pallas pair lost
  assert choices["model.kernels.swiglu"] == ("auto", "pallas", "xla")  # the packed kernel's
  with pytest.raises(ValueError, match="must be one of"):
    config_lib.validate(tiny(**{"model.kernels.attention": "tokamax"}))


def test_a_plain_config_holds_plain_values():
  """choice() returns the default itself: config.json and checkpoint metadata see plain values."""
  cfg = config_lib.base_config()
  assert type(cfg.model.remat) is str and type(cfg.data.packing) is str
  assert '"remat": "none"' in config_lib.to_json(cfg)


def test_a_tokenizer_that_is_not_trained_is_not_held_to_tokenizer_vocab_size():
  config_lib.validate(tiny(**{"data.tokenizer_vocab_size": 4096, "data.source": "prepared",
                              "data.paths": "x"}))
  config_lib.validate(tiny(**{"data.tokenizer_vocab_size": 4096, "data.tokenizer": "t.model"}))


def test_zero_means_off_where_documented():
  config_lib.validate(tiny(**{"train.eval_every": 0, "train.eval_batches": 0,
                              "train.checkpoint_every": 0,
                              "optim.clip_norm": 0.0, "train.sample_tokens": 0}))


def test_the_batch_is_checked_on_the_mesh_it_will_run_on():
  cfg = tiny()
  config_lib.validate(cfg, n_batch_devices=1)
  with pytest.raises(ValueError, match=r"train.global_batch \(16\) must be a multiple of "
                                       r"train.micro_batch_per_device x batch devices \(16 x 3 = 48\)"):
    config_lib.validate(cfg, n_batch_devices=3)
  cfg.train.micro_batch_per_device = 1
  with pytest.raises(ValueError, match=r"the micro-batch, train.micro_batch_per_device x batch "
                                       r"devices \(2\), must divide over the 4 processes"):
    config_lib.validate(cfg, n_batch_devices=2, n_processes=4)


def test_every_number_and_choice_has_a_rule():
  """A key added to base_config() with a number in it needs its bound in the table."""
  cfg = config_lib.base_config()
  ruled = {key for key, _, _ in config_lib._rules()}

  def value(key):
    node = cfg
    for part in key.split("."):
      node = node[part]
    return node

  unruled = [k for k in config_lib.flat_keys(cfg) if k not in ruled
             and isinstance(value(k), (int, float)) and not isinstance(value(k), bool)]
  assert unruled == []


@pytest.mark.parametrize("text, fragment", [
    ("def get_config(:\n  pass\n", "failed: SyntaxError at line 1: invalid syntax"),
    ("raise RuntimeError('boom\\nsecond line')\n", "failed: RuntimeError: boom second line"),
    ("def get_config():\n  return 42\n", "failed: get_config() returned int, not an "
                                         "ml_collections.ConfigDict"),
    ("def get_config():\n  return {}['x']\n", "failed: KeyError: 'x'"),
    ("X = 1\n", "defines no get_config()"),
])
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, text, fragment):
  path = tmp_path / "x.py"
  path.write_text(text)
  with pytest.raises(ValueError) as e:
    config_lib.load_config_file(str(path))
  assert str(e.value).startswith(f"config file {path}") and fragment in str(e.value), e.value
  assert "\n" not in str(e.value)


def test_a_broken_sweep_file_is_one_line_naming_it(tmp_path):
  from tinyllama_jax.sweeps import grid as sweep
  path = tmp_path / "s.py"
  path.write_text("def get_sweep():\n  return 1 / 0\n")
  with pytest.raises(ValueError, match=f"sweep file {path} failed: ZeroDivisionError: division by"):
    sweep.load_sweep_file(str(path))
