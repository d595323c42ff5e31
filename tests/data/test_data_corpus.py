"""Prepared data as a run reads it: manifests checked field by field, shard content in the data
identity (shards rewritten under a checkpoint refuse its resume), the empty splits' messages."""

import hashlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import hostile
from tests.training import faults_helpers as fh
from tinyllama_jax.config import listing
from tinyllama_jax.data import corpus
from tinyllama_jax.data import formats
from tinyllama_jax.data import pipeline
from tinyllama_jax.data import prepare as prepare_lib
from tinyllama_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _prepare(tok, tmp_path, name="data", eval_fraction=0.2, texts=None):
  texts = texts if texts is not None else [
      open(os.path.join(sources.stdlib_root(), n), encoding="utf-8").read()
      for n in sources.stdlib_files()[300:330]]
  src = tmp_path / f"{name}.jsonl"
  src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  out = tmp_path / name
  prepare_lib.prepare([str(src)], tok, str(out), eval_fraction=eval_fraction,
                      shard_tokens=4096, progress=False)
  return out


def _rewrite_in_place(shard):
  """Other tokens under the same name, size and header; the modification time moves on."""
  tokens = np.array(formats.read_litpkds(str(shard)))
  formats.write_litpkds(str(shard), tokens[::-1].copy())


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ('{"format": "tinyllama_jax.prepared/1", "tokenizer": null, "shards": []}',
     "field 'tokenizer' is missing or not an object"),
    ('{"format": "tinyllama_jax.prepared/1", "tokenizer": {"path": "t.model", "sha256": "ab"}}',
     "field 'shards' is missing or not a list"),
    ('{"format": "tinyllama_jax.prepared/1", "tokenizer": {"path": "t.model", "sha256": "ab"}, '
     '"shards": [{"path": "s.bin", "split": "train", "tokens": "many"}]}',
     r"field 'shards\[0\].tokens' is missing or not a count"),
    ("[1, 2]", "is not a tinyllama_jax.prepared/1 manifest"),
])
def test_a_hand_edited_manifest_is_one_error_naming_the_file_and_field(tmp_path, text, message):
  (tmp_path / "manifest.json").write_text(text)
  with pytest.raises(ValueError, match=message) as e:
    corpus.load_manifest(str(tmp_path))
  assert str(tmp_path / "manifest.json") in str(e.value)


def test_train_on_a_hand_edited_manifest_is_one_line_before_anything_runs(tmp_path, capfd):
  (tmp_path / "manifest.json").write_text('{"format": "tinyllama_jax.prepared/1", '
                                          '"tokenizer": null, "shards": []}')
  hostile.check("train", hostile.Probe(
      "tokenizer null", ("--config=configs/tiny.py", "--workdir={tmp}/run",
                         "--config.data.source=prepared", "--config.data.paths={tmp}"), 2,
      f"{tmp_path}/manifest.json: field 'tokenizer' is missing or not an object"), tmp_path, capfd)


def test_shards_rewritten_in_place_change_the_data_identity(tok, small_cfg, tmp_path, caplog):
  out = _prepare(tok, tmp_path)
  cfg = small_cfg(source="prepared", paths=str(out))
  before = pipeline.identity(cfg)
  manifest, _ = corpus.load_manifest(str(out))
  assert all(len(s["sha256"]) == 64 and len(s["docs_sha256"]) == 64 for s in manifest["shards"])
  # Unchanged shards: the identity an earlier version computed from the same manifest.
  old_way = hashlib.sha256(json.dumps([manifest["shards"]]).encode()).hexdigest()
  assert before == {f"prepared:{out}": old_way}
  shard = out / manifest["shards"][0]["path"]
  stat = os.stat(shard)
  _rewrite_in_place(shard)
  assert os.path.getsize(shard) == stat.st_size
  with caplog.at_level(logging.WARNING):
    assert pipeline.identity(cfg) != before
  assert "1 shards of" in caplog.text
  assert "differ from the checksums prepare recorded" in caplog.text
  # A rewrite dated back before the manifest is found when every shard is hashed, on demand.
  os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert pipeline.identity(cfg) == before
  every = small_cfg(source="prepared", paths=str(out), verify_shards=True)
  assert pipeline.identity(every) != before


