"""Test setup: eight fake CPU devices (for sharding tests), set before any JAX operation."""

import atexit
import os
import shutil
import tempfile

import jax
from absl import flags

jax.config.update("jax_num_cpu_devices", 8)
# One persistent compilation cache a test process, which the commands it starts share: most tests
# compile the same tiny programs (a train step, a decode loop), each a second or more on a CPU
# (the suite: 55 to 48 CPU-minutes). A size bound turns on jax's file lock around each
# read and write, so two processes never see a half-written entry.
_CACHE = tempfile.mkdtemp(prefix="tinyllama-jax-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
_CACHE_BYTES = 4 << 30
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_compilation_cache_max_size", _CACHE_BYTES)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(_CACHE_BYTES))
# grain's multiprocessing prefetch reads absl flags; tests run outside app.run.
flags.FLAGS.mark_as_parsed()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(items):
  """The slow end-to-end runs first (stable, the rest in file order): `pytest -n 2` deals tests
  out in order, and a minute-long run dealt last keeps one worker busy while the other idles."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
