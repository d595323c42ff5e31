"""Shared by the decoding tests: tiny random models, and test_export's HF-import fixtures (its
helpers live in tests/, one folder up)."""

import os
import sys

import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_export import REPO, imported, tokenizer_file  # noqa: E402, F401 (fixtures)
from tinyllama_jax import config as config_lib  # noqa: E402
from tinyllama_jax import model as model_lib  # noqa: E402


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


@pytest.fixture(scope="module")
def target():
  return tiny_model(0)


@pytest.fixture(scope="module")
def draft():
  return tiny_model(1, n_layers=1, d_model=32, ffn_dim=64, n_heads=2, n_kv_heads=1)
