"""Pretrain a Llama: `python -m tinyllama_jax.train --config=configs/tiny.py --workdir=runs/tiny`.

The command; the loop is training/loop.py. Any config key can be overridden on the command line
(`--config.optim.lr=3e-4`); `python -m tinyllama_jax.config --config=F` lists them. Rerunning the
same command resumes. Exit status: 0 done or preempted (checkpoint written), 2 bad input (one
line naming it), 3 a fault the run stopped on (non-finite steps, a checkpoint it cannot write).
"""

import os
import sys

import jax
from absl import app, flags, logging

from tinyllama_jax import cli, config as config_lib, distributed
from tinyllama_jax.checkpoint import manager as checkpoint
from tinyllama_jax.training import faults, loop


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  if not FLAGS.workdir:
    raise ValueError("--workdir is required (e.g. --workdir=runs/tiny)")
  logging.set_verbosity(logging.INFO)  # the run reports progress (cli.OwnInfoOnly: its own only)
  config_lib.validate(FLAGS.config)  # one line in the first second, before waiting for peers
  xla_flags = distributed.apply_xla_flags(FLAGS.config.train.xla_flags)
  if FLAGS.config.train.xla_flags.strip():  # a run that sets none starts as fast as before
    faults.check_xla_flags(xla_flags)
  distributed.initialize()
  loop.train(FLAGS.config, FLAGS.workdir, dry_run=FLAGS.dry_run)


def run_cli():
  cli.define_run_flags()
  cli.define_distributed_flags()
  try:
    cli.run(main, faults=(faults.FaultError, checkpoint.CheckpointError))
  except SystemExit as e:
    if e.code and jax.distributed.is_initialized():
      # A normal exit waits at jax.distributed's shutdown for peers that are blocked in a
      # collective with this process, until the coordinator declares it dead (~70 s).
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(e.code if isinstance(e.code, int) else 1)
    raise


if __name__ == "__main__":
  run_cli()
