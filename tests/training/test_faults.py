"""The fault-injection suite: the real train command as a subprocess on a micro model, killed,
signalled, fed NaN, its checkpoints and data damaged, its disk filled. Each test checks that the
run stops cleanly or resumes, loses nothing beyond the last checkpoint interval, and that the
resumed run equals the uninterrupted one bitwise (params, optimizer, RNG, step, data position).

One reference run per module; every process shares a tokenizer and a compilation cache, so a
process costs ~5-8 s (mostly imports). Checkpointer-level cases run in-process on a tiny state.
"""

import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import faults_helpers as fh
from tinyllama_jax import config as config_lib
from tinyllama_jax.checkpoint import manager as checkpoint
from tinyllama_jax.training import faults
from tinyllama_jax.data import formats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Environment of every train process: one compilation cache, one CPU device."""
  return fh.process_env(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """Trained once; every run names it (data.tokenizer), so no run trains its own."""
  return fh.micro_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def launch(env, tokenizer):
  def start(workdir, inject=None, **overrides):
    return fh.Train(workdir, env, inject=inject, **{"data.tokenizer": tokenizer, **overrides})

  def run(workdir, **overrides):
    t = start(workdir, **overrides)
    t.rc = t.wait()
    return t

  start.run = run
  return start


@pytest.fixture(scope="module")
def reference(launch, tmp_path_factory):
  """The uninterrupted run every interrupted one must equal."""
  workdir = tmp_path_factory.mktemp("reference")
  t = launch.run(workdir)
  assert t.rc == 0, t.log[-3000:]
  assert fh.committed_steps(workdir)[-1] == fh.STEPS
  return {"workdir": str(workdir), "final": fh.read_checkpoint(workdir)}


def resume_and_compare(launch, workdir, reference, **overrides):
  t = launch.run(workdir, **overrides)
  assert t.rc == 0, t.log[-3000:]
  fh.assert_same_checkpoint(fh.read_checkpoint(workdir), reference["final"])
  return t


# ----------------------------------------------------------------------------- kill -9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_at_a_random_step_resumes_exactly(seed, launch, reference, tmp_path):
  rng = random.Random(seed)
  target = rng.randint(2, fh.STEPS - 2)
  async_save = seed != 1  # one seed with synchronous saves, whose loss bound is one interval
  t = launch(tmp_path, inject={"step_sleep_s": 0.1}, **{"train.async_checkpoint": async_save})
  killed_at = t.wait_for_step(target)
  t.signal(signal.SIGKILL)
  assert t.wait() == -signal.SIGKILL
  before = fh.committed_steps(tmp_path)

  resumed = resume_and_compare(launch, tmp_path, reference,
                               **{"train.async_checkpoint": async_save})
  start = fh.resumed_from(resumed.log)
  assert start == (before[-1] if before else None), resumed.log[-3000:]
  # Lost: the steps since the last committed save (the kill may land a step after the log
  # line; an async save may still be in flight).
  assert killed_at - (start or 0) <= fh.EVERY * (2 if async_save else 1) + 1, (killed_at, start)


def test_kill9_inside_a_save_ignores_the_partial_checkpoint(launch, reference, tmp_path):
  t = launch(tmp_path, inject={"save_sleep_s": 2.0}, **{"train.async_checkpoint": False})
  partial = tmp_path / "checkpoints" / f"{2 * fh.EVERY}{fh.TMP_SUFFIX}"
  t.wait_for_path(partial)
  time.sleep(0.3)  # inside the save: written, not committed
  t.signal(signal.SIGKILL)
  t.wait()
  assert fh.committed_steps(tmp_path) == [fh.EVERY]
  assert fh.incomplete(tmp_path) == [partial.name]

  resumed = resume_and_compare(launch, tmp_path, reference, **{"train.async_checkpoint": False})
  assert "found 1 incomplete checkpoint save(s)" in resumed.log
  assert fh.resumed_from(resumed.log) == fh.EVERY
  assert fh.incomplete(tmp_path) == []


# ----------------------------------------------------------------------------- signals


def test_sigterm_saves_within_the_grace_period_and_exits_0(launch, reference, tmp_path):
  t = launch(tmp_path, inject={"step_sleep_s": 0.1})
  t.wait_for_step(6)
  sent = time.monotonic()
  t.signal(signal.SIGTERM)
  rc = t.wait()
  took = time.monotonic() - sent
  assert rc == 0, t.log[-3000:]
  assert took < 10, took  # the grace period is 60 s; the step and the save take well under 1 s
  stopped = t.last_step
  assert fh.STEPS > stopped >= 6
  assert fh.committed_steps(tmp_path)[-1] == stopped  # nothing lost at all
  assert f"preempted: checkpoint {stopped} written" in t.log

  resumed = resume_and_compare(launch, tmp_path, reference, **{"train.grace_period_s": 30.0})
  assert fh.resumed_from(resumed.log) == stopped
  # The resumed leg has another grace period: a config difference is a warning, not an error.
  assert "different config (1 keys): train.grace_period_s" in resumed.log


def test_second_signal_exits_at_once_without_a_partial_checkpoint(launch, tmp_path):
  t = launch(tmp_path, inject={"save_sleep_s": 30.0},
             **{"train.async_checkpoint": False, "train.checkpoint_every": 100})
  t.wait_for_step(2)
  t.signal(signal.SIGINT)  # the preemption save starts, and sleeps before its commit
  t.wait_for_incomplete_save()
  time.sleep(faults.Preemption.SAME_REQUEST_WITHIN_S)  # sooner is the first request repeated
  sent = time.monotonic()
  t.signal(signal.SIGINT)
  rc = t.wait()
  assert rc == 128 + signal.SIGINT, t.log[-3000:]
  assert time.monotonic() - sent < 5
  assert "second SIGINT: exiting now" in t.log
  assert fh.committed_steps(tmp_path) == []  # the cut-short save is never listed as a step


def test_grace_period_that_runs_out_exits_anyway(launch, tmp_path):
  t = launch(tmp_path, inject={"save_sleep_s": 30.0},
             **{"train.async_checkpoint": False, "train.grace_period_s": 2.0,
                "train.checkpoint_every": 100})
  t.wait_for_step(2)
  sent = time.monotonic()
  t.signal(signal.SIGTERM)
  assert t.wait() == faults.EXIT_GRACE_EXPIRED, t.log[-3000:]
  assert 2 <= time.monotonic() - sent < 10
  assert "grace period of 2 s ran out" in t.log
  assert fh.committed_steps(tmp_path) == []


def test_a_signal_stops_at_the_next_step_not_at_the_next_log_step(launch, tmp_path):
  """Steps of 64 sequences, so the device (the CPU's compute) is the slow side. The signal comes
  about three steps after the log line of step 12: a host that queued every step up to the next
  log line (24) would stop only after it; this one stops a step or two after the signal."""
  batch = 64
  t = launch(tmp_path, **{"train.steps": 48, "train.log_every": 12, "train.global_batch": batch,
                          "train.checkpoint_every": 100})
  t.wait_for_step(12)
  tokens_per_s = float(re.search(r"\| ([\d,]+) tok/s", t.lines[-1]).group(1).replace(",", ""))
  time.sleep(3 * batch * int(fh.MICRO["train.seq_len"]) / tokens_per_s)
  t.signal(signal.SIGTERM)
  assert t.wait() == 0, t.log[-3000:]
  stopped = fh.committed_steps(tmp_path)
  assert len(stopped) == 1 and 12 < stopped[0] < 24, (stopped, t.log[-3000:])
  assert "finishing the step in progress (and the one queued behind it)" in t.log
  assert f"preempted: checkpoint {stopped[0]} written" in t.log


# ----------------------------------------------------------------------------- NaN


NAN = {"nan_steps": "6,7"}  # one set for all three tests: they share one compiled step


def test_nan_with_policy_stop_exits_and_keeps_the_last_good_checkpoint(launch, tmp_path):
  t = launch.run(tmp_path, inject=NAN)
  assert t.rc == 3, t.log[-3000:]
  assert t.last_line().startswith("error: non-finite loss or gradients at step 6"), t.last_line()
  assert "checkpoint 4 is the last good one" in t.last_line()
  assert fh.committed_steps(tmp_path) == [4]  # step 8 was never saved


def test_nan_with_policy_skip_drops_the_update_and_counts_it(launch, tmp_path):
  t = launch.run(tmp_path, inject=NAN, **{"train.nan_policy": "skip", "train.max_nan_skips": 2,
                                          "train.checkpoint_every": 1,
                                          "train.keep_checkpoints": 20})
  assert t.rc == 0, t.log[-3000:]
  assert "step 6: non-finite loss (nan)" in t.log and "step 7: non-finite loss (nan)" in t.log
  five, seven, last = (fh.read_checkpoint(tmp_path, s)["state"] for s in (5, 7, fh.STEPS))
  for k in five:  # params and optimizer untouched by the two bad steps
    if "params" in k or "opt_state" in k:
      assert (five[k] == seven[k]).all(), k
  assert int(seven["['step']"]) == 7 and int(seven["['nan_skips']"]) == 2
  assert int(last["['nan_skips']"]) == 2
  assert all(np.isfinite(v).all() for v in last.values() if v.dtype.kind == "f")


def test_nan_beyond_the_skip_limit_stops(launch, tmp_path):
  t = launch.run(tmp_path, inject=NAN, **{"train.nan_policy": "skip", "train.max_nan_skips": 1})
  assert t.rc == 3, t.log[-3000:]
  assert "error: 2 steps with non-finite loss or gradients, the last at step 7" in t.last_line()
  assert "more than train.max_nan_skips=1" in t.last_line()
  assert fh.committed_steps(tmp_path) == [4]


# ----------------------------------------------------------------------------- damaged checkpoints


def _biggest_file(path):
  files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  f = _biggest_file(step_dir / "state")
  os.truncate(f, os.path.getsize(f) // 2)


def _flip_bits(step_dir):  # orbax restores this without complaint: only the checksum sees it
  f = _biggest_file(step_dir / "state")
  with open(f, "r+b") as fd:
    fd.seek(os.path.getsize(f) // 2)
    chunk = fd.read(8)
    fd.seek(os.path.getsize(f) // 2)
    fd.write(bytes(b ^ 0x10 for b in chunk))


def _delete_state(step_dir):
  shutil.rmtree(step_dir / "state")


@pytest.fixture(scope="module")
def twelve_steps(launch, tmp_path_factory):
  """A run stopped at step 12 (checkpoints 4, 8, 12), to be damaged and resumed to 16."""
  workdir = tmp_path_factory.mktemp("twelve")
  t = launch.run(workdir, **{"train.steps": 12})
  assert t.rc == 0 and fh.committed_steps(workdir) == [4, 8, 12], t.log[-3000:]
  return workdir


@pytest.mark.parametrize("damage", [_truncate, _flip_bits, _delete_state],
                         ids=["truncated", "bit-flipped", "state-deleted"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(damage, launch, reference,
                                                              twelve_steps, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(twelve_steps, workdir)
  damage(workdir / "checkpoints" / "12")
  resumed = resume_and_compare(launch, workdir, reference)
  assert "checkpoint 12 is corrupt or incomplete" in resumed.log
  assert fh.resumed_from(resumed.log) == 8
  assert len(os.listdir(workdir / "checkpoints.corrupt")) == 1  # kept aside for inspection


# ----------------------------------------------------------------------------- data and disk


@pytest.fixture()
def shards(tmp_path):
  """LITPKDS token shards (two to train on, one held out) and the overrides that use them."""
  rng = np.random.default_rng(0)
  for name in ("train0", "train1", "eval0"):
    formats.write_litpkds(str(tmp_path / f"{name}.bin"),
                          rng.integers(3, 512, 20_000).astype(np.uint16))
  return {"data.source": "litpkds", "data.paths": str(tmp_path / "train*.bin"),
          "data.eval_paths": str(tmp_path / "eval*.bin")}


def _overwrite_header(path):
  with open(path, "r+b") as f:
    f.write(b"garbage!")


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: os.truncate(p, 1000), "train1.bin is truncated or corrupt"),
    (_overwrite_header, "train1.bin is not a LITPKDS token file"),
], ids=["truncated", "corrupt-header"])
def test_damaged_data_shard_is_a_one_line_error(damage, fragment, launch, shards, tmp_path):
  damage(tmp_path / "train1.bin")
  t = launch.run(tmp_path / "w", **shards)
  assert t.rc == 2 and t.last_line().startswith("error: "), t.log[-3000:]
  assert fragment in t.last_line()
  assert "compiling" not in t.log


def test_missing_data_is_a_one_line_error(launch, shards, tmp_path):
  t = launch.run(tmp_path / "w", **dict(shards, **{"data.paths": str(tmp_path / "gone/*.bin")}))
  assert t.rc == 2 and t.last_line().startswith("error: the training data cannot be read"), \
      t.log[-3000:]


@pytest.mark.parametrize("flags, fragment", [
    ({"mesh.fsdp": 2}, "needs 2 devices"),
    ({"train.global_batch": 6}, "train.global_batch (6) must be a multiple"),
], ids=["mesh", "batch"])
def test_bad_config_is_a_one_line_error_before_anything_runs(flags, fragment, launch, tmp_path):
  t = launch.run(tmp_path / "w", **flags)
  assert t.rc == 2 and t.last_line().startswith("error: "), t.log[-3000:]
  assert fragment in t.last_line()
  assert "compiling" not in t.log


@pytest.fixture()
def small_disk(tmp_path, reference):
  """A tmpfs that holds two checkpoints of the micro model but not three."""
  size = int(2.6 * fh.dir_bytes(os.path.join(reference["workdir"], "checkpoints", str(fh.STEPS))))
  mount = tmp_path / "disk"
  reason = fh.try_mount_tmpfs(mount, size)
  if reason:
    pytest.skip(reason)
  yield mount
  fh.umount(mount)


def test_full_disk_is_a_clear_error_and_keeps_the_checkpoints(launch, reference, small_disk,
                                                              tmp_path):
  workdir = small_disk / "w"
  t = launch.run(workdir, **{"train.keep_checkpoints": 10})
  assert t.rc == 3, t.log[-3000:]
  line = t.error_line()
  assert line.startswith("error: could not write checkpoint 12"), t.log[-3000:]
  assert "no space left on device" in line
  assert "the complete checkpoints [4, 8] are intact and a rerun resumes from step 8" in line
  assert fh.incomplete(workdir) == []  # the partial save was removed to give the space back

  moved = tmp_path / "bigger"  # the user frees space: here, moves the workdir to a bigger disk
  shutil.copytree(workdir, moved)
  resumed = resume_and_compare(launch, moved, reference, **{"train.keep_checkpoints": 10})
  assert fh.resumed_from(resumed.log) == 8


def test_too_little_disk_for_one_checkpoint_is_refused_at_start(launch, tmp_path):
  mount = tmp_path / "tiny_disk"
  reason = fh.try_mount_tmpfs(mount, 1 << 20)
  if reason:
    pytest.skip(reason)
  try:
    t = launch.run(mount / "w")
  finally:
    fh.umount(mount)
  assert t.rc == 2, t.log[-3000:]
  assert "MiB free, a checkpoint needs about" in t.last_line()
  assert "compiling" not in t.log


@pytest.mark.parametrize("files", ["tb", "metrics", "log"])
def test_a_writer_that_fails_ends_the_run_and_keeps_the_checkpoints(files, launch, tmp_path):
  """The disk fills between two checkpoints: the tensorboard events (written by a thread that
  died and left the trainer blocked on its queue), metrics.jsonl or the log fail with ENOSPC at
  step 6. Exit 3 in seconds; checkpoint 4 is the latest and complete."""
  t = launch(tmp_path, inject={"full_at_step": 6, "full_files": files},
             **{"train.async_checkpoint": False})
  assert t.wait(timeout=90) == 3, t.log[-3000:]
  assert fh.committed_steps(tmp_path) == [4] and fh.incomplete(tmp_path) == []
  if files != "log":  # with the log on the full disk, its last line is lost with it
    assert t.error_line().startswith("error: could not write "), t.log[-3000:]
    assert ("(no space left on device) at step 6: free disk space or move --workdir to a bigger "
            "disk; the complete checkpoints [4] are intact and a rerun resumes from step 4"
            in t.error_line()), t.error_line()


def test_a_stalled_step_dumps_every_stack_and_exits_3(launch, tmp_path):
  t = launch(tmp_path, inject={"stall_at_step": 6},
             **{"train.async_checkpoint": False, "train.hang_timeout_s": 3})
  sent = time.monotonic()
  assert t.wait(timeout=90) == 3, t.log[-3000:]
  assert time.monotonic() - sent < 60
  assert "no training step completed in 3 s: the stack of every thread follows" in t.log
  assert "(most recent call first)" in t.log and "in stall" in t.log  # the main thread's stack
  assert t.error_line().startswith("error: no training step completed in 3 s "
                                   "(train.hang_timeout_s)"), t.log[-3000:]
  assert fh.committed_steps(tmp_path) == [4]


@pytest.mark.parametrize("seed", [0])
def test_a_disk_that_fills_between_two_checkpoints_ends_the_run_with_one_line(seed, launch,
                                                                              reference, tmp_path):
  """A real full disk: a tmpfs filled by another writer at a random step between checkpoints 20
  and 40. The next write that needs a page (the events, metrics.jsonl) fails: one line naming
  it and the step, exit 3 within seconds, checkpoint 20 intact and nothing partial left."""
  size = 8 * fh.dir_bytes(os.path.join(reference["workdir"], "checkpoints", str(fh.STEPS)))
  mount = tmp_path / "disk"
  reason = fh.try_mount_tmpfs(mount, size)
  if reason:
    pytest.skip(reason)
  try:
    workdir = mount / "w"
    t = launch(workdir, inject={"step_sleep_s": 0.1},
               **{"train.steps": 40, "train.checkpoint_every": 20})
    filled_at = t.wait_for_step(random.Random(seed).randint(21, 28))
    fh.fill(mount / "filler")
    assert t.wait(timeout=90) == 3, t.log[-3000:]
    line = t.error_line()
    stopped = int(re.search(r"at step (\d+):", line).group(1)) if " at step " in line else None
    assert line.startswith("error: could not write ") and "(no space left on device)" in line, \
        t.log[-3000:]
    assert stopped is not None and filled_at <= stopped < 40, line
    assert ("the complete checkpoints [20] are intact and a rerun resumes from step 20"
            in line), line
    assert fh.committed_steps(workdir) == [20] and fh.incomplete(workdir) == []
  finally:
    fh.umount(mount)


# ----------------------------------------------------------------------------- in-process


def _tiny_state(value=1.0):
  return {"step": jnp.int32(3), "params": {"w": jnp.full((64, 64), value, jnp.float32)},
          "rng": jax.random.key(0)}


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def test_a_workdir_takes_one_writer_and_a_killed_one_leaves_no_lock(tmp_path):
  workdir = str(tmp_path / "w")
  lock = faults.workdir_lock(workdir)
  with pytest.raises(ValueError, match=rf"workdir {workdir} is in use by train pid {os.getpid()} "
                                       r"on .*: wait for that run to end, or pass another"):
    faults.workdir_lock(workdir)
  lock.release()
  faults.workdir_lock(workdir).release()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom tinyllama_jax.training import faults\n"
       "lock = faults.workdir_lock(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(300)", workdir],
      cwd=fh.REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(ValueError, match=f"in use by train pid {holder.pid} "):
      faults.workdir_lock(workdir)
  finally:
    holder.kill()  # SIGKILL: no cleanup runs in the holder
    holder.wait()
  faults.workdir_lock(workdir).release()


def test_checksums_see_one_flipped_bit_and_swapped_elements():
  w = jnp.arange(64.0).reshape(8, 8)
  base, _ = checkpoint.checksums({"w": w})
  flipped = jax.lax.bitcast_convert_type(w, jnp.uint32).at[3, 5].add(1)
  assert checkpoint.checksums({"w": jax.lax.bitcast_convert_type(flipped, jnp.float32)})[0] != base
  assert checkpoint.checksums({"w": w.T})[0] != base
  assert checkpoint.checksums({"w": w.at[0, 0].set(jnp.nan)})[1] is False


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  cfg = config_lib.base_config()
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
  for step in (1, 2):
    ckpt.save(step, _tiny_state(step), {"at": step}, cfg)
  ckpt.close()
  for step in (1, 2):
    shutil.rmtree(tmp_path / str(step) / "state")
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
  with pytest.raises(checkpoint.CheckpointError, match="none of the 2 checkpoints"):
    ckpt.restore_latest(_abstract(_tiny_state()), lambda meta: None)
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # nothing moved, nothing deleted
  ckpt.close()


def test_a_state_with_nan_is_never_saved(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
  ckpt.save(1, _tiny_state(), {}, config_lib.base_config())
  with pytest.raises(checkpoint.CheckpointError, match="refusing to save step 2.*intact"):
    ckpt.save(2, _tiny_state(float("nan")), {}, config_lib.base_config())
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_resume_warns_about_config_and_version_differences(caplog):
  cfg = config_lib.base_config()
  saved = cfg.to_dict()
  saved["optim"]["lr"] = 1e-3
  versions = dict(checkpoint.versions(), jax="0.1.0")
  with caplog.at_level(logging.WARNING):
    checkpoint.check_resume({"step": 7, "config": saved, "versions": versions}, cfg, "w")
  text = caplog.text
  assert f"optim.lr: 0.001 -> {cfg.optim.lr!r}" in text
  assert "jax 0.1.0 -> " in text
  saved["model"]["d_model"] = 1
  with pytest.raises(ValueError, match="different architecture.*d_model"):
    checkpoint.check_resume({"step": 7, "config": saved, "versions": versions}, cfg, "w")


def test_a_checkpoint_with_keys_this_version_removed_resumes_with_a_warning(caplog):
  """Checkpoints written before the fault switches left the config carry them in their meta."""
  cfg = config_lib.base_config()
  saved = cfg.to_dict()
  saved["train"].update(inject_nan_steps="", inject_step_sleep_s=0.0, profile_steps="")
  with caplog.at_level(logging.WARNING):
    checkpoint.check_resume({"step": 7, "config": saved, "versions": checkpoint.versions()}, cfg,
                            "w")
  assert "different config (3 keys): train.inject_nan_steps: '' -> '<absent>'" in caplog.text


def test_resume_onto_changed_data_is_refused_or_restarts_the_stream(caplog):
  cfg = config_lib.base_config()
  meta = {"step": 7, "config": cfg.to_dict(), "versions": checkpoint.versions(),
          "data_identity": {"prepared:/d": "aaa"}}
  checkpoint.check_resume(meta, cfg, "w", {"prepared:/d": "aaa"})
  assert checkpoint.same_data(meta, {"prepared:/d": "aaa"})
  with pytest.raises(ValueError, match=r"the training data \(prepared:/d\) changed since "
                                       r"checkpoint 7 .*allow_data_change=True"):
    checkpoint.check_resume(meta, cfg, "w", {"prepared:/d": "bbb"})
  cfg.train.allow_data_change = True
  with caplog.at_level(logging.WARNING):
    checkpoint.check_resume(meta, cfg, "w", {"prepared:/d": "bbb"})
  assert "the data stream restarts from its beginning" in caplog.text
  assert not checkpoint.same_data(meta, {"prepared:/d": "bbb"})
  del meta["data_identity"]  # an older version's checkpoint: resumes, unchecked
  cfg.train.allow_data_change = False
  with caplog.at_level(logging.WARNING):
    checkpoint.check_resume(meta, cfg, "w", {"prepared:/d": "bbb"})
  assert "records no data identity" in caplog.text
  assert checkpoint.same_data(meta, {"prepared:/d": "bbb"})
