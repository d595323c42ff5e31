"""Whole-step benchmark: our train step (one or more variants) and the PyTorch peer, side by side.

    python -m bench --config=configs/1b.py                       # base + both peers
    python -m bench --config=configs/1b.py --config.mesh.data=2 --peer=
    python -m bench --config=configs/1b.py \
        --variants='base;scan:model.scan_layers=True;pallas:model.kernels.attention=pallas'
    python -m bench --smoke                                       # CPU, < 1 min
    python -m bench --plain=plain,stacked --profile_dir=/tmp/prof \
        --profile_variants=base,plain                   # profile ours and the floor, compare

Beside our variants run the peers, each a worker too: the plain hand-written JAX step
(bench/plain_step.py, a port of bench/peers/plain_jax_step.py: the floor a user gets by writing
the step by hand) and the PyTorch peer (bench/peer_torch.py). The table gives each row's ratio
to both; with two rows profiled, the kernel families of the first profiled variant and the first
profiled plain row side by side (bench/profile.py compare).

Each variant runs in its own worker process (bench/step.py, bench/peer_torch.py): a fresh
process gives each its own peak-memory counter and compile, and keeps torch and jax from holding
each other's GPU memory. This process imports neither. It prints a table and writes JSON (--out):
per variant tokens/s per device, MFU, step time, compile time, launch-to-first-step, peak memory
(measured, and XLA's estimate), and our ratio to the faster peer; with config, mesh, versions,
commit and date. A failed or skipped variant is a row that says why, never a silent gap.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from tinyllama_jax import cli, config as config_lib, peak_flops
from tinyllama_jax.data import formats
import bench
from bench import profile  # imports jax only where a trace is taken or read

REPO = bench.REPO


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=None, help="config file (default configs/1b.py; "
                 "--smoke: configs/tiny.py); --config.a.b=v overrides apply to every variant")
  p.add_argument("--variants", default="base",
                 help="';'-separated NAME[:key=value,key=value] (keys under the config, and "
                 "accum=N for that variant's accumulation)")
  p.add_argument("--peer", default="autocast,bf16",
                 help="PyTorch peer variants to run: autocast, bf16 ('' = none)")
  p.add_argument("--plain", default="plain",
                 help="plain-JAX step rows: plain (the peer script's step), stacked, chunked_ce "
                 "(bench-only variants that move one of our choices into it; '' = none)")
  p.add_argument("--peer_compile", action=argparse.BooleanOptionalAction, default=True,
                 help="torch.compile the peer (off on CPU: inductor's CPU compile is slow)")
  p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--window", type=int, default=5, help="steps between device syncs when timing")
  p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
  p.add_argument("--doc_lengths", default="", help="comma-separated document lengths each row "
                 "of our variants' batch holds, the rest padding ('' = one document a row; only "
                 "packed variants, data.packing=first_fit, attend within them)")
  p.add_argument("--out", default=None, help="JSON path (default bench/results/<date>-<card>-"
                 "<commit>-step.json)")
  p.add_argument("--cache_dir", default="", help="JAX persistent compilation cache for workers")
  p.add_argument("--deadline_s", type=float, default=0,
                 help="skip variants that would start after this many seconds (0: never)")
  p.add_argument("--worker_timeout_s", type=float, default=600)
  p.add_argument("--profile_dir", default="",
                 help="trace 3 steps of the profiled variants (DIR/NAME) and summarise them")
  p.add_argument("--profile_variants", default="",
                 help="comma-separated variant names to profile ('' = the first)")
  p.add_argument("--smoke", action="store_true",
                 help="tiny config, few steps, base + scan + eager peer: checks the whole path")
  args, rest = p.parse_known_args(argv)
  dist = ("--distributed", "--coordinator", "--num_processes", "--process_id")
  bad = [a for a in rest if not a.startswith(("--config.",) + dist)]
  if bad:
    p.error(f"unknown arguments {bad}: config overrides look like --config.train.seq_len=1024")
  args.overrides = [a for a in rest if a.startswith("--config.")]
  args.distributed = [a for a in rest if a.startswith(dist)]  # for the JAX workers
  if args.smoke:
    args.config = args.config or "configs/tiny.py"
    args.steps, args.warmup, args.window = 4, 1, 2
    if args.variants == "base":
      args.variants = "base;scan:model.scan_layers=True"
    args.peer_compile = False
    args.peer = "autocast" if args.peer == "autocast,bf16" else args.peer
  args.config = args.config or "configs/1b.py"
  args.out = args.out or bench.result_path("smoke.json" if args.smoke else "step.json")
  return args


def parse_variants(spec):
  """'base;scan:model.scan_layers=True,accum=2' -> [(name, ['--config.model.scan_layers=True',
  '--accum=2'])]: config keys become overrides, `accum` the worker's own flag, and
  `xla_flags=--xla_a=1 --xla_b=2` the worker's XLA_FLAGS (added to any already set)."""
  out = []
  for item in [s.strip() for s in spec.split(";") if s.strip()]:
    name, _, kvs = item.partition(":")
    overrides = []
    for kv in [kv.strip() for kv in kvs.split(",") if kv.strip()]:
      if "=" not in kv:
        raise ValueError(f"variant {name!r}: override {kv!r} needs key=value")
      worker_flag = kv.startswith(("accum=", "xla_flags="))
      overrides.append(f"--{kv}" if worker_flag else f"--config.{kv}")
    out.append((name.strip(), overrides))
  if len({n for n, _ in out}) != len(out):
    raise ValueError(f"--variants has a repeated name: {spec!r}")
  return out


