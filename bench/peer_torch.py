"""The peer a PyTorch user would pick, timed: a worker of `python -m bench`.

    python -m bench.peer_torch --model_json='{...}' --batch=8 --seq_len=2048 \
        --variant=autocast|bf16 [--no-compile]

transformers' LlamaForCausalLM at our model config (sdpa attention, untied embeddings), wrapped in
torch.compile, fused AdamW with TinyLlama's hyper-parameters, global-norm clipping 1.0, the
loss from `labels=` as a transformers user writes it. Variants:
  autocast  fp32 weights and optimizer state, bf16 autocast (our precision recipe);
  bf16      the weights themselves in bf16 (less memory and traffic, lower precision).
Prints one BENCH_RESULT line. torch and transformers are optional by design (not in
requirements.txt): requirements-dev.txt brings CPU builds; a GPU machine brings its own. Never
imported by the JAX side: torch and jax stay in separate
processes, so neither holds the other's GPU memory.
"""

import argparse
import json
import time
import traceback

_T_START = time.perf_counter()

import torch  # noqa: E402

import bench  # noqa: E402  (imports neither jax nor torch)
from tinyllama_jax import params  # noqa: E402  (nor does this)


def build(m, variant, device):
  from transformers import LlamaConfig, LlamaForCausalLM
  config = LlamaConfig(
      vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["ffn_dim"],
      num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"],
      num_key_value_heads=m["n_kv_heads"], head_dim=m["head_dim"],
      max_position_embeddings=m["max_seq_len"], rms_norm_eps=m["norm_eps"],
      rope_theta=m["rope_theta"], tie_word_embeddings=False, attention_bias=False,
      mlp_bias=False, use_cache=False)
  config._attn_implementation = "sdpa"
  model = LlamaForCausalLM(config).to(device)
  if variant == "bf16":
    model = model.to(torch.bfloat16)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.1, fused=device == "cuda")
  return model, opt


def run(m, *, batch, seq_len, variant, steps, warmup, window, compile_, peak_flops):
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  model, opt = build(m, variant, device)
  fwd = torch.compile(model) if compile_ else model
  x = torch.randint(0, m["vocab_size"], (batch, seq_len), device=device)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=variant == "autocast"):
      loss = fwd(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  out = {"name": f"torch_{variant}", "kind": "torch", "variant": variant, "compile": compile_,
         "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu",
         "n_devices": 1, "seq_len": seq_len, "micro_batch_per_device": batch, "accum": 1,
         "tokens_per_step": batch * seq_len, "attention": "sdpa"}
  t0 = time.perf_counter()
  losses = [float(step().detach())]  # compiles forward and backward
  out["compile_s"] = time.perf_counter() - t0  # compile + one step: torch compiles on first call
  out["launch_to_first_step_s"] = time.perf_counter() - _T_START
  for _ in range(max(warmup - 1, 0)):
    losses.append(float(step().detach()))
  windows = []
  for _ in range(max(steps // window, 1)):
    sync()
    t0 = time.perf_counter()
    for _ in range(window):
      loss = step()
    sync()
    windows.append(time.perf_counter() - t0)
  losses.append(float(loss.detach()))
  out["loss_first"], out["loss_last"] = losses[0], losses[-1]
  out.update(bench.timing_summary(windows, window, batch * seq_len, 1,
                                  params.flops_per_token(m, seq_len), peak_flops))
  if device == "cuda":
    out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
  out["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version()}
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model_json", required=True, help="the model config as JSON (our field names)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--variant", choices=("autocast", "bf16"), default="autocast")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--window", type=int, default=5)
  p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--peak_flops", type=float, default=0.0, help="per device, for MFU (0: none)")
  a = p.parse_args()
  try:
    result = run(json.loads(a.model_json), batch=a.batch, seq_len=a.seq_len, variant=a.variant,
                 steps=a.steps, warmup=a.warmup, window=a.window, compile_=a.compile,
                 peak_flops=a.peak_flops or None)
  except Exception as e:  # noqa: BLE001  the matrix goes on without this peer
    traceback.print_exc()
    result = {"name": f"torch_{a.variant}", "kind": "torch",
              "error": f"{type(e).__name__}: {e}"[:2000]}
  bench.emit(result)
  return 0 if "error" not in result else 1


if __name__ == "__main__":
  raise SystemExit(main())
