"""evaluate: our loss on files equals transformers' loss on the same tokens; windows score every
(input, target) pair exactly once; bad input fails cleanly."""

import json
import os

import numpy as np
import pytest
import torch

from bench import eval_speed
from hf_models import STDLIB
from hostile import call
from interrupt import sigint_after
from tinyllama_jax.inference import evaluate


@pytest.fixture(scope="module")
def run(exported):
  return exported


@pytest.fixture
def data_files(tmp_path):
  texts = [open(os.path.join(STDLIB, n), encoding="utf-8").read()[:1500]
           for n in ("json/decoder.py", "json/encoder.py", "textwrap.py")]
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:2]) + "\n"
                   + json.dumps({"text": ""}) + "\n")
  txt = tmp_path / "one.txt"
  txt.write_text(texts[2])
  return str(jsonl), str(txt), texts


def test_loss_equals_transformers(run, data_files):
  params, cfg, tok, _, hf_model = run
  jsonl, txt, texts = data_files
  seq_len = 64
  ours = evaluate.evaluate_files(params, cfg, tok, f"{jsonl},{txt}", seq_len=seq_len,
                                 batch_size=4)
  assert ours["documents"] == 3 and ours["skipped_documents"] == 1
  # transformers on the same windows: each document BOS + text + EOS, cut as training cuts it.
  total, count = 0.0, 0
  for text in texts:
    ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    for s in range(0, len(ids) - 1, seq_len):
      window = torch.tensor([ids[s:s + seq_len + 1]])
      with torch.no_grad():
        logits = hf_model(window[:, :-1]).logits[0].double()
      total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
      count += window.shape[1] - 1
  assert ours["tokens"] == count
  assert abs(ours["loss"] - total / count) <= 1e-4, (ours["loss"], total / count)
  assert np.isclose(ours["perplexity"], np.exp(ours["loss"]))


def test_windows_score_every_pair_once():
  ids = list(range(10))
  rows = evaluate.document_rows([ids, [7], [3, 4]], seq_len=4)
  pairs = [(i, t) for inputs, targets in rows for i, t in zip(inputs, targets)]
  assert pairs == [(k, k + 1) for k in range(9)] + [(3, 4)]
  batches = list(evaluate.row_batches(rows, batch_size=3, seq_len=4))
  assert sum(float(b["loss_mask"].sum()) for b in batches) == len(pairs)


def test_prepared_split(run):
  params, cfg, tok, _, _ = run
  result = evaluate.evaluate_split(params, cfg, tok, "eval", seq_len=32, batch_size=2, batches=1)
  assert result["tokens"] == 64 and np.isfinite(result["loss"])


