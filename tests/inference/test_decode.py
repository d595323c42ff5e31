"""The on-device decode loop: chunks of any size give the same tokens, rows stop at their own
EOS, weights cast once, compiled programs reused; the decode bench's smoke run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding_models import REPO, random_prompts, tiny_model
from bench import decode as bench_decode
from bench import hlo_ops
from tinyllama_jax import config as config_lib
from tinyllama_jax.inference import decode


def test_chunk_size_changes_nothing(target):
  params, cfg = target
  prompts, lengths = random_prompts([3, 11, 20])
  for settings in (dict(), dict(temperature=1.0, top_p=0.9, seed=5)):
    whole = decode.decode(params, cfg, prompts, lengths, max_new_tokens=13, **settings)
    for chunk in (1, 5):
      assert decode.decode(params, cfg, prompts, lengths, max_new_tokens=13, chunk=chunk,
                           **settings) == whole
    assert all(len(row) == 13 for row in whole) and len(set(map(tuple, whole))) == 3


def test_each_row_stops_at_its_eos(target):
  params, cfg = target
  prompts, lengths = random_prompts([4, 9, 15])
  free = decode.decode(params, cfg, prompts, lengths, max_new_tokens=12)
  eos = free[0][6]
  got = decode.decode(params, cfg, prompts, lengths, max_new_tokens=12, eos_id=eos, chunk=4)
  for row, want in zip(got, free):
    assert row == (want[:want.index(eos) + 1] if eos in want else want)
  # Every row done: the loop ends there, not at max_new_tokens.
  first = free[0][0]
  assert decode.decode(params, cfg, prompts[:1], lengths[:1], max_new_tokens=50,
                       eos_id=first) == [[first]]


def test_params_cast_once_same_tokens():
  params, cfg = tiny_model(0, compute_dtype="bfloat16")
  cast = decode.cast_params(params, cfg)
  assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
  prompts, lengths = random_prompts([5, 8])
  # The forward casts fp32 weights to the compute dtype itself: casting first changes no value.
  assert (decode.decode(cast, cfg, prompts, lengths, max_new_tokens=6)
          == decode.decode(params, cfg, prompts, lengths, max_new_tokens=6))


def test_a_run_trained_in_fp8_decodes_with_bf16_matmuls():
  """matmul_dtype=fp8 trains faster; decoding reads the same weights with bf16 matmuls (the
  fp8 forward would quantize each weight again every token): the same program as bf16's."""
  params, cfg = tiny_model(0, compute_dtype="bfloat16", matmul_dtype="fp8")
  _, cfg_bf16 = tiny_model(0, compute_dtype="bfloat16")
  assert decode.for_decoding(cfg).matmul_dtype == "bf16" and cfg.matmul_dtype == "fp8"
  prompts, lengths = random_prompts([5, 8])
  assert (decode.decode(params, cfg, prompts, lengths, max_new_tokens=6)
          == decode.decode(params, cfg_bf16, prompts, lengths, max_new_tokens=6))


def test_the_fused_decode_layer_gives_the_same_tokens(target):
  """model.kernels.decode_layer=pallas (interpreted here): the same tokens as the block's own
  ops, greedy and sampled, one row and rows of different lengths."""
  params, cfg = target
  _, fused = tiny_model(0, kernels=fused_kernels(cfg))
  for lengths in ([7], [3, 11, 20]):
    prompts, lengths = random_prompts(lengths, seed=len(lengths))
    for settings in (dict(), dict(temperature=1.0, top_p=0.9, seed=5)):
      want = decode.decode(params, cfg, prompts, lengths, max_new_tokens=9, chunk=4, **settings)
      assert decode.decode(params, fused, prompts, lengths, max_new_tokens=9, chunk=4,
                           **settings) == want


def fused_kernels(cfg):
  return dict(cfg.kernels.to_dict(), decode_layer="pallas")


def test_the_fused_decode_layer_takes_at_most_16_rows():
  _, plain = tiny_model(0)
  _, cfg = tiny_model(0, kernels=fused_kernels(plain))
  assert decode.fused_layers(cfg, 16) and not decode.fused_layers(cfg, 17)
  _, scanned = tiny_model(0, scan_layers=True, kernels=fused_kernels(plain))
  _, xla = tiny_model(0, kernels=dict(plain.kernels.to_dict(), decode_layer="xla"))
  assert not decode.fused_layers(scanned, 1) and not decode.fused_layers(xla, 1)


def test_auto_fuses_one_token_steps_on_a_gpu_only(monkeypatch):
  _, cfg = tiny_model(0)
  assert cfg.kernels.decode_layer == "auto"
  assert not decode.fused_layers(cfg, 1)  # this CPU
  monkeypatch.setattr(decode.jax, "default_backend", lambda: "gpu")
  assert decode.fused_layers(cfg, 1) and not decode.fused_layers(cfg, 2)


def test_compiled_programs_are_reused(target):
  params, cfg = target
  decode._DECODERS.clear()
  for n in ([3, 7], [5, 2], [9, 9]):
    prompts, lengths = random_prompts(n, seed=n[0])
    decode.decode(params, cfg, prompts, lengths, max_new_tokens=40, chunk=8)
  (decoder,) = decode._DECODERS.values()
  assert decoder.run._cache_size() == 1 and decoder.prefill._cache_size() == 1


