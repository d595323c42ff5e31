"""The example sweep: peak learning rate x warmup on configs/tiny.py, 6 short runs on CPU.

  python -m tinyllama_jax.sweep --config=configs/tiny.py --sweep=configs/sweeps/tiny_lr.py
      --workdir=runs/tiny_lr
  python -m tinyllama_jax.sweep summarize --workdir=runs/tiny_lr
"""

from tinyllama_jax.sweep import product

# Every run: short enough that the six finish in a few minutes on two CPU cores.
FIXED = {
    "train.steps": 60,
    "train.eval_every": 20,
    "train.checkpoint_every": 20,
    "train.eval_batches": 2,
    "train.sample_tokens": 0,
}


def get_sweep():
  # min_lr is 3e-4 in tiny.py: the smallest peak stays above it.
  return product({"optim.lr": [1e-3, 3e-3, 1e-2], "optim.warmup_steps": [5, 20]})
