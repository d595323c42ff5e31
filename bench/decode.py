"""Decoding speed: our on-device decode loop (tinyllama_jax/inference/decode.py) against
transformers' generate, and speculative decoding, on one device.

    BENCH_COMMIT=$(git rev-parse --short HEAD) python -m bench.decode --out=decode.json
    python -m bench.decode --config=configs/tiny.py --new_tokens=16 --out=/tmp/d.json  # CPU smoke
    python -m bench.decode --count_ops --only_ours --dtypes=float32 --deadline_s=0 --out=/tmp/o.json

--count_ops prints the ops of the compiled loop body (one token; bench/hlo_ops.py), compiled from
shapes alone, so the 1b loop's count is a CPU proxy of its kernel count. On a CPU use float32:
the CPU runs bf16 through f32 converts (a layer's cache converted and copied each token) that a
GPU does not have.

(As `python -m`, from the checkout: run as a script, bench/ would come first on sys.path and its
profile.py would hide the standard library's, which torch imports.)

Rows (greedy, a prompt of --prompt_len random tokens, --new_tokens new ones, no EOS):
  ours         batch 1 and 16, bf16 and fp32 params (cast once, before timing), for each
               --kernels set and --xla_options set (XLA's options of the decode programs only; an option this
               XLA lacks gives a row with its error);
  target alone the speculative rows' baseline and reference: the target's own loop on their prompts;
  speculative  the target with a draft of K (--draft_tokens, one row each) tokens a round; the
               output must equal the target's own (same_as_target). Random weights make acceptance
               meaningless, so without --draft_workdir the draft is the target itself: ~100%
               acceptance, the machinery's overhead (K+1 tokens a target call, and the draft's K
               steps, which cost a target step each here). With --target_workdir the prompts are
               real text (stdlib modules' openings, the run's tokenizer);
  hf eager / hf static+compile  transformers' generate on a random LlamaForCausalLM of the same
               shape in bf16 (only if torch and transformers import; only timing, other weights).
Each row: a warm-up call (compiles), then the best of 3 timed calls, each ending on the host
(the tokens are numpy), so nothing is left in flight. tokens_per_s counts every row's new
tokens; ms_per_token is the wall time per decode step (a token of every row). The whole run
stops starting rows after --deadline_s (skipped rows say so), to stay within ~7 minutes.
"""

import argparse
import datetime
import itertools
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

import bench
from bench import hlo_ops, profile
from tinyllama_jax import config as config_lib
from tinyllama_jax import model as model_lib
from tinyllama_jax.checkpoint import run as run_lib
from tinyllama_jax.data import sources
from tinyllama_jax.data import tokenizer as tokenizer_lib
from tinyllama_jax.inference import decode, speculative



def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(bench.REPO, "configs/1b.py"))
  ap.add_argument("--out", required=True, help="The JSON file to write.")
  ap.add_argument("--batches", default="1,16")
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--kernels", default="",
                  help="Other model.kernels settings, a row set each, ';' between sets: "
                       "'rms_norm=pallas,swiglu=pallas;' (an empty set: the config's)")
  ap.add_argument("--xla_options", default="",
                  help="XLA options of the decode programs, a row set each, ';' between sets, "
                       "spaces between options: 'xla_gpu_enable_triton_gemm=false;' ('' = none)")
  ap.add_argument("--draft_tokens", default="4",
                  help="Tokens a draft round, one row each: 4,6 ('' = no speculative rows)")
  ap.add_argument("--target_workdir", default=None, help="Speculative row: a trained target.")
  ap.add_argument("--draft_workdir", default=None, help="Speculative row: its trained draft.")
  ap.add_argument("--no_torch", action="store_true", help="Skip the transformers rows.")
  ap.add_argument("--profile_dir", default="",
                  help="Trace one batch-1 call of the first dtype here; per-token kernel table.")
  ap.add_argument("--only_ours", action="store_true", help="Only the ours rows (flag studies).")
  ap.add_argument("--only_speculative", action="store_true",
                  help="Skip the ours and transformers rows (the target alone is the baseline).")
  ap.add_argument("--count_ops", action="store_true",
                  help="Print the ops of the compiled decode loop's body (a token) per batch.")
  ap.add_argument("--deadline_s", type=float, default=400.0,
                  help="Start no row after this many seconds.")
  return ap.parse_args(argv)


