"""The lines a run stops with (training/report.py); tests/test_train.py checks them on a real run
and its rerun."""

import json

from tinyllama_jax.training import report


def test_durations_read_at_a_glance():
  assert [report.duration(s) for s in (12.34, 245, 7620)] == ["12.3 s", "4m05s", "2h07m"]


def test_a_preempted_run_says_how_to_continue_and_where_its_checkpoint_is():
  lines = report.closing_lines("w", {"step": 12, "checkpoint_step": 12, "preempted": True,
                                     "train/loss": 2.5}, 30, 90)
  assert lines[0] == ("preempted at step 12 of 30 after 1m30s; train loss 2.5000: rerun the same "
                      "command to continue")
  assert lines[1] == "  checkpoint   w/checkpoints/12"


def test_a_finished_run_reports_its_last_logged_losses_and_counts_unreadable_lines(tmp_path):
  rows = [{"start_step": 0}, {"step": 40, "train/loss": 1.25}, {"step": 40, "eval/loss": 1.5}]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')  # a line cut by a kill
  lines = report.finished_lines(str(tmp_path), 40, 30)
  assert lines[0] == ("already at step 40, past train.steps=30: nothing to train (raise "
                      "--config.train.steps to train on); last train loss 1.2500, eval loss "
                      "1.5000 (1 unreadable line(s) of metrics.jsonl skipped)")
  assert lines[2] == f"  metrics      {tmp_path}/metrics.jsonl"
