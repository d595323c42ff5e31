"""An lm-evaluation-harness model over the model's own forward (the one training and decoding use).

`JaxLM` is an `lm_eval.api.model.TemplateLM` (an `LM`): lm-eval's own request plumbing splits
(context, continuation) text as it does for every causal model, and this class tokenizes as
lm-eval's Hugging Face backend does on our export (`python -m tinyllama_jax.export`): BOS first
when the run adds one (the export's add_bos_token), none when the text already starts with the BOS
piece, BOS as the context of an empty context. So a task scores the same here and with
`lm_eval --model hf` on the export (tests/inference/test_lm_eval_backend.py checks both).

- loglikelihood: inference/scoring.py (sorted by length, bucketed, batched on the mesh).
- loglikelihood_rolling: lm-eval's own windows (utils.get_rolling_token_windows with context 1,
  make_disjoint_window) at the model's max_seq_len, every window scored in one sorted pass.
- generate_until: the on-device decode loop (inference/decode.py), greedy unless the task asks for
  sampling; max_gen_toks new tokens at most (contexts cut from the left to leave room for them),
  stopped at EOS, the text cut at the first stop sequence (lm-eval's own post-processing).

lm-eval is the optional `[eval]` extra: `require_lm_eval` is the one line that says so.
"""

import json

import numpy as np
from absl import logging

from tinyllama_jax.inference import decode, scoring

try:
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.models import utils as lm_model_utils
except ImportError:  # the [eval] extra is not installed: require_lm_eval says so in one line
  lm_utils = lm_model_utils = None
  TemplateLM = object

INSTALL = 'pip install -e ".[eval]"'
MAX_GEN_TOKS = 256  # lm-eval's HF backend's default for tasks that set none
BOS_PIECE = "<s>"  # how the export's tokenizer decodes BOS (a text starting so gets no BOS)


def require_lm_eval(what):
  """One line naming the install when lm-eval is missing (before anything loads or compiles)."""
  if lm_utils is None:
    raise ValueError(f"{what} needs lm-evaluation-harness, which is not installed: {INSTALL}")


class JaxLM(TemplateLM):
  """lm-eval's model interface over a run's parameters (a checkpoint's, or training's live ones).

  batch_size: rows a forward (rounded up to the mesh's batch devices); mesh: where the batch is
  split (None: the default device)."""

  def __init__(self, params, cfg, tokenizer, *, batch_size=16, mesh=None):
    require_lm_eval("evaluating lm-eval tasks")
    super().__init__()
    self.cfg_model = cfg.model
    self.tok = tokenizer
    self.add_bos = bool(cfg.data.get("add_bos", True))
    self.scorer = scoring.Scorer(params, cfg.model, batch_size=batch_size, mesh=mesh)
    self._batch_size = batch_size

  @property
  def eot_token_id(self):
    return self.tok.eos_id

  @property
  def prefix_token_id(self):
    return self.tok.bos_id

  @property
  def max_length(self):
    return self.cfg_model.max_seq_len

  @property
  def tokenizer_name(self):
    return self.tok.sha256

  def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
    """As the HF backend's tok_encode on our export: BOS when the run adds one, unless asked
    otherwise or the text already starts with the BOS piece."""
    add = self.add_bos if add_special_tokens is None else add_special_tokens
    if add_special_tokens is None and string.startswith(BOS_PIECE):
      add = False
    ids = ([self.tok.bos_id] if add else []) + self.tok.encode(string)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, ids):
    return self.tok.decode(ids)

  def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
    answers = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in requests])
    for (request, _, _), answer in zip(requests, answers):
      if request is not None:
        self.cache_hook.add_partial("loglikelihood", request, answer)
    return answers

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    windows, owner = [], []
    for n, (text,) in enumerate(req.args for req in requests):
      for context, targets in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((context, targets))
        owner.append(n)
    totals = [0.0] * len(requests)
    for n, (logp, _) in zip(owner, self.scorer.loglikelihoods(windows)):
      totals[n] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm=False):
    groups = {}
    for n, (context, gen_kwargs) in enumerate(req.args for req in requests):
      groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(n)
    out = [None] * len(requests)
    for members in groups.values():
      gen_kwargs = requests[members[0]].args[1]
      texts = self._generate([requests[n].args[0] for n in members], gen_kwargs)
      for n, text in zip(members, texts):
        out[n] = text
        self.cache_hook.add_partial("generate_until", requests[n].args, text)
    return out

  def _generate(self, contexts, gen_kwargs):
    """Completions of one group of contexts that share their generation settings."""
    kwargs = lm_model_utils.normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
    until = lm_model_utils.handle_stop_sequences(kwargs.pop("until", None),
                                                 eos=self.tok.id_to_piece(self.eot_token_id))
    max_gen = int(kwargs.pop("max_gen_toks"))
    if not 0 < max_gen < self.max_length:
      raise ValueError(f"a task asks for max_gen_toks={max_gen}: the model's context is "
                       f"{self.max_length} tokens; lower the task's max_gen_toks")
    temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
    prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen) for c in contexts]
    # longest first, as lm-eval's backends order them: batches of similar lengths
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [None] * len(prompts)
    for b in range(0, len(order), self._batch_size):
      idx = order[b:b + self._batch_size]
      batch = [prompts[i] for i in idx]
      new = decode.decode(self.scorer.params, self.cfg_model, batch,
                          np.array([len(p) for p in batch], np.int32), max_new_tokens=max_gen,
                          eos_id=self.eot_token_id, temperature=temperature,
                          top_p=float(kwargs.get("top_p", 1.0)))
      for i, ids in zip(idx, new):
        text = self.tok.decode([t for t in ids if t != self.eot_token_id])
        texts[i] = lm_model_utils.postprocess_generated_text(text, until, None)
    logging.info("generated %d completions (max_gen_toks=%d, until=%r)", len(texts), max_gen, until)
    return texts
