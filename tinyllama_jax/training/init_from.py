"""train.init_from: start a run from another run's parameters (fine-tuning).

The other run is any workdir with a checkpoint: a pretraining run, or an import that
`python -m tinyllama_jax.export --from_hf` wrote. Its latest checkpoint's parameters (verified
against their stored checksums) replace the fresh init's; the optimizer state, step (0), RNG and
learning-rate schedule are the new run's own, and the data stream starts at its beginning. Only a
fresh start reads it: a workdir with checkpoints resumes them (the loop logs that init_from is
ignored then).
"""

import jax
from absl import logging

from tinyllama_jax.checkpoint import manager as checkpoint
from tinyllama_jax.checkpoint import run as run_lib


def source(cfg):
  """(init_from dir, its step, its config); one-line errors for a missing run or another
  architecture, naming every differing field."""
  init_dir = cfg.train.init_from
  try:
    step = run_lib.resolve_step(init_dir)
  except ValueError as e:
    raise ValueError(f"train.init_from={init_dir!r}: {e}") from None
  init_cfg = run_lib.run_config(init_dir, step)
  saved = init_cfg.get("model", {})
  diffs = [f"{k}: {saved.get(k)} there vs {cfg.model[k]} here" for k in checkpoint.ARCH_KEYS
           if saved.get(k) != cfg.model[k]]
  if diffs:
    raise ValueError(f"train.init_from={init_dir!r} is a different architecture "
                     f"({'; '.join(diffs)}): set these model fields to the run's (its config.json)")
  return init_dir, step, init_cfg


def tokenizer_path(cfg):
  """The init_from run's tokenizer: what a fine-tune without data.tokenizer encodes with."""
  init_dir, step, init_cfg = source(cfg)
  del step
  return run_lib.tokenizer_path(init_cfg, init_dir)


def initial_state(prog, cfg):
  """The fresh state of `prog` with the init_from run's parameters and a new optimizer state."""
  init_dir, step, _ = source(cfg)
  logging.info("train.init_from: starting from the parameters of %s (checkpoint %d), with a "
               "fresh optimizer, step 0 and schedule", init_dir, step)
  shardings = prog.state_shardings
  params = jax.tree.map(jax.device_put, run_lib.load_params(init_dir, step, cfg.model),
                        shardings["params"])
  fresh = ("params", "opt_state")
  rest = jax.jit(lambda rng: {k: v for k, v in prog.init(rng).items() if k not in fresh},
                 out_shardings={k: v for k, v in shardings.items() if k not in fresh})
  state = {**rest(jax.random.key(cfg.seed)), "params": params,
           "opt_state": jax.jit(prog.tx.init, out_shardings=shardings["opt_state"])(params)}
  if jax.tree.structure(state) != jax.tree.structure(prog.abstract_state):
    raise AssertionError("the init_from state does not match the trainer's state tree")
  return state
