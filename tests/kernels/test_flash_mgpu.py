"""Mosaic GPU flash attention against the fp32 jnp reference: forward, log-sum-exp, gradients.

CPU: Mosaic GPU interpret mode (mgpu_interpret: jax's GPU interpreter with the wgmma/run_state
pieces it lacks), which simulates the warp groups, TMA copies, barriers (every phase of every
barrier must be observed by each group) and starts every output and SMEM buffer as NaN, so an
element the kernel forgets to write fails the comparison. Inputs are fresh random values per
case. The gpu-marked test runs the compiled kernel at the bench shapes against cuDNN.
"""

import dataclasses
import functools
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import mgpu_interpret
from kernels_util import assert_close, check_attention, normal, rel_l2
from tinyllama_jax.kernels import attention, flash_mgpu as fm

mgpu_interpret.install()


def _inputs(B, T, H, K, D, seed):
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  return (normal(kq, (B, T, H, D), jnp.bfloat16), normal(kk, (B, T, K, D), jnp.bfloat16),
          normal(kv, (B, T, K, D), jnp.bfloat16), normal(kd, (B, T, H, D), jnp.float32))


def _reference(q, k, v, causal):
  with jax.default_matmul_precision("highest"):
    return attention.attention_xla(*(x.astype(jnp.float32) for x in (q, k, v)), causal=causal)


