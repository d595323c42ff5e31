"""What every Pallas kernel here shares: interpret-mode choice, Triton params.

Importing this module imports Pallas; the backend table only imports it when a config asks for a
'pallas' backend.
"""

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def interpret_default():
  """Pallas on CPU only runs interpreted; on GPU it lowers through Triton."""
  return jax.default_backend() == "cpu"


def resolve_interpret(interpret):
  return interpret_default() if interpret is None else interpret


def call(kernel, *, grid, in_specs, out_specs, out_shape, name, num_warps=4, num_stages=2,
         interpret=False):
  """pl.pallas_call with Triton params; `kernel(*in_refs, *out_refs)` as usual. Returns a
  function of the inputs, like pallas_call. Kernels call it as `_pallas.call`, so the kernel
  tests can swap in a version whose outputs start as NaN (tests/kernels/kernels_util.py)."""
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=params, interpret=interpret,
                        name=name)


def round_up(x, m):
  return (x + m - 1) // m * m
