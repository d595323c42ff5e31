"""prepare's status line: how far it is, how fast it goes, and when it will be done."""

import sys
import time


class Progress:
  """A status line on stderr after each finished input: MB done, MB/s, documents/s and ETA.
  Rewritten in place on a terminal; in a log, the first, the last and one every 30 s."""

  def __init__(self, total_bytes: int, num_inputs: int):
    self._total, self._num_inputs = total_bytes, num_inputs
    self._stream = sys.stderr
    self._tty = self._stream.isatty()
    self._interval = 0.2 if self._tty else 30.0
    self._start, self._last = time.time(), float("-inf")  # the first input shows at once
    self._done_bytes = self._new_bytes = self._new_docs = self._inputs = 0

  def update(self, record: dict):
    self._inputs += 1
    self._done_bytes += record["input_bytes"]
    if not record["skipped"]:  # the rates count this run's work only
      self._new_bytes += record["input_bytes"]
      self._new_docs += record["stats"]["documents"]
    now = time.time()
    if now - self._last >= self._interval or self._inputs == self._num_inputs:
      self._last = now
      # On a terminal: back to the line's start, then clear what a longer last line left.
      self._stream.write(f"\r{self.line(now)}\x1b[K" if self._tty else self.line(now) + "\n")
      self._stream.flush()

  def line(self, now: float) -> str:
    elapsed = max(now - self._start, 1e-9)
    rate = self._new_bytes / elapsed
    eta = (self._total - self._done_bytes) / rate if rate else 0.0
    return (f"prepare: {self._done_bytes / 1e6:.1f}/{self._total / 1e6:.1f} MB, "
            f"{self._inputs}/{self._num_inputs} inputs, {rate / 1e6:.1f} MB/s, "
            f"{self._new_docs / elapsed:.0f} docs/s, ETA {_hms(eta)}")

  def close(self):
    if self._tty and self._inputs:
      self._stream.write("\n")


def _hms(seconds: float) -> str:
  s = int(seconds)
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
