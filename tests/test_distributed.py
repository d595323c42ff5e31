"""Many processes: the environment -> jax.distributed arguments, and a real 2-process FSDP run on
localhost (gloo CPU collectives) that must compute what one process computes on the same batches."""

import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tinyllama_jax.checkpoint import manager as checkpoint
from tinyllama_jax import config as config_lib
from tinyllama_jax import distributed
from tinyllama_jax.training import loop as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_expand_nodelist():
  assert distributed.expand_nodelist("gpu[01-03,7],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu7",
                                                               "cpu5"]
  assert distributed.expand_nodelist("node-a") == ["node-a"]
  assert distributed.expand_nodelist("a1-b[009-010]") == ["a1-b009", "a1-b010"]


def test_slurm_env_gives_first_host_and_rank():
  env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_STEP_NODELIST": "gpu[04-07]",
         "SLURM_JOB_ID": "777", "SLURM_NTASKS_PER_NODE": "4(x4)", "SLURM_LOCALID": "1"}
  kwargs, source = distributed.plan_from_env(env)
  assert source == "SLURM"
  assert kwargs == {"coordinator_address": f"gpu04:{distributed.slurm_port(777)}",
                    "num_processes": 16, "process_id": 5, "local_device_ids": [1]}
  # One task per node drives all its GPUs; an explicit port wins.
  env.update(SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0")
  kwargs, _ = distributed.plan_from_env(env, port=1234)
  assert kwargs == {"coordinator_address": "gpu04:1234", "num_processes": 4, "process_id": 0}


def test_single_process_environments_need_nothing():
  assert distributed.plan_from_env({}) == (None, None)
  assert distributed.plan_from_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == (None, None)
  assert distributed.plan_from_env({"TPU_WORKER_HOSTNAMES": "localhost"}) == (None, None)
  assert distributed.plan_from_env({"TPU_WORKER_HOSTNAMES": "t0,t1"}) == ({}, "TPU VM")
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
         "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "x"}
  assert distributed.plan_from_env(env)[0] == {"coordinator_address": "h:1", "num_processes": 2,
                                               "process_id": 1}


def test_slurm_without_nodelist_is_a_clear_error():
  with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
    distributed.plan_from_env({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})


def test_process_flags_without_a_coordinator_are_refused_not_ignored():
  """--num_processes=2 --process_id=0 alone used to train as one process."""
  with pytest.raises(ValueError, match="need --coordinator=host:port of process 0"):
    distributed.plan("auto", None, 2, 0, {})
  assert distributed.plan("auto", None, 1, 0, {}) == (None, None)  # one process: nothing to do
  assert distributed.plan("auto", None, None, None, {}) == (None, None)
  assert distributed.plan("auto", "h:1", 2, 1, {}) == (
      {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}, "flags")
  # A detected cluster supplies the coordinator; the flags fill in or override the rest.
  assert distributed.plan("auto", None, 4, 3, {"TPU_WORKER_HOSTNAMES": "t0,t1"}) == (
      {"num_processes": 4, "process_id": 3}, "TPU VM")
  assert distributed.plan("jax", None, None, 1, {}) == ({"process_id": 1},
                                                        "jax's cluster detection")
  with pytest.raises(ValueError, match="--coordinator needs --num_processes and --process_id"):
    distributed.plan("auto", "h:1", 2, None, {})


# ------------------------------------------------------------------ two processes, one FSDP mesh

# The micro model of test_train, 4 devices (2 per process) all FSDP, 2 accumulated micro-batches.
OVERRIDES = {
    "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
    "model.head_dim": 16, "model.ffn_dim": 128, "model.vocab_size": 512, "model.max_seq_len": 64,
    "data.tokenizer_vocab_size": 512, "data.tokenizer_train_bytes": 300_000,
    "train.seq_len": 64, "train.global_batch": 8, "train.micro_batch_per_device": 1,
    "train.steps": 10, "train.log_every": 1, "train.eval_every": 10, "train.eval_batches": 1,
    "train.checkpoint_every": 10, "train.sample_tokens": 0, "train.async_checkpoint": False,
    "optim.warmup_steps": 3, "optim.lr": 3e-3, "mesh.fsdp": 4,
}


def make_config():
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  cfg.update_from_flattened_dict(OVERRIDES)
  return cfg


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_all(procs, timeout):
  """Waits for every process; when one fails the others would wait for it in their next
  collective until gloo times out, so they are killed at once."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.returncode not in (None, 0) for p in procs):
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def reference_run(cfg, workdir, tokenizer, process_count):
  """One process, the same mesh shape, and the global batches the processes would assemble:
  each step, every process's local [A, M/P, T] slice side by side on the micro-batch axis."""
  from tinyllama_jax.data import pipeline
  run = train_lib.Run(cfg, workdir)
  step_fn = run.program.compile_step()
  state = run.initial_state()[0]  # a fresh init: the workdir is empty
  its = [pipeline.make_iterator(cfg.data, split="train", seq_len=cfg.train.seq_len,
                                batch_size=cfg.train.global_batch // process_count, seed=cfg.seed,
                                process_index=p, process_count=process_count, tokenizer=tokenizer,
                                vocab_size=cfg.model.vocab_size) for p in range(process_count)]
  losses = []
  for _ in range(cfg.train.steps):
    locals_ = [{k: v.reshape(run.program.accum, -1, *v.shape[1:]) for k, v in next(it).items()}
               for it in its]
    batch = {k: np.concatenate([l[k] for l in locals_], axis=1) for k in locals_[0]}
    state, metrics = step_fn(state, jax.device_put(batch, run.program.batch_sharding))
    losses.append(float(metrics["train/loss"]))
  for it in its:
    it.close()
  return run, state, losses


@pytest.mark.slow
def test_two_processes_train_fsdp_like_one(tmp_path):
  from tinyllama_jax.data import pipeline
  cfg = make_config()
  workdir = str(tmp_path / "two")
  tokenizer = pipeline.load_tokenizer(cfg.data, workdir)  # trained once, read by both processes
  port = free_port()
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  logs = [open(tmp_path / f"log{i}", "w") for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tinyllama_jax.train", "--config=configs/tiny.py",
       f"--workdir={workdir}", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", *args], cwd=REPO, env=env,
      stdout=subprocess.DEVNULL, stderr=logs[i]) for i in range(2)]
  wait_all(procs, timeout=300)
  for f in logs:
    f.close()
  logs = [(tmp_path / f"log{i}").read_text() for i in range(2)]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  log = logs[0]
  assert "process 0 of 2, 2 local / 4 global devices" in log, log[-2000:]
  two = [float(x) for x in re.findall(r"step \d+/10 \| loss (\d+\.\d+)", log)]
  assert len(two) == 10, log[-2000:]

  run, state, one = reference_run(cfg, str(tmp_path / "one"), tokenizer, process_count=2)
  assert one[-1] < one[0] - 0.3  # it learns, so the match below is not of two flat curves
  np.testing.assert_allclose(two, one, atol=1e-4)  # the log prints 4 decimals

  # The 2-process checkpoint restores in this one process, onto a 4-device mesh, FSDP-sharded,
  # and holds the parameters the single process computed.
  restored = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1).restore(
      10, run.program.abstract_state)[0]
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored["params"]),
                          jax.tree.leaves(state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  assert restored["params"]["lm_head"].sharding.spec[0] == "fsdp"


@pytest.mark.slow
def test_a_process_that_fails_exits_at_once(tmp_path):
  """Bad input on one process of two: it prints its one line and exits 2 at once, instead of
  waiting at jax.distributed's shutdown for a peer blocked in a collective (~70 s)."""
  port = free_port()
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  bad = ["--config.data.source=text", f"--config.data.paths={tmp_path}/missing/*.txt"]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tinyllama_jax.train", "--config=configs/tiny.py",
       f"--workdir={tmp_path}/run", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", *args, *(bad if i == 1 else [])], cwd=REPO, env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    _, err = procs[1].communicate(timeout=45)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  assert procs[1].returncode == 2, err[-2000:]
  assert err.strip().splitlines()[-1].startswith("error: "), err[-2000:]
  assert "process 1 of 2" in err, err[-2000:]  # it failed after joining the run


@pytest.mark.slow
def test_a_write_that_fails_on_one_process_stops_every_process_at_the_same_step(tmp_path):
  """Process 0's metrics.jsonl fills its disk after step 3 (only process 0 writes metrics): it
  holds the error until the next step's stop agreement, where both processes stop with exit 3
  and one line each, in seconds; without the agreement process 1, waiting in a collective for
  the one that left, was aborted by jax's coordination service (SIGABRT, no line)."""
  port = free_port()
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  procs = [subprocess.Popen(
      [sys.executable, "tests/training/fault_train.py", "--full_at_step=3", "--full_files=metrics",
       "--config=configs/tiny.py", f"--workdir={tmp_path}/run", f"--coordinator=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", *args, "--config.train.hang_timeout_s=600"],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    errs = [p.communicate(timeout=240)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
      p.wait()
  for p, err in zip(procs, errs):
    assert p.returncode == 3, err[-3000:]
  lines = [err.strip().splitlines()[-1] for err in errs]
  assert lines[0].startswith("error: could not write ") and "metrics.jsonl" in lines[0], errs[0]
  assert "(no space left on device) at step 3:" in lines[0], lines[0]
  assert lines[1].startswith("error: process 0 of 2 could not write its files"), errs[1][-3000:]
  assert "every process stops at step 4" in lines[1], lines[1]
  assert "no checkpoint was written yet" in lines[1], lines[1]
