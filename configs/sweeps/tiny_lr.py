"""The example sweep: peak learning rate x warmup on configs/tiny.py, 4 short runs on CPU.

  python -m tinyllama_jax.sweep --config=configs/tiny.py --sweep=configs/sweeps/tiny_lr.py
      --workdir=runs/tiny_lr
  python -m tinyllama_jax.sweep summarize --workdir=runs/tiny_lr
"""

from tinyllama_jax.sweeps.grid import product

# Every run (kept out of the run names): short, so the four finish in a few minutes on 2 cores.
FIXED = {
    "train.steps": 50,
    "train.global_batch": 8,
    "train.micro_batch_per_device": 8,
    "train.log_every": 5,
    "train.eval_every": 10,
    "train.checkpoint_every": 25,
    "train.eval_batches": 2,
    "train.sample_tokens": 0,
}


def get_sweep():
  # tiny.py's min_lr is 3e-4: every peak stays above it (a lower one fails the sweep up front).
  return product({"optim.lr": [1e-3, 1e-2], "optim.warmup_steps": [5, 25]})
