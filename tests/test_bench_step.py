"""The whole-step benchmark on CPU: its smoke mode end to end (our step and the eager PyTorch peer
in worker processes, the table, the JSON), and its argument handling."""

import json
import os
import subprocess
import sys

import pytest

from bench import __main__ as bench_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.n_heads=4",
         "--config.model.n_kv_heads=2", "--config.model.head_dim=16", "--config.model.ffn_dim=128",
         "--config.model.vocab_size=512", "--config.model.max_seq_len=64",
         "--config.train.seq_len=64", "--config.train.micro_batch_per_device=2"]


@pytest.mark.slow
def test_smoke_runs_ours_and_the_peer_and_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "bench", "--smoke", f"--out={out}",
       "--variants=base;remat_accum:model.remat=full,accum=2,"
       "xla_flags=--xla_cpu_enable_fast_math=false", f"--profile_dir={tmp_path / 'prof'}",
       "--profile_variants=remat_accum,plain", *MICRO],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  by_name = {r["name"]: r for r in report["results"]}
  assert list(by_name) == ["base", "plain", "torch_autocast", "remat_accum"]
  for r in by_name.values():
    assert r["tokens_per_s_per_device"] > 0 and r["step_time_s"] > 0, r
    assert r["loss_last"] < r["loss_first"] + 0.5
  base = by_name["base"]
  assert base["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert base["tokens_per_step"] == 2 * 64 and base["model"]["d_model"] == 64
  assert base["xla_memory"]["temp_size_in_bytes"] > 0
  assert by_name["remat_accum"]["model"]["remat"] == "full"
  assert by_name["remat_accum"]["accum"] == 2
  assert by_name["remat_accum"]["xla_flags"].endswith("--xla_cpu_enable_fast_math=false")
  # The profiled variant carries its summary (on CPU: XLA's host-side op events).
  prof = by_name["remat_accum"]["profile"]
  assert prof["steps"] == 3 and prof["busy_ms_per_step"] > 0 and prof["top_kernels"], prof
  assert abs(sum(b["share"] for b in prof["buckets"].values()) - 1) < 1e-6
  assert (tmp_path / "prof" / "remat_accum" / "summary.txt").exists()
  assert (tmp_path / "prof" / "remat_accum" / "step.hlo.txt.gz").exists()
  assert "profile" not in base
  assert by_name["remat_accum"]["tokens_per_step"] == 2 * 2 * 64
  assert report["peer_best"] == "torch_autocast"
  assert report["ratio_to_best_peer"]["base"] == pytest.approx(
      base["tokens_per_s_per_device"] / by_name["torch_autocast"]["tokens_per_s_per_device"])
  assert report["versions"]["jax"] and report["date"]
  assert "tok/s/dev" in proc.stdout and "remat_accum" in proc.stdout
  # The plain JAX step (the floor row) at the same tiny shapes, and every row's ratio to it.
  plain = by_name["plain"]
  assert plain["kind"] == "plain" and plain["tokens_per_step"] == 2 * 64
  assert report["ratio_to_plain"]["plain"] == 1.0
  assert report["ratio_to_plain"]["base"] == pytest.approx(
      base["tokens_per_s_per_device"] / plain["tokens_per_s_per_device"])
  assert "vs plain" in proc.stdout
  # Both profiled: the kernel families of ours (the first profiled variant) beside the plain's.
  assert plain["profile"]["families"] and report["profile_compare"].startswith(" ")
  assert "remat_accum" in report["profile_compare"] and "kernel family" in proc.stdout


def test_variants_parse_and_typos_fail_before_any_worker():
  assert bench_main.parse_variants("base; s:model.scan_layers=True,accum=2,train.seq_len=8") == [
      ("base", []),
      ("s", ["--config.model.scan_layers=True", "--accum=2", "--config.train.seq_len=8"])]
  assert bench_main.parse_variants("x:xla_flags=--xla_a=1 --xla_b=2") == [
      ("x", ["--xla_flags=--xla_a=1 --xla_b=2"])]
  with pytest.raises(ValueError, match="repeated"):
    bench_main.parse_variants("a;a")
  with pytest.raises(ValueError, match="key=value"):
    bench_main.parse_variants("a:model.remat")
  proc = subprocess.run([sys.executable, "-m", "bench", "--smoke",
                         "--variants=x:model.scan_layer=True"], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2
  assert "model.scan_layers" in proc.stderr.strip().splitlines()[-1]


def test_doc_lengths_lay_out_rows_as_first_fit_does():
  """--doc_lengths: documents with ids 1, 2, ..., positions restarting, the rest padding; cut at T;
  nothing given is one document a row. The parent passes the flag to every jax worker."""
  import numpy as np
  from bench import step
  seg, pos = step.documents_row(10, [3, 2, 1])
  assert seg.tolist() == [1, 1, 1, 2, 2, 3, 0, 0, 0, 0]
  assert pos.tolist() == [0, 1, 2, 0, 1, 0, 0, 0, 0, 0]
  seg, pos = step.documents_row(6, [4, 4])
  assert seg.tolist() == [1, 1, 1, 1, 2, 2] and pos.tolist() == [0, 1, 2, 3, 0, 1]
  seg, pos = step.documents_row(4)
  assert seg.tolist() == [1] * 4 and np.array_equal(pos, np.arange(4))
  args = bench_main.parse_args(["--doc_lengths=300,900"])
  (_, _, cmd, _), = bench_main.variant_jobs(args, [("base", [])], set())
  assert "--doc_lengths=300,900" in cmd


def test_overrides_take_the_fields_type():
  from tinyllama_jax import config as config_lib
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  bench_main.apply_overrides(cfg, ["--config.model.scan_layers=true", "--config.train.seq_len=32",
                                   "--config.optim.lr=1e-3", "--config.model.remat=full"])
  assert cfg.model.scan_layers is True and cfg.train.seq_len == 32 and cfg.optim.lr == 1e-3
  assert cfg.model.remat == "full"


def test_scaling_table_shares_and_wall_clock(tmp_path):
  from bench import scaling

  def report(n, tps, name="base"):
    return {"results": [{"kind": "jax", "name": name, "n_devices": n, "mesh": {"fsdp": n},
                         "tokens_per_s_per_device": tps, "mfu": 0.5, "peak_memory_gib": 30.0}]}
  rows = scaling.rows([report(4, 90.0), report(1, 100.0), report(1, 50.0, "slow")], "base")
  assert [(r["name"], r["n_devices"]) for r in rows] == [("base", 1), ("slow", 1), ("base", 4)]
  assert [r["efficiency"] for r in rows] == [1.0, 0.5, 0.9]
  assert rows[2]["tokens_per_s"] == 360.0
  assert "1.0 h" in scaling.table(rows[2:], tokens=360.0 * 3600)
  with pytest.raises(ValueError, match="baseline"):
    scaling.rows([report(1, 100.0)], "other")
  bad = tmp_path / "bad.json"
  bad.write_text("{")
  proc = subprocess.run([sys.executable, "-m", "bench.scaling", str(bad)], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ")
  assert str(bad) in proc.stderr


def test_plain_step_variants_compute_the_plain_steps_function():
  """The bench-only variants of the plain row move one choice (the parameter layout, the
  cross-entropy) and nothing else: same loss and gradients as the plain step at tiny shapes."""
  import jax
  import numpy as np
  from bench import plain_step
  m = {"vocab_size": 128, "d_model": 32, "ffn_dim": 64, "n_layers": 2, "n_heads": 4,
       "n_kv_heads": 2, "head_dim": 8, "norm_eps": 1e-5, "rope_theta": 10000.0}
  tokens = jax.random.randint(jax.random.key(3), (2, 17), 0, 128)
  out = {}
  for v in plain_step.VARIANTS:
    init, tx, step = plain_step.make(m, 2, 16, v)
    params = init(jax.random.key(0))
    new_params, _, loss, gnorm = jax.jit(step)(params, tx.init(params), tokens)
    if v == "stacked":  # back to the plain layout: a list of per-layer dicts
      new_params["layers"] = [jax.tree.map(lambda a: a[i], new_params["layers"]) for i in range(2)]
    out[v] = (float(loss), float(gnorm), new_params)
  for v in ("stacked", "chunked_ce"):
    assert out[v][0] == pytest.approx(out["plain"][0], rel=2e-2)
    assert out[v][1] == pytest.approx(out["plain"][1], rel=5e-2)
    for a, b in zip(jax.tree.leaves(out[v][2]), jax.tree.leaves(out["plain"][2])):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-3)


def test_profile_compare_lines_up_families_and_buckets():
  from bench import profile

  def summary(span, fams):
    return {"span_ms_per_step": span, "busy_ms_per_step": span, "buckets": {
        "matmul": {"ms_per_step": sum(t for b, _, t in fams if b == "matmul"), "share": 0.5}},
        "families": [{"bucket": b, "op": k, "ms_per_step": t, "calls_per_step": 2}
                     for b, k, t in fams]}
  a = summary(10.0, [("matmul", "gemm", 5.0), ("elementwise", "loop_add_fusion", 3.0)])
  b = summary(8.0, [("matmul", "gemm", 5.0), ("reduction", "input_reduce_fusion", 1.0)])
  lines = profile.compare(a, b, names=("ours", "plain")).splitlines()
  assert lines[1].split() == ["span", "10.00", "8.00", "+2.00"]
  fam = [ln.split() for ln in lines if ln.startswith(("loop_add", "input_reduce", "gemm"))]
  assert fam == [["loop_add_fusion", "elementwise", "3.00", "2", "0.00", "0", "+3.00"],
                 ["input_reduce_fusion", "reduction", "0.00", "0", "1.00", "2", "-1.00"],
                 ["gemm", "matmul", "5.00", "2", "5.00", "2", "+0.00"]]


def test_peak_flops_one_table_for_jax_kinds_and_torch_names():
  from tinyllama_jax import peak_flops
  assert peak_flops.peak_flops("NVIDIA H200") == 989e12
  assert peak_flops.peak_flops("NVIDIA H100 PCIe") == 756e12  # not the SXM part's
  assert peak_flops.peak_flops("NVIDIA H200 NVL") == 989e12  # a spelling the table lacks
  assert peak_flops.peak_flops("cpu") is None and peak_flops.peak_flops(None) is None


def test_the_parent_and_the_tables_load_no_jax():
  """The parent process and the torch worker count FLOPs and look peaks up without jax."""
  code = ("import sys, bench.__main__, tinyllama_jax.params, tinyllama_jax.peak_flops; "
          "assert 'jax' not in sys.modules, 'jax loaded'")
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_a_worker_that_times_out_reports_its_stderr_as_text():
  """TimeoutExpired holds bytes even with text=True; the report is JSON, so it must be str."""
  result, stderr, _ = bench_main.run_worker(
      [sys.executable, "-c", "import sys, time; print('compiling', file=sys.stderr, flush=True);"
       " time.sleep(30)"], timeout=2)
  assert result == {"error": "timed out after 2 s"}
  assert "compiling" in stderr
  json.dumps({"stderr_tail": stderr})
