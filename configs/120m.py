"""TinyLlama's smaller config, "120M": 12 layers, d 768, 12 heads sharing 1 kv head (MQA)."""

from tinyllama_jax.config import base_config


def get_config():
  c = base_config()
  m = c.model
  m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim = 12, 768, 12, 1, 64, 2048
  c.data.tokenizer_vocab_size = 32000
  c.train.steps = 20_000
  c.train.global_batch = 256
  c.optim.lr = 6e-4
  c.optim.min_lr = 6e-5
  c.optim.warmup_steps = 500
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  return c