def apply_overrides(cfg, overrides):
  """--config.a.b=v strings applied to a ConfigDict, each value cast to the field's type."""
  for o in overrides:
    key, _, value = o[len("--config."):].partition("=")
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise ValueError(config_lib.unknown_key_message(key, cfg))
    old = node[leaf]
    if isinstance(old, bool):
      node[leaf] = value.lower() in ("1", "true", "yes")
    else:
      node[leaf] = type(old)(value) if old is not None else value
  return cfg


def run_worker(cmd, timeout, env=None):
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired as e:
    # TimeoutExpired carries the output as bytes even with text=True: the JSON report needs str.
    stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
    return {"error": f"timed out after {timeout:.0f} s"}, stderr[-3000:], timeout
  result = bench.parse_result(proc.stdout)
  if result is None:
    result = {"error": f"worker exited {proc.returncode} without a result: "
                       f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"}
  return result, proc.stderr[-3000:], time.perf_counter() - t0


def fmt(v, spec, scale=1.0):
  return "-" if v is None else format(v * scale, spec)


def table(results, ratios, to_plain=None):
  to_plain = to_plain or {}
  head = (f"{'variant':<22}{'tok/s/dev':>11}{'MFU':>7}{'step ms':>9}{'compile s':>10}"
          f"{'1st step s':>11}{'peak GiB':>9}{'XLA GiB':>8}{'vs peer':>8}{'vs plain':>9}")
  lines = [head, "-" * len(head)]
  for r in results:
    if "error" in r or "skipped" in r:
      lines.append(f"{r['name']:<22}  {r.get('skipped') or r['error']}"[:160])
      continue
    xla = (r.get("xla_memory") or {}).get("peak_estimate_bytes")
    lines.append(
        f"{r['name']:<22}{fmt(r.get('tokens_per_s_per_device'), ',.0f'):>11}"
        f"{fmt(r.get('mfu'), '.1%'):>7}{fmt(r.get('step_time_s'), '.1f', 1e3):>9}"
        f"{fmt(r.get('compile_s'), '.1f'):>10}{fmt(r.get('launch_to_first_step_s'), '.1f'):>11}"
        f"{fmt(r.get('peak_memory_gib'), '.1f'):>9}{fmt(xla, '.1f', 2**-30):>8}"
        f"{fmt(ratios.get(r['name']), '.2f'):>8}{fmt(to_plain.get(r['name']), '.3f'):>9}")
  return "\n".join(lines)


def check_choices(args, cfg):
  """(variants, peers, plains, profiled) from the flags; a typo fails now, not minutes into the
  matrix."""
  variants = parse_variants(args.variants)
  for name, overrides in variants:
    apply_overrides(cfg.copy_and_resolve_references(),
                    [o for o in overrides if o.startswith("--config.")])
  peers = [p.strip() for p in args.peer.split(",") if p.strip()]
  for p in peers:
    if p not in ("autocast", "bf16"):
      raise ValueError(f"--peer: unknown variant {p!r}; choose from autocast, bf16")
  plains = [p.strip() for p in args.plain.split(",") if p.strip()]
  for p in plains:
    if p not in ("plain", "stacked", "chunked_ce"):
      raise ValueError(f"--plain: unknown variant {p!r}; choose from plain, stacked, chunked_ce")
  plain_names = {("plain" if p == "plain" else f"plain_{p}") for p in plains}
  profiled = {v.strip() for v in args.profile_variants.split(",") if v.strip()} or {variants[0][0]}
  unknown = profiled - {n for n, _ in variants} - plain_names
  if args.profile_dir and unknown:
    raise ValueError(f"--profile_variants names no variant: {sorted(unknown)}")
  return variants, peers, plains, profiled


def variant_jobs(args, variants, profiled):
  """Our variants' workers: (name, "jax", command, env)."""
  jobs = []
  for name, overrides in variants:
    env = None
    for o in [o for o in overrides if o.startswith("--xla_flags=")]:
      env = dict(os.environ)
      env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), o.split("=", 1)[1]) if f)
      overrides = [x for x in overrides if x != o]
    cmd = [sys.executable, "-m", "bench.step", f"--config={args.config}",
           *args.overrides, *args.distributed, f"--name={name}", f"--steps={args.steps}",
           f"--warmup={args.warmup}", f"--window={args.window}", f"--accum={args.accum}",
           f"--doc_lengths={args.doc_lengths}", *overrides]  # last: the variant's own settings win
    if args.cache_dir:
      cmd.append(f"--cache_dir={args.cache_dir}")
    if args.profile_dir and name in profiled:
      cmd.append(f"--profile_dir={os.path.join(os.path.abspath(args.profile_dir), name)}")
    jobs.append((name, "jax", cmd, env))
  return jobs


