"""Do the speculative verify pass and the decode step agree? (speculative greedy's identity)

Speculative greedy keeps a draft token while it is the target's argmax in the verify pass, a
forward over K+1 tokens; the plain loop takes the argmax of a forward over one token. Both are
the same math, but on a GPU they run different GEMM and attention kernels (M = K+1 rows against
M = 1), so bf16 rounds differently, and where two logits are nearly tied the argmax can flip.
This measures it: after a prefill of a random prompt, K+1 tokens fed one at a time (the loop)
and the same K+1 tokens in one forward (the verify), from the same cache, per compute dtype:
the largest logit difference, how often the argmax differs, and the top-1 minus top-2 margin.

    python -m bench.spec_logits --out=/tmp/s.json                       # 1b, random weights
    python -m bench.spec_logits --config=configs/tiny.py --out=/tmp/s.json  # CPU smoke
"""

import argparse
import datetime
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import bench
from bench import decode as bench_decode
from tinyllama_jax import config as config_lib
from tinyllama_jax.data import formats
from tinyllama_jax.inference import decode


def compare(cfg_model, params, *, batch, prompt_len, k, seed):
  forward = decode.forward_fn(cfg_model)
  length = decode.round_up(prompt_len + k + 1)
  prefill = jax.jit(decode.prefill_fn(cfg_model, length))
  rng = np.random.default_rng(seed)
  tokens_BT = rng.integers(0, cfg_model.vocab_size, (batch, prompt_len)).astype(np.int32)
  new_BK1 = jnp.asarray(rng.integers(0, cfg_model.vocab_size, (batch, k + 1)), jnp.int32)
  _, cache = prefill(params, tokens_BT, np.full(batch, prompt_len, np.int32))

  @jax.jit
  def one_by_one(params, cache):
    logits = []
    for j in range(k + 1):
      pos_B1 = jnp.full((batch, 1), prompt_len + j, jnp.int32)
      h_B1D, cache = forward(params, new_BK1[:, j:j + 1], pos_B1, cache)
      logits.append(decode.logits_of(params, h_B1D[:, 0]))
    return jnp.stack(logits, axis=1)

  @jax.jit
  def at_once(params, cache):
    pos_BK1 = prompt_len + jnp.broadcast_to(jnp.arange(k + 1, dtype=jnp.int32), (batch, k + 1))
    h_BKD, _ = forward(params, new_BK1, pos_BK1, cache)
    return decode.logits_of(params, h_BKD)

  a_BKV = np.asarray(one_by_one(params, cache), np.float32)
  b_BKV = np.asarray(at_once(params, cache), np.float32)
  top2 = -np.sort(-a_BKV, axis=-1)[..., :2]
  margin = top2[..., 0] - top2[..., 1]
  flips = np.argmax(a_BKV, -1) != np.argmax(b_BKV, -1)
  return {"batch": batch, "k": k, "max_abs_diff": float(np.abs(a_BKV - b_BKV).max()),
          "mean_abs_diff": float(np.abs(a_BKV - b_BKV).mean()),
          "logit_std": float(a_BKV.std()), "argmax_flips": int(flips.sum()),
          "positions": int(flips.size), "median_margin": float(np.median(margin)),
          "min_margin": float(margin.min()),
          "flipped_margins": [float(m) for m in margin[flips][:8]]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(bench.REPO, "configs/1b.py"))
  ap.add_argument("--out", required=True)
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--batches", default="1,4")
  ap.add_argument("--draft_tokens", type=int, default=4)
  ap.add_argument("--prompt_len", type=int, default=128)
  args = ap.parse_args(argv)
  cfg_model = config_lib.load_config_file(args.config).model
  params32 = bench_decode.random_params(cfg_model)
  rows = []
  for dtype in args.dtypes.split(","):
    cfg_d = bench_decode.with_dtype(cfg_model, dtype)
    params = decode.cast_params(params32, cfg_d)
    for batch in map(int, args.batches.split(",")):
      r = {"dtype": dtype, **compare(cfg_d, params, batch=batch, prompt_len=args.prompt_len,
                                     k=args.draft_tokens, seed=batch)}
      rows.append(r)
      print(json.dumps(r), flush=True)
  result = {"rows": rows, "jax": jax.__version__, "device_kind": jax.devices()[0].device_kind,
            "commit": os.environ.get("BENCH_COMMIT"), "config": args.config,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  formats.write_json_atomic(args.out, result)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
