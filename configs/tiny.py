"""A CPU-sized Llama that trains in a few minutes on two cores, on the Python standard library's
own sources (no download) with a 2048-piece tokenizer trained on first use. The embedded default."""

from tinyllama_jax.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 2048, 128, 4, 4, 2
  m.head_dim, m.ffn_dim, m.max_seq_len = 32, 384, 256
  c.data.source = "stdlib"
  c.data.tokenizer_vocab_size = 2048
  t = c.train
  t.steps, t.seq_len, t.global_batch, t.micro_batch_per_device = 300, 256, 16, 16
  t.log_every, t.eval_every, t.eval_batches, t.checkpoint_every = 10, 100, 4, 100
  t.sample_tokens = 48
  o = c.optim
  o.lr, o.min_lr, o.warmup_steps = 3e-3, 3e-4, 30
  c.mesh.fsdp = 1  # one device is plenty (and tests fake eight)
  return c
