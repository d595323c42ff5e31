"""Loss and perplexity on text: `python -m tinyllama_jax.evaluate --workdir=DIR --data=FILE`.

The command; inference/evaluate.py scores (its docstring says how windows are cut).
"""

import json

import jax
from absl import app, flags, logging

from tinyllama_jax import cli
from tinyllama_jax.checkpoint import run as run_lib
from tinyllama_jax.data import tokenizer as tokenizer_lib
from tinyllama_jax.inference import evaluate as evaluate_lib

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "Run directory (train's --workdir, or an import).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("data", None, "Text/.jsonl file(s) (comma list or glob), or split:eval.")
  flags.DEFINE_string("text_field", "text", ".jsonl field holding the document.")
  flags.DEFINE_integer("seq_len", 0, "Window length, 1 to the model's max_seq_len (0: the run's "
                       "train.seq_len).")
  flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
  flags.DEFINE_integer("batches", 16, "Pipeline forms of --data: how many batches to score at "
                       "most (it stops at the end of the data: no token is scored twice).")
  flags.DEFINE_enum("split", "eval", ["eval", "train"], "prepared:/litpkds: which split to score.")
  flags.DEFINE_string("tokenizer", None, "Sentencepiece .model instead of the run's own "
                      "(WORKDIR/tokenizer/tokenizer.model).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not FLAGS.workdir or not FLAGS.data:
    raise ValueError("--workdir and --data are required")
  step = run_lib.resolve_step(FLAGS.workdir, FLAGS.step)
  cfg = run_lib.run_config(FLAGS.workdir, step)
  seq_len = evaluate_lib.check_flags(cfg, seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size,
                        batches=FLAGS.batches)
  tok_path = run_lib.tokenizer_path(cfg, FLAGS.workdir, FLAGS.tokenizer)
  tokenizer = tokenizer_lib.Tokenizer(tok_path) if tok_path else None
  params = jax.device_put(run_lib.load_params(FLAGS.workdir, step, cfg.model))
  pipeline_form = evaluate_lib.data_config_for(cfg, FLAGS.data)
  if pipeline_form is not None:
    data_cfg, split = pipeline_form
    result = evaluate_lib.evaluate_split(params, data_cfg, tokenizer, split or FLAGS.split, seq_len=seq_len,
                            batch_size=FLAGS.batch_size, batches=FLAGS.batches)
  else:
    if tokenizer is None:
      raise ValueError(f"the run in {FLAGS.workdir} has no tokenizer: use --data=split:eval")
    result = evaluate_lib.evaluate_files(params, cfg, tokenizer, FLAGS.data, seq_len=seq_len,
                            batch_size=FLAGS.batch_size, text_field=FLAGS.text_field)
  result.update(step=step, data=FLAGS.data, seq_len=seq_len)
  print(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
        f"{result['tokens']:,} tokens")
  print(json.dumps(result))


def run_cli():
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run_cli()
