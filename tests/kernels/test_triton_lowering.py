"""Every Pallas kernel lowers through the Triton backend at TinyLlama shapes, here on CPU.

jax lowers for a platform it does not run (`lowering_platforms=("cuda",)`); that runs the whole
Pallas -> Triton IR lowering, so an op Triton cannot express fails here, not on the GPU machine.
A case's kernels are counted forward + backward, or forward alone for the decode-only kernels
(they have no backward).
"""

from unittest import mock

import pytest

import jax
import jax.numpy as jnp

from tinyllama_jax.kernels import _pallas, decode_layer, rms_norm, swiglu

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


def _sum(*outs):
  return sum(o.astype(jnp.float32).sum() for o in outs)


CASES = {
    "rms_norm": (lambda x, w: _sum(rms_norm.rms_norm_pallas(x, w, 1e-5)),
                 [S((8, 2048, 2048), BF16), S((2048,), jnp.float32)], 2),
    "add_rms_norm": (lambda x, d, w: _sum(*rms_norm.add_rms_norm_pallas(x, d, w, 1e-5)),
                     [S((8, 2048, 2048), BF16)] * 2 + [S((2048,), jnp.float32)], 2),
    "swiglu_packed": (lambda gu: _sum(swiglu.swiglu_packed_pallas(gu)),
                      [S((8, 2048, 2 * 5632), BF16)], 2),
}
# The fused decode layer at 1 row (GEMVs), 5 (a masked dot) and 16; forward only.
for _M in (1, 5, 16):
  CASES.update({
      f"decode_qkv_{_M}": (lambda x, g, w: decode_layer.norm_gemv(x, g, w, 1e-5),
                           [S((_M, 2048), BF16), S((2048,), BF16), S((2560, 2048), BF16)], 1),
      f"decode_down_{_M}": (lambda a, w, r: decode_layer.gemv_add(a, w, r),
                            [S((_M, 5632), BF16), S((2048, 5632), BF16), S((_M, 2048), BF16)], 1),
      f"decode_gate_up_{_M}": (lambda x, g, w: decode_layer.norm_gemv_swiglu(x, g, w, 1e-5),
                               [S((_M, 2048), BF16), S((2048,), BF16), S((11264, 2048), BF16)],
                               1),
      f"decode_attend_{_M}": (
          lambda qkv, c, s, k, v, p: _sum(*decode_layer.attend(qkv, c, s, k, v, p, 32)),
          [S((_M, 1, 40, 64), BF16), S((_M, 1, 32), jnp.float32), S((_M, 1, 32), jnp.float32),
           S((_M, 384, 4, 64), BF16), S((_M, 384, 4, 64), BF16), S((_M, 1), jnp.int32)], 1),
  })


@pytest.mark.parametrize("name", sorted(CASES))
def test_lowers_to_triton(name):
  loss, args, n_kernels = CASES[name]
  with mock.patch.object(_pallas, "interpret_default", lambda: False):
    argnums = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
    fn = jax.value_and_grad(loss, argnums) if n_kernels > 1 else loss
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("xla.gpu.triton") == n_kernels
