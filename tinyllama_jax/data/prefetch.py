"""Prefetch batches to the devices while the step runs, without breaking exact resume.

A plain read-ahead wrapper's get_state() would be `depth` batches ahead of what the step consumed,
so a resume would silently skip them. Here each buffered batch carries the iterator state from just
before it was read, and get_state() returns the state of the next batch not yet handed out.
The placement function is the caller's (e.g. jax.make_array_from_process_local_data with the batch
sharding); jax places asynchronously, so no thread is needed for the copy to overlap the step.
"""

import collections
from typing import Callable


class DevicePrefetcher:

  def __init__(self, iterator, put: Callable, depth: int = 2):
    if depth < 1:
      raise ValueError(f"prefetch depth={depth} must be at least 1")
    self._it, self._put, self._depth = iterator, put, depth
    self._buffer = collections.deque()

  def _fill(self):
    while len(self._buffer) < self._depth:
      state = self._it.get_state()
      self._buffer.append((state, self._put(next(self._it))))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill()
    _, batch = self._buffer.popleft()
    self._fill()  # the next batches start their host->device copies now, during this step
    return batch

  def get_state(self) -> dict:
    return self._buffer[0][0] if self._buffer else self._it.get_state()

  def set_state(self, state: dict):
    self._buffer.clear()
    self._it.set_state(state)

  def close(self):
    self._buffer.clear()
    self._it.close()
