"""lm-eval speed: requests/s of a multiple-choice task through our lm-eval backend (the model's
forward in the compute dtype, weights cast once, requests sorted and bucketed by length) against
lm-evaluation-harness's own Hugging Face backend (HFLM) on the same weights, on one device, in the
same process.

    python -m bench.eval_speed --out=eval_speed.json                  # 1b config, one GPU
    python -m bench.eval_speed --smoke --out=/tmp/eval_speed.json     # tiny config, CPU

The model is a random init of --config (the 1b: TinyLlama-1.1B's shape), handed to transformers
as our export writes it (interop/hf.py's names and layouts), with a tokenizer trained on the
standard library's sources; the task (`stdlib_mc`, 4 choices a question) is written from comment
lines of the standard library's sources into a local folder and read through lm-eval's
include_path with HF_DATASETS_OFFLINE=1: nothing is downloaded. Both run in bf16 on a GPU (fp32 on
a CPU). Each backend runs the task through lm-eval once (its accuracies; this compiles and warms
up), then its `loglikelihood` on the task's requests (built once, lm-eval's Instances) is timed:
requests/s is the backend's own (4 requests a question), without lm-eval's fixed costs (reading
the data set, building requests, metrics), which are the same for both. The target: ours >= 3x.
"""

import argparse
import glob
import json
import os
import random
import re
import sysconfig
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# JAX and torch share the GPU: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench  # noqa: E402
from tinyllama_jax import config as config_lib, params as param_table  # noqa: E402
from tinyllama_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from tinyllama_jax.inference import lm_eval_backend, lm_eval_tasks  # noqa: E402
from tinyllama_jax.interop import hf  # noqa: E402

STDLIB = sysconfig.get_paths()["stdlib"]
_COMMENT = re.compile(r"^\s*# ([A-Za-z][^#]{30,100})$")


def stdlib_sentences(pattern="*.py", n=None):
  """Comment lines of at least 6 words from the standard library's sources, in a fixed order."""
  out = []
  for path in sorted(glob.glob(os.path.join(STDLIB, pattern))):
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        m = _COMMENT.match(line.rstrip("\n"))
        if m and len(m.group(1).split()) >= 6 and m.group(1) not in out:
          out.append(m.group(1).strip())
    if n is not None and len(out) >= n:
      return out[:n]
  return out


_MC_YAML = """task: stdlib_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{context}}"
doc_to_target: gold
doc_to_choice: choices
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""

_PPL_YAML = """task: stdlib_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
"""

_GEN_YAML = """task: stdlib_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{context}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
"""


def write_local_tasks(folder, n_docs=16, n_choices=4, seed=0):
  """Task YAMLs and their data under `folder` (absolute data paths): stdlib_mc (a comment's first
  half, then its own second half among others'), stdlib_ppl (runs of comment lines, rolling
  log-likelihood), stdlib_gen (complete a comment, exact match). Returns the folder."""
  os.makedirs(folder, exist_ok=True)
  sentences = stdlib_sentences(n=n_docs * (n_choices + 3))
  if len(sentences) < n_docs * n_choices:
    raise ValueError(f"the standard library at {STDLIB} has too few comment lines for {n_docs} "
                     "documents: lower --docs")
  rng = random.Random(seed)
  halves = []
  for s in sentences:
    words = s.split()
    halves.append((" ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])))
  mc, gen = [], []
  for i in range(n_docs):
    others = [halves[(i + 1 + k * n_docs) % len(halves)][1] for k in range(n_choices - 1)]
    gold = rng.randrange(n_choices)
    choices = others[:gold] + [halves[i][1]] + others[gold:]
    mc.append({"context": halves[i][0], "choices": choices, "gold": gold})
    gen.append({"context": halves[i][0], "answer": " " + halves[i][1].split()[0]})
  ppl = [{"text": "\n".join(sentences[i:i + 4])} for i in range(0, 4 * n_docs, 4)]
  for name, rows, template in (("mc", mc, _MC_YAML), ("ppl", ppl, _PPL_YAML),
                               ("gen", gen, _GEN_YAML)):
    data = os.path.join(os.path.abspath(folder), f"stdlib_{name}.jsonl")
    with open(data, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, f"stdlib_{name}.yaml"), "w") as f:
      f.write(template.replace("{data}", data))
  return folder


TASK = "stdlib_mc"


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default=os.path.join(bench.REPO, "configs/1b.py"))
  ap.add_argument("--out", required=True, help="The JSON file to write.")
  ap.add_argument("--smoke", action="store_true", help="tiny config, 4 questions (a CPU check)")
  ap.add_argument("--docs", type=int, default=500, help="questions (4 requests each)")
  ap.add_argument("--batch_size", type=int, default=64, help="rows a forward, both backends")
  ap.add_argument("--tokenizer_vocab", type=int, default=4096)
  ap.add_argument("--tokenizer_files", type=int, default=150, help="stdlib modules it learns from")
  ap.add_argument("--only_ours", action="store_true", help="no HF row (no torch needed)")
  args = ap.parse_args(argv)
  if args.smoke:
    args.config = os.path.join(bench.REPO, "configs/tiny.py")
    args.docs, args.batch_size, args.tokenizer_vocab, args.tokenizer_files = 4, 8, 512, 20
  return args


def random_model(cfg, seed=0):
  """(params, {hf name: fp32 array}): the same random weights for both backends, drawn on the
  host with the table's init (a jax.random draw compiles once a shape: 20 s on a small CPU)."""
  rng = np.random.default_rng(seed)
  std, out_std = param_table.init_stds(cfg.model)
  params, weights = {}, {}
  for path, shape in param_table.shapes(cfg.model):
    init = param_table.lookup(path).init
    x = (np.ones(shape, np.float32) if init == "ones" else
         (out_std if init == "normal_out" else std) * rng.standard_normal(shape, np.float32))
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = x
    weights.update(hf.to_hf(path, x))
  return params, weights


