"""What a run says when it stops: where its checkpoint, metrics and tensorboard events went, its
last losses and its wall time; and, rerun once finished, that nothing is left to train (before
anything is compiled)."""

import os

from absl import logging

from tinyllama_jax.training import metrics


def duration(seconds):
  """12.3 s, 4m05s, 2h07m."""
  if seconds < 60:
    return f"{seconds:.1f} s"
  minutes, s = divmod(int(seconds), 60)
  h, m = divmod(minutes, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _losses(values):
  parts = [f"{name} loss {values[f'{name}/loss']:.4f}" for name in ("train", "eval")
           if values.get(f"{name}/loss") is not None]
  return ", ".join(parts) if parts else "no loss logged"


def _places(workdir, checkpoint_step):
  tb = os.path.join(workdir, "tb")
  return [f"  checkpoint   {os.path.join(workdir, 'checkpoints', str(checkpoint_step))}",
          f"  metrics      {os.path.join(workdir, metrics.METRICS_FILE)}",
          f"  tensorboard  {tb}  (tensorboard --logdir={tb})"]


def closing_lines(workdir, result, total_steps, seconds):
  """The lines a run ends with. result: the loop's last metrics, its `step`, `checkpoint_step`
  (the last one saved) and `preempted`."""
  step = result["step"]
  if result.get("preempted"):
    head = (f"preempted at step {step} of {total_steps} after {duration(seconds)}; "
            f"{_losses(result)}: rerun the same command to continue")
  else:
    head = f"done: step {step} of {total_steps} in {duration(seconds)}; {_losses(result)}"
  return [head] + _places(workdir, result["checkpoint_step"])


def finished_lines(workdir, step, total_steps):
  """What a rerun of a finished run says: its step, its last logged losses, where it all is."""
  series, unreadable = metrics.read_metrics(workdir)
  last = {name: points[-1][1] for name, points in series.items() if points}
  where = f"step {step} of {total_steps}" if step == total_steps else (
      f"step {step}, past train.steps={total_steps}")
  head = (f"already at {where}: nothing to train (raise --config.train.steps to train on); "
          f"last {_losses(last)}")
  if unreadable:
    head += f" ({unreadable} unreadable line(s) of {metrics.METRICS_FILE} skipped)"
  return [head] + _places(workdir, step)


def log_lines(lines):
  for line in lines:
    logging.info("%s", line)
