"""prepare when things go wrong: damaged inputs, odd field values, a full disk, a bad --out, Ctrl-C;
and what it leaves for others: a self-contained, readable output folder."""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from tinyllama_jax.data import corpus
from tinyllama_jax.data import formats
from tinyllama_jax.data import pipeline
from tinyllama_jax.data import prepare as prepare_lib
from tinyllama_jax.data import progress
from tinyllama_jax.data import sources
from tinyllama_jax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _texts(start, n):
  root = sources.stdlib_root()
  return [open(os.path.join(root, name), encoding="utf-8").read()
          for name in sources.stdlib_files()[start:start + n]]


def _jsonl(path, values):
  with open(path, "w") as f:
    for v in values:
      f.write(json.dumps({"text": v}) + "\n")
  return str(path)


def _files_under(out):
  """Every file and folder under `out`, relative to it (hidden ones too, but the writer's lock)."""
  return sorted(os.path.relpath(os.path.join(d, n), out)
                for d, dirs, files in os.walk(out) for n in dirs + files
                if os.path.join(d, n) != os.path.join(out, ".lock"))


def _published(out):
  """What the .done.json records in out/shards account for: each record and its shards' files."""
  names = []
  for done in os.listdir(os.path.join(out, "shards")):
    if done.endswith(".done.json"):
      with open(os.path.join(out, "shards", done)) as f:
        record = json.load(f)
      names += [os.path.join("shards", done)] + [
          p for s in record["shards"] for p in (s["path"], s["path"] + ".docs.npy")]
  return sorted(names + ["shards"])


