"""Sweeps: grids, validation, run names, skip/resume, the print and SLURM launchers, the summary."""

import contextlib
import csv
import json
import os
import pty
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tinyllama_jax.data import formats
from tinyllama_jax.training import metrics
from tinyllama_jax.sweeps import grid as sweep
from tinyllama_jax.sweeps import launch as sweep_launch
from tinyllama_jax.sweeps import summary as sweep_summary
from interrupt import sigint_after

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.py")


def _plan(tmp_path, bindings, fixed=None, cli=()):
  return sweep.plan(TINY, bindings, fixed or {}, list(cli), str(tmp_path / "sweep"))


# ----------------------------------------------------------------------------- grids


def test_product_zip_chain():
  grid = sweep.product({"optim.lr": [1e-4, 1e-3], "optim.warmup_steps": [5, 10, 20]})
  assert len(grid) == 6
  assert grid[0] == {"optim.lr": 1e-4, "optim.warmup_steps": 5}
  assert grid[1] == {"optim.lr": 1e-4, "optim.warmup_steps": 10}  # first key outermost
  zipped = sweep.zipped({"optim.lr": [1e-3, 3e-3], "optim.min_lr": [1e-4, 3e-4]})
  assert zipped == [{"optim.lr": 1e-3, "optim.min_lr": 1e-4}, {"optim.lr": 3e-3, "optim.min_lr": 3e-4}]
  crossed = sweep.product(zipped, {"seed": [0, 1]})
  assert crossed[1] == {"optim.lr": 1e-3, "optim.min_lr": 1e-4, "seed": 1} and len(crossed) == 4
  chained = sweep.chain(grid[:2], [{"optim.lr": 1e-2}], {"seed": [3, 4]})
  assert chained == grid[:2] + [{"optim.lr": 1e-2}, {"seed": 3}, {"seed": 4}]


@pytest.mark.parametrize("make, match", [
    (lambda: sweep.zipped({"optim.lr": [1, 2], "seed": [1]}), "one length"),
    (lambda: sweep.product({"optim.lr": 1e-3}), r"non-empty list of values for 'optim.lr'"),
    (lambda: sweep.product({"data.source": "stdlib"}), r"'data.source': \['stdlib'\]"),
    (lambda: sweep.product({"seed": [1]}, {"seed": [2]}), "binds 'seed' in two parts"),
    (lambda: sweep.chain(3), "dicts of value lists or lists of bindings"),
])
def test_grid_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_load_sweep_file(tmp_path):
  path = tmp_path / "s.py"
  path.write_text(textwrap.dedent("""
      from tinyllama_jax.sweeps.grid import product, zipped
      FIXED = {"train.steps": 7}
      def get_sweep():
        return product(zipped({"optim.lr": [1e-3, 2e-3], "optim.warmup_steps": [1, 2]}), {"seed": [0, 1]})
  """))
  bindings, fixed = sweep.load_sweep_file(str(path))
  assert len(bindings) == 4 and fixed == {"train.steps": 7}
  path.write_text("def get_sweep():\n  return {'seed': [0, 1, 2]}\n")  # a plain dict: its product
  assert sweep.load_sweep_file(str(path))[0] == [{"seed": 0}, {"seed": 1}, {"seed": 2}]
  path.write_text("SWEEP = 1\n")
  with pytest.raises(ValueError, match="defines no get_sweep"):
    sweep.load_sweep_file(str(path))
  with pytest.raises(ValueError, match="does not exist"):
    sweep.load_sweep_file(str(tmp_path / "missing.py"))


# ----------------------------------------------------------------------------- validation


def test_unknown_key_fails_up_front_with_close_keys(tmp_path):
  with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr'; did you mean optim.lr"):
    _plan(tmp_path, [{"optim.lr": 1e-3}, {"optim.lrr": 1e-3}])
  assert not (tmp_path / "sweep").exists()  # nothing was created, nothing started


