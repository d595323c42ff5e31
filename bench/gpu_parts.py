"""The parts `python -m bench.gpu` runs: each a function of a Part (its output names, its clock,
its commands) that runs the bench modules as child processes and returns the result files it
wrote. A part raises PartError (or any exception) to become an error row; the others go on.

Shapes and lengths are those the measurements in docs/performance.md were taken with; --smoke
swaps each for the tiny config on CPU (a check of the runner, not a measurement).
"""

import glob
import importlib.util
import json
import os
import shutil
import sys

from tinyllama_jax import kernels

PY = sys.executable
STEP_1B = ["--config=configs/1b.py", "--config.train.seq_len=2048",
           "--config.train.micro_batch_per_device=8", "--steps=20", "--warmup=3", "--window=5"]


class PartError(Exception):
  """A part's failure, in one line: its row's error."""


class PartSkipped(Exception):
  """A part with nothing to run here: a skipped row that says why."""


def env(part):
  """Device, driver and library versions (the row every table is read against)."""
  code = ("import json, platform, jax, bench; d = jax.devices(); print(json.dumps(dict("
          "python=platform.python_version(), backend=jax.default_backend(), devices=len(d), "
          "device_kind=d[0].device_kind, versions=bench.versions(), commit=bench.commit())))")
  out = part.run([PY, "-c", code], "env")
  info = json.loads(out.strip().splitlines()[-1])
  if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = part.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                                   "clocks.max.sm", "--format=csv,noheader"], "nvidia-smi")
  return [part.write_json("env", info)]


def step(part):
  """The 1b step: attention=auto (base) and cudnn, the plain JAX step and the torch peer in one
  call; each row a worker of `python -m bench`."""
  out = part.path("step.json")
  if part.smoke:
    args = ["--smoke", "--variants=base;xla:model.kernels.attention=xla", "--peer=",
            "--plain="]
  else:
    args = STEP_1B + ["--variants=base;cudnn:model.kernels.attention=cudnn", "--plain=plain",
                      "--peer=bf16", "--worker_timeout_s=150"]
  part.run([PY, "-m", "bench", *args, f"--deadline_s={part.inner_deadline()}",
            f"--out={out}"], "step", memory_fraction="0.92")
  return [out]


def fp8(part):
  """The step in bf16 and with the block's GEMMs in FP8, in one call."""
  out = part.path("fp8-step.json")
  variants = "--variants=base;fp8:model.matmul_dtype=fp8"
  args = (["--smoke", variants] if part.smoke else
          STEP_1B + [variants, "--worker_timeout_s=90"])
  part.run([PY, "-m", "bench", *args, "--plain=", "--peer=",
            f"--deadline_s={part.inner_deadline()}", f"--out={out}"], "fp8-step",
           memory_fraction="0.92")
  return [out]


def attention(part):
  """bench.attention_backends, and this card's rows of attention=auto's table: written beside
  the results and into tinyllama_jax/kernels/attention_auto.json (copy the returned file there
  to commit it)."""
  out, table = part.path("attention-backends.json"), part.path("attention_auto.json")
  part.run([PY, "-m", "bench.attention_backends", f"--out={out}", f"--write_table={table}"]
           + (["--quick"] if part.smoke else []), "attention-backends", memory_fraction="0.6")
  if not part.smoke:
    shutil.copyfile(table, kernels.AUTO_ATTENTION_TABLE)
  return [out, table]


def decode(part):
  """Ours (each --decode_kernels row set, with each --decode_xla_options set) against
  transformers eager and static cache + compile, batch 1 and 16, one process; the last row
  set's batch-1 call profiled."""
  out = part.path("decode.json")
  args = (["--config=configs/tiny.py", "--prompt_len=8", "--new_tokens=8", "--batches=1",
           "--dtypes=float32", "--no_torch"] if part.smoke else
          ["--batches=1,16", "--dtypes=bfloat16",
           f"--profile_dir={part.scratch('decode-profile')}"])
  part.run([PY, "-m", "bench.decode", *args, "--draft_tokens=",
            f"--kernels={part.decode_kernels}", f"--xla_options={part.decode_xla_options}",
            f"--deadline_s={part.inner_deadline()}",
            f"--out={out}"], "decode", memory_fraction="0.6")
  return [out]


