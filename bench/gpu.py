"""One GPU benchmark runner: the parts of a device call, each with its own time cap, results
named by date, card and commit, and a summary table at the end (printed, and as JSON).

    python -m bench.gpu --parts=env,step,decode --deadline_s=570 --out=$OUT
    python -m bench.gpu --parts=env,parity --parity_seeds=1 --deadline_s=590 --out=$OUT
    python -m bench.gpu --smoke --parts=env,decode --out=/tmp/g     # CPU: the tiny config

Parts (bench/gpu_parts.py, in the order given): env (device, versions), step (1b step:
attention=auto vs cudnn vs the plain JAX step vs torch), attention (bench.attention_backends;
this card's rows of kernels/attention_auto.json), decode (ours vs transformers eager and static
cache + compile, batch 1 and 16), decode_layer (the fused decode layer's kernels against XLA,
a tile sweep), spec (a trained target/draft pair's speculative rows), fp8 (the
step in bf16 vs fp8), parity (bf16 vs fp8 from one init, a pair a seed: ~6 min a seed), eval
(bench.eval_speed, where the tree has it), gemm, kernels, sweeps (the Pallas tile sweeps),
gpu_tests (the gpu-marked kernel tests).

Each result is OUT/<date>-<card>-<commit>-<what>.<ext> (e.g. 2026-12-03-h200-900c7ab-decode.json;
the card from nvidia-smi: h100, h200, 2xh100, ..., cpu; the commit: $BENCH_COMMIT, else git's),
each part's output OUT/<...>-<what>.log; the table is <...>-summary.json. A part runs until its
cap or the run's end (--deadline_s less a reserve), whichever is first; a part that fails or is
cut is an error row, one that would start too late a skipped row: the table is never lost.

The GPU machine (Python 3.12, jax 0.11.2) lacks grain, tensorboardX and ml_collections: carry the
wheels of /work/shared/gpu-wheels (copied into an ignored folder of the checkout, e.g. .whl) and
install them first (its README):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
The device's copy of the tree has no usable .git: pass BENCH_COMMIT=$(git rev-parse --short HEAD).
"""

import argparse
import datetime
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import bench
from bench import card, gpu_names, gpu_parts, prefix
from tinyllama_jax import cli
from tinyllama_jax.data import formats

# A full or read-only disk ends the run: every later part would lose its results the same way.
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
RESERVE_S = 10.0  # the run ends this long before --deadline_s: the summary is written by then
MIN_PART_S = {False: 30.0, True: 3.0}  # a part with less time left than this is skipped


def kill_group(proc):
  """Kills a part's command and everything it started (its workers): nothing outlives a part."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


class Part:
  """One part's names, clock and commands."""

  def __init__(self, name, cap_s, end, run):
    self.name, self.cap_s, self.run_cfg = name, cap_s, run
    self.start = time.monotonic()
    self.end = min(self.start + cap_s, end)
    self.smoke, self.seeds, self.parity_steps = run.smoke, run.seeds, run.parity_steps
    self.decode_kernels, self.tests = run.decode_kernels, run.tests
    self.decode_xla_options = run.decode_xla_options

  def left(self):
    return self.end - time.monotonic()

  def inner_deadline(self):
    """A deadline for a bench module's own row scheduling: room left for its last row."""
    return max(1, int(self.left() * 0.7))

  def path(self, what):
    return os.path.join(self.run_cfg.out, f"{self.run_cfg.prefix}-{what}")

  def log_path(self, what):
    return self.path(f"{what}.log")

  def scratch(self, what):
    path = os.path.join(self.run_cfg.scratch, f"{self.run_cfg.prefix}-{what}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path

  def write_json(self, what, obj):
    path = self.path(f"{what}.json")
    formats.write_json_atomic(path, obj)
    return path

  def run(self, cmd, what, memory_fraction=None):
    """Runs cmd (its own process group) under what is left of the part's time, output to
    <what>.log; returns the output. A non-zero exit or the cap raise PartError."""
    timeout = self.left()
    if timeout <= 0:
      raise gpu_parts.PartError(f"no time left for {what} (cap {self.cap_s:.0f} s)")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2",
               BENCH_COMMIT=self.run_cfg.commit or "")
    if memory_fraction and not self.smoke:
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = memory_fraction
    if self.smoke:
      env["JAX_PLATFORMS"] = "cpu"
    log = self.log_path(what)
    with open(log, "w") as f:
      proc = subprocess.Popen(cmd, cwd=bench.REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                              start_new_session=True)
      try:
        rc = proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        kill_group(proc)
        raise gpu_parts.PartError(f"{what} cut at {timeout:.0f} s (the part's cap "
                                  f"{self.cap_s:.0f} s or the run's deadline); see {log}")
      except BaseException:  # Ctrl-C or SIGTERM: the part's processes end with the runner
        kill_group(proc)
        raise
    with open(log) as f:
      out = f.read()
    if rc != 0:
      last = [line for line in out.splitlines() if line.strip()][-1:] or ["(no output)"]
      raise gpu_parts.PartError(f"{what} exited {rc}: {last[0].strip()[:300]}")
    return out


