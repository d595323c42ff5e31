"""bench/decode_gemv.py --smoke on CPU (interpreted kernels): every shape has its XLA row and a
kernel row per config, a config the kernel refuses is an error row, the kernel agrees with the
reference, and the JSON holds it all."""

import argparse
import json

import pytest

from bench import decode_gemv


def test_smoke_rows_and_json(tmp_path, monkeypatch):
  monkeypatch.setattr(decode_gemv, "SMOKE_SHAPES", decode_gemv.SMOKE_SHAPES[1:])  # o-proj, gate_up
  out = tmp_path / "gemv.json"
  # 256 columns tile neither o-proj's 128 nor gate_up's 96: an error row each.
  assert decode_gemv.main(["--smoke", "--configs=32:128:2:2,256:64:4:2", f"--out={out}"]) == 0
  result = json.loads(out.read_text())
  rows = result["rows"]
  block_n = lambda r: r["config"] and r["config"]["block_n"]
  assert [(r["shape"], r["m"], r["impl"], block_n(r)) for r in rows] == [
      (s, m, impl, n) for m in (1, 16) for s in ("o-proj", "gate_up")
      for impl, n in (("xla", None), ("ours", 32), ("ours", 256))]
  for r in rows:
    if r["config"] and r["config"]["block_n"] == 256:
      assert r["us"] is None and "not a multiple of block_n=256" in r["note"]
    else:
      assert r["us"] > 0 and r["gbs"] > 0 and r["max_rel_err"] < 2e-2, r
  assert [s["m"] for s in result["layer"]] == [1, 16]
  assert result["smoke"] and result["jax"] and result["date"]


def test_configs_flag():
  assert decode_gemv.parse_configs("16:512:4:3,32:256:8:2")[1] == dict(
      block_n=32, block_k=256, num_warps=8, num_stages=2)
  with pytest.raises(argparse.ArgumentTypeError, match="n:k:warps:stages"):
    decode_gemv.parse_configs("16:512:4")