@pytest.mark.parametrize("key, value, match", [
    ("optim.lr", "fast", r"optim.lr='fast' is str, but optim.lr takes float values"),
    ("train.steps", 1.5, r"train.steps=1.5 is float, but train.steps takes int values"),
    ("train.steps", True, r"train.steps=True is bool, but train.steps takes int"),
    ("model.scan_layers", 1, r"model.scan_layers=1 is int, but model.scan_layers takes bool"),
    ("data.source", 3, r"data.source=3 is int, but data.source takes str"),
    ("optim.lr", [1e-3], r"belongs in product\(\) or zipped\(\)"),
])
def test_bad_values_name_key_and_type(tmp_path, key, value, match):
  with pytest.raises(ValueError, match=match):
    _plan(tmp_path, [{key: value}])


def test_values_are_typed_like_the_base_config(tmp_path):
  (run,) = _plan(tmp_path, [{"optim.lr": 1, "model.scan_layers": True}],
                 cli=["--config.train.steps=40", "--config.optim.b2=0.99"])
  assert run.cfg.optim.lr == 1.0 and isinstance(run.cfg.optim.lr, float)
  assert run.cfg.train.steps == 40 and run.cfg.optim.b2 == 0.99 and run.cfg.model.scan_layers
  assert "--config.optim.lr=1.0" in run.train_args(TINY)
  for bad, match in [("--config.train.steps=4.5", "train.steps takes int values"),
                     ("--config.model.scan_layers=yes", "takes bool values"),
                     ("--config.train.stepz=4", "did you mean train.steps")]:
    with pytest.raises(ValueError, match=match):
      _plan(tmp_path, [{"seed": 1}], cli=[bad])


def test_swept_and_fixed_and_bad_corners_fail_up_front(tmp_path):
  with pytest.raises(ValueError, match="optim.lr is both swept and fixed"):
    _plan(tmp_path, [{"optim.lr": 1e-3}], fixed={"optim.lr": 2e-3})
  # tiny.py's min_lr is 3e-4: a peak below it is caught before any run starts
  with pytest.raises(ValueError, match=r"run lr1e-04: optim.min_lr \(0.0003\) is above optim.lr"):
    _plan(tmp_path, [{"optim.lr": 1e-3}, {"optim.lr": 1e-4}])


# ----------------------------------------------------------------------------- names


def test_names_readable_and_exact():
  assert sweep.run_name({"optim.lr": 0.0004, "optim.warmup_steps": 500}) == "lr4e-04_warmup_steps500"
  assert sweep.run_name({"optim.lr": 3.5e-4}) == "lr3.5e-04"  # never rounded onto a neighbour
  assert sweep.run_name({"optim.b2": 0.95, "optim.lr": 2.0}) == "b20.95_lr2"
  assert sweep.run_name({"model.scan_layers": True, "data.packing": "best_fit"}) == \
      "scan_layers-True_packing-best_fit"
  assert sweep.run_name({}) == "base"


