"""List every config key: `python -m tinyllama_jax.config --config=F [--config.a.b=v]`.

The command (the config layer below it cannot import cli.py, which imports that layer);
listing.py says what each entry holds.
"""

from absl import flags

from tinyllama_jax import cli
from tinyllama_jax.config import listing


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}: give --config=F and --config.a.b=v")
  print(listing.listing(flags.FLAGS.config))


def run_cli():
  cli.define_run_flags()
  cli.run(main)


if __name__ == "__main__":
  run_cli()
