"""Kernel tests: outputs start poisoned (NaN) so an unwritten element fails the comparison.

CPU runs the Pallas kernels in interpret mode; `pytest -m gpu tests/kernels` runs the gpu-marked
tests on the device machine through the Triton lowering.
"""

import jax
import pytest

import kernels_util
from tinyllama_jax.kernels import _pallas

# Replaced at collection, before any test traces a kernel: a trace cached by jit before the swap
# would run unpoisoned. Every kernel calls `_pallas.call` by attribute, so this reaches them all.
_pallas.call = kernels_util.poisoned_call


@pytest.fixture
def on_gpu():
  if jax.default_backend() != "gpu":
    pytest.fail("gpu-marked test needs a GPU backend (run it on the device machine)")
