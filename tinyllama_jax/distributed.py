"""Multi-process startup: jax.distributed from flags or the environment, before any JAX work.

Who says how many processes there are, first match wins:
  1. flags: --coordinator=host:port --num_processes=N --process_id=i (any launcher, tests);
  2. JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID in the environment;
  3. SLURM (srun): SLURM_PROCID, SLURM_NTASKS, the first host of SLURM_STEP_NODELIST (port from
     the job id, or --coordinator_port); several tasks on one node each take one local GPU;
  4. a multi-host TPU VM slice: jax's own detection (`jax.distributed.initialize()` with no args);
  5. otherwise one process, nothing to initialize.
--distributed=jax hands detection to jax (OpenMPI, Kubernetes, ...); --distributed=off forces (5).
Multi-process CPU runs use gloo collectives (XLA's CPU client has no other cross-process ones).
"""

import os
import re

import jax
from absl import flags, logging


def expand_nodelist(nodelist):
  """SLURM's compressed host list -> names: 'gpu[01-03,7],cpu5' -> gpu01 gpu02 gpu03 gpu7 cpu5."""
  hosts = []
  for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
    if plain:
      hosts.append(plain)
      continue
    for part in ranges.split(","):
      lo, _, hi = part.partition("-")
      for n in range(int(lo), int(hi or lo) + 1):
        hosts.append(f"{prefix}{n:0{len(lo)}d}")
  return hosts


def slurm_port(job_id):
  """A port in [61440, 65535] that all tasks of a job agree on without talking to each other."""
  return 61440 + int(job_id) % 4096


def plan_from_env(env, port=0):
  """(kwargs for jax.distributed.initialize, source) from environment variables, or (None, None)."""
  if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
            "num_processes": int(env["JAX_NUM_PROCESSES"]),
            "process_id": int(env.get("JAX_PROCESS_ID", 0))}, "JAX_* environment"
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
      raise ValueError("SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST: start the tasks with srun")
    kwargs = {"coordinator_address": f"{expand_nodelist(nodelist)[0]}:"
                                     f"{port or slurm_port(env.get('SLURM_JOB_ID', 0))}",
              "num_processes": int(env["SLURM_NTASKS"]), "process_id": int(env["SLURM_PROCID"])}
    # One task per GPU (--ntasks-per-node=GPUS): each process drives the GPU of its local rank,
    # unless the scheduler already narrowed CUDA_VISIBLE_DEVICES to it.
    per_node = int(re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE", "1")).group())
    if per_node > 1 and "SLURM_LOCALID" in env and "," in env.get("CUDA_VISIBLE_DEVICES", ","):
      kwargs["local_device_ids"] = [int(env["SLURM_LOCALID"])]
    return kwargs, "SLURM"
  hostnames = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hostnames or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return {}, "TPU VM"  # jax reads the slice's topology itself
  return None, None


def plan(mode, coordinator, num_processes, process_id, env, port=0):
  """(kwargs for jax.distributed.initialize, source) from the flags, else the environment, or
  (None, None) for one process. --num_processes / --process_id without --coordinator only fill
  in what a detected cluster leaves (jax's detection, SLURM, TPU); alone they are an error, not a
  quiet single-process run."""
  if coordinator is not None:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator needs --num_processes and --process_id too")
    return {"coordinator_address": coordinator, "num_processes": num_processes,
            "process_id": process_id}, "flags"
  kwargs, source = ({}, "jax's cluster detection") if mode == "jax" else plan_from_env(env, port)
  given = {k: v for k, v in (("num_processes", num_processes), ("process_id", process_id))
           if v is not None}
  if kwargs is None and given and num_processes != 1:
    raise ValueError("--num_processes / --process_id need --coordinator=host:port of process 0 "
                     "(or a SLURM, TPU or JAX_COORDINATOR_ADDRESS environment, or "
                     "--distributed=jax): without one each process would train alone")
  return (None, None) if kwargs is None else ({**kwargs, **given}, source)


def initialize():
  """Call once, first thing in main(): joins this process to the run, or does nothing for one.
  Reads the flags cli.define_distributed_flags defines."""
  f = flags.FLAGS
  if f.distributed == "off":
    return
  kwargs, source = plan(f.distributed, f.coordinator, f.num_processes, f.process_id, os.environ,
                        f.coordinator_port)
  if kwargs is None:
    return
  if kwargs.get("num_processes") == 1:
    return
  # Harmless on GPU/TPU (it only configures the CPU client), required for CPU-only runs.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize from %s: %s", source, kwargs)
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def apply_xla_flags(extra, environ=os.environ):
  """XLA_FLAGS += `extra` (train.xla_flags), skipping any flag the environment already names.
  XLA reads the variable once, when the backend starts: call this before any device work."""
  current = environ.get("XLA_FLAGS", "")
  named = {f.split("=", 1)[0] for f in current.split()}
  add = [f for f in extra.split() if f.split("=", 1)[0] not in named]
  if add:
    environ["XLA_FLAGS"] = " ".join([current, *add]).strip()
  return environ.get("XLA_FLAGS", "")
