"""What the lm-eval tests share: a tiny run trained on the standard library's sources, its fp32
Hugging Face export, and local tasks written from stdlib text (bench/eval_speed.py's), all offline."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import eval_speed  # noqa: E402
from tinyllama_jax import config as config_lib  # noqa: E402
from tinyllama_jax.interop import export  # noqa: E402
from tinyllama_jax.training import loop as train_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 20


def tiny_config(steps=STEPS):
  """A 2-layer model of 64 positions, trained a few steps: enough to score text better than chance."""
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"))
  m, t = cfg.model, cfg.train
  m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim = 64, 2, 4, 2, 16, 128
  m.vocab_size, m.max_seq_len = 512, 64
  cfg.data.tokenizer_vocab_size, cfg.data.tokenizer_train_bytes = 512, 200_000
  t.seq_len, t.global_batch, t.micro_batch_per_device = 64, 8, 8
  t.steps, t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = steps, 10, 0, steps, 1
  t.sample_tokens, t.async_checkpoint = 0, False
  cfg.optim.warmup_steps, cfg.optim.lr = 3, 3e-3
  cfg.mesh.fsdp = 1
  return cfg


def trained_run(root):
  """{'workdir', 'hf' (fp32 export), 'tasks' (local task folder)} under root."""
  workdir, hf, tasks = (os.path.join(root, n) for n in ("run", "hf", "tasks"))
  train_lib.train(tiny_config(), workdir)
  export.export(workdir, hf, dtype="fp32")
  eval_speed.write_local_tasks(tasks, n_docs=8)
  return {"workdir": workdir, "hf": hf, "tasks": tasks}