def highlights(path):
  """A few numbers of a result JSON for the table: each row's throughput or time (or why it
  has none), the parity seeds' mean difference, the attention ranking."""
  if not path.endswith(".json") or not os.path.exists(path):
    return {}
  with open(path) as f:
    result = json.load(f)
  if "across_seeds" in result:
    return {"fp8-bf16 mean": result["across_seeds"]["mean_difference"],
            "seeds": result["across_seeds"]["seeds"]}
  if "device_kind" in result and "versions" in result:
    return {"device": result["device_kind"], "jax": result["versions"].get("jax")}
  if isinstance(result.get("meta"), dict) and result["meta"].get("ranked"):
    return {f"auto {case}": " > ".join(names) for case, names in result["meta"]["ranked"].items()}
  out = {}
  for r in result.get("results", result.get("rows", [])):
    if not isinstance(r, dict) or "name" not in r:
      continue
    label = " ".join(str(x) for x in (r["name"], r.get("case", ""), r.get("batch", "")) if x != "")
    for key in ("tokens_per_s_per_device", "tokens_per_s", "fwd_bwd_ms", "error", "skipped"):
      if key in r:
        value = r[key]
        out[label] = round(value, 3) if isinstance(value, float) else str(value)[:80]
        break
  return out


def run_part(name, cap_s, end, run):
  fn = gpu_parts.PARTS[name][0]
  row = {"part": name, "cap_s": cap_s}
  if end - time.monotonic() < MIN_PART_S[run.smoke]:
    row.update(status="skipped", why="the run's deadline")
    return row
  part = Part(name, cap_s, end, run)
  try:
    files = fn(part)
  except gpu_parts.PartSkipped as e:
    row.update(status="skipped", why=str(e))
  except OSError as e:
    if e.errno in FULL_DISK:
      raise
    row.update(status="error", error=f"{type(e).__name__}: {e}"[:400])
  except Exception as e:  # a part's failure is its row's, not the table's
    row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
               if str(e) else type(e).__name__)
  else:
    row.update(status="ok", files=[os.path.basename(p) for p in files],
               highlights={os.path.basename(p): highlights(p) for p in files})
  row["seconds"] = round(time.monotonic() - part.start, 1)
  return row


