"""Config defaults, checks and loading: every key a run can set lives in `base_config()`.

Config files (configs/*.py) start from `base_config()` and change fields; the command line
overrides any dotted key (`--config.optim.lr=3e-4`). Configs are locked, so a typo is an
error, and `check_override_keys` names the closest valid keys before anything starts. A key
with a fixed set of values declares them beside its default (`choice(default, VALUES)`), and the
comment beside a default is its help: `python -m tinyllama_jax.config --config=F` lists them all
(listing.py; the command is __main__.py, above the layer it lists).
"""

import difflib
import importlib.util
import json
import math
import os

import ml_collections

from tinyllama_jax import kernels
from tinyllama_jax.choices import Choice, choice, declaring
from tinyllama_jax.data.config import data_config  # the data package owns its defaults

# The choices of keys below, plain tuples so this module needs no jax. REMATS names
# model.REMAT_POLICIES' policies (tests/test_config.py checks the two agree).
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")  # auto: bfloat16 on GPU/TPU, float32 on CPU
REMATS = ("none", "full", "save_dots", "save_attn", "save_qkv_attn", "save_all_but_mlp")
# The ops whose backend 'auto' picks per device (model.py); model.kernels.swiglu names the
# kernel of the fused gate/up projection (swiglu_packed): separate gate and up take XLA's.
AUTO_KERNELS = ("attention", "swiglu_packed")
NAN_POLICIES = ("stop", "skip")
MATMUL_DTYPES = ("bf16", "fp8")
FP8_GEMM_OUTPUTS = ("float32", "bfloat16")
DECODE_LAYERS = ("auto", "xla", "pallas")


def _backends(op):
  """model.kernels.<op>'s choices when asked: the backends registered then (plan registers a
  stand-in), and 'auto' for the ops the model resolves."""
  return lambda: (("auto",) if op in AUTO_KERNELS else ()) + tuple(kernels.backends(op))


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
  c.compute_dtype = choice("auto", COMPUTE_DTYPES)  # auto: bfloat16 on GPU/TPU, float32 on CPU
  # The block's dense GEMMs (qkv, o-proj, gate/up, down). bf16: in the compute dtype. fp8: FP8
  # GEMMs (cuBLASLt on Hopper, emulated elsewhere): e4m3 activations and weights, e5m2 output
  # gradients, per-tensor scales from each step's amax (no state: resume stays exact). The
  # embedding, lm_head and loss, the master weights and the optimizer do not change.
  c.matmul_dtype = choice("bf16", MATMUL_DTYPES)
  # What fp8's GEMMs write: bfloat16 from the GEMM itself (1.22x bf16 at 1b on an H200), or
  # float32 and then a convert kernel to the compute dtype (1.10x: one fp32 write and read of each
  # output more; docs/performance.md, FP8).
  c.fp8_gemm_output = choice("bfloat16", FP8_GEMM_OUTPUTS)
  c.scan_layers = False  # unrolled ran 15% faster on one H200 at 1b (bench/NOTES.md)
  c.remat = choice("none", REMATS)  # which activations the backward recomputes (model.py)
  # One [D, (H + 2K) Dh] matmul for q, k, v and one [D, 2F] for gate and up (weights concatenated
  # in bf16 each step; the stored layout does not change): fewer, larger GEMMs.
  c.fuse_projections = True
  # Keep gate and up, not also their SwiGLU product, for the backward: 5632 bf16 values a token
  # a layer (3.8 GiB at 1b, 8 x 2048) for one elementwise pass more per layer.
  c.recompute_mlp_act = False
  # The backend of each fused op. XLA's own fusions matched or beat the Pallas RMSNorm/RoPE/SwiGLU
  # kernels on the H200 over forward + backward; the chunked cross-entropy was 1.24x faster and
  # 4.6x leaner (bench/NOTES.md).
  c.kernels = ml_collections.ConfigDict()
  # auto: cuDNN on GPU for one document a row, the Pallas flash kernel for packed rows, else xla
  c.kernels.attention = choice("auto", _backends("attention"))
  c.kernels.rms_norm = choice("xla", _backends("rms_norm"))  # also the norm fused with the add
  c.kernels.rope = choice("xla", _backends("rope"))  # XLA's fusion: the Pallas kernel lost
  # The fused gate/up projection's SwiGLU. auto: Pallas on GPU, else xla. Separate gate and up
  # (fuse_projections=False) always take XLA's: its fusions beat the Pallas pair there.
  c.kernels.swiglu = choice("auto", _backends("swiglu_packed"))
  # xla materialises the [tokens, vocab] logits; chunked never holds them whole
  c.kernels.cross_entropy = choice("chunked", _backends("cross_entropy"))
  # A decode step's layer (at most 16 new tokens a step): xla runs the block's own ops (~22
  # kernels a layer); pallas the five fused kernels of kernels/decode_layer.py, over the weights
  # transposed once before the loop (a second copy of the layers' weights while decoding). auto:
  # pallas on a GPU for steps of one token (batch 1), where it won (1.37x at 1b on an H100), xla
  # for more rows, where its 16-row dots lost (0.61x), and elsewhere (docs/kernels.md).
  c.kernels.decode_layer = choice("auto", DECODE_LAYERS)
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
  c.clip_norm = 1.0  # global gradient norm; 0 = no clipping
  return c


