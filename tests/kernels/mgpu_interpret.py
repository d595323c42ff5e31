"""Mosaic GPU interpret mode (jax 0.10.2, CPU) extended with what our Hopper kernels use.

jax's GPU interpreter (jax._src.pallas.mosaic_gpu.interpret) simulates SMEM, TMA copies, barriers,
warpgroups and wgmma, but in 0.10.2 it lacks four things FlashAttention-3-style kernels need:
  - wgmma with a transposed SMEM operand (plgpu.transpose_ref: K^T in QK^T),
  - wgmma with the A operand in registers (P in PV, dS in dQ/dK),
  - pl.run_state with a preinitialised accumulator (plgpu.ACC.init: acc += P V in place),
  - plgpu.layout_cast (a register-layout hint with no meaning on CPU: the identity here).
`install()` patches the interpreter (tests only; production code is untouched) by running those
equations here and every other equation through jax's own interpreter, in order. It is written
against jax 0.10's interpreter (the CPU machines'); jax 0.11 reorganised its internals (and still
lacks run_state), so there the interpret tests skip (`needs_interpreter`) and the gpu-marked
tests run the compiled kernels.
"""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax._src import callback
from jax._src import core as jax_core
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu import core as gpu_core
from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax._src.state import discharge
from jax._src.state import types as state_types

# Every output and SMEM buffer starts as NaN: an element a kernel forgets to write fails the check.
PARAMS = InterpretGPUParams(uninitialized_memory="nan")
SUPPORTED = jax.__version__.startswith("0.10.")
needs_interpreter = pytest.mark.skipif(
    not SUPPORTED, reason=f"the interpreter extension targets jax 0.10 (have {jax.__version__})")


def _split_transpose(transforms):
  """(index transforms, transpose permutation or None): transposes come last on our operands."""
  transforms = gpu_callbacks._remove_noop_transforms(tuple(transforms))
  perm = None
  rest = []
  for t in transforms:
    if isinstance(t, gpu_core.TransposeTransform):
      perm = tuple(int(p) for p in t.permutation)
    else:
      assert perm is None, "an index after a transpose"
      rest.append(t)
  return tuple(rest), perm


def _read(shared_memory, key_array, transforms, gtid, info):
  rest, perm = _split_transpose(transforms)
  rest = jax.tree.map(int, rest)
  key = gpu_callbacks.HostAllocationKey.from_array(key_array)
  x, _, _ = shared_memory.get_buffer_content(key, interpret_utils.to_range(rest), gtid,
                                             logging_info=info)
  assert x is not None
  return x if perm is None else np.transpose(x, perm)


def _wgmma_callback(*, token, device_id, grid_point_coords, thread_id, acc_key, acc_transforms,
                    acc_dtype, a, a_is_ref, a_transforms, b_key, b_transforms):
  device_id, thread_id = int(device_id), int(thread_id)
  shared_memory = gpu_callbacks._get_shared_memory()
  gtid = shared_memory.get_global_thread_id(device_id, thread_id)
  info = interpret_utils.GPULoggingInfo(
      device_id=device_id, grid_point_coords=tuple(int(x) for x in grid_point_coords),
      thread_id=thread_id, source_info=None)
  a = _read(shared_memory, a, a_transforms, gtid, info) if a_is_ref else np.asarray(a)
  b = _read(shared_memory, b_key, b_transforms, gtid, info)
  acc_transforms = jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms))
  acc_range = interpret_utils.to_range(acc_transforms)
  key = gpu_callbacks.HostAllocationKey.from_array(acc_key)
  acc, _, _ = shared_memory.get_buffer_content(key, acc_range, gtid, logging_info=info)
  res = acc + np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(acc_dtype)
  shared_memory.store_buffer_content(key, acc_range, res, gtid, logging_info=info)
  return token


def _wgmma(self, eqn, token, invals):
  acc, a, b, *leaves = invals
  empty = jax.tree.structure([])
  p = eqn.params
  acc_t, a_t, b_t = jax.tree.unflatten(
      jax.tree_util.treedef_tuple((p["acc_transforms_tree"] or empty,
                                   p["a_transforms_tree"] or empty,
                                   p["b_transforms_tree"] or empty)), leaves)
  a_is_ref = isinstance(eqn.invars[1].aval, state_types.AbstractRef)
  token = callback.io_callback(
      functools.partial(_wgmma_callback, acc_dtype=eqn.invars[0].aval.dtype, a_is_ref=a_is_ref),
      gpu_callbacks.TOKEN_SHAPE_DTYPE, token=token, device_id=self.device_info.device_id,
      grid_point_coords=self.grid_point_coords, thread_id=self.thread_id, acc_key=acc,
      acc_transforms=acc_t, a=a, a_transforms=a_t, b_key=b, b_transforms=b_t, ordered=True)
  return token, []