def test_names_stable_safe_unique():
  a = {"optim.lr": 1e-3, "seed": 2}
  # a function of the binding alone: the same in any sweep, in any process
  assert sweep.run_names([a, {"seed": 5}])[0] == sweep.run_names([{"seed": 9}, a])[1] == "lr1e-03_seed2"
  out = subprocess.run([sys.executable, "-c", "from tinyllama_jax.sweeps import grid as sweep; "
                        "print(sweep.run_name({'optim.lr': 1e-3, 'seed': 2}))"],
                       cwd=REPO, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "lr1e-03_seed2"
  # unsafe characters are replaced, and the hash keeps two such values apart
  odd = [{"data.paths": "/data/a b/*.txt"}, {"data.paths": "/data/a_b/*.txt"}]
  names = sweep.run_names(odd)
  assert names[0] != names[1]
  assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", n) and len(n) <= 120 for n in names)
  long = sweep.run_name({"data.mixture": "0.5:prepared:" + "x" * 300})
  assert len(long) <= 120 and re.fullmatch(r"[A-Za-z0-9._+-]+", long)
  # one binding with two keys that end alike: the full keys
  assert sweep.run_name({"a.x": 1, "b.x": 2, "seed": 3}) == "a.x1_b.x2_seed3"
  assert sweep.run_name({"optim.eps": 1e-8, "model.norm_eps": 1e-6}) == "eps1e-08_norm_eps1e-06"
  clash = sweep.run_names([{"mesh.data": 1}, {"train.seq_len": 4, "mesh.data": 1}, {"data": 1}])
  assert len(set(clash)) == 3
  # the same leaf in different runs: names that would collide get the binding's hash
  colliding = sweep.run_names([{"train.steps": 5}, {"other.steps": 5}])
  assert colliding[0] != colliding[1] and all(n.startswith("steps5_") for n in colliding)
  with pytest.raises(ValueError, match="lists the run .* twice"):
    sweep.run_names([{"seed": 1}, {"seed": 1}])


# ----------------------------------------------------------------------------- skip / resume

FAKE_TRAINER = textwrap.dedent("""
    # Stands in for tinyllama_jax.train: resumes from the latest checkpoint directory, saves every
    # 5 steps, and crashes halfway when its workdir holds a 'crash_once' file.
    import json, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    workdir, steps = args["workdir"], int(args["config.train.steps"])
    ckpt = os.path.join(workdir, "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    start = max([int(n) for n in os.listdir(ckpt) if n.isdigit()], default=0)
    with open(os.path.join(workdir, "calls.jsonl"), "a") as f:
      f.write(json.dumps({"start": start, "devices": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
    crash = os.path.join(workdir, "crash_once")
    for step in range(start + 5, steps + 1, 5):
      if os.path.exists(crash) and step > steps // 2:
        os.remove(crash)
        print("simulated crash"); sys.exit(3)
      os.makedirs(os.path.join(ckpt, str(step)))
""")


def _calls(run):
  path = os.path.join(run.workdir, "calls.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_local_skips_finished_and_resumes_interrupted(tmp_path, capsys):
  trainer = tmp_path / "fake_train.py"
  trainer.write_text(FAKE_TRAINER)
  runs = _plan(tmp_path, sweep.product({"seed": [0, 1, 2]}), fixed={"train.steps": 20})
  sweep.prepare_workdirs(runs, TINY)
  open(os.path.join(runs[1].workdir, "crash_once"), "w").close()
  env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
  launch = lambda: sweep_launch.launch_local(runs, TINY, max_parallel=2,
                                             trainer=[sys.executable, str(trainer)], env=env, poll_s=0.05)
  assert launch() == ["seed1"]
  out = capsys.readouterr().out
  assert "seed1: FAILED (exit 3)" in out and "simulated crash" in out  # the log's tail is shown
  assert [sweep_launch.run_state(r)[0] for r in runs] == ["finished", "failed", "finished"]
  assert sweep_launch.run_state(runs[1])[1] == 10
  # two at a time, each on its own half of the GPUs
  assert {c["devices"] for r in runs for c in _calls(r)} == {"0,1", "2,3"}

  assert launch() == []  # the rerun: finished runs skipped, the crashed one resumed
  out = capsys.readouterr().out
  assert "skip seed0: finished (20/20 steps)" in out and "resume from step 10 seed1" in out
  assert [len(_calls(r)) for r in runs] == [1, 2, 1]
  assert _calls(runs[1])[1]["start"] == 10
  assert sweep.read_run_file(runs[1].workdir)["status"] == "finished"

  assert launch() == []
  assert [len(_calls(r)) for r in runs] == [1, 2, 1]  # all finished: nothing runs again


def test_run_state_reads_checkpoint_steps(tmp_path):
  (run,) = _plan(tmp_path, [{"seed": 0}], fixed={"train.steps": 60})
  sweep.prepare_workdirs([run], TINY)
  assert sweep_launch.run_state(run) == ("new", None)
  ckpt = os.path.join(run.workdir, "checkpoints")
  os.makedirs(os.path.join(ckpt, "20"))
  os.makedirs(os.path.join(ckpt, "60.orbax-checkpoint-tmp-1234"))  # a save cut short: not a step
  assert sweep_launch.run_state(run) == ("interrupted", 20)
  os.makedirs(os.path.join(ckpt, "60"))
  assert sweep_launch.run_state(run) == ("finished", 60)


LOCK_HOLDER = "import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n" \
              "print('locked', flush=True)\ntime.sleep(300)"


def _hold_lock(workdir):
  """A process holding workdir/.lock as a live trainer does; kill it to end the hold."""
  holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, os.path.join(workdir, ".lock")],
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == "locked\n"
  return holder


def test_running_means_a_live_lock_not_a_recorded_pid(tmp_path):
  (run,) = _plan(tmp_path, [{"seed": 0}], fixed={"train.steps": 60})
  sweep.prepare_workdirs([run], TINY)
  # A record from a trainer that died, its pid since taken by a live process (this one).
  formats.write_json_atomic(os.path.join(run.workdir, sweep.RUN_FILE),
                            dict(sweep.read_run_file(run.workdir), status="running",
                                 pid=os.getpid(), host=socket.gethostname()))
  assert sweep_launch.run_state(run) == ("new", None)
  holder = _hold_lock(run.workdir)
  try:
    assert sweep_launch.run_state(run) == ("running", None)
  finally:
    holder.kill()
    holder.wait()
  assert sweep_launch.run_state(run) == ("new", None)


SIGNAL_TRAINER = textwrap.dedent("""
    # Stands in for tinyllama_jax.train under a signal: holds its workdir's lock, records every
    # signal it gets, and on the first one "saves" (half a second) checkpoint 3, then exits 0.
    import fcntl, os, signal, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    workdir = args["workdir"]
    lock = open(os.path.join(workdir, ".lock"), "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    got = []
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, lambda signum, frame: got.append(signum))
    open(os.path.join(workdir, "started"), "w").close()
    while not got:
      time.sleep(0.01)
    time.sleep(0.5)
    os.makedirs(os.path.join(workdir, "checkpoints", "3"))
    with open(os.path.join(workdir, "signals"), "w") as f:
      f.write(",".join(map(str, got)))
""")

SWEEP_WITH_TRAINER = textwrap.dedent("""
    import sys
    from tinyllama_jax.sweeps import grid, launch
    runs = grid.plan(sys.argv[1], [{"seed": 0}, {"seed": 1}], {"train.steps": 20}, [], sys.argv[2])
    grid.prepare_workdirs(runs, sys.argv[1])
    try:
      launch.launch_local(runs, sys.argv[1], max_parallel=2, poll_s=0.05,
                          trainer=[sys.executable, sys.argv[3]])
    except launch.Interrupted as e:
      print("interrupted", e.signum, flush=True)
      sys.exit(128 + e.signum)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_sweep_reaches_its_trainers_once_and_waits_for_their_saves(signum,
                                                                                   tmp_path):
  trainer = tmp_path / "signal_train.py"
  trainer.write_text(SIGNAL_TRAINER)
  workdir = tmp_path / "sweep"
  env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
  proc = subprocess.Popen([sys.executable, "-c", SWEEP_WITH_TRAINER, TINY, str(workdir),
                           str(trainer)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
  runs = [workdir / "seed0", workdir / "seed1"]
  deadline = time.monotonic() + 60
  while not all((r / "started").exists() for r in runs):
    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
    time.sleep(0.02)
  proc.send_signal(signum)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 128 + signum, out
  for r in runs:  # each saved (the sweep waited), got the signal once, and holds no lock now
    assert (r / "checkpoints" / "3").is_dir() and (r / "signals").read_text() == str(int(signum))
    record = sweep.read_run_file(str(r))
    assert record["status"] == "interrupted" and record["returncode"] == 0
  assert "interrupted by" in out and "checkpoint 3 saved" in out
  assert [sweep_launch.run_state(run)[0] for run in _plan(tmp_path, [{"seed": 0}, {"seed": 1}],
                                                           fixed={"train.steps": 20})] == \
      ["interrupted", "interrupted"]


def test_a_hangup_stops_the_trainers_as_sigterm_and_the_sweep_outlives_its_terminal(tmp_path):
  """The sweep's output on a terminal that closes, then SIGHUP (an ssh connection dropped): each
  trainer gets SIGTERM once (SIGHUP would end it without a save) and saves; the sweep, whose
  lines the closed terminal refuses, waits for them and exits 129. Before, SIGHUP ended the
  sweep at once and its trainers trained on with nobody waiting for them."""
  trainer = tmp_path / "signal_train.py"
  trainer.write_text(SIGNAL_TRAINER)
  workdir = tmp_path / "sweep"
  runs = [workdir / "seed0", workdir / "seed1"]
  terminal, its_end = pty.openpty()
  proc = subprocess.Popen([sys.executable, "-c", SWEEP_WITH_TRAINER, TINY, str(workdir),
                           str(trainer)], cwd=REPO, stdout=its_end, stderr=its_end,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"})
  os.close(its_end)
  try:
    deadline = time.monotonic() + 60
    while not all((r / "started").exists() for r in runs):
      assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
      time.sleep(0.02)
    os.close(terminal)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=60) == 128 + signal.SIGHUP
    for r in runs:
      assert (r / "checkpoints" / "3").is_dir()
      assert (r / "signals").read_text() == str(int(signal.SIGTERM))
      assert sweep.read_run_file(str(r))["status"] == "interrupted"
  finally:
    for r in runs:  # trainers a sweep left behind
      pid = sweep.read_run_file(str(r)).get("pid")
      if pid and not (r / "signals").exists():
        with contextlib.suppress(ProcessLookupError):
          os.kill(pid, signal.SIGKILL)


def test_device_slots():
  assert sweep_launch.device_slots(1, {"CUDA_VISIBLE_DEVICES": "0,1"}) == [{}]
  assert sweep_launch.device_slots(2, {"CUDA_VISIBLE_DEVICES": "3,4,5"}) == [
      {"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "4"}]
  with pytest.raises(ValueError, match="more than the 2 visible GPUs"):
    sweep_launch.device_slots(4, {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_trained_run_refuses_a_changed_config(tmp_path):
  (run,) = _plan(tmp_path, [{"seed": 0}], fixed={"train.steps": 60})
  sweep.prepare_workdirs([run], TINY)
  record = sweep.read_run_file(run.workdir)
  assert record["binding"] == {"seed": 0} and record["config"]["train"]["steps"] == 60
  os.makedirs(os.path.join(run.workdir, "checkpoints", "20"))
  (changed,) = _plan(tmp_path, [{"seed": 0}], fixed={"train.steps": 60, "optim.b2": 0.9})
  with pytest.raises(ValueError, match=r"already trained with another config \(optim.b2: 0.95 -> 0.9\)"):
    sweep.prepare_workdirs([changed], TINY)
  sweep.prepare_workdirs([changed], TINY, allow_config_change=True)
  assert sweep.read_run_file(run.workdir)["config"]["optim"]["b2"] == 0.9


# ----------------------------------------------------------------------------- print and SLURM


def test_print_lists_the_unfinished_commands(tmp_path, capsys):
  runs = _plan(tmp_path, sweep.product({"optim.lr": [1e-3, 2e-3]}), fixed={"train.steps": 10})
  sweep.prepare_workdirs(runs, TINY)
  os.makedirs(os.path.join(runs[0].workdir, "checkpoints", "10"))
  sweep_launch.launch_print(runs, TINY)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "# skip lr1e-03: finished (10/10 steps)"
  (cmd,) = [shlex.split(l) for l in lines if not l.startswith("#")]
  assert cmd[:3] == [sys.executable, "-m", "tinyllama_jax.train"]
  assert f"--workdir={runs[1].workdir}" in cmd and "--config.optim.lr=0.002" in cmd
  assert "--config.train.steps=10" in cmd


def test_slurm_script(tmp_path, capsys):
  runs = _plan(tmp_path, sweep.product({"optim.lr": [1e-3, 2e-3, 3e-3]}),
               fixed={"train.steps": 10, "data.paths": "/data/my corpus/*.txt"})
  sweep.prepare_workdirs(runs, TINY)
  os.makedirs(os.path.join(runs[0].workdir, "checkpoints", "10"))  # finished: left out
  path = sweep_launch.launch_slurm(runs, TINY, str(tmp_path / "sweep"), max_parallel=2,
                                   options=["--gres=gpu:8", "--time=48:00:00"])
  text = open(path).read()
  assert text.startswith("#!/bin/bash\n") and os.access(path, os.X_OK)
  for line in ["#SBATCH --array=0-1%2", "#SBATCH --gres=gpu:8", "#SBATCH --time=48:00:00",
               f"#SBATCH --output={tmp_path}/sweep/slurm/%A_%a.out", f"cd {REPO}"]:
    assert line in text.splitlines()
  assert runs[0].workdir not in text and runs[1].workdir in text and runs[2].workdir in text
  subprocess.run(["bash", "-n", path], check=True)
  # Run task 1 with a stand-in interpreter that records its argv: the quoting survives bash.
  recorder = tmp_path / "python"
  recorder.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$RECORD"\n')
  recorder.chmod(0o755)
  record = tmp_path / "argv.txt"
  subprocess.run(["bash", path], check=True, env={**os.environ, "SLURM_ARRAY_TASK_ID": "1",
                                                  "PYTHON": str(recorder), "RECORD": str(record)})
  assert record.read_text().splitlines() == ["-m", "tinyllama_jax.train"] + runs[2].train_args(TINY)
  assert "--config.data.paths=/data/my corpus/*.txt" in record.read_text().splitlines()
  bad = subprocess.run(["bash", path], env={**os.environ, "SLURM_ARRAY_TASK_ID": "7"},
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "no run for array task 7" in bad.stderr
  for run in runs:
    os.makedirs(os.path.join(run.workdir, "checkpoints", "10"), exist_ok=True)
  assert sweep_launch.launch_slurm(runs, TINY, str(tmp_path / "sweep")) is None
  assert "all 3 runs are finished" in capsys.readouterr().out


# ----------------------------------------------------------------------------- summary


def _write_metrics(run_dir, points, start_step=0):
  """points: {tag: [(step, value)]}, written as a run's metrics.Writer writes them."""
  run_dir.mkdir(parents=True, exist_ok=True)
  writer = metrics.Writer(str(run_dir), start_step=start_step)
  for step in sorted({s for series in points.values() for s, _ in series}):
    writer.scalars(step, {tag: v for tag, series in points.items() for s, v in series if s == step})
  writer.close()


def test_metrics_merge_across_a_resume(tmp_path):
  _write_metrics(tmp_path, {"train/loss": [(10, 5.0), (20, 4.0), (30, 3.9)], "eval/loss": [(20, 4.5)]})
  # resumed from the checkpoint at 20: step 30 onwards is recomputed
  _write_metrics(tmp_path, {"train/loss": [(30, 3.5), (40, 3.0)], "eval/loss": [(40, 3.2)]}, 20)
  scalars, bad = metrics.read_metrics(str(tmp_path))
  assert scalars["train/loss"] == [(10, 5.0), (20, 4.0), (30, 3.5), (40, 3.0)]
  assert scalars["eval/loss"] == [(20, 4.5), (40, 3.2)] and bad == 0
  assert os.listdir(tmp_path / "tb")  # the tensorboard events beside it
  with open(tmp_path / metrics.METRICS_FILE, "a") as f:
    f.write('{"step": 50, "train/lo')  # a write cut short by kill -9
  scalars, bad = metrics.read_metrics(str(tmp_path))
  assert bad == 1 and scalars["train/loss"][-1] == (40, 3.0)


def _run_sweep_cli(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "tinyllama_jax.sweep", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_errors_are_one_line(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_sweep():\n  return {'optim.lrr': [1e-3]}\n")
  out = _run_sweep_cli(f"--config={TINY}", f"--sweep={bad}", f"--workdir={tmp_path / 'w'}")
  assert out.returncode == 2 and not (tmp_path / "w").exists()
  assert out.stderr.strip().splitlines() == [
      "error: binding {'optim.lrr': 0.001}: unknown config key 'optim.lrr'; did you mean "
      "optim.lr, optim.min_lr, optim.b2?"]
  with pytest.raises(ValueError, match="holds no runs"):  # summarize's, without a process
    sweep_summary.summarize(str(tmp_path))


SLOW_SWEEP_FILE = textwrap.dedent("""
    import sys, time
    from tinyllama_jax.sweeps.grid import product
    def get_sweep():
      print("reading the grid", file=sys.stderr, flush=True)
      time.sleep(300)  # a grid read from a slow file system
      return product({"seed": [0, 1]})
""")


def test_ctrl_c_while_planning_is_one_line_exit_130_and_creates_nothing(tmp_path):
  """Before, a KeyboardInterrupt traceback, exit 1."""
  slow = tmp_path / "slow.py"
  slow.write_text(SLOW_SWEEP_FILE)
  status, err, out = sigint_after("sweep", (f"--config={TINY}", f"--sweep={slow}",
                                            f"--workdir={tmp_path / 'w'}"), "reading the grid")
  assert (status, err, out) == (130, "interrupted\n", "")
  assert not (tmp_path / "w").exists()


def test_a_run_another_trainer_holds_is_not_reported_finished(tmp_path):
  sweep_file = tmp_path / "two.py"
  sweep_file.write_text("def get_sweep():\n  return {'optim.lr': [1e-3, 2e-3]}\n")
  workdir = tmp_path / "sweep"
  os.makedirs(workdir / "lr1e-03" / "checkpoints" / "5")
  os.makedirs(workdir / "lr2e-03")
  holder = _hold_lock(str(workdir / "lr2e-03"))
  try:
    out = _run_sweep_cli(f"--config={TINY}", f"--sweep={sweep_file}", f"--workdir={workdir}",
                         "--config.train.steps=5")
  finally:
    holder.kill()
    holder.wait()
  assert "skip lr1e-03: finished (5/5 steps)" in out.stdout and \
      "skip lr2e-03: running (0/5 steps)" in out.stdout, out.stdout + out.stderr
  assert "all 2 runs finished" not in out.stdout and out.returncode == 1, out.stdout + out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(
      "1 of 2 runs finished; not finished: lr2e-03 (running): a running one is trained by "
      "another process"), out.stderr


@pytest.mark.slow
def test_two_tiny_runs_end_to_end(tmp_path):
  """A real sweep of two tiny runs, a real resume, the summary and plot from their events."""
  sweep_file = tmp_path / "two.py"
  sweep_file.write_text(textwrap.dedent("""
      FIXED = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
               "model.head_dim": 16, "model.ffn_dim": 128, "model.vocab_size": 512,
               "model.max_seq_len": 64, "data.tokenizer_vocab_size": 512,
               "data.tokenizer_train_bytes": 300_000, "train.seq_len": 64, "train.global_batch": 8,
               "train.micro_batch_per_device": 8, "train.steps": 8, "train.log_every": 2,
               "train.eval_every": 4, "train.checkpoint_every": 4, "train.eval_batches": 1,
               "train.sample_tokens": 0, "train.async_checkpoint": False, "optim.warmup_steps": 2}
      def get_sweep():
        return {"optim.lr": [3e-3, 1e-4]}
  """))
  workdir = tmp_path / "sweep"
  args = [f"--config={TINY}", f"--sweep={sweep_file}", f"--workdir={workdir}",
          "--config.optim.min_lr=1e-5"]
  out = _run_sweep_cli(*args)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "all 2 runs finished" in out.stdout
  # Interrupt one after the fact: drop its last checkpoint; the rerun resumes from step 4.
  resumed = workdir / "lr1e-04"
  subprocess.run(["rm", "-r", str(resumed / "checkpoints" / "8")], check=True)
  out = _run_sweep_cli(*args)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "skip lr3e-03: finished (8/8 steps)" in out.stdout
  assert "resume from step 4 lr1e-04" in out.stdout
  assert len(os.listdir(resumed / "tb")) == 2 and len(os.listdir(workdir / "lr3e-03" / "tb")) == 1

  out = _run_sweep_cli("summarize", f"--workdir={workdir}")
  assert out.returncode == 0, out.stdout + out.stderr
  with open(workdir / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["lr3e-03", "lr1e-04"]  # the higher lr learns faster in 8 steps
  for r in rows:
    assert r["status"] == "finished" and r["step"] == "8" and r["steps"] == "8"
    assert 0 < float(r["best_eval_loss"]) < 9 and 0 < float(r["final_train_loss"]) < 9
    assert float(r["tokens_per_s"]) > 0 and r["best_eval_step"] in ("4", "8")
  assert float(rows[0]["best_eval_loss"]) < float(rows[1]["best_eval_loss"])
  assert float(rows[0]["optim.lr"]) == 3e-3
  md = (workdir / "summary.md").read_text()
  assert md.splitlines()[0].startswith("| run | optim.lr | status | step | steps | final train loss")
  assert "| lr3e-03 | 3e-03 | finished | 8 | 8 |" in md and md in out.stdout
  scalars, bad = metrics.read_metrics(str(resumed))
  records = [json.loads(l) for l in (resumed / metrics.METRICS_FILE).read_text().splitlines()]
  starts = [i for i, r in enumerate(records) if "start_step" in r]
  assert [records[i]["start_step"] for i in starts] == [0, 4] and bad == 0
  resumed_losses = [(r["step"], r["train/loss"]) for r in records[starts[1]:] if "train/loss" in r]
  assert [s for s, _ in resumed_losses] == [6, 8]
  assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8]
  assert scalars["train/loss"][2:] == resumed_losses  # the resumed run's values win
  assert (workdir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_without_matplotlib_still_writes_the_table(tmp_path, capsys, monkeypatch):
  for name, lr, evals in [("lr1e-03", 1e-3, [(10, 5.0), (20, 4.0)]), ("lr1e-02", 1e-2, [(10, 4.5)]),
                          ("lr1e-04", 1e-4, [])]:
    run_dir = tmp_path / name
    _write_metrics(run_dir, {"train/loss": [(10, 6.0), (20, 5.5)], "eval/loss": evals,
                             "perf/tokens_per_s": [(10, 100.0), (20, 300.0)]})
    formats.write_json_atomic(str(run_dir / sweep_summary.RUN_FILE), {
        "binding": {"optim.lr": lr}, "config": {"train": {"steps": 20}}, "status": "failed"})
  os.makedirs(tmp_path / "lr1e-03" / "checkpoints" / "20")
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
  rows = sweep_summary.summarize(str(tmp_path))
  assert [r["run"] for r in rows] == ["lr1e-03", "lr1e-02", "lr1e-04"]  # no eval yet: last
  assert [r["status"] for r in rows] == ["finished", "failed", "failed"]
  assert rows[0]["tokens_per_s"] == 200.0 and rows[0]["best_eval_step"] == 20
  out = capsys.readouterr().out
  assert "no loss_curves.png: matplotlib is not installed" in out
  assert not (tmp_path / "loss_curves.png").exists()
  assert (tmp_path / "summary.md").read_text().splitlines()[4] == \
      "| lr1e-04 | 1e-04 | failed | 20 | 20 | 5.5000 | - | - | - | 200 |"


def test_summary_shows_lm_eval_task_scores(tmp_path):
  """train.eval_tasks' scalars: the last tasks/average and each task's acc_norm (else acc) are
  columns of the summary; a run without them shows '-'."""
  _write_metrics(tmp_path / "a", {"train/loss": [(10, 4.0)], "eval/loss": [(10, 4.1)],
                                  "tasks/average": [(5, 0.3), (10, 0.4)],
                                  "tasks/piqa/acc": [(10, 0.6)], "tasks/piqa/acc_norm": [(10, 0.5)],
                                  "tasks/boolq/acc": [(10, 0.3)]})
  _write_metrics(tmp_path / "b", {"train/loss": [(10, 5.0)], "eval/loss": [(10, 5.1)]})
  rows = sweep_summary.summarize(str(tmp_path), plot_curves=False)
  assert rows[0]["tasks"] == {"tasks/average": 0.4, "tasks/boolq/acc": 0.3,
                              "tasks/piqa/acc_norm": 0.5}
  header, body = sweep_summary.table(rows)
  assert header[-3:] == ["tasks/average", "tasks/boolq/acc", "tasks/piqa/acc_norm"]
  assert body[1][-3:] == [None, None, None]
  md = (tmp_path / "summary.md").read_text().splitlines()
  assert md[2].endswith("| 0.4000 | 0.3000 | 0.5000 |") and md[3].endswith("| - | - | - |")
