"""Glob expansion of data paths: symlinked aliases and loops read each real file once."""

import logging
import os
import threading

import pytest

from tinyllama_jax.data import paths
from tinyllama_jax.data import pipeline
from tinyllama_jax.data import prepare as prepare_lib
from tinyllama_jax.inference import evaluate


@pytest.fixture
def corpus(tmp_path):
  """corpus/v1/a.txt, corpus/v2/{b,c}.txt, an alias corpus/current -> v2 and a loop
  v1/up -> .. (glob follows it 40 levels deep, the kernel's limit)."""
  root = tmp_path / "corpus"
  for rel, text in (("v1/a.txt", "alpha"), ("v2/b.txt", "beta"), ("v2/c.txt", "gamma")):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)
  os.symlink("v2", root / "current")
  os.symlink("..", root / "v1" / "up")
  return root


def test_recursive_glob_reads_each_real_file_once_and_logs_what_it_left_out(corpus, caplog):
  os.symlink("..", corpus / "v2" / "up")  # a second loop: a walk following both branches 2^40 ways
  result = []
  with caplog.at_level(logging.WARNING):
    walk = threading.Thread(target=lambda: result.append(
        paths.expand(f"{corpus}/**/*.txt", "files", "--input")), daemon=True)
    walk.start()
    walk.join(timeout=60)
  assert result, "the expansion did not end: it follows symlink loops"
  found = result[0]
  assert found == [str(corpus / rel) for rel in ("v1/a.txt", "v2/b.txt", "v2/c.txt")]
  assert "left out 2 matches that are files already matched" in caplog.text  # current/{b,c}
  assert "did not walk into 3 symlinked folders" in caplog.text  # v1/up, v2/up, current/up


def test_glob_patterns_match_as_glob_does(corpus):
  assert paths.expand(f"{corpus}/v*/*.txt", "files", "x") == [
      str(corpus / "v1/a.txt"), str(corpus / "v2/b.txt"), str(corpus / "v2/c.txt")]
  assert paths.expand(f"{corpus}/**/a.txt,{corpus}/v1/a.txt", "files", "x") == [
      str(corpus / "v1/a.txt")]
  (corpus / "v1" / ".hidden.txt").write_text("hidden")
  assert str(corpus / "v1/.hidden.txt") not in paths.expand(f"{corpus}/**/*.txt", "files", "x")
  with pytest.raises(FileNotFoundError, match=r"data.mixture='.*nothing\*' matches no files"):
    paths.expand(f"{corpus}/nothing*", "files", "data.mixture")


def test_every_reader_of_globs_expands_through_it(corpus, small_cfg, tok):
  assert len(prepare_lib.expand_inputs(f"{corpus}/**/*.txt")) == 3
  cfg = small_cfg(source="text", paths=f"{corpus}/**/*.txt", eval_fraction=0.0)
  docs, _ = pipeline._documents("text", cfg.paths, cfg, "train")  # pylint: disable=protected-access
  assert sorted(text for _, text in docs) == ["alpha", "beta", "gamma"]
  assert sorted(evaluate.read_documents(f"{corpus}/**/*.txt")[0]) == ["alpha", "beta", "gamma"]
  mixture = small_cfg(source="mixture", mixture=f"1:text:{corpus}/missing/*.txt")
  with pytest.raises(FileNotFoundError, match="data.mixture="):
    pipeline.identity(mixture)


def test_a_folder_that_cannot_be_read_is_counted_not_skipped_silently(corpus, caplog,
                                                                     monkeypatch):
  listdir = os.listdir

  def no_v2(path):  # as an unreadable folder answers (root reads folders whatever their modes)
    if os.path.realpath(path) == str(corpus / "v2"):
      raise PermissionError(13, "Permission denied", path)
    return listdir(path)
  monkeypatch.setattr(os, "listdir", no_v2)
  with caplog.at_level(logging.WARNING):
    assert paths.expand(f"{corpus}/**/*.txt", "files", "--input") == [str(corpus / "v1/a.txt")]
  assert "left out 2 folders that cannot be read" in caplog.text  # v2, and current -> v2
