"""bench/attention_mgpu.py on CPU: every row fails alone (no cuDNN, no Hopper), the essentials
run before the time budget cuts the alternatives, and the JSON holds every row."""

import json

from bench import attention_mgpu


def test_rows_fail_alone_and_the_json_keeps_them(tmp_path, monkeypatch):
  monkeypatch.setattr(attention_mgpu, "SHAPES", [(1, 128, 2, 1, 64)])
  out = tmp_path / "att.json"
  assert attention_mgpu.main([f"--out={out}", "--budget_s=0"]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [r["impl"] for r in rows] == ["cudnn fwd", "cudnn fwd+bwd", "ours fwd (default)",
                                       "ours fwd+bwd (default)", "ours fwd+bwd", "alternatives"]
  assert all(r["ms"] is None and r["note"] for r in rows)
  assert "needs a Hopper GPU" in rows[2]["note"] and "skipped" in rows[-1]["note"]
