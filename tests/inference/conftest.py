"""Fixtures of the decoding tests: tiny random models, and test_export's HF-import fixtures (its
helpers live in tests/, one folder up)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decoding_models import tiny_model  # noqa: E402
from hf_models import exported, imported, tokenizer_file  # noqa: E402, F401 (fixtures)


@pytest.fixture(scope="module")
def target():
  return tiny_model(0)


@pytest.fixture(scope="module")
def draft():
  return tiny_model(1, n_layers=1, d_model=32, ffn_dim=64, n_heads=2, n_kv_heads=1)


@pytest.fixture(scope="session")
def lm_eval_run(tmp_path_factory):
  """A tiny trained run, its fp32 export and local lm-eval tasks (lm_eval_runs.py)."""
  from lm_eval_runs import trained_run
  return trained_run(str(tmp_path_factory.mktemp("lm_eval")))
