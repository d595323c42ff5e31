"""`evaluate` given what a careless or hostile user gives it: each row one line and its exit
status (tests/hostile.py). The run is the imported random Llama of hf_models, once a module."""

import dataclasses
import json

import pytest

from hf_models import hostile_runs
from hostile import OLD_RUN, Probe, check

W = "--workdir={tmp}/run"
PROBES = [
    Probe("binary file", (W, "--data={tmp}/blob.bin"), 2,
          "--data: {tmp}/blob.bin is not UTF-8 text (byte 128: binary data"),
    Probe("UTF-16 text", (W, "--data={tmp}/utf16.txt"), 2,
          "--data: {tmp}/utf16.txt is not UTF-8 text (byte 0: UTF-16 text?)"),
    Probe("zstd data named .txt", (W, "--data={tmp}/docs.txt"), 2,
          "--data: {tmp}/docs.txt is not UTF-8 text (byte 1: zstd data: name it .jsonl.zst"),
    Probe("only empty documents", (W, "--data={tmp}/empty.jsonl"), 2,
          "--data='{tmp}/empty.jsonl' holds no document to score (2 skipped: 2 empty"),
    Probe("a .jsonl.zst without the field", (W, "--data={tmp}/docs.jsonl.zst", "--text_field=body"),
          2, "{tmp}/docs.jsonl.zst:1: no 'body' field (has ['text']): set --text_field"),
    Probe("tokenizer above the vocab", (W, "--data={tmp}/docs.jsonl.zst",
                                        "--tokenizer={tmp}/big.model"), 2,
          "the tokenizer {tmp}/big.model has 1024 pieces, more than the model's vocab_size 512"),
    Probe("the run's copy edited", ("--workdir={tmp}/edited", "--data={tmp}/docs.jsonl.zst"), 2,
          "the tokenizer {tmp}/edited/tokenizer/tokenizer.model (sha256"),
    Probe("a run without a tokenizer", (f"--workdir={OLD_RUN}", "--data={tmp}/docs.jsonl.zst"), 2,
          f"the run in {OLD_RUN} has no tokenizer (synthetic data): --data files are text"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, tokenizer_file):
  import zstandard
  root = hostile_runs(tmp_path_factory.mktemp("evaluate_hostile"), tokenizer_file)
  (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
  (root / "utf16.txt").write_bytes("def f(x):\n    return x\n".encode("utf-16"))
  jsonl = "".join(json.dumps({"text": t}) + "\n" for t in ("def f(x):", "import json"))
  (root / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode()))
  (root / "docs.txt").write_bytes((root / "docs.jsonl.zst").read_bytes())
  (root / "empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
  return root


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_evaluate_hostile(probe, tmp, capfd):
  check("evaluate", dataclasses.replace(probe, message=probe.message.replace("{tmp}", str(tmp))),
        tmp, capfd)