def draft_tokens(args):
  ks = [k.strip() for k in args.draft_tokens.split(",") if k.strip()]
  if not all(k.isdigit() and int(k) > 0 for k in ks):
    raise ValueError(f"--draft_tokens={args.draft_tokens!r}: give positive integers, e.g. 4,6 "
                     "('' for no speculative rows)")
  return [int(k) for k in ks]


class Clock:
  def __init__(self, deadline_s):
    self.start, self.deadline_s = time.perf_counter(), deadline_s

  def left(self):
    return self.deadline_s - (time.perf_counter() - self.start)


def with_dtype(cfg_model, dtype, kernels=""):
  """A copy of the model config computing in dtype (and with the `op=backend,...` settings of
  `kernels`)."""
  cfg_model = cfg_model.copy_and_resolve_references()
  with cfg_model.unlocked():
    cfg_model.compute_dtype = dtype
    for op, backend in kernel_settings(kernels):
      if op not in cfg_model.kernels:
        raise ValueError(f"--kernels: no op {op!r}; ops: {', '.join(cfg_model.kernels)}")
      cfg_model.kernels[op] = backend
  return cfg_model


def kernel_settings(spec):
  """'rms_norm=pallas,swiglu=pallas' -> [('rms_norm', 'pallas'), ('swiglu', 'pallas')]."""
  pairs = [item.split("=") for item in spec.split(",") if item.strip()]
  if any(len(p) != 2 for p in pairs):
    raise ValueError(f"--kernels: {spec!r} is not op=backend,op=backend")
  return [(op.strip(), backend.strip()) for op, backend in pairs]


def xla_options(spec):
  """'a=false b=3 c=X,Y' -> {'a': False, 'b': 3, 'c': 'X,Y'} (XLA's compile options)."""
  def value(v):
    if v.lower() in ("true", "false"):
      return v.lower() == "true"
    return int(v) if v.lstrip("-").isdigit() else v
  pairs = [item.split("=", 1) for item in spec.split()]
  if any(len(p) != 2 for p in pairs):
    raise ValueError(f"--xla_options: {spec!r} is not name=value name=value")
  return {name: value(v) for name, v in pairs}


def variants(args):
  """(row name, kernels spec, XLA options) for each ours row set."""
  out = []
  for spec, xla in itertools.product(args.kernels.split(";"), args.xla_options.split(";")):
    name = "ours" + (f", {spec}" if spec else "") + (f", xla: {xla.strip()}" if xla.strip() else "")
    out.append((name, spec, xla_options(xla)))
  return out


def random_params(cfg_model, seed=0):
  """Random weights made on the device (a 1b model's init on the host takes minutes)."""
  def init():
    return nnx.to_pure_dict(nnx.state(model_lib.Llama(cfg_model, rngs=nnx.Rngs(params=seed)),
                                      nnx.Param))
  return jax.jit(init)()


def load_run(workdir, cfg_like):
  step = run_lib.resolve_step(workdir)
  cfg_model = with_dtype(run_lib.run_config(workdir, step).model, cfg_like.compute_dtype)
  return jax.device_put(run_lib.load_params(workdir, step, cfg_model)), cfg_model


def best_of(fn, clock, reps=3):
  """(the best wall time of up to `reps` calls after one warm-up, the warm-up's result)."""
  result = fn()
  times = []
  for _ in range(reps):
    if times and clock.left() < 0:
      break
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times), result


def row(name, batch, dtype, seconds, new_tokens, **extra):
  return {"name": name, "batch": batch, "dtype": dtype,
          "tokens_per_s": batch * new_tokens / seconds,
          "ms_per_token": 1e3 * seconds / new_tokens, "seconds": seconds, **extra}


def agreement(tokens, reference):
  """The share of the reference's tokens another row set reproduces before its first different
  token, the worst row's (1.0: the same greedy output; random weights make near-ties, so a late
  divergence is bf16 rounding, an early one a wrong kernel)."""
  def prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  return min(prefix(a, b) / max(len(b), 1) for a, b in zip(tokens, reference))