def test_prepared_data(run, tmp_path):
  """--data=prepared:DIR scores the eval split of data written by tinyllama_jax.prepare;
  more --batches than the split holds score it once, to its end, never wrapping around."""
  from tinyllama_jax.data import prepare
  params, cfg, tok, _, _ = run
  docs = tmp_path / "docs.jsonl"
  texts = [open(os.path.join(STDLIB, "json", n), encoding="utf-8").read()
           for n in ("decoder.py", "encoder.py", "scanner.py", "tool.py")]
  docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  manifest = prepare.prepare([str(docs)], tok, str(tmp_path / "prepared"), eval_fraction=0.5,
                             progress=False)
  data_cfg, split = evaluate.data_config_for(cfg, f"prepared:{tmp_path / 'prepared'}")
  assert split is None and data_cfg.data.source == "prepared" and cfg.data.source == "stdlib"
  result = evaluate.evaluate_split(params, data_cfg, tok, "eval", seq_len=32, batch_size=2,
                                   batches=2)
  assert result["tokens"] == 128 and np.isfinite(result["loss"]) and not result["end_of_data"]
  whole = evaluate.evaluate_split(params, data_cfg, tok, "eval", seq_len=32, batch_size=2,
                                  batches=1000)
  rows = manifest["totals"]["eval_tokens"] // 33  # concat rows of seq_len + 1, the tail left out
  assert whole["end_of_data"] and whole["tokens"] == rows * 32 and whole["batches"] == -(-rows // 2)
  assert evaluate.data_config_for(cfg, "some/file.jsonl") is None
  missing, _ = evaluate.data_config_for(cfg, f"prepared:{tmp_path / 'nope'}")
  with pytest.raises(ValueError, match="no prepared manifest"):
    evaluate.evaluate_split(params, missing, tok, "eval", seq_len=32, batch_size=2, batches=1)


def test_bad_data(run, tmp_path, capfd):
  params, cfg, tok, workdir, _ = run
  with pytest.raises(ValueError, match="not a file"):
    evaluate.evaluate_files(params, cfg, tok, str(tmp_path / "nope.txt"), seq_len=32, batch_size=2)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: .*--text_field"):
    evaluate.evaluate_files(params, cfg, tok, str(bad), seq_len=32, batch_size=2)
  proc = call("evaluate", (f"--workdir={workdir}", f"--data={tmp_path}/missing.jsonl"), tmp_path,
              capfd, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --data")
  proc = call("evaluate", (f"--workdir={workdir}", f"--data={bad}", "--seq_len=-5"), tmp_path,
              capfd, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --seq_len=-5: use 1 to")


def test_a_line_that_is_not_utf8_is_skipped_alone(tmp_path):
  """Lines 1 and 3 are scored, line 2 (not UTF-8) is counted as skipped; before, the file was
  dropped from line 2 on."""
  path = tmp_path / "mixed.jsonl"
  path.write_bytes(b'{"text": "first"}\n{"text": "caf\xe9"}\n{"text": "third"}\n')
  assert evaluate.read_documents(str(path)) == (["first", "third"], 1)


def test_flags_out_of_range_are_one_line_errors():
  from tinyllama_jax import config as config_lib
  cfg = config_lib.base_config()
  cfg.train.seq_len, cfg.model.max_seq_len = 64, 256
  assert evaluate.check_flags(cfg, seq_len=0, batch_size=8, batches=16) == 64
  assert evaluate.check_flags(cfg, seq_len=256, batch_size=8, batches=16) == 256
  for seq_len in (-5, 4096):
    with pytest.raises(ValueError, match=rf"--seq_len={seq_len}: use 1 to the model's "
                       r"max_seq_len \(256\)"):
      evaluate.check_flags(cfg, seq_len=seq_len, batch_size=8, batches=16)
  with pytest.raises(ValueError, match="--batch_size=0: use 1 or more"):
    evaluate.check_flags(cfg, seq_len=0, batch_size=0, batches=16)
  with pytest.raises(ValueError, match="--batches=-1: use 1 or more"):
    evaluate.check_flags(cfg, seq_len=0, batch_size=8, batches=-1)


def test_one_pass_over_text_leaves_out_the_padded_tail(tmp_path):
  """A text source packed by concatenation, read once: only whole rows, every token at most once
  (grain pads the last row of a finite stream; padding is no data)."""
  from tinyllama_jax.data import pipeline
  from tinyllama_jax import config as config_lib
  cfg = config_lib.base_config().data
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"text": "word " * n}) + "\n" for n in (30, 7, 50)))
  cfg.source, cfg.paths, cfg.eval_fraction = "text", str(docs), 0.0
  tok = _Bytes()
  n_tokens = sum(len(tok.encode("word " * n)) + 2 for n in (30, 7, 50))
  it = pipeline.make_iterator(cfg, split="train", seq_len=15, batch_size=4, seed=0,
                              process_index=0, process_count=1, tokenizer=tok, vocab_size=512,
                              repeat=False)
  batches = list(it)
  assert sum(len(b["inputs"]) for b in batches) == n_tokens // 16
  assert all(b["loss_mask"].all() for b in batches)


class _Bytes:
  """A stand-in tokenizer: one id per byte (3..258), BOS 1, EOS 2."""
  bos_id, eos_id, vocab_size, sha256, path = 1, 2, 259, "bytes", "bytes"

  def encode(self, text):
    return [b + 3 for b in text.encode()]


def test_zstd_and_parquet_files_hold_the_documents_prepare_reads(tmp_path):
  """The formats prepare and SFT read; before, each was one undecodable document: nothing to
  score."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  texts = ["def f(x):\n    return x", "import json", ""]
  jsonl = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
  (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
  pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
  for name in ("d.jsonl.zst", "d.parquet"):
    assert evaluate.read_documents(str(tmp_path / name)) == (texts[:2], 1), name


def test_ctrl_c_while_compiling_is_one_line_exit_130_and_writes_no_out(imported, tmp_path):  # noqa: F811
  """--tasks with --out, Ctrl-C while the scoring step compiles: `interrupted`, exit 130, no
  --out file and no temporary file beside it. Before, a KeyboardInterrupt traceback, exit 1."""
  eval_speed.write_local_tasks(str(tmp_path / "tasks"), n_docs=2)
  status, err, _ = sigint_after(
      "evaluate", (f"--workdir={imported[2]}", "--tasks=stdlib_mc",
                   f"--include_path={tmp_path}/tasks", f"--out={tmp_path}/out.json"),
      "Compiling jit(_token_scores)", env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
  assert status == 130 and err.strip().splitlines()[-1] == "interrupted", (status, err[-3000:])
  assert "Traceback" not in err
  assert os.listdir(tmp_path) == ["tasks"]