def test_data_prepared_without_checksums_keeps_its_identity_with_a_warning(tok, small_cfg, tmp_path,
                                                                            caplog):
  out = _prepare(tok, tmp_path)
  manifest, _ = corpus.load_manifest(str(out))
  for s in manifest["shards"]:
    del s["sha256"], s["docs_sha256"]
  (out / "manifest.json").write_text(json.dumps(manifest))
  with caplog.at_level(logging.WARNING):
    got = pipeline.identity(small_cfg(source="prepared", paths=str(out)))
  assert got == {f"prepared:{out}": hashlib.sha256(
      json.dumps([manifest["shards"]]).encode()).hexdigest()}
  assert "records no shard checksums" in caplog.text and "not verified" in caplog.text


def test_empty_splits_say_which_split_is_empty_and_why(tok, small_cfg, tmp_path, caplog):
  no_eval = _prepare(tok, tmp_path, "no_eval", eval_fraction=0.0)
  with pytest.raises(ValueError, match="no 'eval' shards: prepare with --eval_fraction > 0"):
    corpus.prepared_shards(str(no_eval), "eval")
  with caplog.at_level(logging.WARNING):
    empty = _prepare(tok, tmp_path, "empty", texts=["", "  "])
  assert "has no training tokens" in caplog.text and "refused at start" in caplog.text
  with pytest.raises(ValueError, match="no 'train' shards \\(its inputs held no documents"):
    corpus.prepared_shards(str(empty), "train")
  with pytest.raises(ValueError, match="no 'train' shards"):  # train refuses it up front
    pipeline.load_tokenizer(small_cfg(source="prepared", paths=str(empty)), str(tmp_path / "w"))


def test_the_mixture_example_in_the_help_names_what_prepare_writes(tok, small_cfg, tmp_path):
  example = listing.key_comments()["data.mixture"].split('"')[3]
  slim, star = _prepare(tok, tmp_path, "slim"), _prepare(tok, tmp_path, "star")
  mixture = example.replace("/data/slim", str(slim)).replace("/data/star", str(star))
  cfg = small_cfg(source="mixture", mixture=mixture)
  assert [w for w, _, _ in pipeline.components(cfg)] == [0.693584, 0.306416]
  assert len(pipeline.identity(cfg)) == 2
  old_example = mixture.replace(str(slim), f"{slim}/*.manifest.json")
  with pytest.raises(FileNotFoundError, match=r"point data.mixture at its --out folder"):
    pipeline.identity(small_cfg(source="mixture", mixture=old_example))



@pytest.mark.slow
def test_a_resume_onto_shards_rewritten_under_the_run_is_refused(tok, tmp_path):
  out = _prepare(tok, tmp_path)
  env = fh.process_env(tmp_path / "cache")
  args = [sys.executable, "-m", "tinyllama_jax.train", "--config=configs/tiny.py",
          f"--workdir={tmp_path / 'run'}"] + [f"--config.{k}={v}" for k, v in {
              **fh.MICRO, "data.source": "prepared", "data.paths": out, "train.steps": 4}.items()]
  first = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  manifest, _ = corpus.load_manifest(str(out))
  _rewrite_in_place(out / manifest["shards"][0]["path"])
  again = subprocess.run(args + ["--config.train.steps=8"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 2, again.stderr[-2000:]
  assert again.stderr.strip().splitlines()[-1].startswith(
      f"error: the training data (prepared:{out}) changed since checkpoint 4"), again.stderr[-2000:]
  assert "Traceback" not in again.stderr
