"""Splash attention (TPU's kernel, run in Pallas's interpreter on CPU) against the jnp reference:
forward and gradients, GQA, packed documents; `auto` picks it on TPU; lengths it cannot take."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels_util import check_attention, normal, packed_segments
from flax import nnx

from tinyllama_jax import config as config_lib, model
from tinyllama_jax.kernels import splash_attention


# (B, T, H, K, D, dtype, segmented, causal): GQA 2 and 4 query heads a kv head, MQA, MHA, packed
# documents with a length-1 one and trailing padding, bf16, two block sizes (T 256: 256, T 384: 128).
@pytest.mark.parametrize("B,T,H,K,D,dtype,segmented,causal", [
    (2, 256, 4, 2, 64, jnp.float32, False, True),
    (2, 256, 4, 2, 64, jnp.float32, True, True),
    (1, 384, 8, 2, 32, jnp.float32, True, True),
    (1, 256, 4, 1, 64, jnp.bfloat16, True, True),
    (1, 128, 2, 2, 128, jnp.float32, False, False),
])
def test_matches_reference(B, T, H, K, D, dtype, segmented, causal):
  check_attention(splash_attention.attention_splash, B, T, H, K, D, dtype, segmented=segmented,
                  causal=causal, seed=T + H)


def test_documents_do_not_attend_across():
  """A query's output must not change when another document's keys and values do."""
  B, T, H, K, D = 1, 256, 2, 1, 32
  seg = jnp.asarray([[1] * 100 + [2] * 156], jnp.int32)
  q, k, v = (normal(jax.random.key(i), s, jnp.float32)
             for i, s in enumerate([(B, T, H, D), (B, T, K, D), (B, T, K, D)]))
  o = splash_attention.attention_splash(q, k, v, seg)
  o2 = splash_attention.attention_splash(q, k.at[:, :100].set(7.0), v.at[:, :100].set(-3.0), seg)
  np.testing.assert_array_equal(np.asarray(o[:, 100:]), np.asarray(o2[:, 100:]))
  assert not np.allclose(np.asarray(o[:, :100]), np.asarray(o2[:, :100]))


def test_length_not_a_multiple_of_128_is_refused_naming_the_backend_that_can():
  q = jnp.zeros((1, 100, 2, 32))
  with pytest.raises(ValueError, match="multiple of 128.*attention=xla"):
    splash_attention.attention_splash(q, q[:, :, :1], q[:, :, :1])


def test_auto_picks_splash_on_tpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert model.resolve_attention("auto", uses_segments=False, head_dim=64) == "splash"
  assert model.resolve_attention("auto", uses_segments=True, head_dim=64) == "splash"
  assert model.resolve_attention("xla", uses_segments=True, head_dim=64) == "xla"


def test_the_model_runs_on_splash_as_on_the_reference():
  """The backend table wiring: a packed batch through Llama with attention=splash and =xla."""
  c = config_lib.model_config()
  c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads = 97, 32, 2, 4, 2
  c.head_dim, c.ffn_dim, c.max_seq_len, c.compute_dtype = 16, 48, 128, "float32"
  tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, 97)
  seg = packed_segments(np.random.default_rng(0), 2, 128)
  outs = {}
  for backend in ("xla", "splash"):
    c.kernels.attention = backend
    outs[backend] = model.Llama(c, rngs=nnx.Rngs(params=0))(tokens, segment_ids_BT=seg)
  np.testing.assert_allclose(outs["splash"], outs["xla"], rtol=1e-4, atol=1e-4)
