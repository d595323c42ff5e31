"""Config defaults and helpers: every key a run can set lives in `base_config()`.

Config files (configs/*.py) start from `base_config()` and change fields; the command line
overrides any dotted key (`--config.optim.lr=3e-4`). Configs are locked, so a typo is an
error, and `check_override_keys` names the closest valid keys before anything starts.
"""

import difflib
import importlib.util
import json
import sys

import ml_collections


def model_config():
  c = ml_collections.ConfigDict()
  c.vocab_size = 32000
  c.d_model = 2048
  c.n_layers = 22
  c.n_heads = 32
  c.n_kv_heads = 4
  c.head_dim = 64
  c.ffn_dim = 5632
  c.max_seq_len = 2048
  c.rope_theta = 10000.0
  c.norm_eps = 1e-5
  c.init_std = 0.0  # 0: TinyLlama's sqrt(2 / (5 d))
  c.compute_dtype = "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
  c.scan_layers = False  # unrolled ran 15% faster on one H200 at 1b (bench/NOTES.md)
  c.remat = "none"  # see model.REMAT_POLICIES
  # One [D, (H + 2K) Dh] matmul for q, k, v and one [D, 2F] for gate and up (weights concatenated
  # in bf16 each step; the stored layout does not change): fewer, larger GEMMs.
  c.fuse_projections = True
  # Keep gate and up, not also their SwiGLU product, for the backward: 5632 bf16 values a token
  # a layer (3.8 GiB at 1b, 8 x 2048) for one elementwise pass more per layer.
  c.recompute_mlp_act = False
  c.kernels = ml_collections.ConfigDict()
  c.kernels.attention = "auto"  # auto | xla | cudnn | pallas
  # XLA's own fusions matched or beat the Pallas RMSNorm/RoPE/SwiGLU kernels on the H200 over
  # forward + backward; the chunked cross-entropy was 1.24x faster and 4.6x leaner (bench/NOTES.md).
  c.kernels.rms_norm = "xla"  # xla | pallas (also the norm fused with the residual add)
  c.kernels.rope = "xla"  # xla | pallas (q and k in one pass)
  c.kernels.swiglu = "auto"  # auto (Pallas for the fused gate/up on GPU, else xla) | xla | pallas
  c.kernels.cross_entropy = "chunked"  # chunked | xla (materialises the [tokens, vocab] logits)
  return c


def optim_config():
  c = ml_collections.ConfigDict()
  c.lr = 4e-4
  c.min_lr = 4e-5
  c.warmup_steps = 2000
  c.decay_steps = 0  # 0: cosine ends at train.steps
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.weight_decay = 0.1  # on all parameters, as TinyLlama did
  c.clip_norm = 1.0
  return c


def train_config():
  c = ml_collections.ConfigDict()
  c.steps = 1_430_512  # optimizer steps
  c.seq_len = 2048
  c.global_batch = 1024  # sequences per optimizer step, all devices and micro-batches together
  c.micro_batch_per_device = 8  # sequences per device per forward/backward; the rest accumulates
  c.log_every = 10
  c.eval_every = 5000
  c.eval_batches = 16
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.sample_tokens = 0  # >0: print a greedy sample of this many tokens at the end
  c.profile_steps = ""
  # Appended to XLA_FLAGS before the backend starts; a flag the environment already sets wins.
  # None pays measurably at 1b on one H200 (command buffers off, cuBLASLt, no Triton GEMMs: all
  # within the +-1% run-to-run noise; bench/NOTES.md), so none is set by default.
  c.xla_flags = ""
  # Faults (tinyllama_jax/faults.py). SIGTERM/SIGINT: finish the step, save, exit 0 within this.
  c.grace_period_s = 60.0
  # Non-finite loss or gradients: 'stop' (exit with an error) or 'skip' (drop that update, count
  # it, stop once more than max_nan_skips were dropped). Either way the state stays finite.
  c.nan_policy = "stop"
  c.max_nan_skips = 20
  # Test-only fault injection (the fault suite in tests/test_faults.py); never set in real runs.
  c.inject_nan_steps = ""  # comma-separated steps (1-based) whose loss and gradients become NaN
  c.inject_step_sleep_s = 0.0  # sleep after each step: a signal lands at a known step
  c.inject_save_sleep_s = 0.0  # sleep before a save is committed: a kill lands inside the save
  return c


def mesh_config():
  c = ml_collections.ConfigDict()
  c.data = 1
  c.fsdp = -1  # -1: all remaining devices
  c.tensor = 1
  return c


def base_config():
  from tinyllama_jax.data.config import data_config  # the data package owns its defaults
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.optim = optim_config()
  c.train = train_config()
  c.mesh = mesh_config()
  c.data = data_config()
  c.peak_flops = 0.0  # per device, for MFU; 0: from the device-kind table in metrics.py
  return c


def flat_keys(cfg, prefix=""):
  keys = []
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys += flat_keys(v, f"{prefix}{k}.")
    else:
      keys.append(f"{prefix}{k}")
  return keys


def unknown_key_message(key, cfg):
  close = difflib.get_close_matches(key, flat_keys(cfg), n=3, cutoff=0.5)
  hint = f"; did you mean {', '.join(close)}?" if close else ""
  return f"unknown config key {key!r}{hint}"


def load_config_file(path):
  """Runs a config file's get_config(), with a one-line error for a missing or broken file."""
  spec = importlib.util.spec_from_file_location("_tinyllama_config", path)
  if spec is None:
    raise ValueError(f"config file {path!r} cannot be loaded: give a .py file with get_config()")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except FileNotFoundError:
    raise ValueError(f"config file {path!r} does not exist (try --config=configs/tiny.py)")
  return module.get_config()


def check_flags(argv):
  """An unknown `--flag` in argv fails with one line naming the closest defined flags (absl's
  own message is two lines and exit 1). Call after the program defines its flags, before
  app.run. `--config=` / `--config.` arguments are check_override_keys' to check."""
  from absl import app, flags
  app.define_help_flags()  # --help, --helpshort, ... are defined by app.run otherwise
  known = set(flags.FLAGS)
  for arg in argv[1:]:
    if arg == "--":
      break
    if not arg.startswith("--") or arg.startswith(("--config=", "--config.")):
      continue
    name = arg[2:].split("=", 1)[0]
    if name in known or (name.startswith("no") and name[2:] in known):
      continue
    close = difflib.get_close_matches(name, sorted(known), n=3)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
    raise ValueError(f"unknown flag --{name}{hint} (--helpshort lists the flags)")


def check_override_keys(argv, flag="config"):
  """Validates `--config.a.b=...` overrides in argv before absl parses them, so a typo
  fails with the closest valid keys instead of a traceback; then every other flag's name."""
  check_flags(argv)
  path = None
  keys = []
  for arg in argv[1:]:
    if arg.startswith(f"--{flag}="):
      path = arg.split("=", 1)[1]
    elif arg.startswith(f"--{flag}."):
      keys.append(arg[len(flag) + 3:].split("=", 1)[0])
  if path is None:
    return
  cfg = load_config_file(path)
  valid = set(flat_keys(cfg))
  for key in keys:
    if key not in valid:
      raise ValueError(unknown_key_message(key, cfg))


def to_json(cfg):
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def exit_on_error(fn):
  """Runs fn(); a ValueError becomes one line on stderr and exit status 2."""
  try:
    return fn()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