def peer_jobs(args, cfg, peers, plains, profiled):
  """(the plain-step workers, the torch peers' workers), each (name, kind, command, env)."""
  m = cfg.model.to_dict()
  torch_jobs = [(f"torch_{p}", "torch", [
      sys.executable, "-m", "bench.peer_torch", f"--model_json={json.dumps(m)}",
      f"--batch={cfg.train.micro_batch_per_device}", f"--seq_len={cfg.train.seq_len}",
      f"--variant={p}", f"--steps={args.steps}", f"--warmup={args.warmup}",
      f"--window={args.window}", "--compile" if args.peer_compile else "--no-compile"], None)
      for p in peers]
  plain_jobs = []
  for v in plains:
    pname = "plain" if v == "plain" else f"plain_{v}"
    cmd = [sys.executable, "-m", "bench.plain_step", f"--model_json={json.dumps(m)}",
           f"--batch={cfg.train.micro_batch_per_device}", f"--seq_len={cfg.train.seq_len}",
           f"--variant={v}", f"--steps={args.steps}", f"--warmup={args.warmup}",
           f"--window={args.window}"]
    if args.profile_dir and pname in profiled:
      cmd.append(f"--profile_dir={os.path.join(os.path.abspath(args.profile_dir), pname)}")
    plain_jobs.append((pname, "plain", cmd, None))
  return plain_jobs, torch_jobs


