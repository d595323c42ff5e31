"""TinyLlama-1.1B with its full pretraining recipe (reference: ../shared/reference/tinyllama.md).

22 layers, d 2048, 32 query / 4 kv heads of 64, SwiGLU 5632, vocab 32000, context 2048:
1,100,048,384 parameters. AdamW 4e-4 -> 4e-5 (cosine, 2000 warmup steps), batch 1024 x 2048
tokens as micro-batches of 8 per device, 1,430,512 steps = 3T tokens. Bring the data and the
Llama-2 tokenizer: --config.data.tokenizer=/path/to/tokenizer.model (see README).
"""

from tinyllama_jax.config import base_config


def get_config():
  c = base_config()  # the defaults are TinyLlama-1.1B and its recipe
  c.data.source = "stdlib"  # replace with the prepared SlimPajama + Starcoder mixture
  c.data.tokenizer_vocab_size = 32000
  return c
