"""The training loop: config -> checks -> mesh -> data -> state (fresh or restored) -> the
compiled step -> metrics and checkpoints. The step (program.py, shared with plan, bench and
import) is a pure function (state, batch) -> (state, metrics), compiled once ahead of time with
explicit shardings and the state donated; all I/O stays in the loop around it.
Rerunning the same run resumes from the workdir's latest complete checkpoint, bitwise. SIGTERM or
SIGINT saves and exits 0; kill -9, NaN, damaged checkpoints and full disks are handled as
docs/reliability.md says (the machinery lives in faults.py and checkpoint/manager.py).
The command is tinyllama_jax/train.py.
"""

import contextlib
import json
import os
import time

import jax
from absl import logging

from tinyllama_jax import config as config_lib, sharding
from tinyllama_jax.checkpoint import manager as checkpoint
from tinyllama_jax.data import pipeline
from tinyllama_jax.data import tokenizer as tokenizer_lib
from tinyllama_jax.inference import generate
from tinyllama_jax.params import flops_per_token, param_count
from tinyllama_jax.training import faults, init_from, metrics, program, report, task_eval

SAMPLE_PROMPT_TOKENS = 8  # a document's first tokens, as the end-of-run sample's prompt

# ----------------------------------------------------------------------------- the run


class Run:
  """Everything a training run holds between steps; `train()` drives it."""

  def __init__(self, cfg, workdir):
    self.cfg, self.workdir = cfg, workdir
    config_lib.validate(cfg)  # the mesh is built from checked sizes, then the batch is checked on it
    self.mesh = sharding.make_mesh(cfg.mesh)
    config_lib.validate(cfg, sharding.batch_devices(self.mesh), jax.process_count())
    self.program = program.build_program(cfg, self.mesh)
    faults.check_environment(workdir, self.program.abstract_state)
    t = cfg.train
    # One run per workdir, locked before anything in it is touched (the checkpointer removes
    # incomplete saves: a live run's); process 0 writes for all processes.
    self.lock = (faults.workdir_lock(workdir)
                 if jax.process_index() == 0 and "://" not in workdir else None)
    self.ckpt = None
    try:
      self.ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                          keep=t.keep_checkpoints, async_save=t.async_checkpoint)
      saved_cfg = self.ckpt.latest_config()
      if saved_cfg is not None:  # refuse another architecture before anything is written
        checkpoint.check_architecture(saved_cfg, cfg.model, workdir)
      elif t.init_from:  # and the init_from run's, before the compile
        init_from.source(cfg)
    except BaseException:
      self.release()
      raise

  def finished_step(self):
    """The step of the newest checkpoint that verifies, when it is at or past train.steps:
    nothing left to train. Read and checked as a resume reads it (a damaged final checkpoint is
    set aside and its steps are trained again), with nothing compiled."""
    step = self.ckpt.latest_step()
    if step is None or step < self.cfg.train.steps:
      return None
    found = self.ckpt.restore_latest(
        self.program.abstract_state,
        lambda meta: checkpoint.check_resume(meta, self.cfg, self.workdir))
    return found[0] if found is not None and found[0] >= self.cfg.train.steps else None

  def release(self):
    """Closes the checkpointer (orbax's writer thread ends before the process does: a run that
    stops on bad data says so in one line, not beside an orbax traceback), frees the lock."""
    try:
      if self.ckpt is not None:
        self.ckpt.close()
    finally:
      if self.lock is not None:
        self.lock.release()

  def initial_state(self, data_identity=None):
    """(state, data state or None, step of the checkpoint or None): the newest checkpoint that
    verifies, else a fresh init; never a fresh init over checkpoints that all fail to read.
    data_identity (data.pipeline.identity): refuse, or drop, a position saved for other data."""
    found = self.ckpt.restore_latest(
        self.program.abstract_state,
        lambda meta: checkpoint.check_resume(meta, self.cfg, self.workdir, data_identity))
    if found is None and self.cfg.train.init_from:
      return init_from.initial_state(self.program, self.cfg), None, None
    if found is None:
      return self.program.jit_init()(jax.random.key(self.cfg.seed)), None, None
    step, state, data_state, meta = found
    if self.cfg.train.init_from:
      logging.warning("train.init_from=%s is ignored: %s has checkpoints, resuming them",
                      self.cfg.train.init_from, self.workdir)
    logging.info("resuming from %s/checkpoints/%d", self.workdir, step)
    if not checkpoint.same_data(meta, data_identity):  # allowed by train.allow_data_change
      data_state = None
    return state, data_state, step