def decode_layer(part):
  """bench.decode_layer: the fused decode layer's kernels against XLA's formula of each op, at
  1 and 16 rows, with their tile sweeps."""
  out = part.path("decode-layer.json")
  part.run([PY, "-m", "bench.decode_layer", f"--out={out}",
            f"--budget_s={part.inner_deadline()}"] + (["--smoke"] if part.smoke else []),
           "decode-layer", memory_fraction="0.6")
  return [out]


def spec(part):
  """A 1b target and a 4-layer d1024 draft trained on the stdlib text (one tokenizer), then
  speculative K=4 and K=6 at batch 1 against the target alone."""
  runs = part.scratch("spec")
  common = ["--config.train.seq_len=1024", "--config.train.eval_every=0",
            "--config.train.checkpoint_every=0", "--config.train.sample_tokens=0",
            "--config.optim.warmup_steps=20", "--config.train.log_every=50",
            "--config.train.global_batch=4", "--config.train.micro_batch_per_device=4"]
  if part.smoke:
    target = ["--config=configs/tiny.py", "--config.train.steps=4"]
    draft = ["--config=configs/tiny.py", "--config.train.steps=4", "--config.model.n_layers=1"]
    common = ["--config.train.seq_len=64", "--config.train.eval_every=0",
              "--config.train.checkpoint_every=0", "--config.train.sample_tokens=0",
              "--config.train.global_batch=2", "--config.train.micro_batch_per_device=2"]
  else:
    target = ["--config=configs/1b.py", "--config.train.steps=600", "--config.optim.lr=4e-4",
              "--config.data.tokenizer_vocab_size=8192",
              "--config.data.tokenizer_train_bytes=2000000"]
    draft = ["--config=configs/120m.py", "--config.train.steps=1500", "--config.optim.lr=1e-3",
             "--config.model.n_layers=4", "--config.model.d_model=1024",
             "--config.model.n_heads=16", "--config.model.n_kv_heads=4",
             "--config.model.ffn_dim=2816"]
  t_dir, d_dir = os.path.join(runs, "target"), os.path.join(runs, "draft")
  part.run([PY, "-m", "tinyllama_jax.train", f"--workdir={t_dir}", *target, *common],
           "spec-train-target", memory_fraction="0.9")
  tokenizer = os.path.join(t_dir, "tokenizer", "tokenizer.model")
  part.run([PY, "-m", "tinyllama_jax.train", f"--workdir={d_dir}", *draft, *common,
            f"--config.data.tokenizer={tokenizer}"], "spec-train-draft", memory_fraction="0.9")
  out = part.path("spec.json")
  part.run([PY, "-m", "bench.decode", f"--config={target[0].split('=', 1)[1]}",
            f"--target_workdir={t_dir}", f"--draft_workdir={d_dir}", "--batches=1",
            "--dtypes=" + ("float32" if part.smoke else "bfloat16"),
            "--draft_tokens=" + ("2" if part.smoke else "4,6"), "--only_speculative",
            *(["--prompt_len=8", "--new_tokens=8"] if part.smoke else []),
            f"--deadline_s={part.inner_deadline()}", f"--out={out}"], "spec",
           memory_fraction="0.6")
  shutil.rmtree(runs, ignore_errors=True)
  return [out]


def parity_args(part, steps, seed):
  if part.smoke:
    return ["--config=configs/tiny.py", f"--config.train.steps={steps}",
            "--config.train.eval_every=2", "--config.train.eval_batches=1",
            "--config.train.checkpoint_every=0", "--config.train.sample_tokens=0",
            f"--config.seed={seed}"]
  return ["--config=configs/1b.py", "--config.data.source=stdlib",
          "--config.data.tokenizer_vocab_size=32000",
          "--config.data.tokenizer_train_bytes=2000000", "--config.data.num_workers=4",
          f"--config.train.steps={steps}", "--config.train.seq_len=2048",
          "--config.train.global_batch=8", "--config.train.micro_batch_per_device=8",
          "--config.train.log_every=50", "--config.train.eval_every=100",
          "--config.train.eval_batches=8", "--config.train.checkpoint_every=0",
          "--config.train.sample_tokens=0", "--config.train.async_checkpoint=false",
          "--config.optim.warmup_steps=60", f"--config.optim.decay_steps={steps}",
          f"--config.seed={seed}"]


