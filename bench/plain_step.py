"""The plain hand-written JAX step, timed: the floor row of `python -m bench`.

    python -m bench.plain_step --model_json='{...}' --batch=8 --seq_len=2048 \
        [--variant=plain|stacked|chunked_ce] [--profile_dir=DIR]

A port of the peer script bench/peers/plain_jax_step.py (copied from the project's shared
peers, /work/shared/peers/plain_jax_step.py + common.py, measured at 74,824 tokens/s
on one H200 at 8 x 2048). The step is the script's, line for line: fp32 params cast to bf16 in
the step (the embedding gathered in fp32, then cast), a Python loop over per-layer parameter
dicts, RMSNorm in fp32, SwiGLU and RoPE (bf16 cos/sin tables) in plain jnp, cuDNN attention via
`jax.nn.dot_product_attention`, full-vocab logits + log_softmax in fp32, `optax.chain(
clip_by_global_norm(1.0), adamw(4e-4, 0.9, 0.95, wd 0.1))`, one `jax.jit` with both params and
optimizer state donated. What differs from the script, none of it inside the timed step:
  - shapes, eps and RoPE theta come from our model config (so the CPU smoke test runs it tiny);
  - the init jits one layer and calls it L times (the script jits the whole unrolled init:
    ~75 s at 1b; the values are the same: same keys, same threefry draws);
  - timing, memory and profile as bench/step.py does them (windows of steps with one sync each,
    peak_bytes_in_use, an optional trace summarised by bench/profile.py and the optimized HLO);
  - attention falls back to 'xla' off GPU (the script tries cuDNN first, then 'xla').
Two bench-only variants move one of our step's choices into the plain step, to place a gap:
  stacked     layer params stored stacked [L, ...] and sliced per layer, as model.py stores them;
  chunked_ce  our chunked cross-entropy (kernels/cross_entropy.py) instead of full logits.
Prints one BENCH_RESULT line (kind "plain").
"""

import argparse
import gzip
import json
import os
import time
import traceback

_T_START = time.perf_counter()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bench  # noqa: E402
from bench import profile  # noqa: E402
from tinyllama_jax import params as param_table  # noqa: E402
from tinyllama_jax.kernels.cross_entropy import cross_entropy_chunked  # noqa: E402
from tinyllama_jax.training import metrics  # noqa: E402

VARIANTS = ("plain", "stacked", "chunked_ce")


def make_init_params(m, stacked):
  """init_params(key) -> the plain step's fp32 parameters (layers a list, or stacked [L, ...])."""
  V, D, FF, L, H, KV, HD = (m["vocab_size"], m["d_model"], m["ffn_dim"], m["n_layers"],
                            m["n_heads"], m["n_kv_heads"], m["head_dim"])

  def init_layer(key):
    ks = jax.random.split(key, 7)
    n = lambda k, s: 0.02 * jax.random.normal(k, s, jnp.float32)  # noqa: E731
    return {"attn_norm": jnp.ones((D,), jnp.float32),
            "wq": n(ks[0], (D, H * HD)), "wk": n(ks[1], (D, KV * HD)), "wv": n(ks[2], (D, KV * HD)),
            "wo": n(ks[3], (H * HD, D)),
            "mlp_norm": jnp.ones((D,), jnp.float32),
            "w_gate": n(ks[4], (D, FF)), "w_up": n(ks[5], (D, FF)), "w_down": n(ks[6], (FF, D))}

  def init_params(key):
    k_emb, k_head, k_layers = jax.random.split(key, 3)
    lkeys = jax.random.split(k_layers, L)
    one = jax.jit(init_layer)
    layers = [one(lkeys[i]) for i in range(L)]
    if stacked:
      layers = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {"embed": 0.02 * jax.random.normal(k_emb, (V, D), jnp.float32),
            "layers": layers,
            "final_norm": jnp.ones((D,), jnp.float32),
            "lm_head": 0.02 * jax.random.normal(k_head, (D, V), jnp.float32)}

  return init_params


