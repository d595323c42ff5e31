"""bench/fp8_parity.py: the held-out losses of two runs' metrics.jsonl, their ratio, the JSON."""

import json

import pytest

from bench import fp8_parity


def _run(path, evals):
  path.mkdir()
  with open(path / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"start_step": 0}) + "\n")
    for step, loss in evals:
      f.write(json.dumps({"step": step, "train/loss": loss + 0.1, "time": 1.0}) + "\n")
      f.write(json.dumps({"step": step, "eval/loss": loss}) + "\n")


def test_the_final_held_out_losses_their_ratio_and_both_curves(tmp_path, capsys):
  _run(tmp_path / "a", [(100, 5.0), (200, 4.0)])
  _run(tmp_path / "b", [(100, 5.1), (200, 4.04)])
  out = tmp_path / "parity.json"
  assert fp8_parity.main([f"--bf16={tmp_path / 'a'}", f"--fp8={tmp_path / 'b'}",
                          f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  assert "final (step 200): bf16 4.0000, fp8 4.0400, ratio 1.0100 (+1.00%)" in printed
  result = json.loads(out.read_text())
  assert [r["step"] for r in result["evals"]] == [100, 200]
  assert result["runs"]["fp8"]["eval/loss"] == [[100, 5.1], [200, 4.04]]
  assert result["runs"]["bf16"]["train/loss"] == [[100, 5.1], [200, 4.1]]


def test_runs_without_a_shared_eval_step_say_so(tmp_path, capsys):
  _run(tmp_path / "a", [(100, 5.0)])
  _run(tmp_path / "b", [])
  assert fp8_parity.main([f"--bf16={tmp_path / 'a'}", f"--fp8={tmp_path / 'b'}"]) == 1
  assert "no eval step in both runs" in capsys.readouterr().out


def test_seeds_give_each_pair_its_difference_and_their_mean_and_spread(tmp_path, capsys):
  _run(tmp_path / "seed0-bf16", [(100, 5.0), (200, 4.0)])
  _run(tmp_path / "seed0-fp8", [(100, 5.1), (200, 4.04)])
  _run(tmp_path / "seed1-bf16", [(100, 5.0), (200, 4.1)])
  _run(tmp_path / "seed1-fp8", [(100, 4.9), (200, 4.08)])
  out = tmp_path / "parity.json"
  assert fp8_parity.main([f"--root={tmp_path}", "--seeds=0,1", f"--out={out}"]) == 0
  result = json.loads(out.read_text())
  assert abs(result["seeds"]["0"]["final"]["difference"] - 0.04) < 1e-9
  assert abs(result["seeds"]["1"]["final"]["difference"] + 0.02) < 1e-9
  summary = result["across_seeds"]
  assert summary["seeds"] == 2 and abs(summary["mean_difference"] - 0.01) < 1e-9
  assert abs(summary["min_difference"] + 0.02) < 1e-9 and abs(summary["max_difference"] - 0.04) < 1e-9
  assert abs(summary["stdev_difference"] - 0.06 / 2 ** 0.5) < 1e-9
  assert "mean +0.0100" in capsys.readouterr().out


def test_a_seed_without_its_runs_is_reported_not_dropped(tmp_path):
  _run(tmp_path / "seed0-bf16", [(100, 5.0)])
  _run(tmp_path / "seed0-fp8", [(100, 5.1)])
  out = tmp_path / "parity.json"
  assert fp8_parity.main([f"--root={tmp_path}", "--seeds=0,3", f"--out={out}"]) == 1
  assert json.loads(out.read_text())["seeds_without_a_result"] == [3]


def test_one_pair_or_a_root_not_both():
  with pytest.raises(ValueError, match="--bf16=DIR --fp8=DIR"):
    fp8_parity.main(["--root=/x", "--bf16=/y"])
  with pytest.raises(ValueError, match="--seeds='a'"):
    fp8_parity.main(["--root=/x", "--seeds=a"])