def train_config():
  c = ml_collections.ConfigDict()
  c.steps = 1_430_512  # optimizer steps
  c.seq_len = 2048
  c.global_batch = 1024  # sequences per optimizer step, all devices and micro-batches together
  c.micro_batch_per_device = 8  # sequences per device per forward/backward; the rest accumulates
  c.log_every = 10  # >= 1; the last step is always logged (steps: only the last)
  c.eval_every = 5000  # 0 = no eval at all; else every this many steps and at the last
  c.eval_batches = 16
  c.checkpoint_every = 5000  # 0 = only the final one; the last step and preemption always save
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.sample_tokens = 0  # >0: print a greedy sample of this many tokens at the end
  # The sample's prompt; '' = the first tokens of the first eval document (train's without eval)
  c.sample_prompt = ""
  # Appended to XLA_FLAGS before the backend starts; a flag the environment already sets wins.
  # None pays measurably at 1b on one H200 (command buffers off, cuBLASLt, no Triton GEMMs: all
  # within the +-1% run-to-run noise; bench/NOTES.md), so none is set by default.
  c.xla_flags = ""
  # Faults (tinyllama_jax/faults.py). SIGTERM/SIGINT: finish the step, save, exit 0 within this.
  c.grace_period_s = 60.0
  # No step completed in this many seconds (a hung collective, file system or writer): every
  # thread's stack goes to the log and the run exits 3. Saves, the compile and the final sample
  # are not timed. 0 = no watchdog.
  c.hang_timeout_s = 1800.0
  # Non-finite loss or gradients: 'stop' (exit with an error) or 'skip' (drop that update, count
  # it, stop once more than max_nan_skips were dropped). Either way the state stays finite.
  c.nan_policy = choice("stop", NAN_POLICIES)
  c.max_nan_skips = 20
  # Resume onto data that changed since the checkpoint (another prepare into the same folder,
  # files added): restart the data stream from its beginning, with a warning, instead of refusing.
  c.allow_data_change = False
  # A run's workdir (or an import from `export --from_hf`) to start from: its parameters, with a
  # fresh optimizer, step 0 and schedule (fine-tuning); the model fields must match its. Only on
  # a fresh start: a workdir with checkpoints resumes them. '' = a random init.
  c.init_from = ""
  # lm-evaluation-harness tasks on the live parameters (training/task_eval.py; needs the [eval]
  # extra): comma-separated names ('tinyllama': TinyLlama's seven), every this many steps (0:
  # only at the last step), at most this many documents a task (0: all), task YAMLs from here.
  c.eval_tasks = ""
  c.eval_tasks_every = 0
  c.eval_tasks_limit = 0
  c.eval_tasks_include_path = ""
  # Weights & Biases (optional `wandb`): the scalars tensorboard gets and the resolved config;
  # '' = off. A resumed run continues its W&B run (the id is kept in WORKDIR/wandb_run_id).
  c.wandb_project = ""
  c.wandb_entity = ""
  c.wandb_run_name = ""
  return c


def mesh_config():
  c = ml_collections.ConfigDict()
  c.data = 1
  c.fsdp = -1  # -1: all remaining devices
  c.tensor = 1
  return c


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.optim = optim_config()
  c.train = train_config()
  c.mesh = mesh_config()
  c.data = data_config()
  c.peak_flops = 0.0  # per device, for MFU; 0: from the device-kind table in peak_flops.py
  return c


