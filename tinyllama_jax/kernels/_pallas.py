"""What every Pallas kernel here shares: interpret-mode choice, Triton params, output poisoning.

Importing this module imports Pallas; the backend table only imports it when a config asks for a
'pallas' backend.
"""

import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Tests set this so every output buffer starts as NaN (ints: their minimum): an element a kernel
# forgets to write then fails the comparison instead of passing on stale memory. Interpret mode
# already starts outputs as NaN; on the GPU this aliases a NaN-filled input to each output.
POISON_ENV = "TINYLLAMA_POISON_KERNEL_OUTPUTS"


def interpret_default():
  """Pallas on CPU only runs interpreted; on GPU it lowers through Triton."""
  return jax.default_backend() == "cpu"


def resolve_interpret(interpret):
  return interpret_default() if interpret is None else interpret


def _poison_value(dtype):
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.nan
  return jnp.iinfo(dtype).min


def call(kernel, *, grid, in_specs, out_specs, out_shape, name, num_warps=4, num_stages=2,
         interpret=False):
  """pl.pallas_call with Triton params; `kernel(*in_refs, *out_refs)` as usual.

  Returns a function of the inputs, like pallas_call. With POISON_ENV set, the outputs are
  NaN-filled buffers aliased in, so unwritten elements show up as NaN.
  """
  single = not isinstance(out_shape, (list, tuple))
  out_shapes = [out_shape] if single else list(out_shape)
  out_specs_l = [out_specs] if single else list(out_specs)
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  poison = os.environ.get(POISON_ENV, "") not in ("", "0")

  def run(*args):
    if not poison:
      return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                            out_shape=out_shape, compiler_params=params, interpret=interpret,
                            name=name)(*args)
    n = len(args)
    fills = [jnp.full(s.shape, _poison_value(s.dtype), s.dtype) for s in out_shapes]

    def poisoned_kernel(*refs):
      kernel(*refs[:n], *refs[n + len(fills):])

    out = pl.pallas_call(poisoned_kernel, grid=grid, in_specs=list(in_specs) + out_specs_l,
                         out_specs=out_specs_l, out_shape=out_shapes, compiler_params=params,
                         interpret=interpret, name=name,
                         input_output_aliases={n + i: i for i in range(len(fills))})(*args, *fills)
    return out[0] if single else out

  return run


def round_up(x, m):
  return (x + m - 1) // m * m
