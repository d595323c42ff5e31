"""lm-eval speed: requests/s of a multiple-choice task through our backend (the model's forward in
the compute dtype, weights cast once, requests sorted and bucketed by length) against
lm-evaluation-harness's own Hugging Face backend (HFLM) on the fp32... no: the same weights
exported to Hugging Face, run by transformers in bf16 on the same device, in the same process.

    python -m bench.eval_speed --out=eval_speed.json                  # 1b config, one GPU
    python -m bench.eval_speed --smoke --out=/tmp/eval_speed.json     # tiny config, CPU

The model is a random init of --config (the 1b: TinyLlama-1.1B's shape) with a tokenizer trained
on the standard library's sources; the task (`stdlib_mc`, 4 choices a question) is written from
comment lines of the standard library's sources into a local folder, read through lm-eval's
`--include_path` with HF_DATASETS_OFFLINE=1: nothing is downloaded. Each backend runs the task
once to compile / warm up, then once timed; requests/s counts lm-eval's loglikelihood requests
(a question is 4). The target is ours >= 3x HF's.
"""

import argparse
import datetime
import glob
import json
import os
import random
import re
import sysconfig

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
