"""Sweeps: many runs of one base config, planned from a sweep file and launched in one command.

  python -m tinyllama_jax.sweep --config=configs/tiny.py --sweep=configs/sweeps/tiny_lr.py \
      --workdir=runs/tiny_lr [--launcher=local|print|slurm] [--config.train.steps=200]
  python -m tinyllama_jax.sweep summarize --workdir=runs/tiny_lr

The command; sweeps/grid.py plans (grids, names, configs), sweeps/launch.py launches,
sweeps/summary.py summarizes. docs/sweeps.md is the guide.
"""

import os
import sys

from absl import app, flags

from tinyllama_jax import cli
from tinyllama_jax.sweeps import grid, launch, summary
# Sweep files written for earlier versions import their grid helpers from here.
from tinyllama_jax.sweeps.grid import chain, product, zipped  # noqa: F401


def sweep_main(flags_, cli_overrides):
  if not flags_.config or not flags_.sweep or not flags_.workdir:
    raise ValueError("--config, --sweep and --workdir are required (e.g. --config=configs/tiny.py "
                     "--sweep=configs/sweeps/tiny_lr.py --workdir=runs/tiny_lr)")
  bindings, fixed = grid.load_sweep_file(flags_.sweep)
  runs = grid.plan(flags_.config, bindings, fixed, cli_overrides, flags_.workdir)
  grid.prepare_workdirs(runs, flags_.config, flags_.allow_config_change)
  print(f"sweep of {len(runs)} runs in {os.path.abspath(flags_.workdir)}", flush=True)
  if flags_.launcher == "print":
    launch.launch_print(runs, flags_.config)
  elif flags_.launcher == "slurm":
    launch.launch_slurm(runs, flags_.config, flags_.workdir, flags_.max_parallel, flags_.slurm_option)
  else:
    _launch_local(runs, flags_)


def _launch_local(runs, flags_):
  try:
    failed = launch.launch_local(runs, flags_.config, flags_.max_parallel or 1)
  except launch.Interrupted as e:
    print(f"{e}: the trainers it started saved their checkpoints and ended; rerun the same "
          "command to resume", file=sys.stderr)
    sys.exit(128 + e.signum)
  if failed:
    print(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}; fix and rerun the "
          "same command to retry them (finished runs are skipped)", file=sys.stderr)
    sys.exit(1)
  # Finished means at the last step: a run skipped as running is another trainer's, not done.
  states = {run.name: launch.run_state(run)[0] for run in runs}
  unfinished = [f"{name} ({state})" for name, state in states.items() if state != "finished"]
  if unfinished:
    print(f"{len(runs) - len(unfinished)} of {len(runs)} runs finished; not finished: "
          f"{', '.join(unfinished)}: a running one is trained by another process (its workdir's "
          ".lock is held); rerun the same command once it ends", file=sys.stderr)
    sys.exit(1)
  print(f"all {len(runs)} runs finished: {sys.executable} -m tinyllama_jax.sweep summarize "
        f"--workdir={flags_.workdir}")


def run_cli(argv=None):
  flags.DEFINE_string("config", None, "Base config file (configs/*.py).")
  flags.DEFINE_string("sweep", None, "Sweep file (configs/sweeps/*.py) with get_sweep().")
  flags.DEFINE_string("workdir", None, "Sweep directory: one subdirectory per run.")
  flags.DEFINE_enum("launcher", "local", ["local", "print", "slurm"],
                    "local: run here; print: print the commands; slurm: write a job-array script.")
  flags.DEFINE_integer("max_parallel", 0, "local: runs at a time, the GPUs split between them "
                       "(default 1); slurm: array tasks at a time (default: no limit).")
  flags.DEFINE_multi_string("slurm_option", [], "An #SBATCH line for the slurm script, repeatable: "
                            "--slurm_option=--gres=gpu:8 --slurm_option=--time=48:00:00")
  flags.DEFINE_bool("allow_config_change", False, "Continue runs that trained under another config.")
  flags.DEFINE_bool("plot", True, "summarize: also draw the loss curves (needs matplotlib).")
  argv = sys.argv if argv is None else argv
  # `--config.a.b=v` goes to every run (absl would refuse it here); the rest are the sweep's flags.
  cli_overrides = [a for a in argv[1:] if a.startswith("--config.")]
  argv = [a for a in argv if a not in cli_overrides]

  def main(args):
    if args[1:] == ["summarize"]:
      if cli_overrides:
        raise app.UsageError("summarize takes no --config.* overrides")
      if not flags.FLAGS.workdir:
        raise ValueError("summarize needs --workdir: the sweep's directory")
      summary.summarize(flags.FLAGS.workdir, plot_curves=flags.FLAGS.plot)
    elif len(args) > 1:
      raise app.UsageError(f"unexpected arguments {args[1:]}: the only command is 'summarize'")
    else:
      sweep_main(flags.FLAGS, cli_overrides)

  cli.run(main, argv=argv)


if __name__ == "__main__":
  run_cli()
