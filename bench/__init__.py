"""Benchmarks: `python -m bench` times whole training steps (ours and the PyTorch
peer's) on synthetic data; see __main__.py. Modules:

  step.py        one JAX variant: build the real train step, warm up, time it (a worker process)
  peer_torch.py  transformers' LlamaForCausalLM with torch.compile (a worker process)
  __main__.py    the matrix: a worker per variant, the table, the JSON
  gpu.py         one device call: the parts (step, attention, decode, spec, fp8, parity, ...),
                 each capped, results named date-card-commit-what, a summary table

Importing this package imports neither jax nor torch.
"""

import datetime
import importlib.metadata
import json
import os
import subprocess

# The checkout: the bench runs its workers and reads configs/ from here (bench/ is not installed).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESULT_PREFIX = "BENCH_RESULT "  # a worker's one line of JSON on stdout

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu", "flax", "optax",
            "orbax-checkpoint", "torch", "transformers", "numpy")


def versions():
  out = {}
  for pkg in PACKAGES:
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def commit():
  """$BENCH_COMMIT if set (the device machine's copy of the tree carries a stale .git, or none),
  else the checkout's commit (+ '-dirty'), else None."""
  if os.environ.get("BENCH_COMMIT"):
    return os.environ["BENCH_COMMIT"]
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          timeout=10)
    if head.returncode == 0:
      dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True, timeout=10).stdout.strip()
      return head.stdout.strip() + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    pass
  return None


def now_utc():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def emit(result):
  """A worker's result: one line the parent finds among whatever else the worker printed."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(stdout):
  for line in reversed(stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  return None


def timing_summary(window_times_s, steps_per_window, tokens_per_step, n_devices, flops_token,
                   peak_flops):
  """Throughput from timed windows of steps (one device sync per window, none inside)."""
  total_s = sum(window_times_s)
  steps = steps_per_window * len(window_times_s)
  step_times = sorted(t / steps_per_window for t in window_times_s)
  tokens_per_s = steps * tokens_per_step / total_s
  out = {"steps_timed": steps, "step_time_s": total_s / steps,
         "step_time_median_s": step_times[len(step_times) // 2],
         "step_time_min_s": step_times[0], "step_time_max_s": step_times[-1],
         "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / n_devices,
         "flops_per_token": flops_token}
  out["mfu"] = (tokens_per_s / n_devices * flops_token / peak_flops) if peak_flops else None
  return out
