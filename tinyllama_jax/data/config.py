"""Data defaults. The trainer's base config does `cfg.data = data_config()`; config files override."""

import ml_collections

from tinyllama_jax.choices import choice

SOURCES = ("stdlib", "synthetic", "text", "prepared", "litpkds", "mixture", "chat")
PACKINGS = ("concat", "first_fit", "best_fit")
CHAT_OVERFLOWS = ("drop", "truncate")  # what data/chat.py does with a conversation too long


def data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # 'stdlib': the running Python's standard library .py files (real text, always present).
  # 'synthetic': uniform random tokens (benchmarks). 'text': raw .txt/.jsonl/.parquet files.
  # 'prepared': token shards + manifest written by `python -m tinyllama_jax.prepare`.
  # 'litpkds': TinyLlama's prepared .bin files. 'mixture': weighted mix of `mixture` entries.
  # 'chat': .jsonl/.jsonl.zst/.parquet rows of {"messages": [{"role", "content"}]} for SFT
  # (data/chat.py), loss on the assistant's tokens only; needs packing first_fit or best_fit.
  c.source = choice("stdlib", SOURCES)
  # 'concat' is TinyLlama's concat-then-split (documents run into each other, no masking) and works
  # with every attention backend. 'first_fit' / 'best_fit' pack whole documents with segment ids,
  # so attention and loss respect document boundaries (needs a segment-aware attention backend).
  c.packing = choice("concat", PACKINGS)
  c.num_packing_bins = 64  # first/best fit: more bins, less padding
  c.paths = ""  # glob(s), comma separated, for 'text' / 'prepared' / 'litpkds'
  # 'litpkds': the eval split's files (TinyLlama kept validation files apart); '' = eval_fraction
  # of the files by name hash. 'prepared' data carries its own eval split (prepare --eval_fraction).
  c.eval_paths = ""
  # 'prepared': at start, a shard is hashed against prepare's checksum when it is not older than
  # the manifest or its size or header differs; True hashes every shard (reads the whole corpus).
  c.verify_shards = False
  c.text_field = "text"  # .jsonl / .parquet column holding the document
  # 'mixture': "weight:source:glob" entries joined by ';', e.g. TinyLlama's
  # "0.693584:prepared:/data/slim;0.306416:prepared:/data/star" (prepare's --out folders; a path
  # may also be a glob of them, or their manifest.json).
  c.mixture = ""
  # Sentencepiece .model; '' = train a BPE on a sample of the corpus, cached in WORKDIR/tokenizer.
  c.tokenizer = ""
  c.tokenizer_vocab_size = 32000
  c.tokenizer_train_bytes = 4_000_000  # sample of the training split the tokenizer learns from
  c.eval_fraction = 0.02  # held-out share of documents/files, chosen by a stable hash of the name
  c.num_workers = 0  # grain mp_prefetch worker processes; 0 = in-process
  c.worker_buffer_size = 4  # batches each worker keeps ready
  c.add_bos = True  # not for 'chat': its template writes the special tokens
  c.add_eos = True
  # 'chat': the Jinja chat template, as transformers renders it; '' = TinyLlama-Chat's (Zephyr's)
  # `<|role|>\n{content}</s>\n` turns. Export writes it into tokenizer_config.json.
  c.chat_template = ""
  # 'chat': a conversation longer than train.seq_len + 1 tokens is dropped, or cut to fit
  # (counted and logged either way).
  c.chat_overflow = choice("drop", CHAT_OVERFLOWS)
  return c