def ours_rows(args, cfg_model, clock, rows):
  params32, first = None, {}
  for dtype, (name, spec, options) in itertools.product(args.dtypes.split(","), variants(args)):
    cfg_d = with_dtype(cfg_model, dtype, kernels=spec)
    if params32 is None:
      params32 = random_params(cfg_model)
    params = jax.block_until_ready(decode.cast_params(params32, cfg_d))
    for batch in map(int, args.batches.split(",")):
      if clock.left() < 0:
        rows.append({"name": name, "batch": batch, "dtype": dtype, "skipped": "deadline"})
        print_row(rows[-1])
        continue
      prompts, lengths = prompt_batch(args, cfg_d, batch)
      try:
        seconds, tokens = best_of(lambda: decode.decode(params, cfg_d, prompts, lengths,
                                                   max_new_tokens=args.new_tokens,
                                                   compiler_options=options), clock)
      except Exception as e:  # an option this XLA does not know: a row that says so
        if not options:
          raise
        rows.append({"name": name, "batch": batch, "dtype": dtype,
                     "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print_row(rows[-1])
        continue
      extra = {}
      if (dtype, batch) in first:
        extra["agrees_with_first_row_set"] = agreement(tokens, first[dtype, batch])
      first.setdefault((dtype, batch), tokens)
      rows.append(row(name, batch, dtype, seconds, args.new_tokens, **extra))
      print_row(rows[-1])
  return params32


def loop_hlo(cfg_model, batch, length, prompt_len=64, chunk=decode.CHUNK, options=None):
  """The optimized HLO text of the decode loop's compiled chunk (Decoder.run) for params in the
  compute dtype, compiled from shapes alone (no weights made: a 1b model compiles on a CPU)."""
  dtype = model_lib.compute_dtype(cfg_model)
  shapes = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(
      model_lib.Llama(cfg_model, rngs=nnx.Rngs(params=0)), nnx.Param)))
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)
  decoder = decode.Decoder(cfg_model, batch=batch, length=length, greedy=True, chunk=chunk,
                           compiler_options=options)
  knobs = decode.knobs_for(cfg_model, max_new_tokens=chunk, eos_id=None, temperature=0.0,
                           top_p=1.0, seed=0, n_valid=None)
  tokens = jax.ShapeDtypeStruct((batch, prompt_len), np.int32)
  state = jax.eval_shape(decoder.prefill, params, tokens,
                         jax.ShapeDtypeStruct((batch,), np.int32), knobs)
  layers = jax.eval_shape(decoder.layout, params)
  return decoder.run.lower(params, layers, state, knobs).compile().as_text()


def count_ops(args, cfg_model):
  """{batch: the loop body's op counts} for the first dtype and the last row set, printed as
  tables (pallas only counts on a GPU: on a CPU it runs interpreted, as loops of its own)."""
  name, spec, options = variants(args)[-1]
  cfg_d = with_dtype(cfg_model, args.dtypes.split(",")[0], kernels=spec)
  length = decode.round_up(args.prompt_len + args.new_tokens)
  out = {}
  for batch in map(int, args.batches.split(",")):
    hlo = loop_hlo(cfg_d, batch, length, options=options)
    counts = hlo_ops.body_ops(hlo)
    print(f"decode loop body, batch {batch}, cache {length}, {name}, "
          f"{jax.default_backend()}:\n"
          f"{hlo_ops.table(counts)}", flush=True)
    # What the suspects move: a weight-sized concatenate or convert would be loop-invariant work
    # left in the body, a cache-sized copy the cache copied; and the lines they come from.
    for label in sorted(counts):
      if any(x in label for x in ("concatenate", "copy", "pad", "convert", "slice", "reduce")):
        print(f"  {label}: {dict(hlo_ops.body_shapes(hlo, label).most_common(3))}\n"
              f"    from {dict(hlo_ops.body_sources(hlo, label).most_common(4))}")
    out[batch] = dict(counts)
  return out


def profile_ours(args, cfg_model, params32):
  """The kernels of one batch-1 decode call of the last row set (compiled), per new token."""
  name, spec, options = variants(args)[-1]
  print(f"profile: {name}", flush=True)
  cfg_d = with_dtype(cfg_model, args.dtypes.split(",")[0], kernels=spec)
  params = jax.block_until_ready(decode.cast_params(params32, cfg_d))
  prompts, lengths = prompt_batch(args, cfg_d, 1)
  run = lambda _: decode.decode(params, cfg_d, prompts, lengths, max_new_tokens=args.new_tokens,
                                compiler_options=options)
  _, summary = profile.capture(args.profile_dir, run, None, steps=args.new_tokens)
  return summary


