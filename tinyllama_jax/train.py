"""Pretrain a Llama: `python -m tinyllama_jax.train --config=configs/tiny.py --workdir=runs/tiny`.

config -> checks -> mesh -> data -> state (fresh or restored) -> jitted step -> metrics and
checkpoints. The step is a pure function (state, batch) -> (state, metrics), compiled once ahead
of time with explicit shardings and the state donated; all I/O stays in the loop around it.
Rerunning the same command resumes from the workdir's latest checkpoint.
"""

import functools
import json
import logging as std_logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from tinyllama_jax import checkpoint, config as config_lib, distributed, kernels, metrics, optim, sharding
from tinyllama_jax.model import Llama, flops_per_token, param_count

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, tb/, config.json.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the step, print its memory plan, exit.")


# ----------------------------------------------------------------------------- checks


def check_config(cfg, n_devices, n_batch_devices, n_processes):
  """Every inconsistency that would otherwise surface as a shape error deep in a trace."""
  m, t = cfg.model, cfg.train
  if t.seq_len > m.max_seq_len:
    raise ValueError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
  if m.n_heads % m.n_kv_heads:
    raise ValueError(f"model.n_heads ({m.n_heads}) must be a multiple of model.n_kv_heads "
                     f"({m.n_kv_heads})")
  micro = t.micro_batch_per_device * n_batch_devices
  if t.global_batch % micro:
    raise ValueError(f"train.global_batch ({t.global_batch}) must be a multiple of "
                     f"micro_batch_per_device x batch devices ({t.micro_batch_per_device} x "
                     f"{n_batch_devices} = {micro})")
  if micro % n_processes:
    raise ValueError(f"the micro-batch ({micro}) must divide over {n_processes} processes")
  if cfg.data.get("tokenizer_vocab_size", 0) > m.vocab_size and not cfg.data.get("tokenizer"):
    raise ValueError(f"data.tokenizer_vocab_size ({cfg.data.tokenizer_vocab_size}) exceeds "
                     f"model.vocab_size ({m.vocab_size})")
  del n_devices


def check_workdir(workdir):
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
    raise ValueError(f"workdir {workdir!r} is not writable ({probe} is not a writable "
                     f"directory): pass another --workdir")


# ----------------------------------------------------------------------------- state and step


def make_init_fn(cfg, tx):
  def init(rng):
    model = Llama(cfg.model, rngs=nnx.Rngs(params=rng))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.fold_in(rng, 1)}
  return init


def model_graphdef(cfg):
  return nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(params=0))))


def loss_sums(params, batch, *, graphdef, cfg):
  """(sum of masked token losses, number of counted tokens) for one micro-batch."""
  model = nnx.merge(graphdef, params)
  segment_ids = batch["segment_ids"] if cfg.data.packing != "concat" else None
  h_BTD = model.hidden(batch["inputs"], batch["positions"], segment_ids)
  B, T, D = h_BTD.shape
  cross_entropy = kernels.get("cross_entropy", cfg.model.kernels.cross_entropy)
  loss_N = cross_entropy(h_BTD.reshape(B * T, D), params["lm_head"].astype(h_BTD.dtype),
                         batch["targets"].reshape(B * T))
  mask_N = batch["loss_mask"].reshape(B * T)
  return jnp.sum(loss_N * mask_N), jnp.sum(mask_N)


def train_step(state, batch_AMT, *, graphdef, cfg, tx, schedule):
  """One optimizer step over A accumulated micro-batches of M sequences of T tokens."""
  params = state["params"]
  grad_fn = jax.value_and_grad(
      functools.partial(loss_sums, graphdef=graphdef, cfg=cfg), has_aux=True)

  def accumulate(carry, micro_batch):
    grads, loss_sum, count = carry
    (micro_loss, micro_count), micro_grads = grad_fn(params, micro_batch)
    grads = jax.tree.map(jnp.add, grads, micro_grads)
    return (grads, loss_sum + micro_loss, count + micro_count), None

  if jax.tree.leaves(batch_AMT)[0].shape[0] == 1:  # no accumulation: no loop, no zeroed buffer
    (loss_sum, count), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch_AMT))
  else:
    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss_sum, count), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), batch_AMT)
  # Gradients of the mean over all counted tokens of the whole step, as one big batch would give.
  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
               "opt_state": opt_state, "rng": jax.random.fold_in(state["rng"], state["step"])}
  return new_state, {"train/loss": loss_sum / count, "train/grad_norm": optax.global_norm(grads),
                     "train/lr": schedule(state["step"]), "train/tokens": count}


