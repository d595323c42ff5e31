"""Test setup: eight fake CPU devices (for sharding tests), set before any JAX operation."""

import os

import jax
from absl import flags

jax.config.update("jax_num_cpu_devices", 8)
# grain's multiprocessing prefetch reads absl flags; tests run outside app.run.
flags.FLAGS.mark_as_parsed()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
