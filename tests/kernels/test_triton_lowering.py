"""Every Pallas kernel lowers through the Triton backend at TinyLlama shapes (bench.kernel_cases),
here on CPU.

jax lowers for a platform it does not run (`lowering_platforms=("cuda",)`); that runs the whole
Pallas -> Triton IR lowering, so an op Triton cannot express fails here, not on the GPU machine.
A case's kernels are counted forward + backward, or forward alone for the decode-only kernels
(they have no backward).
"""

from unittest import mock

import pytest

from bench import kernel_cases
from tinyllama_jax.kernels import _pallas


@pytest.mark.parametrize("name", sorted(kernel_cases.CASES))
def test_lowers_to_triton(name):
  fn, args = kernel_cases.traced(name)
  with mock.patch.object(_pallas, "interpret_default", lambda: False):
    lowered = fn.trace(*args).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("xla.gpu.triton") == kernel_cases.CASES[name][2]
