"""One JAX variant of the whole training step, timed: a worker of `python -m bench`.

    python -m bench.step --config=configs/1b.py [--config.a.b=v ...] --steps=30

The step is training's own, built by program.py as train.py builds it and compiled the same way:
ahead of time, explicit in/out shardings, the state donated. The batch is synthetic (uniform
tokens, one document a row, or --doc_lengths' documents a row) and sits on the devices before
timing starts, so the numbers are the step's alone; the data pipeline has its own benchmark.
Prints one BENCH_RESULT line.
"""

import gzip
import os
import time

_T_START = time.perf_counter()  # before jax: the launch-to-first-step clock starts here

import jax
import numpy as np
from absl import app, flags, logging

import bench
from bench import profile
from tinyllama_jax import cli, distributed, params, sharding
from tinyllama_jax.training import metrics, program


def define_flags():
  cli.define_run_flags()  # --config (with its overrides), --workdir, --dry_run, as train takes them
  cli.define_distributed_flags()
  flags.DEFINE_string("name", "base", "The variant's name in the table.")
  flags.DEFINE_integer("steps", 30, "Timed steps (after warm-up).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one compiles nothing: "
                       "compilation is ahead of time and timed apart).")
  flags.DEFINE_integer("window", 5, "Steps between device syncs while timing.")
  flags.DEFINE_integer("accum", 1, "Micro-batches accumulated per optimizer step.")
  flags.DEFINE_string("doc_lengths", "", "Comma-separated document lengths each batch row holds "
                      "(ids 1, 2, ..., positions restart, the rest padding with loss mask 0); "
                      "'' = one document a row. Only packed variants (data.packing != concat) "
                      "attend within them.")
  flags.DEFINE_string("cache_dir", "", "Persistent compilation cache ('' = none).")
  flags.DEFINE_bool("compile_only", False, "Compile (fill the cache) and exit.")
  flags.DEFINE_string("profile_dir", "", "Write a profiler trace of 3 steps, its summary and the "
                      "step's optimized HLO here.")


def variant_program(cfg, accum):
  """(the variant's config, its program): the global batch is implied by the mesh, micro x batch
  devices x accum."""
  cfg = cfg.copy_and_resolve_references()
  mesh = sharding.make_mesh(cfg.mesh)
  with cfg.unlocked():
    cfg.train.global_batch = cfg.train.micro_batch_per_device * sharding.batch_devices(mesh) * accum
  if cfg.train.seq_len > cfg.model.max_seq_len:
    raise ValueError(f"train.seq_len ({cfg.train.seq_len}) exceeds model.max_seq_len "
                     f"({cfg.model.max_seq_len})")
  return cfg, program.build_program(cfg, mesh, accum=accum)


def documents_row(T, doc_lengths=()):
  """(segment_ids_T, positions_T) of one row: documents of doc_lengths (ids 1, 2, ..., cut at T),
  then padding (id 0, position 0), as the first_fit packer lays a row out; () = one document."""
  segment_ids_T, positions_T = np.zeros(T, np.int32), np.zeros(T, np.int32)
  pos = 0
  for i, n in enumerate(doc_lengths or (T,)):
    n = min(int(n), T - pos)
    segment_ids_T[pos:pos + n], positions_T[pos:pos + n] = i + 1, np.arange(n)
    pos += n
  return segment_ids_T, positions_T


def synthetic_batch(cfg, accum, micro_batch, batch_sharding, doc_lengths=()):
  """This process's [A, M/P, T] slice of a uniform-token batch, as one global array."""
  T, V = cfg.train.seq_len, cfg.model.vocab_size
  rows = micro_batch // jax.process_count()
  rng = np.random.default_rng(jax.process_index())
  tokens = rng.integers(0, V, (accum, rows, T + 1), dtype=np.int32)
  segment_ids_T, positions_T = documents_row(T, doc_lengths)
  shape = (accum, rows, T)
  local = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
           "segment_ids": np.broadcast_to(segment_ids_T, shape).copy(),
           "positions": np.broadcast_to(positions_T, shape).copy(),
           "loss_mask": np.broadcast_to(segment_ids_T != 0, shape).astype(np.float32)}
  return sharding.global_batch_array(local, batch_sharding)