def test_damaged_compressed_inputs_are_errors_naming_the_file(tok, tmp_path):
  zstandard = pytest.importorskip("zstandard")
  docs = _texts(200, 6)
  payload = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
  frame = zstandard.ZstdCompressor().compress(payload)
  (tmp_path / "two_frames.jsonl.zst").write_bytes(frame + frame)  # e.g. files cat'ed together
  (tmp_path / "trunc.jsonl.zst").write_bytes(frame[:5000])  # a cut download
  (tmp_path / "plain.jsonl.zst").write_bytes(payload)
  read = lambda name: list(formats.iter_documents(str(tmp_path / name), "text",
                                                   formats.ReadStats()))
  assert read("two_frames.jsonl.zst") == docs + docs
  with pytest.raises(ValueError, match="trunc.jsonl.zst is truncated: it ends inside a zstd"):
    read("trunc.jsonl.zst")
  with pytest.raises(ValueError, match="plain.jsonl.zst is not valid zstd data"):
    read("plain.jsonl.zst")
  pytest.importorskip("pyarrow")
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({"text": docs}), str(tmp_path / "whole.parquet"))
  raw = (tmp_path / "whole.parquet").read_bytes()
  (tmp_path / "cut.parquet").write_bytes(raw[:len(raw) // 2])
  with pytest.raises(ValueError, match="cut.parquet is truncated or not a parquet file"):
    read("cut.parquet")
  # prepare stops on it: the inputs done before it are kept, it leaves nothing, no manifest.
  good = _jsonl(tmp_path / "a.jsonl", _texts(210, 3))
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="trunc.jsonl.zst is truncated"):
    prepare_lib.prepare([good, str(tmp_path / "trunc.jsonl.zst")], tok, str(out), progress=False)
  assert _files_under(out) == _published(out)
  assert [n for n in os.listdir(out / "shards") if n.endswith(".done.json")] == [
      prepare_lib._input_key(good) + ".done.json"]  # pylint: disable=protected-access


def test_a_full_disk_stops_with_one_line_and_leaves_no_partial_files(tok, tmp_path, monkeypatch):
  a = _jsonl(tmp_path / "a.jsonl", _texts(220, 3))
  b = _jsonl(tmp_path / "b.jsonl", _texts(223, 3))
  out = str(tmp_path / "out")
  real_write, calls = formats.write_litpkds, []

  def fills_the_disk(path, tokens):
    calls.append(path)
    if len(calls) > 2:  # a.jsonl's two shards (train + eval) fit; b.jsonl's first does not
      raise OSError(errno.ENOSPC, "No space left on device", path)
    return real_write(path, tokens)
  monkeypatch.setattr(formats, "write_litpkds", fills_the_disk)
  with pytest.raises(OSError) as e:
    prepare_lib.prepare([a, b], tok, out, eval_fraction=0.3, progress=False)
  assert _files_under(out) == _published(out)  # no orphan .docs.npy of b.jsonl's first shard
  assert len(_published(out)) == 6  # a.jsonl's record + 2 shards of 2 files each, + shards/
  line, status = prepare_lib.failure(e.value, out)
  assert status == 3 and out in line and "free space" in line and "\n" not in line
  monkeypatch.setattr(formats, "write_litpkds", real_write)
  manifest = prepare_lib.prepare([a, b], tok, out, eval_fraction=0.3, progress=False)
  assert manifest["totals"]["documents"] == 6


def test_a_publish_cut_short_leaves_no_record_vouching_for_half_replaced_files(tok, tmp_path,
                                                                             monkeypatch):
  a = _jsonl(tmp_path / "a.jsonl", _texts(220, 6))
  out = str(tmp_path / "out")
  prepare_lib.prepare([a], tok, out, eval_fraction=0.0, shard_tokens=4096, progress=False)
  shards_dir, real_replace, moved = os.path.join(out, "shards"), os.replace, []

  def fails_after_one_move(src, dst):
    if os.path.dirname(dst) == shards_dir:
      moved.append(dst)
      if len(moved) > 1:
        raise OSError(errno.EIO, "Input/output error", dst)
    real_replace(src, dst)
  monkeypatch.setattr(os, "replace", fails_after_one_move)
  with pytest.raises(OSError):  # prepared again with other options: its files are replaced
    prepare_lib.prepare([a], tok, out, eval_fraction=0.0, shard_tokens=2048, progress=False)
  assert len(moved) == 2
  assert os.listdir(shards_dir) == []  # neither the old record nor the half-moved files


def test_out_that_is_a_file_and_bad_options_are_one_line_errors(tok, tmp_path):
  a = _jsonl(tmp_path / "a.jsonl", _texts(230, 2))
  (tmp_path / "file").write_text("not a folder")
  for out in (tmp_path / "file", tmp_path / "file" / "sub"):
    with pytest.raises(ValueError, match=f"--out={out} is not a folder") as e:
      prepare_lib.prepare([a], tok, str(out), progress=False)
    assert prepare_lib.failure(e.value, str(out))[1] == 2
  for bad in (1.5, 1.0, -1.0):
    with pytest.raises(ValueError, match=rf"--eval_fraction={bad} must be in \[0, 1\)"):
      prepare_lib.prepare([a], tok, str(tmp_path / "out"), eval_fraction=bad, progress=False)
  assert not os.path.exists(tmp_path / "out")
  # A failing first input leaves no empty folders behind.
  nofield = tmp_path / "nofield.jsonl"
  nofield.write_text('{"body": "x"}\n')
  with pytest.raises(ValueError, match=r"nofield.jsonl:1: no 'text' field .*set --text_field"):
    prepare_lib.prepare([str(nofield)], tok, str(tmp_path / "out"), progress=False)
  assert not os.path.exists(tmp_path / "out")


def test_no_eval_split_and_field_values_that_are_not_strings(tok, tmp_path, caplog):
  texts = _texts(240, 4)
  path = _jsonl(tmp_path / "mixed.jsonl", texts[:2] + [123, None, ["a list"], "  "] + texts[2:])
  manifest = prepare_lib.prepare([path], tok, str(tmp_path / "out"), eval_fraction=0.0,
                                 progress=False)
  totals = manifest["totals"]
  assert (totals["documents"], totals["skipped_not_string"], totals["skipped_empty"]) == (4, 3, 1)
  assert totals["eval_documents"] == 0 and totals["train_documents"] == 4
  assert "skipped_not_string': 3" in caplog.text and "no eval split" in caplog.text
  with pytest.raises(ValueError, match="has no 'eval' shards"):
    corpus.prepared_shards(str(tmp_path / "out"), "eval")


def test_prepare_needs_no_tqdm_and_shows_progress(tok, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm fails (a requirements.txt install)
  paths = [_jsonl(tmp_path / f"{i}.jsonl", _texts(250 + i, 1)) for i in range(2)]
  prepare_lib.prepare(paths, tok, str(tmp_path / "out"), progress=True)
  assert "2/2 inputs" in capsys.readouterr().err
  bar = progress.Progress(3_000_000, 3)
  for _ in range(3):
    bar.update({"input_bytes": 1_000_000, "skipped": False, "stats": {"documents": 10}})
  bar.close()
  lines = capsys.readouterr().err.splitlines()  # not a terminal: the first and the last line only
  assert len(lines) == 2 and lines[-1].startswith("prepare: 3.0/3.0 MB, 3/3 inputs")
  assert "MB/s" in lines[-1] and "docs/s" in lines[-1] and lines[-1].endswith("ETA 0:00:00")


def test_prepared_data_carries_its_tokenizer_and_is_readable_by_others(tok, small_cfg, tmp_path):
  own = tmp_path / "own.model"
  shutil.copy(tok.path, own)
  a = _jsonl(tmp_path / "a.jsonl", _texts(260, 3))
  prepare_lib.prepare([a], tokenizer_lib.Tokenizer(str(own)), str(tmp_path / "out"),
                      eval_fraction=0.3, progress=False)
  os.unlink(own)  # prepared data must not depend on where its tokenizer was
  shutil.move(tmp_path / "out", tmp_path / "moved")  # nor on where the data itself was
  manifest, root = corpus.load_manifest(str(tmp_path / "moved"))
  assert manifest["tokenizer"]["path"] == "tokenizer.model"
  cfg = small_cfg(source="prepared", paths=str(tmp_path / "moved"))
  loaded = pipeline.load_tokenizer(cfg, str(tmp_path / "w"))
  assert loaded.path == os.path.join(root, "tokenizer.model") and loaded.sha256 == tok.sha256
  # Data prepared before the copy existed records an absolute path: it still trains.
  manifest["tokenizer"]["path"] = tok.path
  assert corpus.manifest_tokenizer_path(manifest, root) == tok.path
  os.unlink(tmp_path / "moved" / "tokenizer.model")
  with pytest.raises(FileNotFoundError, match=r"tokenizer of the prepared data .*moved is missing "
                     r".*re-run prepare.*--config.data.tokenizer"):
    pipeline.load_tokenizer(cfg, str(tmp_path / "w"))
  umask = os.umask(0o022)
  os.umask(umask)
  prepare_lib.prepare([a], tok, str(tmp_path / "shared"), eval_fraction=0.3, progress=False)
  for name in _files_under(tmp_path / "shared"):
    mode = os.stat(tmp_path / "shared" / name).st_mode
    want = (0o777 if stat.S_ISDIR(mode) else 0o666) & ~umask
    assert stat.S_IMODE(mode) == want, name


def _finished_one_and_writing_another(out):
  names = os.listdir(out / "shards") if (out / "shards").exists() else []
  return any(n.endswith(".done.json") for n in names) and any(n.endswith(".partial") for n in names)


def _stop_mid_input(tok, tmp_path, signum, whole_group):
  """Starts prepare with two workers on inputs of ~1 MB, signals it once one input is published and
  another is being written; returns (exit status, stderr, out, the inputs published when it had
  exited)."""
  root, names = sources.stdlib_root(), sources.stdlib_files()
  for i in range(24):  # ~1 MB each: enough that workers are mid-input when it lands
    with open(tmp_path / f"in{i:02d}.jsonl", "w") as f:
      size, k = 0, i
      while size < 1_000_000:
        text = open(os.path.join(root, names[k % len(names)]), encoding="utf-8").read()
        f.write(json.dumps({"text": text}) + "\n")
        size, k = size + len(text), k + 24
  out = tmp_path / "out"
  proc = subprocess.Popen(
      [sys.executable, "-m", "tinyllama_jax.prepare", f"--tokenizer={tok.path}",
       f"--input={tmp_path}/*.jsonl", f"--out={out}", "--num_workers=2"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    deadline = time.time() + 120
    while not _finished_one_and_writing_another(out):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()
      time.sleep(0.01)
    if whole_group:
      os.killpg(proc.pid, signum)
    else:
      os.kill(proc.pid, signum)
    proc.wait(timeout=60)  # not communicate(): workers that outlive it hold its pipes open
    done_at_exit = _published(out)
    _, err = proc.communicate(timeout=60)
    deadline = time.time() + 10
    while _group_alive(proc.pid):  # the workers are stopped with their parent, not left running
      assert time.time() < deadline, "prepare's workers outlived it"
      time.sleep(0.05)
  finally:
    if _group_alive(proc.pid):
      os.killpg(proc.pid, signal.SIGKILL)
  return proc.returncode, err, out, done_at_exit


def _group_alive(pgid):
  try:
    os.killpg(pgid, 0)
    return True
  except ProcessLookupError:
    return False


def test_ctrl_c_stops_workers_quietly_with_no_partial_files(tok, tmp_path):
  """Ctrl-C signals the whole process group: the parent says one line, the workers nothing."""
  code, err, out, _ = _stop_mid_input(tok, tmp_path, signal.SIGINT, whole_group=True)
  assert code == 130, err
  assert err.splitlines()[-1] == ("interrupted; rerun the same command to continue (finished "
                                  "inputs are kept)")
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
  assert _files_under(out) == _published(out) and len(_published(out)) > 1


def test_sigterm_to_prepare_alone_stops_its_workers_with_no_partial_files(tok, tmp_path):
  """A scheduler's or `kill`'s SIGTERM reaches the parent only: it stops its workers (no input
  published after it, no broken-pipe tracebacks) and exits 143 in one line."""
  code, err, out, _ = _stop_mid_input(tok, tmp_path, signal.SIGTERM, whole_group=False)
  assert code == 128 + signal.SIGTERM, err
  assert err.splitlines()[-1] == ("stopped by SIGTERM; rerun the same command to continue "
                                  "(finished inputs are kept)")
  assert "Traceback" not in err and "BrokenPipe" not in err, err
  assert _files_under(out) == _published(out) and len(_published(out)) > 1


def test_workers_of_a_prepare_killed_with_9_stop_with_it(tok, tmp_path):
  """No cleanup can run in a process killed with -9; its workers get SIGTERM from the kernel, so
  they publish nothing after it (a rerun removes their staging folders)."""
  code, _, out, done_at_exit = _stop_mid_input(tok, tmp_path, signal.SIGKILL, whole_group=False)
  assert code == -signal.SIGKILL
  assert _published(out) == done_at_exit


_HOLD_LOCK = """
import sys, time
from tinyllama_jax.data import prepare
lock = prepare.out_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_prepare_into_one_out_is_refused_and_a_killed_holder_leaves_no_lock(tok,
                                                                                    tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (tmp_path / "in.txt").write_text("one small document")
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  args = [sys.executable, "-m", "tinyllama_jax.prepare", f"--tokenizer={tok.path}",
          f"--input={tmp_path}/in.txt", f"--out={out}"]
  try:
    assert holder.stdout.readline().strip() == "locked"
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"error: --out={out} is being written by prepare pid {holder.pid} on ")
    assert os.listdir(out) == [".lock"]  # the holder's folder untouched: no shards/ made
  finally:
    holder.kill()
    holder.wait()
  again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0, again.stderr