def _run_state(self, eqn, token, invals):
  """pl.run_state: refs passed in stay as they are; every value (the initialised accumulators,
  and arrays the body closes over, which run_state hoists to refs) gets a buffer, the body runs on
  them, and their final values come out."""
  body = eqn.params["jaxpr"]
  if not all(eqn.params["is_initialized"]):
    raise NotImplementedError("run_state with uninitialised refs")
  is_ref = [isinstance(v.aval, state_types.AbstractRef) for v in eqn.invars]
  args = []
  for ref, init in zip(is_ref, invals):
    if ref:
      args.append(init)
      continue
    tid = gpu_callbacks.get_thread_id_for_collective_allocation_key(
        thread_id=jnp.int32(self.thread_id), axes_dims=self.thread_cluster_shape,
        is_last_thread_axis_collective=False)
    token, request = gpu_callbacks.call_make_allocation_request_array(
        token=token, device_id=jnp.int32(self.device_info.device_id),
        memory_space_id=gpu_callbacks.get_memory_space_idx(gpu_core.MemorySpace.REGS),
        thread_id=jnp.int32(tid), initial_ref_count=1)
    token, key = gpu_callbacks.call_allocate_buffer(
        token=token, device_id=jnp.int32(self.device_info.device_id),
        grid_point_coords=self.grid_point_coords, thread_id=self.thread_id,
        allocation_request_as_array=request, value=init)
    args.append(key)
  token, _ = self.interpret(body, token, *args)
  outs = []
  for ref, v, key in zip(is_ref, eqn.invars, args):
    if ref:
      outs.append(key)
      continue
    token, val = callback.io_callback(
        functools.partial(gpu_callbacks.wgmma_accumulator_deref, source_info=eqn.source_info),
        (gpu_callbacks.TOKEN_SHAPE_DTYPE, v.aval), token=token,
        device_id=self.device_info.device_id, grid_point_coords=self.grid_point_coords,
        thread_id=self.thread_id, acc_allocation_key_as_array=key, wait_n=None, ordered=True)
    outs.append(val)
    token = gpu_callbacks.call_deallocate_buffer(
        token=token, device_id=jnp.int32(self.device_info.device_id),
        grid_point_coords=self.grid_point_coords, thread_id=self.thread_id,
        allocation_key_as_array=key)
  return token, outs


_HANDLERS = {
    gpu_primitives.wgmma_ref_p: _wgmma,
    discharge.run_state_p: _run_state,
    gpu_core.layout_cast_p: lambda self, eqn, token, invals: (token, [invals[0]]),
}


def _free_vars(eqns):
  defined, free = set(), []
  for e in eqns:
    subs = [v for v in e.invars if isinstance(v, jax_core.Var)]
    free += [v for v in subs if v not in defined and v not in free]
    defined.update(e.outvars)
  return free


def _interpret(orig, self, jaxpr, token, *args):
  if not any(e.primitive in _HANDLERS for e in jaxpr.eqns):
    return orig(self, jaxpr, token, *args)
  env = dict(zip(list(jaxpr.constvars) + list(jaxpr.invars), args))
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
  segment = []

  def flush(token):
    if not segment:
      return token
    ins = _free_vars(segment)
    outs = [v for e in segment for v in e.outvars if not isinstance(v, jax_core.DropVar)]
    sub = jax_core.Jaxpr((), ins, outs, list(segment),
                         jax_core.join_effects(*(e.effects for e in segment)))
    token, vals = orig(self, sub, token, *map(read, ins))
    env.update(zip(outs, vals))
    segment.clear()
    return token

  for e in jaxpr.eqns:
    if e.primitive in _HANDLERS:
      token = flush(token)
      token, outs = _HANDLERS[e.primitive](self, e, token, [read(v) for v in e.invars])
      env.update((v, o) for v, o in zip(e.outvars, outs) if not isinstance(v, jax_core.DropVar))
    else:
      segment.append(e)
  token = flush(token)
  return token, [read(v) for v in jaxpr.outvars]


def install():
  cls = jaxpr_interpret.JaxprInterpreter
  if not SUPPORTED or getattr(cls.interpret, "_extended", False):
    return
  orig = cls.interpret
  cls.interpret = lambda self, *a: _interpret(orig, self, *a)
  cls.interpret._extended = True
