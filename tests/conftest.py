"""Test setup: eight fake CPU devices (for sharding tests), set before any JAX operation."""

import os

import jax
from absl import flags

jax.config.update("jax_num_cpu_devices", 8)
# grain's multiprocessing prefetch reads absl flags; tests run outside app.run.
flags.FLAGS.mark_as_parsed()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(items):
  """The slow end-to-end runs first (stable, the rest in file order): `pytest -n 2` deals tests
  out in order, and a minute-long run dealt last keeps one worker busy while the other idles."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