def make(m, batch, seq_len, variant):
  """(init_params, tx, train_step) of the plain step at the model config `m` (our field names)."""
  D, L, H, KV, HD = m["d_model"], m["n_layers"], m["n_heads"], m["n_kv_heads"], m["head_dim"]
  T, B, EPS, THETA = seq_len, batch, m["norm_eps"], m["rope_theta"]
  CDT = jnp.bfloat16
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  stacked = variant == "stacked"
  init_params = make_init_params(m, stacked)

  def rms_norm(x, w):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + EPS)
    return y.astype(CDT) * w

  def rope_tables():
    inv = 1.0 / (THETA ** (jnp.arange(0, HD, 2, dtype=jnp.float32) / HD))
    f = jnp.outer(jnp.arange(T, dtype=jnp.float32), inv)
    emb = jnp.concatenate([f, f], axis=-1)  # (T, HD), HF 'rotate_half' convention
    return jnp.cos(emb).astype(CDT)[None, :, None, :], jnp.sin(emb).astype(CDT)[None, :, None, :]

  def apply_rope(x, cos, sin):
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin

  def block(h, p, cos, sin):
    x = rms_norm(h, p["attn_norm"])
    q = (x @ p["wq"]).reshape(B, T, H, HD)
    k = (x @ p["wk"]).reshape(B, T, KV, HD)
    v = (x @ p["wv"]).reshape(B, T, KV, HD)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    h = h + o.reshape(B, T, H * HD) @ p["wo"]
    x = rms_norm(h, p["mlp_norm"])
    h = h + (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]
    return h

  def loss_fn(params, tokens):
    x_ids, y_ids = tokens[:, :-1], tokens[:, 1:]
    h = jnp.take(params["embed"], x_ids, axis=0).astype(CDT)  # gather fp32, then cast
    p16 = jax.tree_util.tree_map(lambda a: a.astype(CDT),
                                 {k: v for k, v in params.items() if k != "embed"})
    cos, sin = rope_tables()
    layers = p16["layers"]
    if stacked:
      layers = [{k: v[i] for k, v in layers.items()} for i in range(L)]
    for lp in layers:
      h = block(h, lp, cos, sin)
    if variant == "chunked_ce":
      x = rms_norm(h, p16["final_norm"])
      return jnp.mean(cross_entropy_chunked(x.reshape(B * T, D), p16["lm_head"],
                                            y_ids.reshape(B * T)))
    logits = rms_norm(h, p16["final_norm"]) @ p16["lm_head"]  # bf16 (B, T, V)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, y_ids[..., None], axis=-1)[..., 0]
    return jnp.mean(nll)

  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(4e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))

  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss, optax.global_norm(grads)

  return init_params, tx, train_step


def run(m, *, batch, seq_len, variant, steps, warmup, window, profile_dir=""):
  init_params, tx, train_step = make(m, batch, seq_len, variant)
  name = "plain" if variant == "plain" else f"plain_{variant}"
  out = {"name": name, "kind": "plain", "variant": variant, "n_devices": 1,
         "device_kind": jax.devices()[0].device_kind, "seq_len": seq_len,
         "micro_batch_per_device": batch, "accum": 1, "tokens_per_step": batch * seq_len,
         "source": "bench/peers/plain_jax_step.py (ported)"}
  t0 = time.perf_counter()
  params = init_params(jax.random.key(0))
  opt_state = jax.jit(tx.init)(params)
  bkeys = jax.random.split(jax.random.key(1), 3)
  batches = [jax.random.randint(k, (batch, seq_len + 1), 0, m["vocab_size"], dtype=jnp.int32)
             for k in bkeys]
  jax.block_until_ready((params, opt_state, batches))
  out["init_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state,
                                                              batches[0]).compile()
  out["compile_s"] = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  if ma is not None:  # as program.memory_report (importing it would pull in the trainer's modules)
    x = {k: int(getattr(ma, k, 0)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                             "temp_size_in_bytes", "alias_size_in_bytes")}
    x["peak_estimate_bytes"] = (x["argument_size_in_bytes"] + x["output_size_in_bytes"]
                                + x["temp_size_in_bytes"] - x["alias_size_in_bytes"])
    out["xla_memory"] = x
  if profile_dir:
    os.makedirs(profile_dir, exist_ok=True)
    with gzip.open(os.path.join(profile_dir, "step.hlo.txt.gz"), "wt") as f:
      f.write(compiled.as_text())

  losses = []
  for i in range(max(warmup, 1)):
    params, opt_state, loss, gn = compiled(params, opt_state, batches[i % 3])
    losses.append(float(loss))
    if i == 0:
      out["launch_to_first_step_s"] = time.perf_counter() - _T_START
  if profile_dir:

    def three_steps(carry):
      params, opt_state = carry
      for i in range(3):
        params, opt_state, loss, _ = compiled(params, opt_state, batches[i % 3])
      jax.block_until_ready(loss)
      return params, opt_state
    (params, opt_state), out["profile"] = profile.capture(profile_dir, three_steps,
                                                          (params, opt_state))

  windows, i = [], 0
  for _ in range(max(steps // window, 1)):
    t0 = time.perf_counter()
    for _ in range(window):
      params, opt_state, loss, gn = compiled(params, opt_state, batches[i % 3])
      i += 1
    jax.block_until_ready((params, opt_state, loss, gn))
    windows.append(time.perf_counter() - t0)
  losses.append(float(loss))
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"plain step {variant}: loss went non-finite: {losses}")
  out["loss_first"], out["loss_last"] = losses[0], losses[-1]
  out.update(bench.timing_summary(windows, window, batch * seq_len, 1,
                                  param_table.flops_per_token(m, seq_len),
                                  metrics.peak_flops_per_device(0.0)))
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model_json", required=True, help="the model config as JSON (our field names)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--variant", choices=VARIANTS, default="plain")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--window", type=int, default=5)
  p.add_argument("--profile_dir", default="")
  a = p.parse_args()
  try:
    result = run(json.loads(a.model_json), batch=a.batch, seq_len=a.seq_len, variant=a.variant,
                 steps=a.steps, warmup=a.warmup, window=a.window, profile_dir=a.profile_dir)
  except Exception as e:  # noqa: BLE001  the matrix goes on without this row
    traceback.print_exc()
    result = {"name": "plain" if a.variant == "plain" else f"plain_{a.variant}", "kind": "plain",
              "error": f"{type(e).__name__}: {e}"[:2000]}
  bench.emit(result)
  return 0 if "error" not in result else 1


if __name__ == "__main__":
  raise SystemExit(main())
