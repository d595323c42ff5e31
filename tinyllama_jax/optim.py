"""TinyLlama's optimizer: AdamW, global-norm clipping, linear warmup then cosine to min_lr.

The schedule is a function of the optimizer step (optax's own count, advanced once per update),
never of micro-batches: gradient accumulation happens inside the train step, before optax sees
the gradients (upstream mistake 3 in the reference).
"""

import optax
from absl import logging


def lr_schedule(cfg_optim, total_steps):
  decay_steps = cfg_optim.decay_steps or total_steps
  if cfg_optim.warmup_steps >= decay_steps:  # a short trial run of a long recipe: warmup only
    logging.warning("optim.warmup_steps (%d) >= decay length (%d): the run ends inside warmup",
                    cfg_optim.warmup_steps, decay_steps)
    return optax.linear_schedule(0.0, cfg_optim.lr, cfg_optim.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg_optim.lr, warmup_steps=cfg_optim.warmup_steps,
      decay_steps=decay_steps, end_value=cfg_optim.min_lr)


def make_optimizer(cfg_optim, total_steps):
  schedule = lr_schedule(cfg_optim, total_steps)
  tx = optax.chain(
      # Clipping to a norm of 0 would zero every update: 0 means no clipping.
      optax.clip_by_global_norm(cfg_optim.clip_norm) if cfg_optim.clip_norm else optax.identity(),
      optax.adamw(schedule, b1=cfg_optim.b1, b2=cfg_optim.b2, eps=cfg_optim.eps,
                  weight_decay=cfg_optim.weight_decay),
  )
  return tx, schedule
