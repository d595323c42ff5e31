"""The memory planner: exact per-device state under FSDP, the analytic model against the H200's
measured peaks, XLA's analysis through the attention stand-in, and the CLI's answers."""

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from absl import flags

from tinyllama_jax import config as config_lib, kernels, params, plan as plan_cli
from tinyllama_jax.training import plan as plan_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 2**30


def config_1b(**model):
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/1b.py"))
  for k, v in model.items():
    cfg.model.kernels[k] = v
  return cfg


def test_state_bytes_are_exact_and_split_by_fsdp():
  cfg = config_1b()
  n = params.param_count(cfg.model)
  _, (one,) = plan_lib.plan(cfg, 1, ["none"], source="analytic")
  _, (eight,) = plan_lib.plan(cfg, 8, ["none"], source="analytic")
  assert one.params_gib * GIB == 4 * n
  assert one.opt_state_gib * GIB == pytest.approx(8 * n, abs=64)  # + Adam's step counts
  # Everything but the norm weights ([L, D] x 2 and [D], replicated) is split 8 ways.
  norms = 2 * cfg.model.n_layers * cfg.model.d_model + cfg.model.d_model
  assert eight.params_gib * GIB == 4 * (n - norms) / 8 + 4 * norms
  # The flash stand-in is an attention backend only while plan traces: no run's choice after.
  assert "plan_flash" not in kernels.backends("attention")


@pytest.mark.parametrize("micro, measured_gib", [(8, 38.3), (16, 62.1)])
def test_analytic_peak_is_within_10pct_of_the_h200(micro, measured_gib):
  """bench/NOTES.md: 1b, one H200, unrolled, cuDNN attention, XLA cross-entropy, no remat."""
  cfg = config_1b(cross_entropy="xla")
  cfg.train.micro_batch_per_device = micro
  _, (p,) = plan_lib.plan(cfg, 1, ["none"], source="analytic")
  assert abs(p.peak_gib - measured_gib) / measured_gib < 0.10, p


def test_remat_policies_order_by_what_they_keep():
  _, plans = plan_lib.plan(config_1b(), 1, ["none", "save_dots", "save_all_but_mlp",
                                            "save_qkv_attn", "save_attn", "full"],
                           source="analytic")
  peaks = [p.peak_gib for p in plans]
  assert peaks == sorted(peaks, reverse=True)
  assert len({p.params_gib + p.opt_state_gib for p in plans}) == 1


def test_flash_stand_in_has_attentions_shapes_and_gradients():
  q = jnp.ones((2, 8, 4, 16))
  k = v = jnp.ones((2, 8, 2, 16))
  o = plan_lib.attention_stand_in(q, k, v, None, causal=True)
  assert o.shape == q.shape
  grads = jax.grad(lambda q, k, v: plan_lib.flash_stand_in(q, k, v).sum(), argnums=(0, 1, 2))(
      q, k, v)
  assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_xla_source_compiles_the_real_step_on_fake_devices():
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  cfg.model.n_layers, cfg.train.seq_len, cfg.train.micro_batch_per_device = 2, 64, 2
  cfg.mesh.fsdp = -1
  mesh, (p,) = plan_lib.plan(cfg, 2, ["full"], source="xla")
  assert dict(mesh.shape)["fsdp"] == 2
  assert p.source == "xla-cpu"
  assert p.xla["temp_size_in_bytes"] > 0
  assert p.peak_gib * GIB == p.xla["peak_estimate_bytes"]
  assert p.peak_gib > p.params_gib + p.opt_state_gib


def run_plan(*args):
  return subprocess.run([sys.executable, "-m", "tinyllama_jax.plan", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli_answers_the_a100_and_4090_questions(tmp_path):
  """1b at 8 x 2048 per device: 16 A100-40G with FSDP fit without remat; one 24 GB 4090 needs
  full remat (fp32 weights + Adam alone are 16.4 GiB there)."""
  proc = run_plan("--config=configs/1b.py", "--devices=16", "--device_memory_gib=40",
                  "--source=analytic", f"--json={tmp_path}/a100.json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  a100 = json.loads((tmp_path / "a100.json").read_text())
  assert a100["mesh"]["fsdp"] == 16 and a100["plans"][0]["fits"]
  assert "none" in proc.stdout and "yes" in proc.stdout
  _, plans = plan_lib.plan(config_1b(), 1, ["none", "full"], source="analytic")  # as the CLI
  assert {p.remat: p.fits(24) for p in plans} == {"none": False, "full": True}


def test_a_mesh_train_would_refuse_is_refused_here_too():
  """tiny.py's 16 sequences a step cannot split into micro-batches of 16 on each of 3 devices."""
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  cfg.mesh.fsdp = -1
  with pytest.raises(ValueError, match=r"train.global_batch \(16\) must be a multiple of .*"
                                       r"\(16 x 3 = 48\)"):
    plan_lib.plan(cfg, 3, ["none"], source="analytic")
  cfg.train.steps = 0
  with pytest.raises(ValueError, match=r"train.steps=0 must be >= 1"):
    plan_lib.plan(cfg, 2, ["none"], source="analytic")


def test_cli_bad_flags_are_one_line_and_exit_2(monkeypatch):
  proc = run_plan("--config=configs/tiny.py", "--remat=nope")  # the command's one run on bad input
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "nope" in last and "save_dots" in last, last
  monkeypatch.setattr(flags, "FLAGS", argparse.Namespace(devices=1, device_memory_gib=-5.0))
  with pytest.raises(ValueError, match=r"--device_memory_gib=-5.0: give the memory"):
    plan_cli.main(["plan"])