def eval_step(params, batch, *, graphdef, cfg):
  return loss_sums(params, batch, graphdef=graphdef, cfg=cfg)


# ----------------------------------------------------------------------------- the run


class Run:
  """Everything a training run holds between steps; `train()` drives it."""

  def __init__(self, cfg, workdir):
    self.cfg, self.workdir = cfg, workdir
    self.mesh = sharding.make_mesh(cfg.mesh)
    n_batch_devices = sharding.batch_devices(self.mesh)
    check_config(cfg, jax.device_count(), n_batch_devices, jax.process_count())
    check_workdir(workdir)
    t = cfg.train
    self.micro_batch = t.micro_batch_per_device * n_batch_devices
    self.accum = t.global_batch // self.micro_batch
    self.tx, self.schedule = optim.make_optimizer(cfg.optim, t.steps)
    self.graphdef = model_graphdef(cfg)

    init = make_init_fn(cfg, self.tx)
    abstract = jax.eval_shape(init, jax.random.key(0))
    self.state_shardings = sharding.tree_shardings(abstract, self.mesh)
    self.abstract_state = checkpoint.abstract_like(abstract, self.state_shardings)
    self.batch_sharding = sharding.accum_batch_sharding(self.mesh)
    self.eval_sharding = sharding.batch_sharding(self.mesh)
    self._init = jax.jit(init, out_shardings=self.state_shardings)

    self.ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                        keep=t.keep_checkpoints, async_save=t.async_checkpoint)
    self.restore_step = self.ckpt.latest_step()
    if self.restore_step is not None:  # refuse before anything is written into the workdir
      checkpoint.check_architecture(self.ckpt.read_meta(self.restore_step)["config"], cfg.model,
                                    workdir)

  def batch_spec(self, leading):
    T = self.cfg.train.seq_len
    shape = (*leading, T)
    return {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_mask" else np.int32,
                                    sharding=self.batch_sharding if len(leading) == 2
                                    else self.eval_sharding)
            for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}

  def compile_step(self):
    step = functools.partial(train_step, graphdef=self.graphdef, cfg=self.cfg, tx=self.tx,
                             schedule=self.schedule)
    jitted = jax.jit(step, donate_argnums=0, in_shardings=(self.state_shardings,
                                                           self.batch_sharding),
                     out_shardings=(self.state_shardings, None))
    t0 = time.perf_counter()
    lowered = jitted.lower(self.abstract_state, self.batch_spec((self.accum, self.micro_batch)))
    compiled = lowered.compile()
    logging.info("compiled the train step in %.1f s", time.perf_counter() - t0)
    return compiled

  def compile_eval(self):
    fn = functools.partial(eval_step, graphdef=self.graphdef, cfg=self.cfg)
    return jax.jit(fn, in_shardings=(self.state_shardings["params"], self.eval_sharding))

  def initial_state(self):
    if self.restore_step is None:
      return self._init(jax.random.key(self.cfg.seed)), None
    logging.info("resuming from %s/checkpoints/%d", self.workdir, self.restore_step)
    return self.ckpt.restore(self.restore_step, self.abstract_state)