def _data_errors_as_one_line(fn):
  try:
    return fn()
  except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
    raise faults.data_error(e) from e


def load_tokenizer(cfg, workdir):
  """The run's tokenizer (None for synthetic data), trained and cached on first use; a fine-tune
  (train.init_from) of raw text or chat without data.tokenizer uses its init_from run's."""
  data = cfg.data
  if cfg.train.init_from and not data.tokenizer and data.source in ("chat", "stdlib", "text"):
    data = data.copy_and_resolve_references()
    own = os.path.join(workdir, tokenizer_lib.RUN_COPY)  # a resume needs no init_from run
    data.tokenizer = own if os.path.isfile(own) else init_from.tokenizer_path(cfg)
  tokenizer = _data_errors_as_one_line(lambda: pipeline.load_tokenizer(data, workdir))
  if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than "
                     f"model.vocab_size={cfg.model.vocab_size}: raise the model's vocab_size")
  return tokenizer


def make_iterator(cfg, split, batch_size, tokenizer):
  """This process's share of `batch_size` sequences a batch, from `split`."""
  return _data_errors_as_one_line(lambda: pipeline.make_iterator(
      cfg.data, split=split, seq_len=cfg.train.seq_len, batch_size=batch_size // jax.process_count(),
      seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      tokenizer=tokenizer, vocab_size=cfg.model.vocab_size))


def check_eval_split(cfg, tokenizer, batch_size):
  """Eval needs one row of seq_len + 1 tokens: found out before the compile, not after training."""
  if not cfg.train.eval_every:
    return
  try:
    make_iterator(cfg, "eval", batch_size, tokenizer).close()
  except ValueError as e:
    if isinstance(e.__cause__, OSError):  # files missing or unreadable: that line says so
      raise
    raise ValueError(f"cannot evaluate on this data's eval split ({e}): prepare it with a larger "
                     "--eval_fraction (data.eval_fraction for raw files), or pass "
                     "--config.train.eval_every=0 to train without eval") from e


def evaluate(eval_fn, params, cfg, tokenizer, batch_size, sharding_, on_batch=lambda: None):
  """The mean eval loss over train.eval_batches; on_batch() after each (the step watchdog's)."""
  it = make_iterator(cfg, "eval", batch_size, tokenizer)
  loss_sum, count = 0.0, 0.0
  try:
    for _ in range(cfg.train.eval_batches):
      batch = sharding.global_batch_array(next(it), sharding_)
      s, c = eval_fn(params, batch)
      loss_sum, count = loss_sum + float(s), count + float(c)
      on_batch()
  finally:
    it.close()
  return loss_sum / max(count, 1.0)


def greedy_sample(params, cfg_model, tokenizer, prompt, n_tokens):
  """A short greedy continuation through generate's KV-cached decoder (the model's own forward)."""
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  n_tokens = min(n_tokens, cfg_model.max_seq_len - len(ids))
  out = generate.generate(params, cfg_model, [ids], max_new_tokens=n_tokens,
                          eos_id=tokenizer.eos_id, n_valid=tokenizer.vocab_size)[0]
  return tokenizer.decode(ids[1:] + [t for t in out if t != tokenizer.eos_id])


def data_prompt(cfg, tokenizer, batch_size):
  """train.sample_prompt, else the first tokens of the first document of the eval split (the
  train split without eval) as text: a prompt in the run's own language."""
  if cfg.train.sample_prompt:
    return cfg.train.sample_prompt
  it = make_iterator(cfg, "eval" if cfg.train.eval_every else "train", batch_size, tokenizer)
  try:
    row = [int(t) for t in next(it)["inputs"][0]]
  finally:
    it.close()
  start = row.index(tokenizer.bos_id) + 1 if tokenizer.bos_id in row else 0
  ids = row[start:start + SAMPLE_PROMPT_TOKENS]
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids)