def table(rows):
  lines = [f"{'part':<10} {'status':<8} {'s':>6} {'cap':>5}  what"]
  for r in rows:
    what = r.get("error") or r.get("why") or "; ".join(
        f"{k}: {v}" for h in r.get("highlights", {}).values() for k, v in h.items())
    lines.append(f"{r['part']:<10} {r['status']:<8} {r.get('seconds', 0):>6.1f} "
                 f"{r['cap_s']:>5.0f}  {what[:300]}")
  return "\n".join(lines)


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", default="env,step", help="comma-separated, run in this order: "
                 + ",".join(gpu_parts.PARTS))
  p.add_argument("--deadline_s", type=float, default=570.0,
                 help="the whole run ends this many seconds after it starts, less a reserve")
  p.add_argument("--out", required=True, help="the folder the results are written to")
  p.add_argument("--caps", default="", help="part=seconds,... replacing parts' default caps")
  p.add_argument("--parity_seeds", default="0", help="the parity part's seeds: 0,1,2")
  p.add_argument("--parity_steps", type=int, default=600, help="the parity runs' steps")
  p.add_argument("--decode_kernels", default="decode_layer=xla;",
                 help="the decode part's row sets of model.kernels (bench.decode --kernels; the "
                      "first is the others' token reference); the last one is profiled at batch 1")
  p.add_argument("--decode_xla_options", default="",
                 help="the decode part's row sets of XLA options (bench.decode --xla_options), "
                      "each with every --decode_kernels set")
  p.add_argument("--tests", default="tests/kernels",
                 help="the gpu_tests part's test paths, space-separated")
  p.add_argument("--card", default="", help="the card's name in the files (default: nvidia-smi)")
  p.add_argument("--scratch", default="/dev/shm" if os.path.isdir("/dev/shm") else
                 tempfile.gettempdir(), help="where training parts put their runs")
  p.add_argument("--smoke", action="store_true", help="the tiny config on CPU: checks the runner")
  args = p.parse_args(argv)
  args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
  unknown = [s for s in args.parts if s not in gpu_parts.PARTS]
  if unknown or not args.parts:
    raise ValueError(f"--parts: unknown part(s) {unknown or '(none given)'}: choose from "
                     f"{', '.join(gpu_parts.PARTS)}")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise ValueError(f"--out={args.out} is a file: give a folder for the results")
  if args.deadline_s <= RESERVE_S:
    raise ValueError(f"--deadline_s={args.deadline_s:g}: give more than {RESERVE_S:g} seconds")
  caps = [c.split("=") for c in args.caps.split(",") if c.strip()]
  if any(len(c) != 2 or c[0] not in gpu_parts.PARTS or not re.fullmatch(r"\d+(\.\d*)?", c[1])
         for c in caps):
    raise ValueError(f"--caps={args.caps!r}: give part=seconds,... with parts from "
                     f"{', '.join(gpu_parts.PARTS)}")
  args.caps = {name: float(s) for name, s in caps}
  seeds = [s.strip() for s in args.parity_seeds.split(",") if s.strip()]
  if not seeds or not all(s.isdigit() for s in seeds):
    raise ValueError(f"--parity_seeds={args.parity_seeds!r}: give non-negative integers, e.g. 0,1")
  args.seeds = [int(s) for s in seeds]
  if args.parity_steps < (2 if args.smoke else 600):
    raise ValueError(f"--parity_steps={args.parity_steps}: parity needs >= 600 steps")
  return args


def main(argv):
  args = parse(argv)
  # SIGTERM (a scheduler, `timeout`) as an exception: the running part's processes are killed
  # on the way out instead of running on without the runner.
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  try:
    return run_all(args)
  finally:
    signal.signal(signal.SIGTERM, previous)


def run_all(args):
  start = time.monotonic()
  end = start + args.deadline_s - RESERVE_S
  try:
    os.makedirs(args.out, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--out={args.out}: cannot make the folder ({e.strerror})") from None
  args.commit = bench.commit()
  args.card = args.card or ("cpu" if args.smoke else card(gpu_names()))
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  args.prefix = prefix(date, args.card, args.commit)
  print(f"bench.gpu: {args.prefix}, parts {','.join(args.parts)}, deadline {args.deadline_s:g} s",
        flush=True)
  rows = []
  for name in args.parts:
    cap = args.caps.get(name, gpu_parts.PARTS[name][2 if args.smoke else 1])
    try:
      rows.append(run_part(name, cap, end, args))
    except OSError as e:
      print(f"error: part {name} could not write its results ({e}): the run stops; what the "
            f"parts before it wrote is in {args.out}", file=sys.stderr)
      return 3
    r = rows[-1]
    print(f"  {name}: {r['status']} in {r.get('seconds', 0):.1f} s"
          + (f": {r.get('error') or r.get('why')}" if r["status"] != "ok" else ""), flush=True)
  summary = {"prefix": args.prefix, "date": bench.now_utc(), "commit": args.commit,
             "card": args.card, "parts": rows, "deadline_s": args.deadline_s,
             "wall_s": round(time.monotonic() - start, 1), "smoke": args.smoke}
  path = os.path.join(args.out, f"{args.prefix}-summary.json")
  print(table(rows))
  try:
    formats.write_json_atomic(path, summary)
  except OSError as e:  # the table above is all that is left: a fault, not a result
    print(f"error: cannot write {path} ({e}): the parts' files are in {args.out}", file=sys.stderr)
    return 3
  print(f"wrote {path}")
  return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
  cli.exit_on_error(lambda: sys.exit(main(sys.argv[1:])))
