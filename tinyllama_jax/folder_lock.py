"""One writer per folder: an exclusive flock on FOLDER/.lock, held until release() or the process
ends. The kernel drops it with the process, so a crashed or kill -9'd writer leaves nothing stuck;
the file keeps the holder's line (command, pid, host, since when) for the refusal's message. Train
holds its workdir's, prepare its --out's."""

import fcntl
import os
import socket
import time


class FolderLock:
  """`refusal(holder, lock_path)` is the ValueError's message when another process holds it."""

  def __init__(self, folder, command, refusal):
    self.path = os.path.join(folder, ".lock")
    # A file object, not a bare descriptor: one dropped without release() closes, and unlocks,
    # when it is garbage collected. "a+" creates without truncating the holder's line.
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read(512).strip() or "another process"
      self._file.close()
      raise ValueError(refusal(holder, self.path)) from None
    self._file.truncate(0)
    self._file.write(f"{command} pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    self._file.flush()

  def release(self, remove=False):
    if remove:  # a folder its writer made and leaves empty
      os.unlink(self.path)
    self._file.close()  # closing the file drops the flock


def holder(folder):
  """Who holds FOLDER/.lock now ('train pid N on HOST, since ...'), or None when no live process
  does: the kernel drops a lock with its process, so a dead or reused pid never counts."""
  try:
    f = open(os.path.join(folder, ".lock"))
  except FileNotFoundError:
    return None
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return f.read(512).strip() or "another process"
    fcntl.flock(f, fcntl.LOCK_UN)
  return None