def sample_wanted(cfg, tokenizer):
  """Whether the run ends with a sample: train.sample_tokens asks for one, and a tokenizer can
  write it (synthetic data has none: said, not skipped silently)."""
  if cfg.train.sample_tokens and tokenizer is None:
    logging.warning("train.sample_tokens=%d: no sample, data.source=%r has no tokenizer to write "
                    "it with", cfg.train.sample_tokens, cfg.data.source)
  return bool(cfg.train.sample_tokens) and tokenizer is not None


def train(cfg, workdir, dry_run=False):
  """Runs (or resumes) training; returns the last logged metrics. SIGTERM/SIGINT end it early
  after a checkpoint (`preempted` in the result); faults.py says what else it survives. A run
  already at train.steps says so and returns {"step", "finished": True}, nothing compiled."""
  start = time.monotonic()
  run = Run(cfg, workdir)
  try:
    with jax.set_mesh(run.mesh):  # kernels run per device under shard_map on this mesh
      finished = None if dry_run else run.finished_step()
      result = ({"step": finished, "finished": True} if finished is not None
                else _train(run, cfg, workdir, dry_run))
  finally:
    run.release()
  if dry_run or jax.process_index() != 0:
    return result
  if finished is not None:
    report.log_lines(report.finished_lines(workdir, finished, cfg.train.steps))
  else:
    report.log_lines(report.closing_lines(workdir, result, cfg.train.steps,
                                          time.monotonic() - start))
  return result


def _log_model(run, cfg):
  """Logs the model's size and the step's shape; returns the parameter count."""
  n_params = param_count(cfg.model)
  logging.info("model: %s parameters (%s without the input embedding); mesh %s; %d x %d "
               "sequences per step (accumulation x micro-batch)", f"{n_params:,}",
               f"{param_count(cfg.model, with_embedding=False):,}", dict(run.mesh.shape),
               run.program.accum, run.program.micro_batch)
  return n_params


def _compile_step(prog):
  """(the compiled train step, XLA's per-device memory plan), the plan logged."""
  logging.info("compiling the train step (first compile takes a while)...")
  compiled = prog.compile_step()
  memory = program.memory_report(compiled)
  if memory:
    logging.info("per-device memory plan (XLA): %s",
                 {k: f"{v / 2**30:.2f} GiB" for k, v in memory.items()})
  return compiled, memory


def _eval_at(step, eval_fn, params, cfg, tokenizer, prog, *, save, on_batch):
  """The eval loss at `step`. `save`: saves checkpoint `step` before a failing eval raises (the
  steps since the last checkpoint stay trained); None when `step` is already saved."""
  logging.info("evaluating on %d held-out batches...", cfg.train.eval_batches)
  try:
    loss = evaluate(eval_fn, params, cfg, tokenizer, prog.micro_batch, prog.eval_sharding,
                    on_batch)
  except Exception:
    if save is not None:
      logging.error("eval failed at step %d: saving checkpoint %d first", step, step)
      save(step)
    raise
  logging.info("step %d: eval loss %.4f", step, loss)
  return loss


def _log_sample(params, cfg, tokenizer, writer, step, batch_size):
  prompt = data_prompt(cfg, tokenizer, batch_size)
  sample = greedy_sample(params, cfg.model, tokenizer, prompt, cfg.train.sample_tokens)
  logging.info("sample (greedy): %r", sample)
  writer.text(step, "sample", sample)


def _throughput(cfg):
  t = cfg.train
  return metrics.Throughput(
      tokens_per_step=t.global_batch * t.seq_len, flops_per_token=flops_per_token(cfg.model, t.seq_len),
      n_devices=jax.device_count(), peak_flops=metrics.peak_flops_per_device(cfg.peak_flops),
      total_steps=t.steps)


