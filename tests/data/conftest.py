"""Data test fixtures: a small tokenizer trained once per session on a slice of the stdlib."""

import pytest

from tinyllama_jax.data import pipeline
from tinyllama_jax.data.config import data_config


def _small_cfg(**overrides):
  cfg = data_config()
  cfg.tokenizer_vocab_size = 512
  cfg.tokenizer_train_bytes = 300_000
  cfg.num_packing_bins = 8
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="session")
def small_cfg():
  """A factory: small_cfg(packing='first_fit') -> a data config with a 512-piece tokenizer."""
  return _small_cfg


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data_workdir"))


@pytest.fixture(scope="session")
def tok(workdir):
  return pipeline.load_tokenizer(_small_cfg(), workdir)
