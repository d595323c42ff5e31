"""bench/attention_backends.py: its documents are the stdlib modules, packed in order, ids from 1
in every row; the auto table it writes keeps other devices' rows and ranks this run's."""

import json

import numpy as np

from bench import attention_backends


def test_documents_are_contiguous_runs_numbered_from_one_in_each_row():
  seg = np.asarray(attention_backends.stdlib_rows(4, 2048))
  assert seg.shape == (4, 2048)
  assert (seg[:, 0] == 1).all()
  steps = np.diff(seg, axis=1)
  assert set(np.unique(steps)) <= {0, 1}  # each id one run, in order
  assert sum(len(np.unique(r)) for r in seg) > 4  # real-text lengths: several documents


def test_the_written_table_ranks_this_device_and_keeps_the_others(tmp_path):
  out, table = tmp_path / "a.json", tmp_path / "auto.json"
  attention_backends.main(["--quick", f"--out={out}", f"--write_table={table}",
                           "--backends=pallas,xla"])
  devices = json.loads(table.read_text())["devices"]
  assert "NVIDIA H200" in devices  # the committed rows stay
  cpu = devices["cpu"]["head_dims"]["64"]
  assert set(cpu) == {"documents", "no_documents"}
  assert set(cpu["no_documents"]) == {"pallas", "xla"}  # both within the band, ranked


def test_cudnn_keeps_first_place_unless_another_is_clearly_faster():
  assert attention_backends.rank([(1.574, "mgpu"), (1.609, "cudnn"), (1.784, "pallas")]) == [
      "cudnn", "mgpu", "pallas"]  # the 2026-12-03 H200 d64 rows: 2% is inside the spread between calls
  assert attention_backends.rank([(1.50, "mgpu"), (1.609, "cudnn")]) == ["mgpu", "cudnn"]
  assert attention_backends.rank([(1.6, "pallas"), (1.5, "mgpu")]) == ["mgpu", "pallas"]