def run_variant(cfg, *, name, steps, warmup, window, accum, compile_only=False, profile_dir="",
                doc_lengths=()):
  cfg, prog = variant_program(cfg, accum)
  mesh = prog.mesh
  out = {"name": name, "kind": "jax", "mesh": dict(mesh.shape), "n_devices": mesh.size,
         "n_processes": jax.process_count(), "device_kind": jax.devices()[0].device_kind,
         "seq_len": cfg.train.seq_len, "micro_batch_per_device": cfg.train.micro_batch_per_device,
         "accum": accum, "tokens_per_step": cfg.train.global_batch * cfg.train.seq_len,
         "model": cfg.model.to_dict(), "xla_flags": os.environ.get("XLA_FLAGS", "")}

  t0 = time.perf_counter()
  with jax.set_mesh(mesh):  # Pallas backends find it and run per device (model._per_device)
    lowered = prog.lower_step()
  out["lower_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  out["compile_s"] = time.perf_counter() - t0
  out["xla_memory"] = program.memory_report(compiled)
  if profile_dir:  # the optimized HLO beside the trace: kernel names in the profile map to it
    os.makedirs(profile_dir, exist_ok=True)
    with gzip.open(os.path.join(profile_dir, "step.hlo.txt.gz"), "wt") as f:
      f.write(compiled.as_text())
  init_jit = prog.jit_init()
  if compile_only:
    init_jit.lower(jax.random.key(0)).compile()
    return out

  t0 = time.perf_counter()
  state = init_jit(jax.random.key(cfg.seed))
  jax.block_until_ready(state)
  out["init_s"] = time.perf_counter() - t0
  batch = synthetic_batch(cfg, accum, prog.micro_batch, prog.batch_sharding, doc_lengths)
  out["doc_lengths"] = list(doc_lengths)

  losses = []
  for i in range(max(warmup, 1)):
    state, m = compiled(state, batch)
    losses.append(float(m["train/loss"]))  # a sync: every warm-up step completes alone
    if i == 0:
      out["launch_to_first_step_s"] = time.perf_counter() - _T_START
  if profile_dir:

    def three_steps(state):
      for _ in range(3):
        state, m = compiled(state, batch)
      jax.block_until_ready(m)
      return state
    state, out["profile"] = profile.capture(profile_dir, three_steps, state)

  windows = []
  for _ in range(max(steps // window, 1)):
    t0 = time.perf_counter()
    for _ in range(window):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)
    windows.append(time.perf_counter() - t0)
  losses.append(float(m["train/loss"]))
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"variant {name}: loss went non-finite: {losses}")
  out["loss_first"], out["loss_last"] = losses[0], losses[-1]
  out.update(bench.timing_summary(
      windows, window, out["tokens_per_step"], mesh.size,
      params.flops_per_token(cfg.model, cfg.train.seq_len),
      metrics.peak_flops_per_device(cfg.peak_flops)))
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  distributed.apply_xla_flags(f.config.train.xla_flags)  # as train.py starts
  distributed.initialize()
  if f.cache_dir:
    jax.config.update("jax_compilation_cache_dir", f.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    # --config is train's flag: the same files and overrides.
    result = run_variant(f.config, name=f.name, steps=f.steps, warmup=f.warmup, window=f.window,
                         accum=f.accum, compile_only=f.compile_only, profile_dir=f.profile_dir,
                         doc_lengths=[int(n) for n in f.doc_lengths.split(",") if n])
  except Exception as e:  # the matrix goes on; the table shows why this variant has no numbers
    logging.exception("variant %s failed", f.name)
    result = {"name": f.name, "kind": "jax", "error": f"{type(e).__name__}: {e}"[:2000]}
  if jax.process_index() == 0:
    bench.emit(result)
  return 0 if "error" not in result else 1


if __name__ == "__main__":
  define_flags()
  cli.run(main)
