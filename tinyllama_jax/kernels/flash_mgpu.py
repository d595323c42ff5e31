"""Flash attention for Hopper in Pallas Mosaic GPU (wgmma, TMA, mbarriers, warp groups): forward.

Same contract as `attention.attention_xla` for one document a row: q_BTHD, k_BTKD, v_BTKD bf16
(or f16), H % K == 0, causal or not; output in q's dtype. Packed documents (segment ids) are
refused: `attention=pallas` takes them.

One CTA computes 2 * block_q query rows of one (row, query head) with three warp groups:
- two compute warp groups, block_q rows each: S = Q K^T by wgmma (Q in SMEM, K^T a transposed
  SMEM view), online softmax in registers in the log2 domain (the 1/sqrt(D) scale rides on the
  exp2's FMA), then O += P V by wgmma with P straight from registers into the accumulator;
- one memory warp group streaming K/V tiles of block_kv keys by TMA into a ring of `steps` SMEM
  slots; per slot a "loaded" barrier (TMA bytes) and a "consumed" one (both compute groups).
- A schedule barrier ping-pongs the compute groups (FlashAttention-3): one runs its softmax while
  the other's wgmmas hold the tensor cores. Group 1 starts half a step late, group 0 ends so.
- GQA without repeating K/V: the CTA for query head h reads kv head h // G; the G CTAs of a kv
  head are adjacent in the launch order (heads on the fastest grid axis), so they share K/V in L2.
- Causality: a group visits only key blocks at or below its diagonal, unmasked below it and with
  the iota mask on the (at most two) diagonal blocks. The CTA's memory group fetches the key
  blocks of its later group; the earlier group releases those it skips, so slots stay in phase.
  The heaviest query tiles launch first (the tile axis is the slowest, reversed).
- The log-sum-exp (log2 domain, [B, H, T] fp32) is kept for the backward.

Backward (MgpuConfig.backward): 'mgpu', the Mosaic GPU dQ and dK/dV kernels of flash_mgpu_bwd
(GQA's sum over a kv head's G query heads inside the dK/dV kernel), or 'triton', the Pallas
Triton kernels of attention=pallas; both take this forward's output and log-sum-exp.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from tinyllama_jax.kernels import _mgpu, flash_attention, flash_mgpu_bwd

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
  """Forward: block_q query rows per compute warp group (64: one wgmma M tile; a CTA holds 2x),
  block_kv keys per streamed tile, steps K/V tiles in flight (SMEM ring slots), pingpong the
  two groups' schedule barrier. Backward 'mgpu' (flash_mgpu_bwd): the dQ kernel streams
  bwd_block_kv keys, the dK/dV kernel bwd_block_q query rows, bwd_steps in flight; 'triton':
  the Pallas Triton kernels of attention=pallas."""
  block_q: int = 64
  block_kv: int = 128
  steps: int = 2
  pingpong: bool = True
  backward: str = "mgpu"
  bwd_block_kv: int = 64
  bwd_block_q: int = 64
  bwd_steps: int = 2


# d64: 128-key tiles, 4 in flight (K+V ring 128 KiB); d128: 128-key tiles, 2 in flight (128 KiB;
# 3 exceed the 227 KiB of SMEM). The d64 backward's dK/dV takes 128 query rows a tile: measured
# best on an H200 (2026-12-02: fwd+bwd 1.582 ms vs 1.636 with 64 rows, cuDNN 1.602, B8 T2048 32/4).
_DEFAULTS = {64: MgpuConfig(steps=4, bwd_block_q=128), 128: MgpuConfig(steps=2)}


def default_config(head_dim):
  return _DEFAULTS.get(head_dim, MgpuConfig())


def supports(seq_len=None, head_dim=None, dtype=None):
  """Whether attention=auto may pick this backend for a call of these (None: not known): the
  limits _check enforces, asked without raising."""
  D = head_dim or 64
  q = jax.ShapeDtypeStruct((1, seq_len or 128, 1, D), dtype or jnp.bfloat16)
  try:
    _check(q, q, q, None, default_config(D))
  except ValueError:
    return False
  return True


def _check(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, cfg):
  B, T, H, D = q_BTHD.shape
  if segment_ids_BT is not None:
    raise ValueError("attention 'mgpu' takes no segment ids (packed documents); "
                     "use --config.model.kernels.attention=pallas")
  if k_BTKD.shape != v_BTKD.shape or k_BTKD.shape[:2] != (B, T) or k_BTKD.shape[3] != D:
    raise ValueError(f"attention 'mgpu': k {k_BTKD.shape} and v {v_BTKD.shape} must be "
                     f"[B={B}, T={T}, kv heads, D={D}] like q {q_BTHD.shape}")
  if H % k_BTKD.shape[2]:
    raise ValueError(f"attention 'mgpu': query heads ({H}) must be a multiple of kv heads "
                     f"({k_BTKD.shape[2]})")
  if D not in (64, 128):
    raise ValueError(f"attention 'mgpu' needs head dim 64 or 128, got {D}; "
                     "use --config.model.kernels.attention=pallas")
  if not all(x.dtype == q_BTHD.dtype for x in (k_BTKD, v_BTKD)) or q_BTHD.dtype not in (
      jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention 'mgpu' needs bf16 or f16 q, k, v (got {q_BTHD.dtype}, "
                     f"{k_BTKD.dtype}, {v_BTKD.dtype}); use attention=pallas for fp32")
  tiles = (cfg.block_kv, cfg.bwd_block_kv, cfg.bwd_block_q)
  if (cfg.block_q != 64 or any(t % 64 or t > 128 for t in tiles)
      or min(cfg.steps, cfg.bwd_steps) < 1 or cfg.backward not in ("mgpu", "triton")):
    raise ValueError(f"MgpuConfig needs block_q 64, the other tiles 64 or 128, steps >= 1 and "
                     f"backward 'mgpu' or 'triton': {cfg}")
  if T % 128:
    raise ValueError(f"attention 'mgpu' needs the sequence length ({T}) to be a multiple of "
                     "128; use attention=pallas for this length")


def _fwd_step_fn(cfg, qo_smem, k_smem, v_smem, k_loaded, v_loaded, k_free, v_free, schedule,
                 sync, q0, n_steps, scale2, dtype):
  """One key block of a compute group's online softmax: step(j, (acc, m, l), masked)."""
  bq, bk, S = cfg.block_q, cfg.block_kv, cfg.steps

  def step(j, carry, masked):
    acc, m, l = carry
    slot = lax.rem(j, jnp.int32(S))

    def qk(s_ref):
      plgpu.wgmma(s_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
      sync()  # the other group's softmax overlaps this wgmma
      return s_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
    plgpu.barrier_arrive(k_free.at[slot])
    if masked:
      rows = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
      cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
      s = jnp.where(rows + q0 >= cols + j * bk, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1) * scale2)
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    # The whole softmax before the barriers below (jax's FA3 example measured this order
    # faster at head dims <= 128): the compiler may not sink work past the schedule point.
    acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p.astype(dtype)))
    if cfg.pingpong:
      plgpu.barrier_arrive(schedule)  # softmax done: the other group may issue its wgmma
    plgpu.barrier_wait(v_loaded.at[slot])
    if cfg.pingpong:
      plgpu.barrier_wait(schedule)

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p, v_smem.at[slot])
      nxt = j + 1
      pl.when(nxt < n_steps)(
          lambda: plgpu.barrier_wait(k_loaded.at[lax.rem(nxt, jnp.int32(S))]))

    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_free.at[slot])
    return acc, m_new, l

  return step


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem2, k_smem, v_smem, lse_smem2,
                    k_loaded, v_loaded, q_loaded, k_free, v_free, schedule, *, cfg, causal, G,
                    n_tiles):
  bq, bk, S = cfg.block_q, cfg.block_kv, cfg.steps
  T, D = q_ref.shape[1], q_ref.shape[3]
  dtype = q_ref.dtype
  scale2 = D ** -0.5 * _LOG2E
  b, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
  tile = lax.axis_index("q")
  if causal:
    tile = n_tiles - 1 - tile  # heaviest tiles first
  cta_q0 = tile * (2 * bq)
  # Key blocks the CTA's later group needs: what the memory group fetches.
  cta_steps = lax.div(cta_q0 + 2 * bq + bk - 1, jnp.int32(bk)) if causal else T // bk

  def sync():
    if cfg.pingpong:
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

  @pl.when(wg < 2)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    q0 = cta_q0 + wg * bq
    qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], qo_smem, q_loaded.at[wg])
    n_steps = lax.div(q0 + bq + bk - 1, jnp.int32(bk)) if causal else T // bk
    n_full = lax.div(q0, jnp.int32(bk)) if causal else n_steps  # blocks wholly below the diagonal
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    carry = (plgpu.layout_cast(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA),
             plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout),
             plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout))
    plgpu.barrier_wait(q_loaded.at[wg])
    # Each step waits for the next step's K while its PV wgmma runs; the first K here.
    pl.when(n_steps > 0)(lambda: plgpu.barrier_wait(k_loaded.at[0]))
    pl.when(wg == 1)(sync)

    step = _fwd_step_fn(cfg, qo_smem, k_smem, v_smem, k_loaded, v_loaded, k_free, v_free,
                        schedule, sync, q0, n_steps, scale2, dtype)
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    if causal:
      carry = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)

      def release(j, _):  # blocks only the later group needs: free them, keep the ping-pong
        slot = lax.rem(j, jnp.int32(S))
        # Waited for, though unused: every group then sees every phase of the loaded barriers.
        plgpu.barrier_wait(k_loaded.at[slot])
        plgpu.barrier_wait(v_loaded.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        sync()
        sync()

      lax.fori_loop(n_steps, cta_steps, release, None)
    pl.when(wg == 0)(sync)
    acc, m, l = carry
    qo_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
    lse_smem[...] = m + jnp.log2(l)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(q0, bq), h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q0, bq)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    kv_h = lax.div(h, jnp.int32(G))

    def fetch(j, slot):
      rows = (b, pl.ds(j * bk, bk), kv_h)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_loaded.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_loaded.at[slot])

    _mgpu.stream(cta_steps, S, fetch, (k_free, v_free))