def _lse2_reference(q, k, causal):
  """log2 of the softmax denominator of the scaled logits, [B, H, T] (what the kernel keeps)."""
  B, T, H, D = q.shape
  K = k.shape[2]
  s = jnp.einsum("btkgd,bskd->bkgts", q.astype(jnp.float32).reshape(B, T, K, H // K, D),
                 k.astype(jnp.float32), precision="highest") * D ** -0.5
  if causal:
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
  return (jax.nn.logsumexp(s, axis=-1) * math.log2(math.e)).reshape(B, H, T)


# (B, T, H, K, D, causal, block_kv, steps): GQA 2 query heads a kv head and MHA, 64- and
# 128-key tiles, a ring shorter than the key blocks (slots reused) and as long, head dim 128.
CASES = [
    (1, 256, 2, 1, 64, True, 64, 2),
    (1, 256, 2, 1, 128, True, 128, 2),
    (1, 256, 2, 2, 64, False, 128, 2),
]


@mgpu_interpret.needs_interpreter
@pytest.mark.parametrize("B,T,H,K,D,causal,block_kv,steps", CASES)
def test_forward_and_lse_interpret(B, T, H, K, D, causal, block_kv, steps):
  q, k, v, _ = _inputs(B, T, H, K, D, seed=T + H + D)
  cfg = fm.MgpuConfig(block_kv=block_kv, steps=steps)
  o, lse = jax.jit(lambda q, k, v: fm._forward(q, k, v, cfg, causal, mgpu_interpret.PARAMS))(
      q, k, v)
  o_ref = _reference(q, k, v, causal)
  assert o.dtype == jnp.bfloat16
  assert_close(o, o_ref, jnp.bfloat16, "output")
  assert rel_l2(lse, _lse2_reference(q, k, causal)) < 1e-4


@mgpu_interpret.needs_interpreter
def test_gradients_with_triton_backward_interpret():
  """Through the custom VJP with backward='triton': this forward's output and log-sum-exp feed
  attention=pallas's backward kernels (the Mosaic GPU backward: test_flash_mgpu_bwd.py)."""
  cfg = fm.MgpuConfig(block_kv=64, steps=2, backward="triton")
  kernel = functools.partial(fm.flash_attention_mgpu, config=cfg,
                             interpret=mgpu_interpret.PARAMS)
  check_attention(kernel, 1, 256, 2, 1, 64, jnp.bfloat16, segmented=False, causal=True, seed=3)


def test_refuses_what_it_cannot_do():
  q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
  kv = q[:, :, :2]
  with pytest.raises(ValueError, match="segment ids.*attention=pallas"):
    fm.attention_mgpu(q, kv, kv, jnp.ones((1, 256), jnp.int32))
  with pytest.raises(ValueError, match="multiple of 128"):
    fm.attention_mgpu(q[:, :200], kv[:, :200], kv[:, :200])
  with pytest.raises(ValueError, match="head dim 64 or 128"):
    fm.attention_mgpu(q[..., :32], kv[..., :32], kv[..., :32])
  with pytest.raises(ValueError, match="bf16 or f16"):
    fm.attention_mgpu(q.astype(jnp.float32), kv.astype(jnp.float32), kv.astype(jnp.float32))
  with pytest.raises(ValueError, match="backward 'mgpu' or 'triton'"):
    fm.flash_attention_mgpu(q, kv, kv, config=fm.MgpuConfig(backward="xla"))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    fm.attention_mgpu(q, q[:, :, :3], q[:, :, :3])
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a Hopper GPU"):
      fm.attention_mgpu(q, kv, kv)


def test_supports_says_what_the_checks_refuse():
  assert fm.supports(seq_len=2048, head_dim=64, dtype=jnp.bfloat16)
  assert fm.supports()  # nothing known: no reason to refuse
  assert not fm.supports(seq_len=1000, head_dim=64, dtype=jnp.bfloat16)
  assert not fm.supports(seq_len=2048, head_dim=96, dtype=jnp.bfloat16)
  assert not fm.supports(seq_len=2048, head_dim=128, dtype=jnp.float32)


def test_table_entry_is_lazy():
  from tinyllama_jax import kernels
  assert "mgpu" in kernels.backends("attention")
  assert kernels.get("attention", "mgpu") is fm.attention_mgpu


@pytest.mark.parametrize("D", [64, 128])
def test_lowers_at_bench_shape(D):
  """The Mosaic GPU lowering (layouts, SMEM budget) runs on CPU for the bench shapes."""
  H, K = (32, 4) if D == 64 else (16, 2)
  q = jax.ShapeDtypeStruct((8, 2048, H, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((8, 2048, K, D), jnp.bfloat16)
  fwd = lambda q, k, v: fm._forward(q, k, v, fm.default_config(D), True, None)
  text = jax.jit(fwd).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize("backward", ["mgpu", "triton"])
@pytest.mark.parametrize("B,T,H,K,D", [(8, 2048, 32, 4, 64), (8, 2048, 16, 2, 128),
                                       (2, 1024, 8, 8, 64)])
def test_matches_reference_and_cudnn_gpu(on_gpu, B, T, H, K, D, backward):
  cfg = dataclasses.replace(fm.default_config(D), backward=backward)
  kernel = functools.partial(fm.flash_attention_mgpu, config=cfg)
  check_attention(kernel, B, T, H, K, D, jnp.bfloat16, segmented=False, causal=True, seed=T + H)
  q, k, v, _ = _inputs(B, T, H, K, D, seed=T + H + 1)
  o, lse = jax.jit(lambda q, k, v: fm._forward(q, k, v, cfg, True, None))(q, k, v)
  assert rel_l2(o, attention.attention_cudnn(q, k, v)) < 2e-2
  np.testing.assert_allclose(np.asarray(lse), np.asarray(_lse2_reference(q, k, True)), atol=1e-2)


def test_model_step_lowers_with_mgpu(monkeypatch):
  """The backend table wiring: Llama's gradient with attention=mgpu, traced as on the GPU
  machine and lowered for CUDA on CPU: the forward, dQ and dK/dV Mosaic GPU kernels."""
  from flax import nnx
  from tinyllama_jax import config as config_lib, model
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  c = config_lib.model_config()
  c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads = 97, 128, 1, 2, 1
  c.head_dim, c.ffn_dim, c.max_seq_len, c.compute_dtype = 64, 96, 256, "bfloat16"
  c.kernels.attention = "mgpu"
  graphdef, state = nnx.split(model.Llama(c, rngs=nnx.Rngs(params=0)))
  loss = lambda state, tokens: nnx.merge(graphdef, state)(tokens).astype(jnp.float32).mean()
  text = jax.jit(jax.grad(loss)).trace(state, jax.ShapeDtypeStruct((2, 256), jnp.int32)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu") == 3
