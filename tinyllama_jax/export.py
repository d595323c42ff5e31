"""Export a run to Hugging Face, or import a Hugging Face Llama as a run.

  python -m tinyllama_jax.export --workdir=DIR [--step=N] --out=OUT [--dtype=bf16|fp32]
      [--tokenizer=PATH]
  python -m tinyllama_jax.export --from_hf=HFDIR --workdir=DIR [--config=configs/1b.py]

The command; interop/export.py exports and interop/hf_import.py imports (their docstrings say
what is written, and how a failure leaves nothing). Exit status: 2 bad input, 3 writing failed
(e.g. a full disk), 128 + N stopped by signal N (SIGTERM, SIGINT: the partial output is removed).
"""

import json
import sys

from absl import app, flags, logging

from tinyllama_jax import cli
from tinyllama_jax.interop import export as export_lib
from tinyllama_jax.interop import hf_import

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "Run directory to export from (or import into).")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_string("out", None, "Export: the Hugging Face directory to write.")
  flags.DEFINE_string("dtype", "bf16", "Export: weight dtype, bf16 or fp32.")
  flags.DEFINE_string("max_shard_size", "5GB",
                      "Export: largest safetensors file (e.g. 2GB); 0 = one file.")
  flags.DEFINE_string("from_hf", None, "Import: a Hugging Face Llama directory.")
  flags.DEFINE_string("config", None, "Import: config file whose training fields the run starts "
                      "from (default: base_config).")
  flags.DEFINE_string("tokenizer", None, "Sentencepiece .model. Import: default "
                      "HFDIR/tokenizer.model. Export: instead of the run's own "
                      "(WORKDIR/tokenizer/tokenizer.model).")
  flags.DEFINE_bool("allow_other_tokenizer", False, "Export: use --tokenizer even though its "
                    "sha256 is not the one the run trained with (a warning instead of an error).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]} (see --help)")
  logging.set_verbosity(logging.INFO)
  if not FLAGS.workdir:
    raise ValueError("--workdir is required")
  try:
    with export_lib.signals_raise_interrupted():
      _import_or_export()
  except export_lib.Interrupted as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)


def _import_or_export():
  if FLAGS.from_hf:
    report = hf_import.import_hf(FLAGS.from_hf, FLAGS.workdir, base_config_path=FLAGS.config,
                                  tokenizer=FLAGS.tokenizer)
    print(f"imported {FLAGS.from_hf} -> {report['workdir']}; continue training with:\n"
          f"  python -m tinyllama_jax.train --config={report['workdir']}/config.py "
          f"--workdir={report['workdir']}")
    return
  if not FLAGS.out:
    raise ValueError("--out is required for export (or pass --from_hf=HFDIR to import)")
  report = export_lib.export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                             max_shard_size=FLAGS.max_shard_size, tokenizer=FLAGS.tokenizer,
                             allow_other_tokenizer=FLAGS.allow_other_tokenizer)
  print(json.dumps(report))


def run_cli():
  define_flags()
  cli.run(main, faults=(export_lib.WriteError,))


if __name__ == "__main__":
  run_cli()