def flat_items(tree, prefix=""):
  """('a.b.c', value) for each leaf of a nested ConfigDict, or of its to_dict() (a checkpoint's
  saved config), in the tree's order."""
  for k, v in tree.items():
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      yield from flat_items(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def flat_keys(cfg):
  return [k for k, _ in flat_items(cfg)]


def unknown_key_message(key, cfg):
  close = difflib.get_close_matches(key, flat_keys(cfg), n=3, cutoff=0.5)
  hint = f"; did you mean {', '.join(close)}?" if close else ""
  return f"unknown config key {key!r}{hint}"


def load_config_file(path):
  """Runs a config file's get_config(); whatever goes wrong is one ValueError line naming the
  file: a syntax error with its line, an exception inside the file, a result that is no config."""
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist (try --config=configs/tiny.py)")
  cfg, _ = run_file_function(path, "get_config", "config file",
                             "add one that returns config.base_config() with your changes")
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ValueError(f"config file {path} failed: get_config() returned {type(cfg).__name__}, "
                     "not an ml_collections.ConfigDict (return config.base_config(), changed)")
  return cfg


def run_file_function(path, name, what, hint):
  """(the result of `name`() in the Python file at `path`, the module), where everything that goes
  wrong, in the file or in the function, is one ValueError line naming `what` and `path`."""
  spec = importlib.util.spec_from_file_location(f"_tinyllama_{name}", path)
  if spec is None:
    raise ValueError(f"{what} {path!r} cannot be loaded: give a .py file with {name}()")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  # Whatever a config file raises is its author's to fix; SystemExit too: a file that calls
  # sys.exit() would end the command silently, with the file's status.
  except (Exception, SystemExit) as e:  # noqa: BLE001
    raise ValueError(_failed(what, path, e)) from None
  function = getattr(module, name, None)
  if not callable(function):
    raise ValueError(f"{what} {path} defines no {name}(): {hint}")
  try:
    return function(), module
  except (Exception, SystemExit) as e:  # noqa: BLE001
    raise ValueError(_failed(what, path, e)) from None


def _failed(what, path, error):
  if isinstance(error, SyntaxError):
    return f"{what} {path} failed: SyntaxError at line {error.lineno}: {error.msg}"
  if isinstance(error, SystemExit):
    return (f"{what} {path} called sys.exit({error.code!r}): a {what} is only read, its "
            "function returns its value; remove the exit")
  text = " ".join(str(error).split())
  return f"{what} {path} failed: {type(error).__name__}" + (f": {text}" if text else "")


def to_json(cfg):
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- validation
#
# Every bound, choice and cross-field rule of a config, checked by `validate` before a run
# touches data, a tokenizer or the compiler: train, plan and sweep call it. One row per key:
# (key, rule, hint), from the bounds below and the choices each key declares beside its default.

# A rule: (test of the value, what the value must be).
_POSITIVE = (lambda v: v >= 1, "must be >= 1")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_POSITIVE_REAL = (lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
_NON_NEGATIVE_REAL = (lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
_FRACTION = (lambda v: 0 <= v < 1, "must be in [0, 1)")
_MESH_AXIS = (lambda v: v == -1 or v >= 1, "must be -1 (all remaining devices) or >= 1")


def _one_of(choices):
  return (lambda v: v in choices, f"must be one of {', '.join(map(str, choices))}")


def choices():
  """{dotted key: its allowed values} for every key declared with choice(), as they are now."""
  with declaring():
    declared = base_config()
  return {key: value.allowed() for key, value in flat_items(declared)
          if isinstance(value, Choice)}


# The bounds of the numbers; the keys with choices are checked against their declared choices.
_BOUNDS = [
    ("seed", _NON_NEGATIVE, ""),
    ("model.vocab_size", _POSITIVE, ""),
    ("model.d_model", _POSITIVE, ""),
    ("model.n_layers", _POSITIVE, ""),
    ("model.n_heads", _POSITIVE, ""),
    ("model.n_kv_heads", _POSITIVE, ""),
    ("model.head_dim", _POSITIVE, ""),
    ("model.ffn_dim", _POSITIVE, ""),
    ("model.max_seq_len", _POSITIVE, ""),
    ("model.rope_theta", _POSITIVE_REAL, ""),
    ("model.norm_eps", _POSITIVE_REAL, ""),
    ("model.init_std", _NON_NEGATIVE_REAL, "0 = TinyLlama's sqrt(2 / (5 d_model))"),
    ("optim.lr", _POSITIVE_REAL, "the peak learning rate, e.g. 3e-4"),
    ("optim.min_lr", _NON_NEGATIVE_REAL, "where the cosine ends"),
    ("optim.warmup_steps", _NON_NEGATIVE, ""),
    ("optim.decay_steps", _NON_NEGATIVE, "0 = the cosine ends at train.steps"),
    ("optim.b1", _FRACTION, ""),
    ("optim.b2", _FRACTION, ""),
    ("optim.eps", _POSITIVE_REAL, ""),
    ("optim.weight_decay", _NON_NEGATIVE_REAL, ""),
    ("optim.clip_norm", _NON_NEGATIVE_REAL, "0 = no clipping"),
    ("train.steps", _POSITIVE, "optimizer steps to train"),
    ("train.seq_len", _POSITIVE, ""),
    ("train.global_batch", _POSITIVE, "sequences per optimizer step"),
    ("train.micro_batch_per_device", _POSITIVE, ""),
    ("train.log_every", _POSITIVE, "train.log_every=train.steps logs only the last step"),
    ("train.eval_every", _NON_NEGATIVE, "0 = no eval"),
    ("train.eval_batches", _NON_NEGATIVE, ""),  # and >= 1 while eval is on: below
    ("train.checkpoint_every", _NON_NEGATIVE, "0 = only the final checkpoint"),
    ("train.keep_checkpoints", _POSITIVE, ""),
    ("train.sample_tokens", _NON_NEGATIVE, "0 = no sample"),
    ("train.grace_period_s", _POSITIVE_REAL,
     "seconds a preempted run has to save; schedulers give 30 to 120"),
    ("train.hang_timeout_s", _NON_NEGATIVE_REAL, "0 = no step watchdog"),
    ("train.max_nan_skips", _NON_NEGATIVE, ""),
    ("train.eval_tasks_every", _NON_NEGATIVE, "0 = only at the last step"),
    ("train.eval_tasks_limit", _NON_NEGATIVE, "0 = every document"),
    ("mesh.data", _MESH_AXIS, ""),
    ("mesh.fsdp", _MESH_AXIS, ""),
    ("mesh.tensor", _MESH_AXIS, ""),
    ("data.num_packing_bins", _POSITIVE, ""),
    ("data.tokenizer_vocab_size", _POSITIVE, ""),
    ("data.tokenizer_train_bytes", _POSITIVE, ""),
    ("data.eval_fraction", _FRACTION, ""),
    ("data.num_workers", _NON_NEGATIVE, "0 = in-process"),
    ("data.worker_buffer_size", _POSITIVE, ""),
    ("peak_flops", _NON_NEGATIVE_REAL, "0 = from the device-kind table"),
]


def _rules():
  """(key, rule, hint) rows: the bounds, and every declared choice."""
  return _BOUNDS + [(key, _one_of(allowed), "") for key, allowed in choices().items()]


def _cross_field_problems(cfg):
  """Rules between keys, each a message naming them and the fix."""
  m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
  if t.seq_len > m.max_seq_len:
    yield (f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}): shorten "
           "the sequence or raise model.max_seq_len")
  if m.n_heads % m.n_kv_heads:
    yield (f"model.n_heads ({m.n_heads}) must be a multiple of model.n_kv_heads "
           f"({m.n_kv_heads})")
  if m.head_dim % 2:
    yield f"model.head_dim ({m.head_dim}) must be even for RoPE"
  if m.kernels.attention == "splash" and t.seq_len % 128:
    yield (f"model.kernels.attention='splash' needs train.seq_len ({t.seq_len}) to be a multiple "
           "of 128: change the length or use attention=auto or xla")
  if m.kernels.attention == "mgpu" and t.seq_len % 128:
    yield (f"model.kernels.attention='mgpu' needs train.seq_len ({t.seq_len}) to be a multiple "
           "of 128: change the length or use attention=pallas")
  if m.kernels.decode_layer == "pallas" and m.scan_layers:
    yield ("model.kernels.decode_layer='pallas' needs model.scan_layers=False (a cache per "
           "layer): set scan_layers=False or decode_layer=xla")
  if o.min_lr > o.lr:
    yield f"optim.min_lr ({o.min_lr}) is above optim.lr ({o.lr}): lower min_lr or raise lr"
  if d.tokenizer_vocab_size > m.vocab_size and d.source in ("stdlib", "text") and not d.tokenizer:
    # the tokenizer this run trains; a prepared folder's own is checked once it is loaded
    yield (f"data.tokenizer_vocab_size ({d.tokenizer_vocab_size}) exceeds model.vocab_size "
           f"({m.vocab_size}): raise the model's vocab_size or train a smaller tokenizer")
  if t.eval_every and t.eval_batches < 1:
    yield (f"train.eval_batches={t.eval_batches} must be >= 1 while train.eval_every > 0 (turn "
           "eval off with train.eval_every=0)")
  for key, module, install in (("eval_tasks", "lm_eval", '-e ".[eval]"'),
                               ("wandb_project", "wandb", "wandb")):
    if t.get(key) and importlib.util.find_spec(module) is None:  # said before the compile
      yield f"train.{key} needs {module}, which is not installed: pip install {install}"
  if t.global_batch % t.micro_batch_per_device:
    yield (f"train.global_batch ({t.global_batch}) must be a multiple of "
           f"train.micro_batch_per_device ({t.micro_batch_per_device})")
  if d.source == "chat" and not d.paths:
    yield ("data.source='chat' needs data.paths: the chat files (.jsonl/.jsonl.zst/.parquet rows "
           "with a 'messages' list), e.g. --config.data.paths='/data/ultrachat/*.parquet'")
  if d.source in ("text", "prepared", "litpkds") and not d.paths:
    yield f"data.source={d.source!r} needs data.paths (a glob, or the prepared folder)"
  if d.source == "chat" and d.packing == "concat":
    yield ("data.source='chat' packs whole conversations with their loss masks: set "
           "data.packing=first_fit (or best_fit)")
  if d.source == "chat" and not d.tokenizer and not t.init_from:
    yield ("data.source='chat' needs a tokenizer: set train.init_from to the run to fine-tune "
           "(its tokenizer is used) or data.tokenizer to a sentencepiece .model")
  if d.packing != "concat" and m.kernels.attention in ("cudnn", "mgpu"):
    yield (f"data.packing={d.packing!r} masks attention per document, which "
           f"model.kernels.attention={m.kernels.attention!r} cannot: use auto, pallas or xla, or "
           "packing=concat")


def _batch_problems(cfg, n_batch_devices, n_processes):
  t = cfg.train
  micro = t.micro_batch_per_device * n_batch_devices
  if t.global_batch % micro:
    yield (f"train.global_batch ({t.global_batch}) must be a multiple of "
           f"train.micro_batch_per_device x batch devices ({t.micro_batch_per_device} x "
           f"{n_batch_devices} = {micro}): change either, or the mesh")
  if micro % n_processes:
    yield (f"the micro-batch, train.micro_batch_per_device x batch devices ({micro}), must "
           f"divide over the {n_processes} processes: change it or the number of processes")


def validate(cfg, n_batch_devices=None, n_processes=1):
  """Raises one ValueError line naming the first key out of bounds and the fix. With the batch
  devices of the mesh (data x fsdp) and the process count, also the batch's divisibility."""
  for key, (test, requirement), hint in _rules():
    value = cfg
    for part in key.split("."):
      value = value[part]
    try:
      ok = test(value)
    except TypeError:  # None, or a config file's value of another type
      ok = False
    if not ok:
      raise ValueError(f"{key}={value!r} {requirement}" + (f" ({hint})" if hint else ""))
  problem = next(_cross_field_problems(cfg), None)
  if problem is None and n_batch_devices is not None:
    problem = next(_batch_problems(cfg, n_batch_devices, n_processes), None)
  if problem is not None:
    raise ValueError(problem)


def requirements():
  """{key: what validate holds it to}, e.g. 'must be a finite number > 0' (listing.py shows it)."""
  return {key: requirement for key, (_, requirement), _ in _rules()}
