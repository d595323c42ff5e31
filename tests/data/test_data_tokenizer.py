import os

import pytest

from tinyllama_jax.data import pipeline
from tinyllama_jax.data import sources
from tinyllama_jax.data import tokenizer as tokenizer_lib


def test_trained_tokenizer_has_llama_ids_and_round_trips(tok, workdir):
  assert tok.path == os.path.join(workdir, "tokenizer", "tokenizer.model")
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, 1, 2)
  assert len(tok.sha256) == 64
  text = open(os.path.join(sources.stdlib_root(), "json", "decoder.py")).read()
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert len(ids) < len(text) / 1.3  # it learned merges, not just bytes
  # Byte fallback: text the training sample never saw still round-trips exactly.
  odd = "  \tλ 東京 \U0001f680\n\n  x"
  assert tok.decode(tok.encode(odd)) == odd
  assert 0 not in tok.encode(odd)  # nothing becomes <unk>


def test_tokenizer_is_cached_not_retrained(tok, workdir, small_cfg):
  mtime = os.path.getmtime(tok.path)
  again = pipeline.load_tokenizer(small_cfg(), workdir)
  assert again.sha256 == tok.sha256
  assert os.path.getmtime(tok.path) == mtime


def test_cached_tokenizer_for_another_vocab_is_an_error(tok, workdir, small_cfg):
  with pytest.raises(ValueError, match="trained for .*vocab_size.*512.*delete"):
    pipeline.load_tokenizer(small_cfg(tokenizer_vocab_size=1024), workdir)


def test_explicit_tokenizer_path_loads_and_pickles(tok, small_cfg, tmp_path):
  import pickle
  loaded = pipeline.load_tokenizer(small_cfg(tokenizer=tok.path), str(tmp_path))
  assert loaded.sha256 == tok.sha256
  assert os.listdir(tmp_path / "tokenizer") == ["tokenizer.model"]  # the copy; nothing trained
  copy = pickle.loads(pickle.dumps(loaded))  # grain worker processes receive it this way
  assert copy.encode("def f(x):\n  return x") == loaded.encode("def f(x):\n  return x")


def test_missing_tokenizer_file_is_a_clear_error(small_cfg, tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model.*not found.*data.tokenizer"):
    pipeline.load_tokenizer(small_cfg(tokenizer=str(tmp_path / "nope.model")), str(tmp_path))


def test_file_that_is_not_a_sentencepiece_model_is_a_clear_error(small_cfg, tmp_path):
  bogus = tmp_path / "bogus.model"
  bogus.write_bytes(b"this is not a model")
  with pytest.raises(ValueError, match="bogus.model.*not a sentencepiece model"):
    tokenizer_lib.Tokenizer(str(bogus))


def test_synthetic_source_needs_no_tokenizer(small_cfg, tmp_path):
  assert pipeline.load_tokenizer(small_cfg(source="synthetic"), str(tmp_path)) is None
