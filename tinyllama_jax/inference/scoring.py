"""Log-likelihoods of token continuations through the model's own forward, batched for the device.

A request is (context ids, continuation ids); its answer is (the sum of the continuation's log
probabilities, whether greedy decoding would have produced exactly that continuation), as
lm-evaluation-harness's Hugging Face backend computes them: the ids past the model's context are
cut from the left, the last input token is dropped, and the log-softmax runs over the whole vocab.

Requests are sorted by length (longest first) and scored batch_size at a time, each batch right
padded to a bucket length (bucket_length: at least MIN_BUCKET, at most max_seq_len) and to
batch_size rows: a task compiles a handful of programs, not one per length. Padding sits after a
row's tokens, so the causal forward scores them exactly as alone. Weights are cast to the compute
dtype once (bf16 on GPU/TPU), the batch split over the mesh's batch axes when one is set.

Across processes (Levanter's arrangement): process 0 runs lm-eval's bookkeeping and broadcasts
each padded batch; every other process sits in `serve`, running the same forward on what it
receives, until process 0 calls `stop_serving` (with failed=True when its side raised: then
every process raises, rather than waiting in a collective process 0 never joins).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from tinyllama_jax import model as model_lib, sharding
from tinyllama_jax.inference import decode

MIN_BUCKET = 32
_STOP, _SCORE, _FAILED = 0, 1, 2  # what process 0 broadcasts before each batch, or instead


def bucket_length(n, max_len):
  """The padded length of a batch whose longest row has n tokens: the next of 32, 48, 64, 96,
  128, 192, ... (powers of two and their halfway points: at most 1.5x the tokens, ~2 programs an
  octave), at most max_len."""
  n = max(int(n), MIN_BUCKET)
  power = 1 << (n - 1).bit_length()
  return min(3 * power // 4 if n <= 3 * power // 4 else power, max_len)


def model_inputs(context, continuation, max_len):
  """(inputs, targets, how many of the last targets are scored): lm-eval's cut, whole
  (context + continuation) kept to its last max_len + 1 ids."""
  whole = (list(context) + list(continuation))[-(max_len + 1):]
  return whole[:-1], whole[1:], len(continuation)


def _token_scores(params, tokens_BT, targets_BT, *, graphdef):
  """Per token: log p(target) and whether the target is the argmax."""
  model = nnx.merge(graphdef, params)
  h_BTD = model.hidden(tokens_BT)
  logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, params["lm_head"].astype(h_BTD.dtype),
                          preferred_element_type=jnp.float32)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  logp_BT = target_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
  return logp_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


class Scorer:
  """Scores requests on `mesh` (None: the default device) with `batch_size` rows a call."""

  def __init__(self, params, cfg_model, *, batch_size, mesh=None):
    if batch_size < 1:
      raise ValueError(f"--batch_size={batch_size}: use 1 or more")
    cfg_model = decode.for_decoding(cfg_model)
    self.max_len = cfg_model.max_seq_len
    self.mesh = mesh
    step = sharding.batch_devices(mesh) if mesh is not None else 1
    self.batch_size = -(-batch_size // step) * step  # every batch device gets rows
    self.cfg_model = cfg_model
    self.set_params(params)
    self._fn = jax.jit(functools.partial(_token_scores,
                                         graphdef=model_lib.graphdef(cfg_model)))
    self.batches = 0

  def set_params(self, params):
    """New weights (training's, each evaluation), cast once; the compiled programs stay."""
    self.params = decode.cast_params(params, self.cfg_model)

  def loglikelihoods(self, requests):
    """[(log-likelihood, is greedy)] for [(context ids, continuation ids)], in request order."""
    for _, continuation in requests:
      if not 0 < len(continuation) <= self.max_len:
        raise ValueError(f"a task's answer is {len(continuation)} tokens: it must be 1 to the "
                         f"model's context ({self.max_len} tokens); check the task's choices")
    rows = [model_inputs(c, x, self.max_len) for c, x in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    batches = [order[b:b + self.batch_size] for b in range(0, len(order), self.batch_size)]
    out = [None] * len(rows)

    def finish(idx, device_out):
      for i, answer in zip(idx, self._answers([rows[i] for i in idx], device_out)):
        out[i] = answer

    # Each batch is dispatched before the previous one's scores come back to the host: the
    # device computes while the host pads the next batch and sums the last. Not across
    # processes: there a batch's gather is a collective every process enters before the next
    # batch's broadcast.
    overlap = jax.process_count() == 1
    pending = None
    for idx in batches:
      launched = (idx, self._launch([rows[i] for i in idx]))
      if not overlap:
        finish(*launched)
        continue
      if pending is not None:
        finish(*pending)
      pending = launched
    if pending is not None:
      finish(*pending)
    return out

  def _launch(self, rows):
    """The batch's per-token scores, computing (device arrays, not yet on the host)."""
    T = bucket_length(max(len(r[0]) for r in rows), self.max_len)
    tokens = np.zeros((self.batch_size, T), np.int32)
    targets = np.zeros((self.batch_size, T), np.int32)
    for i, (inputs, tgt, _) in enumerate(rows):
      tokens[i, :len(inputs)], targets[i, :len(tgt)] = inputs, tgt
    if jax.process_count() > 1:
      self._broadcast(_SCORE, tokens, targets)
    return self._forward(tokens, targets)

  def _answers(self, rows, device_out):
    logp_BT, greedy_BT = self._to_host(device_out)
    out = []
    for i, (inputs, _, n) in enumerate(rows):
      span = slice(len(inputs) - n, len(inputs))
      out.append((float(logp_BT[i, span].astype(np.float64).sum()), bool(greedy_BT[i, span].all())))
    return out

  def _forward(self, tokens, targets):
    self.batches += 1
    if self.mesh is None:
      return self._fn(self.params, tokens, targets)
    shard = sharding.batch_sharding(self.mesh)
    place = lambda x: jax.make_array_from_callback(x.shape, shard, lambda i: x[i])
    return self._fn(self.params, place(tokens), place(targets))

  @staticmethod
  def _to_host(device_out):
    if jax.process_count() > 1:
      return multihost_utils.process_allgather(device_out, tiled=True)
    return jax.device_get(device_out)

  def _broadcast(self, op, tokens=None, targets=None):
    """Sends (op, tokens, targets) from process 0; elsewhere receives them."""
    shape = (0, 0) if tokens is None else tokens.shape
    head = multihost_utils.broadcast_one_to_all(np.array([op or 0, *shape], np.int32))
    if head[0] != _SCORE:
      return int(head[0]), None, None
    if tokens is None:
      tokens = targets = np.zeros(tuple(head[1:]), np.int32)
    tokens, targets = multihost_utils.broadcast_one_to_all((tokens, targets))
    return int(head[0]), np.asarray(tokens), np.asarray(targets)

  def serve(self):
    """On processes other than 0: run process 0's batches until it stops; returns the count."""
    served = 0
    while True:
      op, tokens, targets = self._broadcast(None)  # process 0's op, not this one's
      if op == _STOP:
        return served
      if op == _FAILED:
        raise ValueError("the lm-eval tasks failed on process 0 (its log says why)")
      self._to_host(self._forward(tokens, targets))  # the allgather process 0 joins
      served += 1

  def stop_serving(self, failed=False):
    if jax.process_count() > 1 and jax.process_index() == 0:
      self._broadcast(_FAILED if failed else _STOP)
