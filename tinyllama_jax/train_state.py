"""The train state: what a run's checkpoint holds (params, optimizer state, step, RNG, non-finite
step count), made by one init function, and its abstract tree. Below the checkpoint layer, so that
reading a finished run's checkpoint (checkpoint/run.py) needs nothing from training/."""

import jax
import jax.numpy as jnp
from flax import nnx

from tinyllama_jax import model as model_lib, optim


def make_init_fn(cfg, tx):
  def init(rng):
    model = model_lib.Llama(cfg.model, rngs=nnx.Rngs(params=rng))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.fold_in(rng, 1), "nan_skips": jnp.zeros((), jnp.int32)}
  return init


def state_tree(cfg):
  """The train state's abstract tree (shapes and dtypes, no shardings, no mesh): what a
  checkpoint of this config holds, e.g. to pair its stored checksums with leaves."""
  tx, _ = optim.make_optimizer(cfg.optim, cfg.train.steps)
  return jax.eval_shape(make_init_fn(cfg, tx), jax.random.key(0))
