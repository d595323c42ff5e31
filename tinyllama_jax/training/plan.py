"""Memory planner: what one device holds for a config and mesh, before renting the devices.

    python -m tinyllama_jax.plan --config=configs/1b.py --devices=16 --device_memory_gib=40
    python -m tinyllama_jax.plan --config=configs/1b.py --devices=1 --device_memory_gib=24 \
        --remat=none,full,save_dots

Per remat policy: parameters, gradients and optimizer state per device (exact, from the
shardings), activations and the peak. Where the peak comes from (--source):
  xla       XLA's memory analysis of the real train step compiled for the devices at hand:
            arguments + outputs + temporaries - donated aliases. On a GPU/TPU with --devices
            present this is the number to trust (it matched the measured H200 peak to 0.1%).
            On CPU it compiles for fake devices with two substitutions (bf16 compute; attention
            as a stand-in with flash attention's memory profile, as cuDNN/Pallas do not compile
            there), but XLA:CPU keeps fp32 copies and fuses less: 80 GiB for 1b at 8 x 2048
            where the H200 measured 38.3. On CPU it is an upper bound, not a plan.
  analytic  bytes per token per layer by remat policy (below), calibrated on the H200's measured
            peaks (bench/NOTES.md "Step"); within a few % at remat none.
  auto      (default) xla on an accelerator with enough devices, else analytic.
"""

import contextlib
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from absl import logging

from tinyllama_jax import config as config_lib, kernels, params, sharding
from tinyllama_jax.training import program

GIB = 2**30
# A CUDA context, cuDNN/cuBLAS handles and workspaces that no XLA analysis sees.
RUNTIME_RESERVE_GIB = 1.0


# ----------------------------------------------------------------------------- attention stand-in


@jax.custom_vjp
def flash_stand_in(q_BTHD, k_BTKD, v_BTKD):
  return _stand_in_fwd(q_BTHD, k_BTKD, v_BTKD)[0]