def parity(part):
  """bf16 against fp8 from one init: for each --parity_seeds seed, the 1b config trained on the
  stdlib corpus (real, non-repeating text) with one 32k tokenizer trained on it, 8 x 2048,
  --parity_steps steps (>= 600), held-out loss every 100; then each seed's paired difference
  and their mean and spread (bench.fp8_parity). One seed takes ~6 minutes on an H200."""
  root, tokenizer = part.scratch("parity"), None
  for seed in part.seeds:
    for dtype in ("bf16", "fp8"):
      workdir = os.path.join(root, f"seed{seed}-{dtype}")
      extra = [f"--config.data.tokenizer={tokenizer}"] if tokenizer else []
      part.run([PY, "-m", "tinyllama_jax.train", f"--workdir={workdir}",
                *parity_args(part, part.parity_steps, seed), *extra,
                f"--config.model.matmul_dtype={dtype}"], f"parity-seed{seed}-{dtype}",
               memory_fraction="0.92")
      tokenizer = tokenizer or os.path.join(workdir, "tokenizer", "tokenizer.model")
      shutil.copyfile(os.path.join(workdir, "metrics.jsonl"),
                      part.path(f"parity-seed{seed}-{dtype}-metrics.jsonl"))
      for checkpoints in glob.glob(os.path.join(workdir, "checkpoints")):
        shutil.rmtree(checkpoints)  # a 1b checkpoint is ~13 GB; the curves are in metrics.jsonl
  out = part.path("parity.json")
  part.run([PY, "-m", "bench.fp8_parity", f"--root={root}",
            "--seeds=" + ",".join(map(str, part.seeds)), f"--out={out}"], "parity")
  shutil.rmtree(root, ignore_errors=True)
  return [out] + [part.path(f"parity-seed{s}-{d}-metrics.jsonl") for s in part.seeds
                  for d in ("bf16", "fp8")]


def eval_speed(part):
  """`python -m bench.eval_speed` where the tree has it."""
  if importlib.util.find_spec("bench.eval_speed") is None:
    raise PartSkipped("bench.eval_speed is not in this tree")
  out = part.path("eval.json")
  part.run([PY, "-m", "bench.eval_speed", f"--out={out}"] + (["--smoke"] if part.smoke else []),
           "eval", memory_fraction="0.6")
  return [out]


def gemm(part):
  """XLA's GEMMs at the 1b step's shapes against FP8 and jax's Mosaic GPU matmul."""
  out = part.path("gemm.json")
  part.run([PY, "-m", "bench.gemm", f"--out={out}", f"--deadline_s={part.inner_deadline()}"]
           + (["--quick"] if part.smoke else []), "gemm", memory_fraction="0.92")
  return [out]


def kernel_rows(part):
  """bench.kernels: attention, cross-entropy and the row ops against XLA."""
  out = part.path("kernels.json")
  part.run([PY, "-m", "bench.kernels", f"--out={out}"] + (["--quick"] if part.smoke else []),
           "kernels", memory_fraction="0.92")
  return [out]


def sweeps(part):
  """The tile sweeps of the Pallas flash attention and the row kernels, every row checked
  against XLA in fp32."""
  att, rows = part.path("attention-sweep.json"), part.path("rows-sweep.json")
  quick = ["--quick"] if part.smoke else []
  part.run([PY, "-m", "bench.attention_sweep", f"--out={att}",
            f"--deadline_s={max(1, int(part.left() * 0.5))}", *quick], "attention-sweep",
           memory_fraction="0.6")
  part.run([PY, "-m", "bench.rows_sweep", f"--out={rows}", f"--budget={part.inner_deadline()}",
            *quick], "rows-sweep", memory_fraction="0.6")
  return [att, rows]


def gpu_tests(part):
  """The gpu-marked kernel tests (Triton and Mosaic GPU lowering, NaN-poisoned outputs)."""
  part.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *part.tests.split()],
           "gpu-tests", memory_fraction="0.6")
  return [part.log_path("gpu-tests")]


# name: (function, cap in seconds on a GPU, cap with --smoke). Order: what most runs need first.
PARTS = {
    "env": (env, 60, 60),
    "step": (step, 240, 240),
    "attention": (attention, 170, 240),
    "decode": (decode, 200, 200),
    "decode_layer": (decode_layer, 240, 200),
    "spec": (spec, 330, 300),
    "fp8": (fp8, 160, 240),
    "parity": (parity, 560, 300),
    "eval": (eval_speed, 200, 120),
    "gemm": (gemm, 220, 240),
    "kernels": (kernel_rows, 200, 240),
    "sweeps": (sweeps, 240, 300),
    "gpu_tests": (gpu_tests, 150, 240),
}
