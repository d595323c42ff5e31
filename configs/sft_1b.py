"""Supervised fine-tuning of TinyLlama-1.1B into a chat model: the recipe of
TinyLlama-1.1B-Chat-v1.0's SFT stage.

    python -m tinyllama_jax.train --config=configs/sft_1b.py --workdir=runs/sft_1b \
      --config.train.init_from=runs/1b \
      --config.data.paths='/data/ultrachat_200k/data/train_sft-*.parquet'

What it is based on. TinyLlama-1.1B-Chat-v1.0's model card: "following Hugging Face's Zephyr
training recipe", first fine-tuned on a variant of UltraChat (HuggingFaceH4/ultrachat_200k), then
aligned with DPO (TRL) on ultrafeedback_binarized (DPO is not implemented here). Zephyr's SFT recipe
is alignment-handbook's recipes/zephyr-7b-beta/sft/config_full.yaml: the chat template of
data/chat.py's ZEPHYR_TEMPLATE (the same string TinyLlama-Chat's tokenizer_config.json carries),
learning rate 2e-5, cosine schedule, warmup_ratio 0.1, max_seq_length 2048, bf16, 1 epoch,
16 sequences a device on 8 GPUs (global batch 128); HF Trainer's defaults for the rest (AdamW
betas 0.9/0.999, eps 1e-8, no weight decay, gradient clipping 1.0, cosine to 0).
alignment-handbook's recipes/zephyr-tinyllama/sft (QLoRA) uses the same template, data, cosine,
warmup 0.1 and max length 2048 (with LoRA's 2e-4). TinyLlama's own repo (sft/script.sh) holds only
the older v0.1/v0.2 recipes (OpenAssistant, lr 1e-5, constant schedule).

What is uncertain. TinyLlama's exact SFT data ("a variant of UltraChat"), its epoch count (1 in
Zephyr's recipe; 1 to 3 have been reported) and its batch size (128 in Zephyr's full recipe; 64
is possible). Packing: SFTTrainer's packing concatenated conversations across boundaries; here
they are packed whole (first_fit) and never attend to each other. The loss is on the assistant's
tokens only (SFTTrainer of that time trained on every token).

train.steps: one epoch is (conversations / 1.5 conversations a packed row) / 128 rows a step.
UltraChat-200k's train_sft split is 207,865 conversations, ~1.4k tokens each: ~1,100 steps at
2048 tokens a row. The train log prints the conversations and tokens the files hold ("chat
data: ..."): set --config.train.steps (and optim.warmup_steps to a tenth of it) from it.
"""

from tinyllama_jax.config import base_config


def get_config():
  c = base_config()  # the model fields are TinyLlama-1.1B's: init_from must be a 1.1B run
  d = c.data
  d.source = "chat"
  d.paths = ""  # the user's chat files (.jsonl/.jsonl.zst/.parquet with a `messages` column)
  d.packing = "first_fit"  # conversations kept whole, each attending only to itself
  d.chat_template = ""  # TinyLlama-Chat's (Zephyr's) template
  d.chat_overflow = "truncate"  # SFTTrainer cut long conversations at max_seq_length
  d.eval_fraction = 0.01
  t = c.train
  t.init_from = ""  # the pretrained run (or an `export --from_hf` import of TinyLlama-1.1B)
  t.seq_len = 2048
  t.global_batch = 128
  t.micro_batch_per_device = 8
  t.steps = 1100  # ~1 epoch of UltraChat-200k (see above)
  t.eval_every, t.eval_batches, t.checkpoint_every = 200, 16, 200
  t.sample_tokens = 0
  o = c.optim
  o.lr, o.min_lr = 2e-5, 0.0
  o.warmup_steps = 110  # warmup_ratio 0.1
  o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm = 0.9, 0.999, 1e-8, 0.0, 1.0
  return c
