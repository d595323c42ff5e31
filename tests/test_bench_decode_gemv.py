"""bench/decode_gemv.py --smoke on CPU (interpreted kernels): every shape has its XLA row and a
kernel row per config, a config the kernel refuses is an error row, the kernel agrees with the
reference, and the JSON holds it all."""

import json

from bench import decode_gemv


def test_smoke_rows_and_json(tmp_path, monkeypatch):
  monkeypatch.setattr(decode_gemv, "SMOKE_SHAPES", decode_gemv.SMOKE_SHAPES[1:])  # o-proj, gate_up
  out = tmp_path / "gemv.json"
  assert decode_gemv.main(["--smoke", f"--out={out}"]) == 0
  result = json.loads(out.read_text())
  rows = result["rows"]
  assert [(r["shape"], r["m"], r["impl"]) for r in rows] == [
      (s, m, impl) for m in (1, 16) for s in ("o-proj", "gate_up")
      for impl in ("xla", "ours", "ours")]
  for r in rows:
    if r["impl"] == "ours" and r["config"]["block_n"] == 256:  # 128 and 96 columns: not tiled
      assert r["us"] is None and "not a multiple of block_n=256" in r["note"]
    else:
      assert r["us"] > 0 and r["gbs"] > 0 and r["max_rel_err"] < 2e-2, r
  assert [s["m"] for s in result["layer"]] == [1, 16]
  assert result["smoke"] and result["jax"] and result["date"]
