"""What the Mosaic GPU kernels here share: SMEM tiling and the memory warp group's TMA ring.

Importing this module imports Pallas Mosaic GPU; the backend table only imports it when a config
asks for the 'mgpu' attention backend.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def smem_transforms(dtype):
  """(8 rows x one 128-byte swizzle span) tiles: what wgmma reads and TMA writes swizzled."""
  return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(128))


def stream(n, S, fetch, free):
  """The memory group's loop: fetch(j, slot) for j < n into a ring of S slots, each refill
  after its slot's `free` barriers complete; the last uses of every slot are waited for too, so
  every barrier phase is observed (the interpreter checks it; on the GPU it costs nothing)."""
  for j in range(S):
    pl.when(j < n)(functools.partial(fetch, j, j))

  @pl.loop(S, n)
  def _(j):
    slot = lax.rem(j, jnp.int32(S))
    for bar in free:
      plgpu.barrier_wait(bar.at[slot])
    fetch(j, slot)

  @pl.loop(jnp.maximum(n - S, 0), n)
  def _(j):
    slot = lax.rem(j, jnp.int32(S))
    for bar in free:
      plgpu.barrier_wait(bar.at[slot])
