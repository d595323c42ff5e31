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
import re
import shutil
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


def card(names):
  """'h200' for one NVIDIA H200, '2xh100' for two H100s, 'cpu' for none (nvidia-smi's names)."""
  if not names:
    return "cpu"
  name = names[0].upper()
  kind = next((k.lower() for k in ("H100", "H200", "A100", "B200", "GH200") if k in name), None)
  kind = kind or re.sub(r"[^a-z0-9]+", "", name.lower().replace("nvidia", ""))[:12] or "gpu"
  return kind if len(names) == 1 else f"{len(names)}x{kind}"


def prefix(date, card_name, commit):
  """'2026-12-03-h200-900c7ab' (date-card where the commit is unknown)."""
  short = (commit or "").split()[0].split("-")[0].split("+")[0][:7] if commit else ""
  return "-".join(x for x in (date, card_name, short) if x)


def gpu_names():
  """nvidia-smi's name of each visible GPU ([] without one); imports no jax."""
  if not shutil.which("nvidia-smi"):
    return []
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  names = [n.strip() for n in out.splitlines() if n.strip()]
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  return names[:len([d for d in visible.split(",") if d.strip()])] if visible else names


def result_path(what, device_kinds=None):
  """Where a measurement lands when no path is given: bench/results/<date>-<card>-<commit>-<what>
  (device_kinds: jax's device kinds, one a device; None: nvidia-smi's GPUs, else cpu)."""
  if device_kinds is None:
    device_kinds = gpu_names()
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  return os.path.join(REPO, "bench", "results", f"{prefix(date, card(device_kinds), commit())}-{what}")


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