def hf_backend(cfg, weights, tokenizer_path, batch_size, folder):
  """lm-eval's HFLM over a LlamaForCausalLM holding `weights`, bf16 on a GPU (fp32 on a CPU)."""
  import torch
  import transformers
  from lm_eval.models.huggingface import HFLM
  hf.write_tokenizer(folder, tokenizer_path, add_bos=cfg.data.add_bos, add_eos=False,
                     max_len=cfg.model.max_seq_len, log=print)
  hf_cfg = transformers.LlamaConfig.from_dict(hf.hf_config(cfg.model, bos_id=1, eos_id=2,
                                                           dtype_name="float32"))
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
  gpu = torch.cuda.is_available()
  model = model.to("cuda" if gpu else "cpu", torch.bfloat16 if gpu else torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=cfg.model.max_seq_len)


def task_requests(manager):
  """The task's loglikelihood requests (lm-eval Instances), built once for both backends."""
  task = manager.load([TASK])["tasks"][TASK]
  task.build_all_requests(rank=0, world_size=1)
  return list(task.instances)


def timed(lm, manager, requests, name):
  """The task through lm-eval (accuracies; it also compiles and warms up), then the backend's
  loglikelihood on the same requests, timed: the row, and each request's log-likelihood."""
  results = lm_eval_tasks.evaluate(lm, [TASK], manager, bootstrap_iters=0)
  t0 = time.perf_counter()
  answers = lm.loglikelihood(requests, disable_tqdm=True)
  seconds = time.perf_counter() - t0
  row = {"backend": name, "requests": len(requests), "seconds": round(seconds, 3),
         "requests_per_s": round(len(requests) / seconds, 1),
         "acc": results["results"][TASK]["acc,none"],
         "acc_norm": results["results"][TASK]["acc_norm,none"]}
  return row, [lp for lp, _ in answers]


def print_table(rows):
  print(f"{'backend':<10} {'requests':>9} {'seconds':>9} {'requests/s':>11} {'acc':>7} {'acc_norm':>9}")
  for r in rows:
    print(f"{r['backend']:<10} {r['requests']:>9} {r['seconds']:>9.2f} {r['requests_per_s']:>11.1f} "
          f"{r['acc']:>7.3f} {r['acc_norm']:>9.3f}")


def main(argv=None):
  args = parse(argv)
  lm_eval_backend.require_lm_eval("bench.eval_speed")
  cfg = config_lib.load_config_file(args.config)
  with tempfile.TemporaryDirectory() as tmp:
    tasks = write_local_tasks(os.path.join(tmp, "tasks"), n_docs=args.docs)
    tok = tokenizer_lib.train_tokenizer(
        [open(p, encoding="utf-8", errors="replace").read()
         for p in sorted(glob.glob(os.path.join(STDLIB, "*.py")))[:args.tokenizer_files]],
        os.path.join(tmp, "tokenizer.model"), args.tokenizer_vocab)
    params, weights = random_model(cfg)
    manager = lm_eval_tasks.task_manager([TASK], tasks)
    requests = task_requests(manager)
    ours = lm_eval_backend.JaxLM(jax.device_put(params), cfg, tok, batch_size=args.batch_size)
    rows, logps = [], []
    row, lp = timed(ours, manager, requests, "ours")
    rows.append(row)
    logps.append(lp)
    del ours
    if not args.only_ours:
      os.makedirs(os.path.join(tmp, "hf"))
      row, lp = timed(hf_backend(cfg, weights, tok.path, args.batch_size, os.path.join(tmp, "hf")),
                      manager, requests, "hf")
      rows.append(row)
      logps.append(lp)
  result = {"rows": rows, "device": jax.devices()[0].device_kind, "config": args.config,
            "docs": args.docs, "batch_size": args.batch_size, "smoke": args.smoke,
            "date": bench.now_utc(), "commit": bench.commit(), "versions": bench.versions()}
  if len(rows) == 2:
    result["speedup"] = round(rows[0]["requests_per_s"] / rows[1]["requests_per_s"], 2)
    result["max_abs_logp_diff"] = float(np.max(np.abs(np.subtract(*logps))))
  print_table(rows)
  if "speedup" in result:
    print(f"ours / hf: {result['speedup']:.2f}x requests/s (target >= 3x); largest per-request "
          f"log-likelihood difference {result['max_abs_logp_diff']:.2e}")
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
