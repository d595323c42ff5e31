"""bench/fp8_parity.py: the held-out losses of two runs' metrics.jsonl, their ratio, the JSON."""

import json

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
