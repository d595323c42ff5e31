"""Loss and perplexity on text: `python -m tinyllama_jax.evaluate --workdir=DIR --data=FILE`.
lm-evaluation-harness tasks: `python -m tinyllama_jax.evaluate --workdir=DIR --tasks=tinyllama
--out=results.json` (docs/evaluate.md).

The command; inference/evaluate.py scores (its docstring says how windows are cut), and
inference/lm_eval_tasks.py + lm_eval_backend.py run the tasks.
"""

import json
import os

import jax
from absl import app, flags, logging

from tinyllama_jax import cli
from tinyllama_jax.checkpoint import run as run_lib
from tinyllama_jax.data import formats
from tinyllama_jax.inference import evaluate as evaluate_lib
from tinyllama_jax.inference import lm_eval_backend, lm_eval_tasks

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
  flags.DEFINE_string("tasks", None, "lm-eval task names, comma-separated, instead of --data; "
                      "'tinyllama': TinyLlama's seven (hellaswag, openbookqa, winogrande, "
                      "arc_easy, arc_challenge, boolq, piqa).")
  flags.DEFINE_integer("num_fewshot", None, "--tasks: few-shot examples (default: each task's).")
  flags.DEFINE_integer("limit", None, "--tasks: at most this many documents a task.")
  flags.DEFINE_string("include_path", None, "--tasks: a folder of lm-eval task YAMLs (local "
                      "tasks).")
  flags.DEFINE_string("out", None, "--tasks: write lm-eval's results (task -> metric -> value) "
                      "to this JSON file.")
  flags.DEFINE_bool("allow_other_tokenizer", False, "Use --tokenizer even though its sha256 is "
                    "not the one the run trained with (a warning instead of an error).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if FLAGS.tasks is not None:
    return tasks_main()
  if not FLAGS.workdir or not FLAGS.data:
    raise ValueError("--workdir and --data are required")
  files = not evaluate_lib.reads_pipeline(FLAGS.data)
  step, cfg, tokenizer = run_lib.open_run(
      FLAGS.workdir, FLAGS.step, tokenizer=FLAGS.tokenizer,
      allow_other_tokenizer=FLAGS.allow_other_tokenizer,
      needs_text="--data files are text (--data=split:eval scores the run's own data)" if files
      else None)
  seq_len = evaluate_lib.check_flags(cfg, seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size,
                        batches=FLAGS.batches)
  params = jax.device_put(run_lib.load_params(FLAGS.workdir, step, cfg.model))
  if not files:
    data_cfg, split = evaluate_lib.data_config_for(cfg, FLAGS.data)
    result = evaluate_lib.evaluate_split(params, data_cfg, tokenizer, split or FLAGS.split, seq_len=seq_len,
                            batch_size=FLAGS.batch_size, batches=FLAGS.batches)
  else:
    result = evaluate_lib.evaluate_files(params, cfg, tokenizer, FLAGS.data, seq_len=seq_len,
                            batch_size=FLAGS.batch_size, text_field=FLAGS.text_field)
  result.update(step=step, data=FLAGS.data, seq_len=seq_len)
  print(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
        f"{result['tokens']:,} tokens")
  print(json.dumps(result))


def tasks_main():
  """--tasks: every input checked (tasks, settings, run, --out) before the model loads."""
  names = lm_eval_tasks.parse_names(FLAGS.tasks)
  lm_eval_tasks.check_settings(limit=FLAGS.limit, num_fewshot=FLAGS.num_fewshot,
                              batch_size=FLAGS.batch_size)
  if FLAGS.data or not FLAGS.workdir:
    raise ValueError("--tasks needs --workdir (a run) and no --data (one evaluation at a time)")
  if FLAGS.out and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.out))):
    raise ValueError(f"--out={FLAGS.out!r}: its folder does not exist")
  manager = lm_eval_tasks.task_manager(names, FLAGS.include_path)
  step, cfg, tok = run_lib.open_run(FLAGS.workdir, FLAGS.step, tokenizer=FLAGS.tokenizer,
                                    allow_other_tokenizer=FLAGS.allow_other_tokenizer,
                                    needs_text="lm-eval tasks are text")
  lm = lm_eval_backend.JaxLM(jax.device_put(run_lib.load_params(FLAGS.workdir, step, cfg.model)),
                             cfg, tok, batch_size=FLAGS.batch_size)
  results = lm_eval_tasks.evaluate(lm, names, manager, num_fewshot=FLAGS.num_fewshot,
                                   limit=FLAGS.limit)
  print(lm_eval_tasks.table(results))
  average, picked = lm_eval_tasks.headline(results, names)
  if average is not None:
    print(f"average of {len(picked)} ({', '.join(f'{t} {m}' for t, (m, _) in picked.items())}): "
          f"{average:.4f}")
  if FLAGS.out:
    formats.write_json_atomic(FLAGS.out, results["results"])


def run_cli():
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run_cli()
