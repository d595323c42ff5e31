"""Kernel tests: outputs start poisoned (NaN) so an unwritten element fails the comparison.

CPU runs the Pallas kernels in interpret mode; `pytest -m gpu tests/kernels` runs the gpu-marked
tests on the device machine through the Triton lowering.
"""

import os

import jax
import pytest

from tinyllama_jax.kernels import _pallas

os.environ[_pallas.POISON_ENV] = "1"


@pytest.fixture
def on_gpu():
  if jax.default_backend() != "gpu":
    pytest.fail("gpu-marked test needs a GPU backend (run it on the device machine)")
