"""Reads what an offline W&B run wrote (WORKDIR/wandb/offline-run-*/run-ID.wandb: W&B's records in
LevelDB's log framing, 32 KiB blocks of [crc32, length, type] + bytes), without the network."""

import glob
import json
import os
import struct
import time

from wandb.proto import wandb_internal_pb2

_BLOCK, _HEADER = 32768, 7
_FULL, _LAST = 1, 4


def _records(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B", path
  pos, buf = _HEADER, b""
  while pos + _HEADER <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < _HEADER:  # a block's tail too short for a header is padding
      pos += left
      continue
    _, n, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
    if kind == 0:
      break
    buf += data[pos + _HEADER:pos + _HEADER + n]
    pos += _HEADER + n
    if kind in (_FULL, _LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(buf)
      yield record
      buf = b""


def _finished(path, timeout_s=60):
  """The records of a run file once its exit record is written (W&B's service process may still be
  flushing after finish() returns)."""
  deadline = time.monotonic() + timeout_s
  while True:
    records = list(_records(path))
    if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
      return records
    time.sleep(0.2)


def offline_runs(workdir):
  """{run id: (history {key: [(step, value)] by step}, config keys)} of every offline run in workdir."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
    run_id = os.path.basename(path)[len("run-"):-len(".wandb")]
    history, config = out.setdefault(run_id, ({}, set()))
    for r in _finished(path):
      kind = r.WhichOneof("record_type")
      if kind == "history":
        items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for key, value in items.items():
          if not key.startswith("_"):
            history.setdefault(key, []).append((items["_step"], value))
      elif kind == "run":
        config.update(u.key or u.nested_key[0] for u in r.run.config.update)
  # A resume writes a second run file of the same id; two starts in one second share the
  # directory's timestamp, so the files' order is not the steps' order.
  for history, _ in out.values():
    for key in history:
      history[key].sort()
  return out