def memory_report(compiled):
  """Per-device bytes from XLA's compiled memory analysis (None where the backend has none)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  report = {f: int(getattr(analysis, f, 0)) for f in fields}
  report["peak_estimate_bytes"] = (report["argument_size_in_bytes"] + report["output_size_in_bytes"]
                                   + report["temp_size_in_bytes"] - report["alias_size_in_bytes"])
  return report


def make_data(cfg, workdir, split, batch_size):
  from tinyllama_jax.data import pipeline  # grain loads only when a run needs data
  tokenizer = pipeline.load_tokenizer(cfg.data, workdir)
  if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than "
                     f"model.vocab_size={cfg.model.vocab_size}: raise the model's vocab_size")
  it = pipeline.make_iterator(
      cfg.data, split=split, seq_len=cfg.train.seq_len, batch_size=batch_size // jax.process_count(),
      seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      tokenizer=tokenizer, vocab_size=cfg.model.vocab_size)
  return it, tokenizer


def evaluate(eval_fn, params, cfg, workdir, batch_size, sharding_):
  it, _ = make_data(cfg, workdir, "eval", batch_size)
  loss_sum, count = 0.0, 0.0
  try:
    for _ in range(cfg.train.eval_batches):
      batch = sharding.global_batch_array(next(it), sharding_)
      s, c = eval_fn(params, batch)
      loss_sum, count = loss_sum + float(s), count + float(c)
  finally:
    it.close()
  return loss_sum / max(count, 1.0)


def greedy_sample(params, graphdef, tokenizer, prompt, n_tokens, seq_len):
  """A short greedy continuation (full recompute each token: fine for a tiny model at the end of
  a run; tinyllama_jax.generate has the KV-cached decoder)."""
  tokens = [tokenizer.bos_id] + tokenizer.encode(prompt)
  logits_fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  for _ in range(n_tokens):
    window = tokens[-seq_len:]
    buf = np.zeros((1, seq_len), np.int32)
    buf[0, :len(window)] = window
    tokens.append(int(jnp.argmax(logits_fn(params, buf)[0, len(window) - 1])))
  return tokenizer.decode(tokens[1:])


def train(cfg, workdir, dry_run=False):
  """Runs (or resumes) training; returns the last logged metrics."""
  run = Run(cfg, workdir)
  t = cfg.train
  n_params = param_count(cfg.model)
  logging.info("model: %s parameters (%s without the input embedding); mesh %s; %d x %d "
               "sequences per step (accumulation x micro-batch)", f"{n_params:,}",
               f"{param_count(cfg.model, with_embedding=False):,}", dict(run.mesh.shape),
               run.accum, run.micro_batch)
  logging.info("compiling the train step (first compile takes a while)...")
  compiled = run.compile_step()
  memory = memory_report(compiled)
  if memory:
    logging.info("per-device memory plan (XLA): %s",
                 {k: f"{v / 2**30:.2f} GiB" for k, v in memory.items()})
  if dry_run:
    print(json.dumps({"params": n_params, "mesh": dict(run.mesh.shape), "memory": memory}))
    return {}

  train_it, tokenizer = make_data(cfg, workdir, "train", t.global_batch)
  state, data_state = run.initial_state()
  if data_state:  # an imported model's checkpoint has none: the stream starts fresh
    train_it.set_state(data_state)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
  eval_fn = run.compile_eval()
  writer = metrics.Writer(os.path.join(workdir, "tb"))
  throughput = metrics.Throughput(
      tokens_per_step=t.global_batch * t.seq_len, flops_per_token=flops_per_token(cfg.model, t.seq_len),
      n_devices=jax.device_count(), peak_flops=metrics.peak_flops_per_device(cfg.peak_flops),
      total_steps=t.steps)

  step = int(state["step"])
  last = {}
  throughput.start(step)
  try:
    while step < t.steps:
      local = next(train_it)
      local = {k: v.reshape(run.accum, -1, *v.shape[1:]) for k, v in local.items()}
      state, step_metrics = compiled(state, sharding.global_batch_array(local, run.batch_sharding))
      step += 1
      if step % t.log_every == 0 or step == t.steps:
        last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not np.isfinite(last["train/loss"]):
          raise FloatingPointError(f"loss is {last['train/loss']} at step {step}")
        last.update(throughput.report(step))
        metrics.console_line(step, t.steps, last)
        writer.scalars(step, last)
      if step % t.eval_every == 0 or step == t.steps:
        logging.info("evaluating on %d held-out batches...", t.eval_batches)
        last["eval/loss"] = evaluate(eval_fn, state["params"], cfg, workdir, run.micro_batch,
                                     run.eval_sharding)
        logging.info("step %d: eval loss %.4f", step, last["eval/loss"])
        writer.scalars(step, {"eval/loss": last["eval/loss"]})
        throughput.start(step)
      if step % t.checkpoint_every == 0 or step == t.steps:
        run.ckpt.save(step, state, train_it.get_state(), cfg)
        throughput.start(step)
    if t.sample_tokens and tokenizer is not None and jax.process_index() == 0:
      sample = greedy_sample(state["params"], run.graphdef, tokenizer, "def ", t.sample_tokens,
                             t.seq_len)
      logging.info("sample (greedy): %r", sample)
      writer.text(step, "sample", sample)
  finally:
    run.ckpt.wait()
    run.ckpt.close()
    writer.close()
    train_it.close()
  last["step"] = step
  last["params"] = state["params"]
  return last


class _OwnInfoOnly(std_logging.Filter):
  """INFO lines from this package; other libraries' (orbax writes ~30 per save) from WARNING up."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "tinyllama_jax" in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise ValueError("--workdir is required (e.g. --workdir=runs/tiny)")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  distributed.initialize()
  train(_CONFIG.value, _WORKDIR.value, dry_run=_DRY_RUN.value)


def run_cli():
  config_lib.exit_on_error(lambda: config_lib.check_override_keys(sys.argv))
  config_lib.exit_on_error(lambda: app.run(main))


if __name__ == "__main__":
  run_cli()