def _write_config(cfg, workdir):
  """WORKDIR/config.json, whole or not at all: a failed write leaves the previous one."""
  path = os.path.join(workdir, "config.json")
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(config_lib.to_json(cfg))
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise faults.WriteFailed(path, e) from e


def _train(run, cfg, workdir, dry_run):
  t, prog = cfg.train, run.program
  n_params = _log_model(run, cfg)
  if not dry_run:  # missing, unreadable or too little data fails now, not after the compile
    tokenizer = load_tokenizer(cfg, workdir)
    check_eval_split(cfg, tokenizer, prog.micro_batch)
    data_identity = _data_errors_as_one_line(lambda: pipeline.identity(cfg.data))
    train_it = make_iterator(cfg, "train", t.global_batch, tokenizer)
    tasks = task_eval.TaskEval(cfg, tokenizer, run.mesh)  # names and lm-eval checked here
  compiled, memory = _compile_step(prog)
  if dry_run:
    print(json.dumps({"params": n_params, "mesh": dict(run.mesh.shape), "memory": memory}))
    return {}

  try:
    state, data_state, saved_step = run.initial_state(data_identity)
    if data_state:  # an imported model's checkpoint has none: the stream starts fresh
      train_it.set_state(data_state)
    steps = _Steps(run, compiled, train_it, tokenizer, data_identity, tasks, state, saved_step)
    steps.train()
  finally:
    train_it.close()
  return dict(steps.last, step=steps.step, checkpoint_step=steps.saved_step,
              params=steps.state["params"], preempted=steps.preempted)


