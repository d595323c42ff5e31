"""Data benchmark: prepare throughput (MB/s of text per core) and loader throughput (tokens/s/host).

  python -m bench.data [--mb=16] [--seconds=3] [--json=PATH]   # default bench/results/<date>-cpu-<commit>-data.json

The corpus is the running Python's standard library (.py sources, code: a hard case for BPE),
written as .jsonl files; the tokenizer is a 32000-piece BPE trained on it (Llama-2's size) unless
--tokenizer names one. Prints a table and writes the numbers as JSON.
"""

import json
import os
import platform
import resource
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

import bench
from tinyllama_jax.data import formats
from tinyllama_jax.data import pipeline
from tinyllama_jax.data import prepare as prepare_lib
from tinyllama_jax.data import sources
from tinyllama_jax.data import tokenizer as tokenizer_lib
from tinyllama_jax.data.config import data_config

_MB = flags.DEFINE_integer("mb", 16, "MB of text to prepare")
_SECONDS = flags.DEFINE_float("seconds", 3.0, "time per loader measurement")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "loader sequence length")
_BATCH = flags.DEFINE_integer("batch_size", 8, "loader batch (sequences per host)")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "sentencepiece .model ('' = train a 32000 BPE)")
_JSON = flags.DEFINE_string("json", "", "where to write the results ('' = bench/results/"
                            "<date>-cpu-<commit>-data.json)")


def _write_corpus(folder: str, megabytes: int, num_files: int) -> list[str]:
  root, names = sources.stdlib_root(), sources.stdlib_files()
  texts, total = [], 0
  for name in names * (1 + megabytes * 10**6 // 30_000_000):  # cycle if asked for more than it has
    with open(os.path.join(root, name), encoding="utf-8") as f:
      texts.append(f.read())
    total += len(texts[-1].encode())
    if total >= megabytes * 10**6:
      break
  paths = [os.path.join(folder, f"part-{i:03d}.jsonl") for i in range(num_files)]
  for i, path in enumerate(paths):
    with open(path, "w") as f:
      for text in texts[i::num_files]:
        f.write(json.dumps({"text": text}) + "\n")
  return paths


def _cpu_seconds():
  """CPU time of this process and its finished children: a per-core rate that other load on a
  shared machine does not distort (wall-clock rates are reported beside it)."""
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _prepare_rate(paths, tok, out, num_workers):
  wall, cpu = time.perf_counter(), _cpu_seconds()
  manifest = prepare_lib.prepare(paths, tok, out, num_workers=num_workers, progress=False,
                                 eval_fraction=0.01)
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  mb = manifest["totals"]["text_bytes"] / 1e6
  return {"wall_MB_per_s": mb / wall, "MB_per_cpu_s": mb / cpu, "text_MB": mb,
          "tokens": manifest["totals"]["train_tokens"] + manifest["totals"]["eval_tokens"]}


def _loader_rate(cfg, tok, vocab_size, num_workers=0):
  cfg.num_workers = num_workers
  it = pipeline.make_iterator(cfg, split="train", seq_len=_SEQ_LEN.value,
                              batch_size=_BATCH.value, seed=0, process_index=0, process_count=1,
                              tokenizer=tok, vocab_size=vocab_size)
  try:
    for _ in range(1 + 4 * num_workers):  # start-up (workers, first opens) is not throughput
      next(it)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < _SECONDS.value:
      batch = next(it)
      n += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    used = float(batch["loss_mask"].mean())
  finally:
    it.close()
  tokens = n * _BATCH.value * _SEQ_LEN.value
  # In-process, tokens per CPU-second of this process is the per-core rate; with workers the
  # work happens elsewhere, so only the wall-clock rate means anything.
  return {"tokens_per_s": tokens / seconds, "non_padding": used,
          "tokens_per_cpu_s": tokens / cpu if num_workers == 0 else None}


def main(argv):
  del argv
  cores = os.cpu_count() or 1
  results = {"machine": {"cpu_count": cores, "processor": platform.processor() or platform.machine(),
                         "python": platform.python_version()},
             "settings": {"mb": _MB.value, "seq_len": _SEQ_LEN.value,
                          "batch_size": _BATCH.value, "corpus": "stdlib .py as jsonl"},
             "prepare": {}, "loader": {}}
  with tempfile.TemporaryDirectory() as tmp:
    paths = _write_corpus(tmp, _MB.value, num_files=max(2 * cores, 4))
    if _TOKENIZER.value:
      tok = tokenizer_lib.Tokenizer(_TOKENIZER.value)
    else:
      logging.info("training a 32000-piece BPE on 4 MB of the corpus")
      tok = pipeline.load_tokenizer(data_config(), os.path.join(tmp, "work"))
    results["tokenizer"] = {"path": tok.path, "vocab_size": tok.vocab_size}
    results["prepare"]["in_process"] = _prepare_rate(paths[:2], tok, os.path.join(tmp, "one"), 1)
    results["prepare"][f"workers={cores}"] = _prepare_rate(paths, tok, os.path.join(tmp, "all"),
                                                           cores)

    cfg = data_config()
    cfg.source, cfg.paths = "prepared", os.path.join(tmp, "all")
    for packing in ("concat", "first_fit", "best_fit"):
      cfg.packing = packing
      for workers in (0, cores):
        results["loader"][f"prepared/{packing}/workers={workers}"] = _loader_rate(
            cfg, tok, tok.vocab_size, workers)
    cfg = data_config()
    cfg.tokenizer = tok.path
    for workers in (0, cores):
      results["loader"][f"stdlib (tokenized on the fly)/concat/workers={workers}"] = (
          _loader_rate(cfg, tok, tok.vocab_size, workers))
    cfg.source = "synthetic"
    results["loader"]["synthetic/workers=0"] = _loader_rate(cfg, None, 32000)

  load = os.getloadavg()[0]
  results["machine"]["load_average_1min_at_end"] = load
  print(f"\ndata benchmark on {cores} cores ({results['machine']['processor']}, load average "
        f"{load:.1f}), {_MB.value} MB of text, vocab {tok.vocab_size}")
  print(f"{'prepare (text MB/s)':<48} {'wall':>12} {'per CPU-s':>12}")
  for k, v in results["prepare"].items():
    print(f"  {k:<46} {v['wall_MB_per_s']:>12.2f} {v['MB_per_cpu_s']:>12.2f}")
  print(f"{'loader (seq ' + str(_SEQ_LEN.value) + ', batch ' + str(_BATCH.value) + ')':<48} "
        f"{'tokens/s':>12} {'per CPU-s':>12} {'non-pad':>8}")
  for k, v in results["loader"].items():
    per_cpu = f"{v['tokens_per_cpu_s']:,.0f}" if v["tokens_per_cpu_s"] else "-"
    print(f"  {k:<46} {v['tokens_per_s']:>12,.0f} {per_cpu:>12} {v['non_padding']:>8.3f}")
  path = _JSON.value or bench.result_path("data.json", ["cpu"])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  formats.write_json_atomic(path, results)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