def prompt_batch(args, cfg_model, batch):
  rng = np.random.default_rng(batch)
  prompts = rng.integers(0, cfg_model.vocab_size, (batch, args.prompt_len)).tolist()
  return prompts, np.full(batch, args.prompt_len, np.int32)


def text_prompts(args, workdir, batch):
  """Prompts of real text for trained models (random tokens would make acceptance meaningless):
  --prompt_len tokens from the start of every 40th standard-library module (the stdlib source's
  own text), encoded with the run's tokenizer."""
  cfg = run_lib.run_config(workdir, run_lib.resolve_step(workdir))
  tok = tokenizer_lib.Tokenizer(run_lib.tokenizer_path(cfg, workdir))
  prompts = []
  for path in sources.stdlib_files()[::40]:
    with open(os.path.join(sources.stdlib_root(), path), encoding="utf-8") as f:
      ids = tok.encode(f.read())
    if len(ids) >= args.prompt_len:
      prompts.append(ids[:args.prompt_len])
    if len(prompts) == batch:
      return prompts, np.full(batch, args.prompt_len, np.int32)
  raise ValueError(f"too few stdlib modules of --prompt_len={args.prompt_len} tokens: lower it")


def load_pair(args, cfg_t, params32=None):
  """(params_t, cfg_t, params_d, cfg_d, label): the trained runs, or without a draft run the
  target (trained, or random: the ours rows' params32 where they made them) drafting for itself."""
  if args.draft_workdir and not args.target_workdir:
    raise ValueError("--draft_workdir needs --target_workdir (the run it drafts for)")
  if args.target_workdir:
    params_t, cfg_t = load_run(args.target_workdir, cfg_t)
  else:
    params_t = params32 if params32 is not None else random_params(cfg_t)
  if not args.draft_workdir:
    return params_t, cfg_t, params_t, cfg_t, "(draft = target: ~100% acceptance, the overhead)"
  params_d, cfg_d = load_run(args.draft_workdir, cfg_t)
  toks = [run_lib.tokenizer_path(run_lib.run_config(w, run_lib.resolve_step(w)), w)
          for w in (args.target_workdir, args.draft_workdir)]
  same = None not in toks and len({tokenizer_lib.file_sha256(t) for t in toks}) == 1
  for k in draft_tokens(args):
    speculative.check_draft(cfg_t, cfg_d, draft_tokens=k, same_tokenizer=same)
  shape = (f"{cfg_d.n_layers} layers d{cfg_d.d_model} {cfg_d.n_heads}/{cfg_d.n_kv_heads} heads "
           f"ffn {cfg_d.ffn_dim}")  # the draft as built, whatever its run directory is called
  return params_t, cfg_t, params_d, cfg_d, f"(draft: {shape})"


def speculative_rows(args, cfg_model, clock, rows, params32=None):
  """Per batch: the target's own loop (the baseline and the reference output), then each K."""
  dtype = args.dtypes.split(",")[0]
  params_t, cfg_t, params_d, cfg_d, label = load_pair(args, with_dtype(cfg_model, dtype), params32)
  params_t = jax.block_until_ready(decode.cast_params(params_t, cfg_t))
  params_d = jax.block_until_ready(decode.cast_params(params_d, cfg_d))
  for batch in map(int, args.batches.split(",")):
    if clock.left() < 0:
      rows.append({"name": f"speculative {label}", "batch": batch, "dtype": dtype,
                   "skipped": "deadline"})
      print_row(rows[-1])
      continue
    prompts, lengths = (text_prompts(args, args.target_workdir, batch) if args.target_workdir
                        else prompt_batch(args, cfg_t, batch))
    plain_s, want = best_of(lambda: decode.decode(params_t, cfg_t, prompts, lengths,
                                                  max_new_tokens=args.new_tokens), clock)
    rows.append(row("target alone", batch, dtype, plain_s, args.new_tokens))
    print_row(rows[-1])
    for k in draft_tokens(args):
      seconds, (got, stats) = best_of(lambda: speculative.decode(
          params_t, cfg_t, params_d, cfg_d, prompts, lengths, draft_tokens=k,
          max_new_tokens=args.new_tokens), clock)
      rows.append(row(f"speculative K={k} {label}", batch, dtype, seconds, args.new_tokens,
                      acceptance=stats["acceptance"],
                      tokens_per_target_call=stats["tokens_per_call"],
                      speedup_vs_target=plain_s / seconds, same_as_target=got == want))
      print_row(rows[-1])


