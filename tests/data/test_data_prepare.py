"""prepare CLI + readers + prepared/LITPKDS/text sources, on files built from the stdlib sources."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tinyllama_jax.data import corpus
from tinyllama_jax.data import formats
from tinyllama_jax.data import pipeline
from tinyllama_jax.data import prepare as prepare_lib
from tinyllama_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stdlib_texts(start, n):
  root = sources.stdlib_root()
  return [open(os.path.join(root, name), encoding="utf-8").read()
          for name in sources.stdlib_files()[start:start + n]]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """a.jsonl (30 docs, one blank line, one non-UTF-8 line), b/*.txt (5 files + 1 empty), plus
  .jsonl.zst / .parquet when their packages are installed."""
  d = tmp_path_factory.mktemp("inputs")
  docs = _stdlib_texts(100, 40)
  with open(d / "a.jsonl", "wb") as f:
    for i, text in enumerate(docs[:30]):
      f.write(json.dumps({"text": text, "id": i}).encode() + b"\n")
      if i == 3:
        f.write(b"\n" + b'{"text": "caf\xe9"}\n')
  (d / "b").mkdir()
  for i, text in enumerate(docs[30:35]):
    (d / "b" / f"{i}.txt").write_text(text)
  (d / "b" / "empty.txt").write_text("")
  try:
    import zstandard  # pylint: disable=g-import-not-at-top
    payload = "".join(json.dumps({"text": t}) + "\n" for t in docs[35:38]).encode()
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
  except ImportError:
    pass
  try:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pq.write_table(pa.table({"text": docs[38:40]}), str(d / "e.parquet"))
  except ImportError:
    pass
  return d


def _prepare(inputs, tok, out, **kw):
  paths = prepare_lib.expand_inputs(f"{inputs}/a.jsonl,{inputs}/b/*.txt,{inputs}/*.zst,"
                                    f"{inputs}/*.parquet")
  kw.setdefault("eval_fraction", 0.1)
  return prepare_lib.prepare(paths, tok, str(out), progress=False, **kw)


def _documents_of(out, split):
  """Every document of a split, read back through the shards' document index."""
  manifest, root = corpus.load_manifest(str(out))
  store = corpus.TokenStore(corpus.prepared_shards(str(out), split))
  docs = corpus.DocumentSource(store, 0, 1)
  return manifest, [docs[i]["tokens"] for i in range(len(docs))]


def test_prepare_writes_every_document_once_with_bos_and_eos(inputs, tok, tmp_path):
  manifest = _prepare(inputs, tok, tmp_path / "out")
  totals = manifest["totals"]
  want = _stdlib_texts(100, 35)
  if os.path.exists(inputs / "c.jsonl.zst"):
    want += _stdlib_texts(135, 3)
  if os.path.exists(inputs / "e.parquet"):
    want += _stdlib_texts(138, 2)
  assert totals["documents"] == len(want)
  assert totals["skipped_not_utf8"] == 1 and totals["skipped_empty"] == 1
  assert manifest["tokenizer"]["sha256"] == tok.sha256
  got = []
  for split in sources.SPLITS:
    _, docs = _documents_of(tmp_path / "out", split)
    assert sum(map(len, docs)) == totals[f"{split}_tokens"]
    for d in docs:
      assert d[0] == tok.bos_id and d[-1] == tok.eos_id
      got.append(tok.decode(d[1:-1]))
  assert sorted(got) == sorted(want)
  assert 0 < totals["eval_documents"] < totals["train_documents"]


def test_small_shards_hold_the_same_stream_and_rerun_skips_done_inputs(inputs, tok, tmp_path):
  big = _prepare(inputs, tok, tmp_path / "big")
  small = _prepare(inputs, tok, tmp_path / "small", shard_tokens=1000)
  assert len(small["shards"]) > len(big["shards"])
  assert all(s["tokens"] <= 1000 for s in small["shards"])
  for totals in (big["totals"], small["totals"]):  # a document cut by a shard boundary counts once
    assert totals["documents"] == totals["train_documents"] + totals["eval_documents"]
  assert small["totals"]["documents"] == big["totals"]["documents"]
  for split in sources.SPLITS:
    a = corpus.TokenStore(corpus.prepared_shards(str(tmp_path / "big"), split))
    b = corpus.TokenStore(corpus.prepared_shards(str(tmp_path / "small"), split))
    np.testing.assert_array_equal(a.slice(0, a.num_tokens), b.slice(0, b.num_tokens))
  mtimes = {p: os.path.getmtime(p) for p in (tmp_path / "small" / "shards").iterdir()}
  again = _prepare(inputs, tok, tmp_path / "small", shard_tokens=1000)
  assert again["totals"] == small["totals"]
  assert mtimes == {p: os.path.getmtime(p) for p in (tmp_path / "small" / "shards").iterdir()}


def test_litpkds_round_trip_and_corrupt_files(tmp_path):
  tokens = np.arange(1000, dtype=np.uint16)
  path = str(tmp_path / "x.bin")
  formats.write_litpkds(path, tokens)
  with open(path, "rb") as f:  # the original's header, byte for byte
    assert f.read(24) == b"LITPKDS" + (1).to_bytes(8, "little") + b"\x08" + (1000).to_bytes(8, "little")
  np.testing.assert_array_equal(formats.read_litpkds(path), tokens)
  raw = open(path, "rb").read()
  (tmp_path / "short.bin").write_bytes(raw[:-10])
  with pytest.raises(ValueError, match="short.bin is truncated or corrupt.*1000 tokens"):
    formats.read_litpkds(str(tmp_path / "short.bin"))
  (tmp_path / "magic.bin").write_bytes(b"NOTPKDS" + raw[7:])
  with pytest.raises(ValueError, match="magic.bin is not a LITPKDS token file"):
    formats.read_litpkds(str(tmp_path / "magic.bin"))


def test_a_file_with_the_longest_name_the_file_system_takes_is_written(tmp_path):
  """The temporary sibling's name is short: any name `path` may have fits."""
  path = tmp_path / ("n" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 4) + ".bin")
  digest = formats.write_litpkds(str(path), np.arange(10, dtype=np.uint16))
  assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
  assert os.listdir(tmp_path) == [path.name]


def test_tinyllama_files_train_without_their_bos_padding(tok, small_cfg, tmp_path):
  """TinyLlama's last chunk is padded with BOS: those tokens never reach a batch."""
  rng = np.random.default_rng(0)
  body = rng.integers(3, 512, 3000).astype(np.uint16)
  formats.write_litpkds(str(tmp_path / "train_0.bin"), body[:2000])
  formats.write_litpkds(str(tmp_path / "train_1.bin"),
                        np.concatenate([body[2000:], np.full(1000, tok.bos_id, np.uint16)]))
  cfg = small_cfg(source="litpkds", paths=f"{tmp_path}/train_*.bin", tokenizer=tok.path,
                  eval_paths=f"{tmp_path}/train_1.bin")
  it = pipeline.make_iterator(cfg, split="train", seq_len=99, batch_size=10, seed=0,
                              process_index=0, process_count=1, tokenizer=tok, vocab_size=512)
  rows = [next(it) for _ in range(3)]  # 3000 tokens = 30 rows of 100 = exactly one epoch
  seen = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1).ravel()
                         for b in rows])
  assert (seen != tok.bos_id).all()
  assert sorted(seen.tolist()) == sorted(body.tolist())  # every token once: a global row shuffle


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
@pytest.mark.parametrize("process_count", [2, 3])
def test_prepared_processes_are_disjoint_and_complete(inputs, tok, tmp_path_factory, packing,
                                                      process_count):
  out = tmp_path_factory.getbasetemp() / "disjoint"
  if not (out / formats.MANIFEST).exists():
    _prepare(inputs, tok, out, shard_tokens=5000)
  store = corpus.TokenStore(corpus.prepared_shards(str(out), "train"))
  make = ((lambda p: corpus.RowSource(store, 65, p, process_count)) if packing == "concat" else
          (lambda p: corpus.DocumentSource(store, p, process_count)))
  parts = [make(p) for p in range(process_count)]
  items = [tuple(part[i]["tokens"].tolist()) for part in parts for i in range(len(part))]
  everything = make(0).__class__(*((store, 65) if packing == "concat" else (store,)), 0, 1)
  assert sorted(items) == sorted(tuple(everything[i]["tokens"].tolist())
                                 for i in range(len(everything)))
  if packing == "first_fit":
    assert sum(len(t) for t in items) == store.num_tokens


def test_prepared_pipeline_resumes_exactly_with_workers(inputs, tok, small_cfg, tmp_path):
  _prepare(inputs, tok, tmp_path / "out", shard_tokens=5000)
  cfg = small_cfg(source="prepared", paths=str(tmp_path / "out"), packing="best_fit",
                  num_workers=2)
  make = lambda: pipeline.make_iterator(cfg, split="train", seq_len=64, batch_size=4, seed=2,
                                        process_index=1, process_count=2, tokenizer=tok,
                                        vocab_size=512)
  it = make()
  try:
    [next(it) for _ in range(6)]
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
  finally:
    it.close()
  resumed = make()
  try:
    resumed.set_state(state)
    for want in expected:
      got = next(resumed)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])
  finally:
    resumed.close()


def test_mixture_follows_the_weights(tok, small_cfg, tmp_path):
  for name, token in (("five", 5), ("seven", 7)):
    formats.write_litpkds(str(tmp_path / f"{name}.bin"), np.full(20000, token, np.uint16))
  cfg = small_cfg(source="mixture", tokenizer=tok.path, eval_fraction=0.0,
                  mixture=f"0.693584:litpkds:{tmp_path}/five.bin;0.306416:litpkds:{tmp_path}/seven.bin")
  it = pipeline.make_iterator(cfg, split="train", seq_len=15, batch_size=50, seed=0,
                              process_index=0, process_count=1, tokenizer=tok, vocab_size=512)
  rows = np.concatenate([next(it)["inputs"][:, 0] for _ in range(20)])
  assert set(rows.tolist()) == {5, 7}
  assert abs((rows == 5).mean() - 0.693584) < 0.01


def test_bad_inputs(inputs, tok, small_cfg, tmp_path):
  with pytest.raises(FileNotFoundError, match="matches no files"):
    prepare_lib.expand_inputs(str(tmp_path / "nothing*.jsonl"))
  (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
  with pytest.raises(ValueError, match=r"nofield.jsonl:2: no 'text' field \(has \['body'\]\)"):
    _ = list(formats.iter_documents(str(tmp_path / "nofield.jsonl"), "text", formats.ReadStats()))
  (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
  with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
    _ = list(formats.iter_documents(str(tmp_path / "broken.jsonl"), "text", formats.ReadStats()))
  with pytest.raises(ValueError, match="unknown file type"):
    prepare_lib.expand_inputs(__file__)
  # A manifest made with another tokenizer.
  _prepare(inputs, tok, tmp_path / "out")
  other = pipeline.load_tokenizer(small_cfg(tokenizer_vocab_size=600), str(tmp_path / "w"))
  cfg = small_cfg(source="prepared", paths=str(tmp_path / "out"))
  with pytest.raises(ValueError, match="prepared with tokenizer .*prepare the data again"):
    pipeline.make_iterator(cfg, split="train", seq_len=16, batch_size=2, seed=0, process_index=0,
                           process_count=1, tokenizer=other, vocab_size=1024)
  # Token ids beyond the model's vocab never make a batch.
  formats.write_litpkds(str(tmp_path / "big.bin"), np.full(200, 900, np.uint16))
  cfg = small_cfg(source="litpkds", paths=str(tmp_path / "big.bin"), eval_fraction=0.0)
  it = pipeline.make_iterator(cfg, split="train", seq_len=16, batch_size=2, seed=0,
                              process_index=0, process_count=1, tokenizer=tok, vocab_size=512)
  with pytest.raises(ValueError, match="token id 900 is beyond the model's vocab_size=512"):
    next(it)
  with pytest.raises(ValueError, match="needs data.paths"):
    pipeline.load_tokenizer(small_cfg(source="prepared"), str(tmp_path))
  with pytest.raises(ValueError, match="mixture entry 'x:prepared' is not"):
    pipeline.components(small_cfg(source="mixture", mixture="x:prepared"))


def test_cli_prepares_and_fails_clearly(inputs, tok, tmp_path):
  cmd = [sys.executable, "-m", "tinyllama_jax.prepare", f"--tokenizer={tok.path}",
         "--num_workers=2"]
  ok = subprocess.run(cmd + [f"--input={inputs}/b/*.txt", f"--out={tmp_path}/out"], cwd=REPO,
                      capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr
  # The library module run as a command names the command, and prepares nothing.
  old = subprocess.run([sys.executable, "-m", "tinyllama_jax.data.prepare", *cmd[3:],
                        f"--input={inputs}/b/*.txt", f"--out={tmp_path}/old"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert old.returncode == 2 and old.stderr.startswith(
      "error: the prepare command is `python -m tinyllama_jax.prepare`"), old.stderr
  assert not os.path.exists(tmp_path / "old")
  assert json.loads(ok.stdout)["documents"] == 5
  # Bad input exits 2 (as every command does) with one line naming prepare's own flag.
  bad = subprocess.run(cmd + [f"--tokenizer={tmp_path}/none.model", f"--input={inputs}/b/*.txt",
                              f"--out={tmp_path}/bad"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
  assert "none.model' not found: set --tokenizer to" in bad.stderr
  assert "data.tokenizer" not in bad.stderr and "train one" not in bad.stderr
  assert not os.path.exists(tmp_path / "bad")


def test_optional_formats_name_their_missing_package(tmp_path, monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_optional(name, *args, **kwargs):
    if name in ("zstandard", "pyarrow"):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_optional)
  for name, package in (("x.jsonl.zst", "zstandard"), ("x.parquet", "pyarrow")):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(ImportError, match=f"{name} needs the '{package}' package.*pip install"):
      _ = list(formats.iter_documents(str(tmp_path / name), "text", formats.ReadStats()))


@pytest.mark.parametrize("package,name", [("zstandard", "c.jsonl.zst"), ("pyarrow", "e.parquet")])
def test_compressed_and_columnar_inputs_read(inputs, package, name):
  pytest.importorskip(package, reason=f"{package} not installed: {name} inputs untested")
  stats = formats.ReadStats()
  docs = list(formats.iter_documents(str(inputs / name), "text", stats))
  assert docs == (_stdlib_texts(135, 3) if package == "zstandard" else _stdlib_texts(138, 2))


def test_a_document_longer_than_a_piece_is_tokenized_in_pieces_to_the_same_text(tok, tmp_path,
                                                                                 monkeypatch):
  monkeypatch.setattr(prepare_lib, "_PIECE_CHARS", 3000)
  text = " ".join(_stdlib_texts(150, 12))  # one document of tens of pieces
  assert len(text) > 10 * 3000
  src = tmp_path / "long.jsonl"
  src.write_text(json.dumps({"text": text}) + "\n")
  prepare_lib.prepare([str(src)], tok, str(tmp_path / "out"), eval_fraction=0.0,
                      shard_tokens=1000, progress=False)
  manifest, docs = _documents_of(tmp_path / "out", "train")
  assert manifest["totals"]["train_documents"] == 1
  tokens = np.concatenate(docs)  # its pieces, cut by the shards
  assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
  assert tok.decode(tokens[1:-1]) == text
  cuts = len(list(prepare_lib._pieces(text))) - 1  # pylint: disable=protected-access
  assert abs(len(tokens) - 2 - len(tok.encode(text))) <= 2 * cuts  # merges lost at the cuts


_PEAK_MEMORY = """
import resource, sys
from tinyllama_jax.data import prepare, tokenizer
tok = tokenizer.Tokenizer(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare.prepare([sys.argv[2]], tok, sys.argv[3], eval_fraction=0.0, shard_tokens=1 << 16,
                progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def _peak_growth(tok, tmp_path, text, size):
  """How much the peak memory of a prepare process grows while it prepares one document."""
  (tmp_path / f"{size}.txt").write_text((text * (size // len(text) + 1))[:size])
  proc = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, tok.path,
                         str(tmp_path / f"{size}.txt"), str(tmp_path / f"out{size}")],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return int(proc.stdout.split()[-1])


def test_one_huge_document_takes_memory_in_proportion_to_its_text_only(tok, tmp_path):
  """Per byte of a single-line document, prepare holds its text (2 bytes a character here: it is
  not all ASCII) and, while it decodes, its bytes; not its tokens as Python lists (39 bytes a byte
  before pieces). A piece's cost and the shard buffer are fixed; the growth between two sizes is
  the per-byte part (about 5 here, with the allocator's slack)."""
  text = " ".join(_stdlib_texts(0, 400)).replace("\n", " ")
  small, large = 3_000_000, 11_000_000
  per_byte = (_peak_growth(tok, tmp_path, text, large) -
              _peak_growth(tok, tmp_path, text, small)) / (large - small)
  assert per_byte < 8, f"peak memory grows by {per_byte:.1f} bytes a byte of the document"
