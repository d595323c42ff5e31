"""bench/eval_speed.py --smoke on CPU: both backends' rows, the same weights scoring the same (fp32
here: every request's log-likelihood within 1e-4, the same accuracies), the JSON; and the local
tasks it writes from the standard library's text."""

import json

from bench import eval_speed


def test_smoke_rows_and_json(tmp_path, capsys):
  out = tmp_path / "eval_speed.json"
  assert eval_speed.main(["--smoke", f"--out={out}"]) == 0
  result = json.loads(out.read_text())
  ours, theirs = result["rows"]
  assert (ours["backend"], theirs["backend"]) == ("ours", "hf")
  assert ours["requests"] == theirs["requests"] == 4 * 4
  assert ours["requests_per_s"] > 0 and theirs["requests_per_s"] > 0
  assert (ours["acc"], ours["acc_norm"]) == (theirs["acc"], theirs["acc_norm"])
  assert result["max_abs_logp_diff"] < 1e-4
  assert result["speedup"] > 0 and result["smoke"]
  assert "ours / hf:" in capsys.readouterr().out


def test_local_tasks_from_stdlib_text(tmp_path):
  folder = eval_speed.write_local_tasks(str(tmp_path), n_docs=5)
  rows = [json.loads(line) for line in open(f"{folder}/stdlib_mc.jsonl")]
  assert len(rows) == 5
  for row in rows:
    assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
    assert 0 <= row["gold"] < 4 and row["context"]
  assert len({r["gold"] for r in rows}) > 1  # the answer is not always in one place
  docs = [json.loads(line)["text"] for line in open(f"{folder}/stdlib_ppl.jsonl")]
  assert len(docs) == 5 and all(len(d.split("\n")) == 4 for d in docs)
  assert str(tmp_path) in open(f"{folder}/stdlib_mc.yaml").read()  # absolute data paths