def test_bench_smoke(tmp_path):
  out = tmp_path / "decode.json"
  bench_decode.main(["--config", os.path.join(REPO, "configs/tiny.py"), "--new_tokens=2",
              "--prompt_len=8", "--batches=1,2", "--dtypes=float32", "--no_torch",
              f"--out={out}"])
  result = json.loads(out.read_text())
  names = {row["name"] for row in result["rows"]}
  assert {"ours", "speculative"} <= {n.split(" ")[0] for n in names}
  assert all(row["tokens_per_s"] > 0 for row in result["rows"])
  assert result["jax"] == jax.__version__ and np.isfinite(result["rows"][0]["ms_per_token"])


def test_bench_without_speculative_rows(tmp_path):
  """--draft_tokens='' runs no speculative row (the transformers study needs none)."""
  out = tmp_path / "decode.json"
  bench_decode.main(["--config", os.path.join(REPO, "configs/tiny.py"), "--new_tokens=2",
                     "--prompt_len=8", "--batches=1", "--dtypes=float32", "--no_torch",
                     "--draft_tokens=", f"--out={out}"])
  assert [row["name"] for row in json.loads(out.read_text())["rows"]] == ["ours"]
  with pytest.raises(ValueError, match="--draft_tokens='4,x': give positive integers"):
    bench_decode.main(["--out", str(out), "--draft_tokens=4,x"])


def test_bench_transformers_rows(monkeypatch):
  """Both transformers rows run (on a CPU the static cache is not compiled); a generate that
  fails is that row's error, and the table goes on."""
  transformers = pytest.importorskip("transformers")
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py")).model
  args = bench_decode.parse(["--out=unused", "--batches=1", "--prompt_len=4",
                                  "--new_tokens=2"])
  rows = []
  bench_decode.hf_rows(args, cfg, bench_decode.Clock(1000.0), rows)
  assert [r["name"] for r in rows] == ["hf eager", "hf static+compile"]
  assert all(r["tokens_per_s"] > 0 for r in rows)

  def broken(*a, **k):
    raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten\nmore")
  monkeypatch.setattr(transformers.LlamaForCausalLM, "generate", broken)
  rows = []
  bench_decode.hf_rows(args, cfg, bench_decode.Clock(1000.0), rows)
  assert [r["error"] for r in rows] == ["RuntimeError: accessing tensor output of CUDAGraphs "
                                        "that has been overwritten"] * 2


def test_bench_kernel_sets(tmp_path):
  """--kernels gives a row set each ('' = the config's), named by its settings; a bad op is refused."""
  out = tmp_path / "decode.json"
  args = ["--config", os.path.join(REPO, "configs/tiny.py"), "--new_tokens=2", "--prompt_len=8",
          "--batches=1", "--dtypes=float32", "--only_ours", f"--out={out}"]
  bench_decode.main(args + ["--kernels=;rms_norm=pallas"])
  names = [row["name"] for row in json.loads(out.read_text())["rows"]]
  assert names == ["ours", "ours, rms_norm=pallas"]
  with pytest.raises(ValueError, match="--kernels: no op 'rms'"):
    bench_decode.main(args + ["--kernels=rms=pallas"])


def test_bench_xla_option_sets(tmp_path):
  """--xla_options gives a row set each, compiled with those options; an option XLA lacks is a
  row with its error, not a crash; a malformed set is refused."""
  out = tmp_path / "decode.json"
  args = ["--config", os.path.join(REPO, "configs/tiny.py"), "--new_tokens=2", "--prompt_len=8",
          "--batches=1", "--dtypes=float32", "--only_ours", f"--out={out}"]
  bench_decode.main(args + ["--xla_options=;xla_gpu_enable_triton_gemm=false;xla_no_such_flag=1"])
  rows = json.loads(out.read_text())["rows"]
  assert [r["name"] for r in rows] == ["ours", "ours, xla: xla_gpu_enable_triton_gemm=false",
                                       "ours, xla: xla_no_such_flag=1"]
  assert np.isfinite(rows[1]["ms_per_token"]) and "xla_no_such_flag" in rows[2]["error"]
  assert bench_decode.xla_options("a=false b=3 c=X,Y") == {"a": False, "b": 3, "c": "X,Y"}
  with pytest.raises(ValueError, match="--xla_options: 'a' is not name=value"):
    bench_decode.xla_options("a")


def test_loop_body_copies_no_cache():
  """The compiled decode loop updates each layer's cache in place: no op of its body makes an
  array the size of the whole (stacked) cache, and none copies a layer's cache (a stacked cache
  sliced and set back per layer did both, every token: bench/NOTES.md, 2026-12-02, H200, 352dbab)."""
  _, cfg = tiny_model(0)
  B, S, L = 2, 64, cfg.n_layers
  hlo = bench_decode.loop_hlo(cfg, batch=B, length=S, prompt_len=8)
  ops = hlo_ops.body_ops(hlo)
  assert ops["dot"] + ops["fusion:kCustom:dot"] + ops["fusion:kOutput:dot"] > 0  # the body parsed
  layer = f"[{B},{S},{cfg.n_kv_heads},{cfg.head_dim}]"
  stacked = f"[{L},{B},{S},{cfg.n_kv_heads},{cfg.head_dim}]"
  shapes = [s for label in ops for s in hlo_ops.body_shapes(hlo, label)]
  assert not [s for s in shapes if stacked in s]
  assert not [s for s in hlo_ops.body_shapes(hlo, "copy") if layer in s]