def _forward(q, k, v, cfg, causal, interpret):
  B, T, H, D = q.shape
  G = H // k.shape[2]
  n_tiles = T // (2 * cfg.block_q)
  steps = min(cfg.steps, T // cfg.block_kv)
  cfg = dataclasses.replace(cfg, steps=steps)
  tr = _mgpu.smem_transforms(q.dtype)
  scratch = [
      plgpu.SMEM((2, cfg.block_q, D), q.dtype, transforms=tr),
      plgpu.SMEM((steps, cfg.block_kv, D), q.dtype, transforms=tr),
      plgpu.SMEM((steps, cfg.block_kv, D), q.dtype, transforms=tr),
      plgpu.SMEM((2, cfg.block_q), jnp.float32),
      plgpu.Barrier(num_barriers=steps),
      plgpu.Barrier(num_barriers=steps),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_arrivals=2, num_barriers=steps),
      plgpu.Barrier(num_arrivals=2, num_barriers=steps),
      plgpu.Barrier(num_arrivals=2),
  ]
  kernel = functools.partial(_forward_kernel, cfg=cfg, causal=causal, G=G, n_tiles=n_tiles)
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((B, H, T), jnp.float32)),
      scratch_types=scratch,
      grid=(H, B, n_tiles), grid_names=("h", "b", "q"),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(q, k, v)


