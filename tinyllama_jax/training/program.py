"""The train program: the state, the step over it and their shardings, built once for a config
and mesh, so that train, plan, bench and import compile the same thing.

    prog = build_program(cfg, mesh)
    compiled = prog.compile_step()        # AOT: explicit shardings, the state donated
    state = prog.jit_init()(jax.random.key(cfg.seed))

The step is a pure function (state, batch) -> (state, metrics). Callers that run Pallas kernels
lower it under `jax.set_mesh(prog.mesh)` (the kernels find the mesh there and run per device);
the builder leaves that context to them.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from tinyllama_jax import kernels, model as model_lib, optim, sharding, train_state
from tinyllama_jax.checkpoint import manager as checkpoint
from tinyllama_jax.training import faults

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


# ----------------------------------------------------------------------------- the step


def loss_sums(params, batch, *, graphdef, cfg, use_segments=None):
  """(sum of masked token losses, number of counted tokens) for one micro-batch: the one loss of
  training, its eval and `evaluate`. use_segments: attend within the batch's segment_ids; None =
  as cfg.data.packing packs (first/best fit do, concat does not)."""
  model = nnx.merge(graphdef, params)
  if use_segments is None:
    use_segments = cfg.data.packing != "concat"
  segment_ids = batch["segment_ids"] if use_segments else None
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
  loss, grads = loss_sum / count, jax.tree.map(lambda g: g / count, grads)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  # A non-finite step leaves params and optimizer as they were; it still consumes its batch.
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, opt_state = faults.keep_if_nonfinite(
      ok, (optax.apply_updates(params, updates), opt_state), (params, state["opt_state"]))
  nan_skips = state["nan_skips"] + (~ok).astype(jnp.int32)
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
               "rng": jax.random.fold_in(state["rng"], state["step"]), "nan_skips": nan_skips}
  return new_state, {"train/loss": loss, "train/grad_norm": grad_norm,
                     "train/lr": schedule(state["step"]), "train/tokens": count,
                     "train/skipped": ~ok, "train/nan_skips": nan_skips}


def eval_step(params, batch, *, graphdef, cfg):
  return loss_sums(params, batch, graphdef=graphdef, cfg=cfg)


# ----------------------------------------------------------------------------- the program


@dataclasses.dataclass(frozen=True)
class Program:
  """One config's train program on one mesh. abstract_state carries the shardings (what the
  step is lowered with and a checkpoint is restored into); a step takes [accum, micro_batch, T]."""
  cfg: object
  mesh: jax.sharding.Mesh
  graphdef: object
  tx: optax.GradientTransformation
  schedule: object
  init: object  # rng -> state, unjitted (jit_init places it on the mesh)
  state_shardings: object
  abstract_state: object
  batch_sharding: jax.sharding.NamedSharding  # [A, M, T]: the train step's batch
  eval_sharding: jax.sharding.NamedSharding  # [M, T]: the eval step's batch
  micro_batch: int  # sequences per micro-batch, all batch devices together
  accum: int  # micro-batches per optimizer step

  def batch_spec(self, leading):
    """Abstract batch of shape (*leading, T): [A, M, T] for the train step, [M, T] for eval."""
    shape = (*leading, self.cfg.train.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, np.float32 if k == "loss_mask" else np.int32,
                                    sharding=self.batch_sharding if len(leading) == 2
                                    else self.eval_sharding)
            for k in BATCH_KEYS}

  def lower_step(self):
    """The train step lowered for this program's state and batch, the state donated."""
    step = functools.partial(train_step, graphdef=self.graphdef, cfg=self.cfg, tx=self.tx,
                             schedule=self.schedule)
    jitted = jax.jit(step, donate_argnums=0, in_shardings=(self.state_shardings,
                                                           self.batch_sharding),
                     out_shardings=(self.state_shardings, None))
    return jitted.lower(self.abstract_state, self.batch_spec((self.accum, self.micro_batch)))

  def compile_step(self):
    t0 = time.perf_counter()
    compiled = self.lower_step().compile()
    logging.info("compiled the train step in %.1f s", time.perf_counter() - t0)
    return compiled

  def jit_eval(self):
    """(params, [M, T] batch) -> (loss sum, token count), compiled on first call."""
    fn = functools.partial(eval_step, graphdef=self.graphdef, cfg=self.cfg)
    return jax.jit(fn, in_shardings=(self.state_shardings["params"], self.eval_sharding))

  def jit_init(self):
    return jax.jit(self.init, out_shardings=self.state_shardings)


def build_program(cfg, mesh, *, accum=None):
  """The program for `cfg` on `mesh`. accum: micro-batches per step; by default the config's
  global_batch over one micro-batch (train.micro_batch_per_device on every batch device)."""
  micro_batch = cfg.train.micro_batch_per_device * sharding.batch_devices(mesh)
  tx, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
  init = train_state.make_init_fn(cfg, tx)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_shardings = sharding.tree_shardings(abstract, mesh)
  return Program(
      cfg=cfg, mesh=mesh, graphdef=model_lib.graphdef(cfg.model), tx=tx, schedule=schedule,
      init=init, state_shardings=state_shardings,
      abstract_state=checkpoint.abstract_like(abstract, state_shardings),
      batch_sharding=sharding.accum_batch_sharding(mesh), eval_sharding=sharding.batch_sharding(mesh),
      micro_batch=micro_batch,
      accum=accum if accum is not None else cfg.train.global_batch // micro_batch)


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