def hf_rows(args, cfg_model, clock, rows):
  """transformers' generate, eager and with a static cache + torch.compile, if they import."""
  try:
    import torch
    import transformers
  except ImportError as e:
    rows.append({"name": "hf", "skipped": f"torch/transformers do not import ({e})"})
    print_row(rows[-1])
    return
  device = "cuda" if torch.cuda.is_available() else "cpu"
  m = cfg_model
  hf_cfg = transformers.LlamaConfig(
      vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
      num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
      num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
      max_position_embeddings=m.max_seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
      tie_word_embeddings=False)
  with torch.device(device):
    model = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
  for name, compiled in (("hf eager", False), ("hf static+compile", True)):
    if compiled:
      # transformers' own way: with a static cache on CUDA, generate compiles its decode step
      # (its CompileConfig: fullgraph, CUDA graphs) and marks each graph step itself; a forward
      # wrapped by hand in torch.compile(mode="reduce-overhead") reads a cache tensor that the
      # next CUDA graph replay overwrote (bench/NOTES.md, 2026-12-03, H200, 81c6693). Compiling takes a minute or two: start
      # only with room for it.
      model.generation_config.cache_implementation = "static"
    for batch in map(int, args.batches.split(",")):
      if clock.left() < (120 if compiled else 0):
        rows.append({"name": name, "batch": batch, "dtype": "bfloat16", "skipped": "deadline"})
        print_row(rows[-1])
        continue
      ids = torch.as_tensor(np.random.default_rng(batch).integers(
          0, m.vocab_size, (batch, args.prompt_len)), device=device)

      def generate():
        with torch.no_grad():
          out = model.generate(ids, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        return out.cpu()
      try:
        seconds, _ = best_of(generate, clock, reps=1)  # eager takes ~20 s a call at batch 1
      except Exception as e:  # a peer's failure is its row's, not the table's
        rows.append({"name": name, "batch": batch, "dtype": "bfloat16",
                     "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
      else:
        rows.append(row(name, batch, "bfloat16", seconds, args.new_tokens,
                        torch=torch.__version__, transformers=transformers.__version__))
      print_row(rows[-1])


def print_row(r):
  for why in ("skipped", "error"):
    if why in r:
      print(f"{r['name']:<32} {r.get('batch', ''):>5} {r.get('dtype', ''):>9}  {why}: "
            f"{r[why]}", flush=True)
      return
  extra = "".join(f"  {k}={r[k]:.3g}" for k in ("acceptance", "tokens_per_target_call",
                                                "speedup_vs_target", "agrees_with_first_row_set")
                  if k in r)
  extra += f"  same_as_target={r['same_as_target']}" if "same_as_target" in r else ""
  print(f"{r['name']:<32} {r['batch']:>5} {r['dtype']:>9} {r['tokens_per_s']:>11.1f} "
        f"{r['ms_per_token']:>9.3f}{extra}", flush=True)


def main(argv=None):
  args = parse(argv)
  cfg_model = config_lib.load_config_file(args.config).model
  limit = cfg_model.max_seq_len
  if args.prompt_len + args.new_tokens + max(draft_tokens(args), default=0) + 1 > limit:
    raise ValueError(f"--prompt_len + --new_tokens + --draft_tokens + 1 exceed the model's "
                     f"context of {limit}: lower --new_tokens")
  clock = Clock(args.deadline_s)
  print(f"{'row':<32} {'batch':>5} {'dtype':>9} {'tokens/s':>11} {'ms/token':>9}", flush=True)
  rows = []
  ops = count_ops(args, cfg_model) if args.count_ops else None
  params32 = None if args.only_speculative else ours_rows(args, cfg_model, clock, rows)
  profile_summary = profile_ours(args, cfg_model, params32) if args.profile_dir else None
  if not args.only_ours and draft_tokens(args):
    speculative_rows(args, cfg_model, clock, rows, params32)
  del params32
  if not (args.no_torch or args.only_ours or args.only_speculative):
    hf_rows(args, cfg_model, clock, rows)
  result = {"rows": rows, "profile_per_token": profile_summary, "loop_body_ops": ops,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
            "device_kind": jax.devices()[0].device_kind,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": os.environ.get("BENCH_COMMIT"), "config": args.config,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "wall_s": time.perf_counter() - clock.start}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