class _Steps:
  """The steps of one run, with their metrics, checkpoints and evals, until train.steps or a
  signal. A file that cannot be written (metrics, events, the log) stops the run (exit 3), on
  every process at the same step (_local); a step that never completes is the step watchdog's
  (faults.StepWatchdog)."""

  def __init__(self, run, compiled, train_it, tokenizer, data_identity, tasks, state, saved_step):
    self.run, self.cfg, self.t = run, run.cfg, run.cfg.train
    self.compiled, self.train_it, self.tokenizer, self.tasks = compiled, train_it, tokenizer, tasks
    self.data_identity, self.state, self.saved_step = data_identity, state, saved_step
    self.step = int(state["step"])
    self.eval_fn = run.program.jit_eval()
    self.throughput = _throughput(self.cfg)
    self.nonfinite = faults.NonFiniteGuard(self.t.nan_policy, self.t.max_nan_skips)
    self.last, self.preempted = {}, False
    self.writer = self.console = self.watchdog = None
    self.fault = None  # (WriteFailed, step): a write of this process's that failed, held (_local)

  def train(self):
    try:
      self.writer = metrics.Writer(self.run.workdir, start_step=self.step, cfg=self.cfg)
      with faults.ConsoleWatch() as self.console, \
          faults.StepWatchdog(self.t.hang_timeout_s) as self.watchdog:
        if jax.process_index() == 0:
          self._local(_write_config, self.cfg, self.run.workdir)
        self._loop()
        if self.fault is not None:  # held past the last step's agreement: no one waits now
          raise self.fault[0]
        self.console.check()
      self.writer.close()
    except faults.WriteFailed as e:
      self.run.ckpt.wait()  # a save in flight is committed (or is the error) before the line
      step = self.fault[1] if self.fault and self.fault[0] is e else self.step
      raise e.with_checkpoints(step, self.run.ckpt.all_steps()) from e
    finally:
      if self.writer is not None:
        with contextlib.suppress(faults.WriteFailed):  # the error already raised is the one told
          self.writer.close()

  def _local(self, write, *args):
    """write(*args), a write to this process's own files (config.json, metrics, events, the
    log). Alone, a failure raises at once. With several processes the first failure is held
    until the next step's agreement (Preemption.requested), where every process stops at the
    same step: one leaving alone would leave the others blocked in the next collective until
    jax's coordination service aborts them (SIGABRT, no line) or the step watchdog ends them."""
    try:
      write(*args)
    except faults.WriteFailed as e:
      if jax.process_count() == 1:
        raise
      if self.fault is None:
        self.fault = (e, self.step)
        logging.error("%s at step %d: the run stops on every process after the next step",
                      e, self.step)

  def _stop_together(self, faulted):
    """Every process ends here, at the same step, once any holds a failed write (_local)."""
    if self.fault is not None:
      raise self.fault[0]  # train() adds the step it failed at and the checkpoints
    with self.watchdog.paused():
      self.run.ckpt.wait()
    checkpoints = self.run.ckpt.all_steps()
    raise faults.FaultError(
        f"process {faulted[0]} of {jax.process_count()} could not write its files (its log "
        f"says which), so every process stops at step {self.step}: fix that disk; "
        f"{faults.checkpoints_note(checkpoints)}")

  def save(self, step):  # of the loop's current state
    self.nonfinite.check(self.saved_step)  # a stopped run keeps its last good checkpoint latest
    with self.watchdog.paused():
      self.run.ckpt.save(step, self.state, self.train_it.get_state(), self.cfg,
                         self.data_identity,
                         tokenizer_sha256=self.tokenizer.sha256 if self.tokenizer else None)
    self.throughput.start(step)
    self.saved_step = step

  def _loop(self):
    t, prog = self.t, self.run.program
    self.throughput.start(self.step)
    previous = None
    with faults.Preemption(t.grace_period_s) as preemption:
      while self.step < t.steps:
        local = next(self.train_it)
        local = {k: v.reshape(prog.accum, -1, *v.shape[1:]) for k, v in local.items()}
        batch = sharding.global_batch_array(local, prog.batch_sharding)
        self.state, step_metrics = self.compiled(self.state, batch)
        # The host runs at most one step ahead of the device (it waits for the previous step,
        # with this one queued, so the device never idles): a signal stops the run at the
        # next step, not log_every steps later, and the watchdog's beat means a finished step.
        if previous is not None:
          previous.block_until_ready()
        previous = step_metrics["train/loss"]
        self.step += 1
        self.watchdog.beat()
        self.nonfinite.record(self.step, step_metrics)
        self.preempted, faulted = preemption.requested(fault=self.fault is not None)
        if faulted:
          self._stop_together(faulted)
        if self.step % t.log_every == 0 or self.step == t.steps:
          self._log(step_metrics)
        # The checkpoint comes before the eval: a failing eval never costs trained steps.
        if ((t.checkpoint_every and self.step % t.checkpoint_every == 0) or
            self.step == t.steps or self.preempted):
          self.save(self.step)
        if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps) and \
            not self.preempted:
          self._eval()
        if self.tasks.due(self.step) and not self.preempted:
          with self.watchdog.paused():  # a benchmark pass is no step and may take a while
            self._local(self.writer.scalars, self.step, self.tasks.run(self.state["params"]))
          self.throughput.start(self.step)
        if self.preempted:
          with self.watchdog.paused():
            self.run.ckpt.wait()
          logging.warning("preempted: checkpoint %d written %.1f s after the signal; exiting",
                          self.step, preemption.seconds_since_signal())
          break
      with self.watchdog.paused():
        self.run.ckpt.wait()
    if (sample_wanted(self.cfg, self.tokenizer) and jax.process_index() == 0 and
        not self.preempted):
      with self.watchdog.paused():
        _log_sample(self.state["params"], self.cfg, self.tokenizer, self.writer, self.step,
                    prog.micro_batch)

  def _log(self, step_metrics):
    self.nonfinite.check(self.saved_step)
    self.last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    self.last.update(self.throughput.report(self.step))
    metrics.console_line(self.step, self.t.steps, self.last)
    self._local(self.console.check)
    self._local(self.writer.scalars, self.step, self.last)

  def _eval(self):
    save = self.save if self.saved_step != self.step else None
    self.last["eval/loss"] = _eval_at(self.step, self.eval_fn, self.state["params"], self.cfg,
                                      self.tokenizer, self.run.program, save=save,
                                      on_batch=self.watchdog.beat)
    self._local(self.writer.scalars, self.step, {"eval/loss": self.last["eval/loss"]})
    self.throughput.start(self.step)
