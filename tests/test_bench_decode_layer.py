"""bench.decode_layer on CPU (--smoke: tiny shapes, interpreted): rows for XLA and each config,
a refused config as an error row, the layer summary, one-line refusals of bad flags."""

import json

import pytest

from bench import decode_layer


def test_smoke_rows_errors_and_the_layer_summary(tmp_path, capsys):
  out = tmp_path / "k.json"
  assert decode_layer.main(["--smoke", "--ops=qkv,attend_long,lm_head", "--rows=1",
                              "--configs=-:-:4:3,-:48:4:3", f"--out={out}"]) == 0
  data = json.loads(out.read_text())
  rows = {(r["op"], r["impl"], r["config"]): r for r in data["rows"]}
  assert set(rows) == {("qkv", "xla", None), ("qkv", "ours", "-:-:4:3"),
                       ("qkv", "ours", "-:48:4:3"), ("attend_long", "xla", None),
                       ("attend_long", "ours", "16:4"), ("attend_long", "ours", "32:4"),
                       ("attend_long", "ours", "8:4:16"),
                       ("lm_head", "xla", None), ("lm_head", "ours", "-:-:4:3"),
                       ("lm_head", "ours", "-:48:4:3")}
  ok = rows["qkv", "ours", "-:-:4:3"]
  assert ok["us"] > 0 and ok["max_rel_err"] < 1e-2 and ok["vs_xla"] > 0
  assert rows["attend_long", "ours", "32:4"]["max_rel_err"] < 1e-2
  assert rows["attend_long", "ours", "8:4:16"]["max_rel_err"] < 1e-2  # four splits combined
  refused = rows["qkv", "ours", "-:48:4:3"]
  assert refused["us"] is None and "block_k=48" in refused["note"]
  assert rows["lm_head", "ours", "-:-:4:3"]["max_rel_err"] < 1e-2
  (summary,) = data["layer"]
  assert summary["ops"] == ["qkv", "attend_long"] and summary["lm_head"]
  layer_us = rows["qkv", "xla", None]["us"] + rows["attend_long", "xla", None]["us"]
  assert summary["xla_layer_us"] == pytest.approx(layer_us)
  assert summary["xla_token_ms"] == pytest.approx(
      (22 * layer_us + rows["lm_head", "xla", None]["us"]) / 1e3)
  assert "M=1: a layer's qkv+attend_long" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--configs=4:2048:4"], "want block_n:block_k:num_warps:num_stages"),
    (["--attend_configs=64"], "want block_s:num_warps"),
    (["--ops=logits"], "--ops of qkv,o,gate_up,down,attend,attend_long,lm_head"),
    (["--rows=17"], "--rows of 1..16"),
    (["--rows=1,x"], "--rows='1,x': want row counts"),
])
def test_bad_flags_exit_2_in_one_line(tmp_path, capsys, args, message):
  assert decode_layer.main(["--smoke", f"--out={tmp_path / 'k.json'}", *args]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and "\n" not in err
  assert not (tmp_path / "k.json").exists()
