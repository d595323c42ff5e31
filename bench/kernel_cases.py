"""Every Pallas Triton kernel at TinyLlama-1.1B's shapes, as a function and argument shapes to
lower it with: tests/kernels/test_triton_lowering.py lowers each for a GPU on the CPU, and
`python -m bench.ptx` compiles each for an H100.

CASES: name -> (fn, argument shapes, kernels). fn's float arguments are differentiated where
kernels > 1 (the forward and backward kernels); the decode-only kernels count their forward.
"""

import jax
import jax.numpy as jnp

from tinyllama_jax.kernels import decode_layer, rms_norm, swiglu

S = jax.ShapeDtypeStruct
BF16, F32 = jnp.bfloat16, jnp.float32


def _sum(*outs):
  return sum(o.astype(jnp.float32).sum() for o in outs)


CASES = {
    "rms_norm": (lambda x, w: _sum(rms_norm.rms_norm_pallas(x, w, 1e-5)),
                 [S((8, 2048, 2048), BF16), S((2048,), F32)], 2),
    "add_rms_norm": (lambda x, d, w: _sum(*rms_norm.add_rms_norm_pallas(x, d, w, 1e-5)),
                     [S((8, 2048, 2048), BF16)] * 2 + [S((2048,), F32)], 2),
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
          [S((_M, 1, 40, 64), BF16), S((_M, 1, 32), F32), S((_M, 1, 32), F32),
           S((_M, 384, 4, 64), BF16), S((_M, 384, 4, 64), BF16), S((_M, 1), jnp.int32)], 1),
  })
# Flash-decoding over a 2,048-slot cache: a program per 128 slots and head, one trip each.
CASES["decode_attend_split_1"] = (
    lambda qkv, c, s, k, v, p: _sum(*decode_layer.attend(qkv, c, s, k, v, p, 32, block_s=128,
                                                         split_s=128)),
    [S((1, 1, 40, 64), BF16), S((1, 1, 32), F32), S((1, 1, 32), F32),
     S((1, 2048, 4, 64), BF16), S((1, 2048, 4, 64), BF16), S((1, 1), jnp.int32)], 1)
# The final norm + lm_head as the same GEMV, fp32 logits (bench.decode_layer's lm_head row).
for _M in (1, 16):
  CASES[f"decode_lm_head_{_M}"] = (lambda x, g, w: decode_layer.norm_gemv(x, g, w, 1e-5, F32),
                                   [S((_M, 2048), BF16), S((2048,), BF16),
                                    S((32000, 2048), BF16)], 1)


def traced(name):
  """(jitted fn, argument shapes) of a case: its kernels, with their backward where it has one."""
  fn, args, n_kernels = CASES[name]
  argnums = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
  return jax.jit(jax.value_and_grad(fn, argnums) if n_kernels > 1 else fn), args
