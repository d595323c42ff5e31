"""Preemption of a 2-process run: SIGTERM to one process only. Both processes must stop at the
same step (faults.Preemption all-gathers the flag each step), save that one step together, exit 0,
and the rerun of the same command must continue to exactly what an uninterrupted 2-process run
computes (bitwise on CPU: params, optimizer, RNG, step, every process's data position).

Each process has 2 CPU devices; one FSDP mesh of 4 spans both (gloo collectives on localhost),
as in test_distributed. Three 2-process launches: the reference, the preempted run, its rerun.
"""

import signal
import time

import pytest

import faults_helpers as fh
from test_distributed import free_port, wait_all

pytestmark = pytest.mark.slow

N_PROCESSES = 2
GRACE_S = 30  # far above a step plus a save (< 2 s), far below the test's timeouts
# The fault suite's micro run, sharded FSDP over 4 devices of 2 processes (2 accumulated
# micro-batches), with no periodic checkpoint: the preemption save and the final one are the only
# ones, so "exactly one checkpoint of the stop step" is what the workdir must hold.
TWO_PROCESS = {"mesh.fsdp": 4, "train.micro_batch_per_device": 1, "train.checkpoint_every": 1000,
               "train.grace_period_s": GRACE_S}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Two CPU devices per process, one compilation cache for every process of the module."""
  return fh.process_env(tmp_path_factory.mktemp("jax_cache"), JAX_NUM_CPU_DEVICES="2")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return fh.micro_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def start(workdir, env, tokenizer):
  """The same command for every leg: N processes of one jax.distributed job on localhost."""
  port = free_port()
  return [fh.Train(workdir, env, args=[f"--coordinator=127.0.0.1:{port}",
                                       f"--num_processes={N_PROCESSES}", f"--process_id={i}"],
                   inject={"step_sleep_s": 0.1}, **{"data.tokenizer": tokenizer, **TWO_PROCESS})
          for i in range(N_PROCESSES)]


def finish(procs, timeout=240):
  """Waits for all (a failed one gets the others killed: they would hang in a collective)."""
  wait_all([p.proc for p in procs], timeout)
  for p in procs:
    p.rc = p.wait(10)
  return procs


def assert_all_ok(procs):
  """Every process exited 0; else every process's log (the first to fail is not always 0)."""
  assert [p.rc for p in procs] == [0] * len(procs), "\n".join(
      f"--- process {i} exited {p.rc}:\n{p.log[-2500:]}" for i, p in enumerate(procs))


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(env, tokenizer,
                                                                           tmp_path):
  reference = tmp_path / "reference"
  ref = finish(start(reference, env, tokenizer))
  assert_all_ok(ref)
  assert "process 1 of 2, 2 local / 4 global devices" in ref[1].log, ref[1].log[-2000:]
  assert fh.committed_steps(reference) == [fh.STEPS]

  workdir = tmp_path / "preempted"
  procs = start(workdir, env, tokenizer)
  procs[1].wait_for_step(6)  # both log every step; process 1 is the one the scheduler signals
  sent = time.monotonic()
  procs[1].signal(signal.SIGTERM)
  finish(procs, timeout=GRACE_S + 30)
  took = time.monotonic() - sent
  assert_all_ok(procs)
  assert took < GRACE_S, took
  assert "received SIGTERM" in procs[1].log and "received SIG" not in procs[0].log
  stopped = [p.last_step for p in procs]
  assert stopped[0] == stopped[1], stopped  # one stop step, agreed through the all-gather
  stop = stopped[0]
  assert fh.STEPS > stop >= 6, stop
  for p in procs:
    assert f"preempted: checkpoint {stop} written" in p.log, p.log[-3000:]
  assert fh.committed_steps(workdir) == [stop]  # exactly one complete checkpoint: that step
  assert fh.incomplete(workdir) == []

  resumed = finish(start(workdir, env, tokenizer))
  assert_all_ok(resumed)
  for p in resumed:
    assert fh.resumed_from(p.log) == stop, p.log[-3000:]
    assert p.last_step == fh.STEPS
  assert fh.committed_steps(workdir) == [stop, fh.STEPS]
  final = fh.read_checkpoint(workdir)
  # Each process reads its own slice of the data: the checkpoint holds every process's position
  # (before the fix only process 0's, and process 1 could not resume).
  assert len(final["data"]["processes"]) == N_PROCESSES
  fh.assert_same_checkpoint(final, fh.read_checkpoint(reference))