def run_jobs(jobs, args, t_start):
  """Each job's result row, in order; a job that would run past --deadline_s is a skipped row."""
  results, longest = [], 0.0
  for name, kind, cmd, env in jobs:
    elapsed = time.perf_counter() - t_start
    if args.deadline_s and elapsed + max(longest, 30.0) > args.deadline_s:
      results.append({"name": name, "kind": kind,
                      "skipped": f"skipped: {elapsed:.0f} s gone of the {args.deadline_s:.0f} s "
                                 f"deadline; a worker takes ~{max(longest, 30.0):.0f} s"})
      print(f"[bench] {results[-1]['skipped']}", flush=True)
      continue
    print(f"[bench] {name} ...", flush=True)
    result, stderr, took = run_worker(cmd, args.worker_timeout_s, env)
    longest = max(longest, took)
    result.setdefault("name", name)
    result.setdefault("kind", kind)
    result["worker_s"] = took
    if kind == "jax":
      result["overrides"] = [c[len("--config."):] for c in cmd if c.startswith("--config.")]
      if env:
        result["xla_flags"] = env["XLA_FLAGS"]
    if "error" in result:
      result["stderr_tail"] = stderr
      print(f"[bench] {name} failed: {result['error'][:300]}\n{stderr[-1500:]}", flush=True)
    if kind == "torch" and result.get("tokens_per_s") and not result.get("mfu"):
      peak = peak_flops.peak_flops(result.get("device_kind"))
      result["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / peak if peak else None
    elif "tokens_per_s" in result:  # each row as it lands: a call cut short keeps them
      print(f"[bench] {name}: {result['tokens_per_s']:,.0f} tokens/s, "
            f"step {result.get('step_time_s', 0) * 1e3:.1f} ms, {took:.0f} s", flush=True)
    results.append(result)
  return results


def comparisons(results):
  """(the faster torch peer's row, ratios to it, the plain row, ratios to it, the profile
  comparison of the first profiled variant and plain row or None)."""
  peer_best = max((r for r in results if r["kind"] == "torch" and r.get("tokens_per_s")),
                  key=lambda r: r["tokens_per_s"], default=None)
  ratios = {}
  if peer_best:
    for r in results:
      if r.get("tokens_per_s_per_device"):
        ratios[r["name"]] = r["tokens_per_s_per_device"] / peer_best["tokens_per_s_per_device"]
  plain = next((r for r in results if r["name"] == "plain" and r.get("tokens_per_s")), None)
  to_plain = {r["name"]: r["tokens_per_s_per_device"] / plain["tokens_per_s_per_device"]
              for r in results if plain and r.get("tokens_per_s_per_device")}
  profiles = [r for r in results if isinstance(r.get("profile"), dict)
              and "buckets" in r["profile"]]
  ours_p = next((r for r in profiles if r["kind"] == "jax"), None)
  plain_p = next((r for r in profiles if r["kind"] == "plain"), None)
  compared = None
  if ours_p and plain_p:
    compared = profile.compare(ours_p["profile"], plain_p["profile"],
                               names=(ours_p["name"], plain_p["name"]))
  return peer_best, ratios, plain, to_plain, compared


def main(argv):
  args = parse_args(argv)
  t_start = time.perf_counter()
  cfg = apply_overrides(config_lib.load_config_file(os.path.join(REPO, args.config)
                                                    if not os.path.isabs(args.config)
                                                    else args.config), args.overrides)
  variants, peers, plains, profiled = check_choices(args, cfg)
  jobs = variant_jobs(args, variants, profiled)
  plain_jobs, torch_jobs = peer_jobs(args, cfg, peers, plains, profiled)
  jobs[1:1] = plain_jobs[:1] + torch_jobs + plain_jobs[1:]  # floors right after the first variant
  results = run_jobs(jobs, args, t_start)
  peer_best, ratios, plain, to_plain, compared = comparisons(results)
  report = {"date": bench.now_utc(), "commit": bench.commit(), "versions": bench.versions(),
            "config": args.config, "overrides": args.overrides, "variants": args.variants,
            "settings": {"steps": args.steps, "warmup": args.warmup, "window": args.window,
                         "accum": args.accum, "seq_len": cfg.train.seq_len,
                         "micro_batch_per_device": cfg.train.micro_batch_per_device},
            "peer_best": peer_best["name"] if peer_best else None,
            "ratio_to_best_peer": ratios, "ratio_to_plain": to_plain,
            "profile_compare": compared, "results": results,
            "wall_s": time.perf_counter() - t_start}
  if compared:
    print(compared)
  print(table(results, ratios, to_plain))
  if peer_best:
    print(f"vs peer = tokens/s per device / {peer_best['name']}'s "
          f"({peer_best['tokens_per_s']:,.0f} tokens/s, the faster torch peer)")
  if plain:
    print(f"vs plain = tokens/s per device / the plain JAX step's "
          f"({plain['tokens_per_s']:,.0f} tokens/s)")
  out = args.out if os.path.isabs(args.out) else os.path.join(os.getcwd(), args.out)
  formats.write_json_atomic(out, report)
  print(f"wrote {out}")
  ok = [r for r in results if "error" not in r and "skipped" not in r]
  return 0 if ok and len(ok) + sum("skipped" in r for r in results) == len(results) else 1

if __name__ == "__main__":
  cli.exit_on_error(lambda: sys.exit(main(sys.argv[1:])))
