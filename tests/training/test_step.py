"""The train step's arithmetic: accumulation equals one big batch; the schedule counts optimizer
steps, not micro-batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tinyllama_jax import optim, train_state
from tinyllama_jax import model as model_lib
from tinyllama_jax.training import program as program_lib
from tests.test_model import small_model_config
from tinyllama_jax.config import base_config


def step_setup():
  cfg = base_config()
  cfg.model = small_model_config()
  cfg.optim.warmup_steps, cfg.optim.decay_steps = 3, 10
  tx, schedule = optim.make_optimizer(cfg.optim, 10)
  state = train_state.make_init_fn(cfg, tx)(jax.random.key(0))
  step = jax.jit(functools.partial(program_lib.train_step, graphdef=model_lib.graphdef(cfg.model),
                                   cfg=cfg, tx=tx, schedule=schedule))
  return state, step, schedule


def random_batch(key, n, T=16, vocab=97):
  tokens = jax.random.randint(key, (n, T + 1), 0, vocab)
  mask = (jax.random.uniform(jax.random.fold_in(key, 1), (n, T)) > 0.2).astype(jnp.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "segment_ids": jnp.ones((n, T), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(T), (n, T))}


def test_accumulation_equals_one_big_batch():
  state, step, _ = step_setup()
  batch = random_batch(jax.random.key(1), 8)
  one = jax.tree.map(lambda x: x[None], batch)  # [1, 8, T]
  four = jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch)  # [4, 2, T]
  s1, m1 = step(jax.tree.map(jnp.copy, state), one)
  s4, m4 = step(jax.tree.map(jnp.copy, state), four)
  np.testing.assert_allclose(m1["train/loss"], m4["train/loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["train/grad_norm"], m4["train/grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_schedule_counts_optimizer_steps():
  state, step, schedule = step_setup()
  lrs = []
  for i in range(4):
    batch = jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), random_batch(jax.random.key(i), 8))
    state, m = step(state, batch)
    lrs.append(float(m["train/lr"]))
  assert int(state["step"]) == 4
  np.testing.assert_allclose(lrs, [float(schedule(i)) for i in range(4)], rtol=1e-6)
  assert lrs[0] == 0.0 and abs(lrs[3] - 4e-4) < 1e-9  # warmup of 3 optimizer steps, whatever the accumulation
