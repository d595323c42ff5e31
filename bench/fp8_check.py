"""Does XLA turn model.matmul_dtype=fp8 into cuBLASLt FP8 GEMMs, and what does one save?

    python3 -m bench.fp8_check [--out=fp8-check.json]   # from the checkout's root

(1) One GEMM at the 1b gate/up shape, [16384, 2048] x [2048, 5632] (8 x 2048 tokens): the bf16
dot against kernels/fp8.py's dot, forward and forward + both gradients, timed on the device,
with the optimized HLO's GEMM custom calls counted (`__cublas$lt$matmul$f8` is the FP8 one).
(2) One 1b layer (n_layers=1), loss and gradients with fp8: how many of its GEMMs are FP8 ones
(4 projections x 3 GEMMs = 12 expected). Prints and writes JSON. --n/--tokens shrink it (CPU).
"""

import argparse
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from bench.kernels import loop_time_ms
from tinyllama_jax import config as config_lib
from tinyllama_jax.data import formats
from tinyllama_jax.kernels import fp8
from tinyllama_jax.model import Llama

_GEMM = re.compile(r'custom_call_target="(__cublas\$lt\$matmul(?:\$f8)?|__cublas\$gemm)"')


def gemm_calls(hlo_text):
  """{custom-call target: count} of the GEMMs in an optimized HLO, plus Triton GEMM fusions and
  whether any fp8 type appears at all."""
  counts = {}
  for target in _GEMM.findall(hlo_text):
    counts[target] = counts.get(target, 0) + 1
  counts["triton_gemm_fusions"] = len(re.findall(r'"kind":"__triton_gemm"', hlo_text))
  counts["mentions_f8e4m3"] = "f8e4m3" in hlo_text
  counts["mentions_f8e5m2"] = "f8e5m2" in hlo_text
  return counts


def timed(fn, *args, iters=20):
  """(ms a call, optimized HLO text) of jit(fn) on args: the kernel benches' loop timer."""
  compiled = jax.jit(fn).lower(*args).compile()
  return loop_time_ms(compiled, args, inner=iters), compiled.as_text()


def one_gemm(n=16384, k=2048, m=5632):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (n, k), jnp.bfloat16)
  w = (jax.random.normal(kw, (k, m), jnp.float32) * 0.02).astype(jnp.bfloat16)
  g = (jax.random.normal(kg, (n, m), jnp.float32) * 1e-3).astype(jnp.bfloat16)
  flops = 2 * n * k * m
  rows = {}
  # fp8: the model's form (the FP8 GEMM writes fp32, a convert writes bf16); fp8_bf16_out: the
  # GEMM writes bf16 itself (a candidate: one activation-sized fp32 write and read fewer a GEMM)
  for name, dot in (("bf16", jnp.dot), ("fp8", fp8.dot),
                    ("fp8_bf16_out", fp8.make_dot(jnp.dtype(jnp.bfloat16)))):
    fwd_ms, fwd_hlo = timed(dot, x, w)
    vjp = lambda x, w, g, dot=dot: jax.vjp(dot, x, w)[1](g)
    both_ms, both_hlo = timed(lambda x, w, g, vjp=vjp: (vjp(x, w, g), dot(x, w)), x, w, g)
    rows[name] = {"fwd_ms": fwd_ms, "fwd_tflops": flops / fwd_ms / 1e9,
                  "fwd_bwd_ms": both_ms, "fwd_bwd_tflops": 3 * flops / both_ms / 1e9,
                  "fwd_gemms": gemm_calls(fwd_hlo), "fwd_bwd_gemms": gemm_calls(both_hlo)}
  rows["speedup_fwd"] = rows["bf16"]["fwd_ms"] / rows["fp8"]["fwd_ms"]
  rows["speedup_fwd_bwd"] = rows["bf16"]["fwd_bwd_ms"] / rows["fp8"]["fwd_bwd_ms"]
  rows["speedup_fwd_bwd_bf16_out"] = rows["bf16"]["fwd_bwd_ms"] / rows["fp8_bf16_out"]["fwd_bwd_ms"]
  return {"shape": [n, k, m], **rows}


def one_layer(tokens):
  out = {}
  for matmul_dtype in ("bf16", "fp8"):
    cfg = config_lib.load_config_file("configs/1b.py").model
    cfg.n_layers, cfg.matmul_dtype = 1, matmul_dtype
    gd, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)
    seq = min(tokens, 2048)
    x = jax.random.randint(jax.random.key(1), (tokens // seq, seq), 0, cfg.vocab_size)
    loss = lambda p: jnp.mean(nnx.merge(gd, p).hidden(x).astype(jnp.float32) ** 2)
    ms, hlo = timed(jax.value_and_grad(loss), params, iters=10)
    out[matmul_dtype] = {"fwd_bwd_ms": ms, "gemms": gemm_calls(hlo)}
    if matmul_dtype == "fp8" and os.environ.get("OUT"):
      with open(os.path.join(os.environ["OUT"], "fp8-layer-hlo.txt"), "w") as f:
        f.write(hlo)
  return out


def main(argv):
  p = argparse.ArgumentParser(prog="bench/fp8_check.py", description=__doc__)
  p.add_argument("--out", default="")
  p.add_argument("--n", type=int, default=16384, help="the GEMM's rows (tokens)")
  p.add_argument("--tokens", type=int, default=8 * 2048, help="the layer's tokens")
  args = p.parse_args(argv)
  result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "gemm": one_gemm(n=args.n), "layer": one_layer(args.tokens)}
  print(json.dumps(result, indent=1))
  if args.out:
    formats.write_json_atomic(args.out, result)


if __name__ == "__main__":
  main(sys.argv[1:])