def _stand_in_fwd(q_BTHD, k_BTKD, v_BTKD):
  """Costs what flash attention stores, computes nothing meaningful (it is only compiled)."""
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  kv_B1HD = jnp.repeat(jnp.mean(k_BTKD + v_BTKD, axis=1, keepdims=True), H // K, axis=2)
  o_BTHD = q_BTHD * kv_B1HD
  lse_BTH = jnp.sum(q_BTHD.astype(jnp.float32), axis=-1)  # flash's fp32 row statistics
  return o_BTHD, (q_BTHD, k_BTKD, v_BTKD, o_BTHD, lse_BTH)


def _stand_in_bwd(res, g_BTHD):
  q_BTHD, k_BTKD, v_BTKD, o_BTHD, lse_BTH = res
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  dq = (g_BTHD * o_BTHD + lse_BTH[..., None].astype(q_BTHD.dtype) * q_BTHD)
  g_BTKD = g_BTHD.reshape(B, T, K, H // K, D).sum(axis=3)
  return dq, g_BTKD * v_BTKD, g_BTKD * k_BTKD


flash_stand_in.defvjp(_stand_in_fwd, _stand_in_bwd)


def attention_stand_in(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True):
  del segment_ids_BT, causal
  return flash_stand_in(q_BTHD, k_BTKD, v_BTKD)


def planning_config(cfg, remat):
  """The config as an accelerator would run it, compiled on CPU (see the module docstring)."""
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    m = cfg.model
    m.remat = remat
    if m.compute_dtype == "auto":
      m.compute_dtype = "bfloat16"
    m.kernels.attention = "plan_flash"
    for op in ("rms_norm", "rope", "swiglu"):  # Pallas ones are row-local: same bytes as XLA's
      m.kernels[op] = "xla"
  return cfg


@contextlib.contextmanager
def _stand_in_registered():
  """The stand-in as an attention backend while plan traces, then gone: a name no run chooses
  (a process that plans and then lists or validates configs must not see it)."""
  kernels.register("attention", "plan_flash", "tinyllama_jax.training.plan:attention_stand_in")
  try:
    yield
  finally:
    kernels.unregister("attention", "plan_flash")


# ----------------------------------------------------------------------------- analytic model


def activation_elements_per_token_layer(m, remat):
  """bf16 elements one layer keeps per token for the backward, by policy (model.block's tags).
  'none' was fitted to the H200 (1b, 8 x 2048: 38.3 GiB measured, 16 x 2048: 62.1): XLA keeps
  the residual stream twice (x, x + attn), q, k, v, o, flash's fp32 row statistics, gate, up
  and silu(gate) * up, and recomputes the norms in the backward (25,664 elements at 1b)."""
  D, H, K, Dh, F = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim
  q, kv, attn, proj, mlp = H * Dh, 2 * K * Dh, H * Dh, D, 2 * F
  return {
      "none": 2 * D + q + kv + attn + 2 * H + mlp + F,
      "full": D,  # the layer's input only; the rest is recomputed layer by layer
      "save_dots": D + q + kv + proj + mlp + D,
      "save_attn": D + attn,
      "save_qkv_attn": D + q + kv + attn,
      "save_all_but_mlp": D + q + kv + attn + proj,
  }[remat]


@dataclasses.dataclass
class Plan:
  remat: str
  source: str  # "xla" or "analytic"
  params_gib: float
  grads_gib: float
  opt_state_gib: float
  activations_gib: float  # activations + workspace (XLA: temporaries less the gradients)
  peak_gib: float
  xla: dict | None = None

  def fits(self, memory_gib):
    return self.peak_gib + RUNTIME_RESERVE_GIB <= memory_gib


def analytic_activations_gib(cfg, micro_per_device, remat):
  m, T = cfg.model, cfg.train.seq_len
  tokens = micro_per_device * T
  per_layer = activation_elements_per_token_layer(m, remat) * 2 * tokens
  full_layer = activation_elements_per_token_layer(m, "none") * 2 * tokens
  recompute = 0 if remat == "none" else full_layer  # one layer rebuilt at a time in the backward
  # fp32 logits and their gradient; the chunked kernel holds one 4096-token chunk's at a time
  # (bench/NOTES.md kernels: 4.03 GiB vs 0.87 GiB of temporaries at 16k tokens).
  ce_tokens = tokens if cfg.model.kernels.cross_entropy == "xla" else min(tokens, 4096)
  logits = 2 * ce_tokens * m.vocab_size * 4
  return (m.n_layers * per_layer + recompute + logits + 2 * tokens * m.d_model * 4) / GIB


def state_bytes(tree):
  """Bytes one device holds of a tree of sharded abstract arrays."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


# ----------------------------------------------------------------------------- the planner


def planning_program(cfg, mesh, remat, stand_ins=True):
  """(the planned config, its program) under `remat`; stand_ins: as planning_config has it."""
  if stand_ins:
    cfg = planning_config(cfg, remat)
  else:
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.model.remat = remat
  # One micro-batch a step: accumulation repeats it, the peak is one micro-batch's.
  return cfg, program.build_program(cfg, mesh, accum=1)


def plan_one(cfg, mesh, remat, use_xla, stand_ins=True):
  cfg, prog = planning_program(cfg, mesh, remat, stand_ins)
  state = prog.abstract_state
  params_b = state_bytes(state["params"])
  opt_b = state_bytes(state["opt_state"])
  micro = cfg.train.micro_batch_per_device
  fixed = dict(params_gib=params_b / GIB, grads_gib=params_b / GIB, opt_state_gib=opt_b / GIB)
  if use_xla:
    try:
      t0 = time.perf_counter()
      compiled = prog.lower_step().compile()
      report = program.memory_report(compiled)
      logging.info("remat=%s: compiled for %d CPU devices in %.0f s", remat, mesh.size,
                   time.perf_counter() - t0)
      if report:
        temp = report["temp_size_in_bytes"]
        return Plan(remat, f"xla-{mesh.devices.flat[0].platform}",
                    activations_gib=max(temp - params_b, 0) / GIB,
                    peak_gib=report["peak_estimate_bytes"] / GIB, xla=report, **fixed)
    except Exception as e:  # noqa: BLE001  the analytic model still answers
      logging.warning("remat=%s: XLA compile failed (%s); analytic model only", remat,
                      str(e).splitlines()[0][:300])
  act = analytic_activations_gib(cfg, micro, remat)
  # The step's arguments (state + batch), its gradients, activations; one layer's bf16 weights
  # gathered at a time (FSDP) and twice that in flight.
  layer_w = (params.param_count(cfg.model, with_embedding=False) / cfg.model.n_layers) * 2 * 2
  peak = (params_b * 2 + opt_b) / GIB + act + layer_w / GIB
  return Plan(remat, "analytic", activations_gib=act, peak_gib=peak, **fixed)


def plan(cfg, n_devices, remats, source="auto"):
  """(mesh, [Plan per remat policy]). The mesh is over the accelerators when there are enough of
  them, else over CPU devices (shardings, and so the state's bytes, are the same either way).
  A config that train would refuse on this mesh is refused here too (config.validate)."""
  config_lib.validate(cfg)
  accel = [d for d in jax.devices() if d.platform != "cpu"]
  on_accel = len(accel) >= n_devices
  devices = accel if on_accel else jax.devices("cpu")
  if len(devices) < n_devices:
    raise ValueError(f"--devices={n_devices} needs that many CPU devices, {len(devices)} exist: "
                     "run plan as its own process (it sets jax_num_cpu_devices at start-up)")
  mesh = sharding.make_mesh(cfg.mesh, devices=devices[:n_devices])
  config_lib.validate(cfg, sharding.batch_devices(mesh))
  use_xla = source == "xla" or (source == "auto" and on_accel)
  with _stand_in_registered() if not on_accel else contextlib.nullcontext():
    return mesh, [plan_one(cfg, mesh, r, use_xla, stand_ins=not on_accel) for r in remats]


def format_table(cfg, mesh, plans, memory_gib):
  T, micro = cfg.train.seq_len, cfg.train.micro_batch_per_device
  lines = [f"{params.param_count(cfg.model):,} parameters; mesh {dict(mesh.shape)}; "
           f"{micro} x {T} tokens per device; fp32 params, grads and Adam moments; bf16 compute",
           f"{'remat':<18}{'source':>9}{'params':>8}{'grads':>7}{'adam':>7}{'activ.':>8}"
           f"{'peak':>7}   fits {memory_gib:g} GiB (+{RUNTIME_RESERVE_GIB:g} runtime)?"]
  for p in plans:
    verdict = "yes" if p.fits(memory_gib) else "NO"
    lines.append(f"{p.remat:<18}{p.source:>9}{p.params_gib:8.2f}{p.grads_gib:7.2f}"
                 f"{p.opt_state_gib:7.2f}{p.activations_gib:8.2f}{p.peak_gib:7.2f}   {verdict}"
                 f" ({memory_gib - p.peak_gib - RUNTIME_RESERVE_GIB:+.1f} GiB)")
  lines.append("GiB per device. activ. = XLA's temporaries less the gradients (activations, "
               "gathered weights, workspace); peak = arguments + outputs + temporaries - donated.")
  return "\n".join(lines)
