"""Peak learning rate x warmup for the 120M model (the example grid): 6 runs.

  python -m tinyllama_jax.sweep --config=configs/120m.py --sweep=configs/sweeps/lr_warmup.py
      --workdir=runs/lr_warmup --launcher=slurm --slurm_option=--gres=gpu:1
"""

from tinyllama_jax.sweeps.grid import product


def get_sweep():
  return product({"optim.lr": [1e-4, 4e-4, 1e-3], "optim.warmup_steps": [500, 2000]})
