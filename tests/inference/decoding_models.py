"""Helpers of the decoding tests: tiny random models and prompts (a module of its own name: a
`conftest` import would be ambiguous with tests/conftest.py)."""

import os

import numpy as np
from flax import nnx

from tinyllama_jax import config as config_lib
from tinyllama_jax import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_model(seed, **fields):
  """(params, model config): a random Llama small enough to decode thousands of rows on a CPU.
  A large init makes its next-token choices confident, so greedy decoding has no near-ties."""
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py")).model
  with cfg.unlocked():
    cfg.update({**dict(vocab_size=64, d_model=64, n_layers=2, ffn_dim=128, max_seq_len=128,
                       init_std=0.3), **fields})
  model = model_lib.Llama(cfg, rngs=nnx.Rngs(params=seed))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg


def random_prompts(lengths, vocab_size=64, seed=0):
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(0, vocab_size, n).tolist() for n in lengths]
  return prompts, np.array(lengths, np.int32)
