"""Where a step's device time goes: a summary of a jax.profiler trace, by kind of kernel.

    python -m bench.profile TRACE_DIR [--steps=3] [--json=out.json]

Reads the newest `*.xplane.pb` under TRACE_DIR with `jax.profiler.ProfileData` (no TensorBoard
or xprof needed), takes the GPU kernels off the device planes' stream lines, and buckets them by
kernel name and HLO op: matmul (cuBLAS/cuDNN GEMMs, Triton GEMM fusions), attention (cuDNN
fused attention, our Pallas flash kernels), collectives (NCCL), copies, reductions, elementwise
fusions, other. Per step: busy time per bucket, its share, and device idle (wall time not covered
by any kernel). The top kernels by total time come with it: the table that says what to fuse next.
`python -m bench --profile_dir=DIR` traces and summarises the first variant.
"""

import argparse
import collections
import glob
import json
import os
import re
import sys

# First match wins: attention before matmul (cuDNN attention kernels also say "sm90"/"gemm"-ish).
BUCKETS = (
    ("attention", ("fmha", "flash", "cudnn_fused_attention", "fprop_attention", "dot_product_att",
                   "sdpa", "attention")),
    ("collective", ("nccl", "all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                    "collective")),
    ("matmul", ("gemm", "cublas", "cutlass", "nvjet", "xmma", "wgmma", "_dot", "dot.", "matmul")),
    ("copy", ("memcpy", "memset", "copy")),
    ("reduction", ("reduce", "input_", "softmax", "norm")),
    ("elementwise", ("loop_", "fusion", "convert", "elementwise")),
)
_SKIP_LINES = ("XLA Ops", "XLA Modules", "Steps", "Launch Stats", "Source", "TensorFlow")


def classify(kernel, hlo_op=""):
  text = f"{kernel} {hlo_op}".lower()
  for bucket, keys in BUCKETS:
    if any(k in text for k in keys):
      return bucket
  return "other"


def op_family(kernel, hlo_op):
  """A name that groups the same kind of kernel across layers: XLA numbers every fusion
  ('loop_multiply_fusion_12'). The kernel's own name, not the HLO op's: under command buffers
  (CUDA graphs) the op is only the buffer's name."""
  name = kernel or hlo_op
  return re.sub(r"([._]\d+)+$", "", name)[:90]


def find_xplane(trace_dir):
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir!r}: trace with "
                            "jax.profiler.start_trace(dir) first")
  return max(files, key=os.path.getmtime)


def device_kernels(xplane_path):
  """{plane name: [(kernel name, hlo op, start ns, end ns)]} for each device plane; on a CPU
  backend (no device planes) the host plane's XLA op events stand in, so the tool runs in tests."""
  from jax.profiler import ProfileData
  data = ProfileData.from_file(xplane_path)
  out, host = {}, {}
  for plane in data.planes:
    on_device = plane.name.startswith("/device:") and "CUSTOM" not in plane.name
    if not on_device and plane.name != "/host:CPU":
      continue
    kernels = []
    for line in plane.lines:
      if any(line.name.startswith(s) for s in _SKIP_LINES):
        continue
      for ev in line.events:
        stats = dict(ev.stats)
        if on_device or "hlo_op" in stats:
          kernels.append((ev.name, str(stats.get("hlo_op", "")), ev.start_ns, ev.end_ns))
    if kernels:
      (out if on_device else host)[plane.name] = kernels
  return out or host


def _union_ns(intervals):
  total, end = 0, None
  for s, e in sorted(intervals):
    if end is None or s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def summarize(trace_dir, steps, top=15):
  """Per-step buckets and top kernels of the first device plane (one process = its devices)."""
  planes = device_kernels(find_xplane(trace_dir))
  if not planes:
    raise ValueError(f"the trace under {trace_dir!r} has no device kernels (a CPU run?)")
  name = sorted(planes)[0]
  kernels = planes[name]
  by_bucket, by_kernel = collections.Counter(), collections.Counter()
  calls, by_op = collections.Counter(), collections.Counter()
  for kname, hlo, s, e in kernels:
    b = classify(kname, hlo)
    by_bucket[b] += e - s
    key = (b, op_family(kname, hlo))
    by_kernel[key] += e - s
    calls[key] += 1
    by_op[hlo or kname] += e - s
  busy = _union_ns([(s, e) for _, _, s, e in kernels])
  span = max(e for *_, e in kernels) - min(s for _, _, s, _ in kernels)
  summed = sum(by_bucket.values())
  ms = lambda ns: ns / 1e6 / steps
  return {
      "device_plane": name, "steps": steps, "kernels": len(kernels),
      "span_ms_per_step": ms(span), "busy_ms_per_step": ms(busy),
      "idle_ms_per_step": ms(span - busy),
      # Buckets sum kernel time; streams overlap (e.g. NCCL beside compute), so shares are of the
      # summed kernel time, not of the wall span.
      "buckets": {b: {"ms_per_step": ms(t), "share": t / summed}
                  for b, t in by_bucket.most_common()},
      "top_kernels": [{"bucket": b, "op": k, "ms_per_step": ms(t), "calls_per_step": calls[(b, k)]
                       / steps} for (b, k), t in by_kernel.most_common(top)],
      # Single HLO ops (join with the saved step.hlo.txt.gz for their bytes and shapes).
      "top_ops": [{"op": k, "ms_per_step": ms(t)} for k, t in by_op.most_common()],
      # Every kernel family, for comparing two steps family by family (`compare`).
      "families": [{"bucket": b, "op": k, "ms_per_step": ms(t), "calls_per_step": calls[(b, k)]
                    / steps} for (b, k), t in by_kernel.most_common()],
  }


