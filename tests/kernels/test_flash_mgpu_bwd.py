"""The Mosaic GPU backward (dQ and dK/dV kernels) against the fp32 jnp reference's gradients,
in Mosaic GPU interpret mode on CPU (see test_flash_mgpu.py: NaN-started outputs and SMEM,
every barrier phase observed, fresh random inputs); GPU runs: test_flash_mgpu.py's gpu test."""

import dataclasses
import functools

import pytest

import jax
import jax.numpy as jnp

import mgpu_interpret
from kernels_util import check_attention
from tinyllama_jax.kernels import flash_mgpu as fm, flash_mgpu_bwd

mgpu_interpret.install()


# (B, T, H, K, D, causal, bwd_block_kv, bwd_block_q, bwd_steps): GQA 2 (one kv head), 64-row
# tiles, slots reused (4 key blocks, 8 (query block, head) pairs, 2 slots); head dim 128 with
# 128-row streamed tiles, GQA 2; MHA without causality on a 3-slot ring.
CASES = [
    (1, 256, 2, 1, 64, True, 64, 64, 2),
    (1, 256, 2, 1, 128, True, 128, 128, 2),
    (1, 128, 2, 2, 64, False, 64, 64, 3),
]


@mgpu_interpret.needs_interpreter
@pytest.mark.parametrize("B,T,H,K,D,causal,block_kv,block_q,steps", CASES)
def test_gradients_interpret(B, T, H, K, D, causal, block_kv, block_q, steps):
  cfg = fm.MgpuConfig(block_kv=64, steps=2, bwd_block_kv=block_kv, bwd_block_q=block_q,
                      bwd_steps=steps)
  kernel = functools.partial(fm.flash_attention_mgpu, config=cfg,
                             interpret=mgpu_interpret.PARAMS)
  check_attention(kernel, B, T, H, K, D, jnp.bfloat16, segmented=False, causal=causal,
                  seed=T + H + D)


@pytest.mark.parametrize("D", [64, 128])
def test_lowers_at_bench_shape(D):
  """Both backward kernels lower for the GPU on CPU (layouts, SMEM budget) at every tile."""
  H, K = (32, 4) if D == 64 else (16, 2)
  q = jax.ShapeDtypeStruct((8, 2048, H, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((8, 2048, K, D), jnp.bfloat16)
  for block_kv, block_q in ((64, 64), (128, 64), (64, 128)):
    cfg = dataclasses.replace(fm.default_config(D), bwd_block_kv=block_kv, bwd_block_q=block_q)
    loss = lambda q, k, v: fm._attention(q, k, v, cfg, True, None).astype(jnp.float32).sum()
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, kv, kv).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 3  # forward, dQ, dK/dV
  assert flash_mgpu_bwd._ROWS == 64