def _triton_config(T, dtype, D):
  """The Triton backward's tiles, capped so they divide T (no padding: the forward has none)."""
  cfg = flash_attention.default_config(T, dtype=dtype, head_dim=D)
  assert flash_attention._pallas.round_up(T, max(cfg.tiles())) == T, (T, cfg)
  return cfg


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, cfg, causal, interpret):
  return _forward(q, k, v, cfg, causal, interpret)[0]


def _attention_fwd(q, k, v, cfg, causal, interpret):
  o, lse = _forward(q, k, v, cfg, causal, interpret)
  return o, (q, k, v, o, lse)


def _attention_bwd(cfg, causal, interpret, res, do):
  q, k, v, o, lse = res
  T, D = q.shape[1], q.shape[3]
  if cfg.backward == "triton":
    tri = _triton_config(T, q.dtype, D)
    return flash_attention._backward(q, k, v, None, o, lse, do.astype(q.dtype), tri, T, causal)
  return flash_mgpu_bwd.backward(
      q, k, v, o, lse, do, causal=causal, block_kv=cfg.bwd_block_kv, block_q=cfg.bwd_block_q,
      steps=cfg.bwd_steps, interpret=interpret)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention_mgpu(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True,
                         config=None, interpret=None):
  """Drop-in for `attention_xla` (no segment ids); `interpret`: a Mosaic GPU InterpretGPUParams
  to run on CPU (tests), None to compile for the GPU."""
  cfg = config or default_config(q_BTHD.shape[3])
  _check(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, cfg)
  if interpret is None and jax.default_backend() != "gpu":
    raise ValueError("attention 'mgpu' needs a Hopper GPU; use "
                     "--config.model.kernels.attention=pallas or xla here")
  return _attention(q_BTHD, k_BTKD, v_BTKD, cfg, causal, interpret)


def attention_mgpu(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT=None, *, causal=True):
  """The backend table's entry: the measured tiles for the head dim."""
  return flash_attention_mgpu(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, causal=causal)