def capture(trace_dir, run_steps, carry, steps=3):
  """(run_steps(carry), summary): traces `steps` steps that run_steps runs (and waits for) into
  trace_dir, then summarises them; a summary that fails is {"error": ...}, the timing still
  counts. The carry threads the donated state through."""
  import jax  # loaded where a trace is taken or read, as device_kernels does
  jax.profiler.start_trace(trace_dir)
  carry = run_steps(carry)
  jax.profiler.stop_trace()
  try:
    summary = summarize(trace_dir, steps=steps)
    with open(os.path.join(trace_dir, "summary.txt"), "w") as f:
      f.write(table(summary) + "\n")
    print(table(summary), file=sys.stderr, flush=True)
  except Exception as e:  # noqa: BLE001  the table says why there is no profile
    summary = {"error": f"{type(e).__name__}: {e}"}
  return carry, summary


def compare(a, b, names=("a", "b"), top=40):
  """Two summaries side by side: buckets, then kernel families by |ms a - ms b| (the families
  that place a gap between two steps). Families are kernel names with XLA's numbering stripped,
  so a row can hold different fusions of one kind; `top_ops` and the saved HLO tell them apart."""
  na, nb = names
  lines = [f"{'':<14}{na:>10}{nb:>10}{'diff':>9}   (ms a step; {na} - {nb})",
           f"{'span':<14}{a['span_ms_per_step']:>10.2f}{b['span_ms_per_step']:>10.2f}"
           f"{a['span_ms_per_step'] - b['span_ms_per_step']:>+9.2f}",
           f"{'busy':<14}{a['busy_ms_per_step']:>10.2f}{b['busy_ms_per_step']:>10.2f}"
           f"{a['busy_ms_per_step'] - b['busy_ms_per_step']:>+9.2f}"]
  for bucket in sorted(set(a["buckets"]) | set(b["buckets"])):
    ta = a["buckets"].get(bucket, {}).get("ms_per_step", 0.0)
    tb = b["buckets"].get(bucket, {}).get("ms_per_step", 0.0)
    lines.append(f"{bucket:<14}{ta:>10.2f}{tb:>10.2f}{ta - tb:>+9.2f}")
  fam = lambda s: {(f["bucket"], f["op"]): f for f in s.get("families") or s["top_kernels"]}
  fa, fb = fam(a), fam(b)
  zero = {"ms_per_step": 0.0, "calls_per_step": 0}
  rows = sorted(set(fa) | set(fb), key=lambda k: -abs(fa.get(k, zero)["ms_per_step"]
                                                       - fb.get(k, zero)["ms_per_step"]))
  lines.append(f"{'kernel family':<58}{'bucket':>12}{na + ' ms':>9}{'calls':>6}{nb + ' ms':>9}"
               f"{'calls':>6}{'diff':>8}")
  for k in rows[:top]:
    x, y = fa.get(k, zero), fb.get(k, zero)
    lines.append(f"{k[1][:57]:<58}{k[0]:>12}{x['ms_per_step']:>9.2f}{x['calls_per_step']:>6.0f}"
                 f"{y['ms_per_step']:>9.2f}{y['calls_per_step']:>6.0f}"
                 f"{x['ms_per_step'] - y['ms_per_step']:>+8.2f}")
  return "\n".join(lines)


def table(summary):
  s = summary
  lines = [f"device {s['device_plane']}: {s['span_ms_per_step']:.1f} ms a step traced, "
           f"{s['busy_ms_per_step']:.1f} busy, {s['idle_ms_per_step']:.1f} idle "
           f"({s['kernels']} kernels over {s['steps']} steps)",
           f"{'bucket':<14}{'ms/step':>9}{'share':>8}"]
  for b, v in s["buckets"].items():
    lines.append(f"{b:<14}{v['ms_per_step']:>9.2f}{v['share']:>8.1%}")
  lines.append(f"{'top kernels':<64}{'bucket':>12}{'ms/step':>9}{'calls':>7}")
  for k in s["top_kernels"]:
    lines.append(f"{k['op'][:63]:<64}{k['bucket']:>12}{k['ms_per_step']:>9.2f}"
                 f"{k['calls_per_step']:>7.0f}")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("trace_dir")
  p.add_argument("--steps", type=int, default=3, help="steps the trace holds")
  p.add_argument("--json", default="", help="also write the summary here")
  args = p.parse_args()
  try:
    s = summarize(args.trace_dir, args.steps)
  except (OSError, ValueError) as e:  # no trace there, or one without device kernels: one line
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(table(s))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(s, f, indent=1)


if __name__ == "__main__":
  main()
