"""Prepare a corpus once, for many runs: text files -> sentencepiece token shards + manifest.json.

  python -m tinyllama_jax.prepare --input='/data/slimpajama/train/*/*.jsonl.zst' \
      --tokenizer=tokenizer.model --out=/data/slim_prepared

data/prepare.py does the work; its docstring says what is written. Exit status: 0 done, 2 bad
input, 3 cannot write (full disk), 130 interrupted (Ctrl-C), 143 stopped by SIGTERM.
"""

import json
import os
import sys

from absl import flags

from tinyllama_jax import cli
from tinyllama_jax.data import prepare as prepare_lib
from tinyllama_jax.data import tokenizer as tokenizer_lib


def define_flags():
  flags.DEFINE_string("input", None, "glob(s) of .txt/.jsonl/.jsonl.zst/.parquet files, comma "
                      "separated")
  flags.DEFINE_string("tokenizer", None, "sentencepiece .model file (copied into --out)")
  flags.DEFINE_string("out", None, "output folder (shards/ + manifest.json + tokenizer.model)")
  flags.DEFINE_string("text_field", "text", ".jsonl key / .parquet column holding the text")
  flags.DEFINE_bool("add_bos", True, "start each document with BOS")
  flags.DEFINE_bool("add_eos", True, "end each document with EOS")
  flags.DEFINE_float("eval_fraction", 0.001, "share of documents held out for eval, in [0, 1)")
  flags.DEFINE_integer("shard_tokens", 2049 * 1024, "tokens per shard (TinyLlama's chunk)")
  flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "tokenizer processes (0 or 1: none)")


def main(argv):
  del argv
  f = flags.FLAGS
  prepare_lib.stop_on_sigterm()
  try:
    for name in ("input", "tokenizer", "out"):
      if not f[name].value:
        raise ValueError(f"--{name} is required (--helpshort lists the flags)")
    tokenizer = tokenizer_lib.Tokenizer(f.tokenizer, flag="--tokenizer")
    inputs = prepare_lib.expand_inputs(f.input)
    manifest = prepare_lib.prepare(inputs, tokenizer, f.out, text_field=f.text_field, add_bos=f.add_bos,
                       add_eos=f.add_eos, eval_fraction=f.eval_fraction,
                       shard_tokens=f.shard_tokens, num_workers=f.num_workers)
  except BaseException as e:  # pylint: disable=broad-except
    line_status = prepare_lib.failure(e, f.out)
    if line_status is None:
      raise
    print(line_status[0], file=sys.stderr)
    sys.exit(line_status[1])
  print(json.dumps(manifest["totals"], indent=1))


def run_cli():
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run_cli()
