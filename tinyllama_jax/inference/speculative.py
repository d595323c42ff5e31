"""Speculative decoding: a small draft model proposes K tokens, the target scores them in one
cached forward, and the longest agreeing prefix is kept (Leviathan et al. 2023; Chen et al. 2023).

A round, per row at position p with `last` (the newest token, in neither cache yet):
  draft   K cached steps from `last` (the first also rewrites p-1, whose key and value the
          draft lacks after a round that accepted all K): tokens d_1..d_K, distributions q_1..q_K;
  target  one forward over [last, d_1..d_K] at p..p+K: distributions p_0..p_K;
  accept  d_i while u_i < p_{i-1}(d_i) / q_i(d_i); at the first reject i, a token from
          norm(max(0, p_{i-1} - q_i)); after K accepts, a bonus token from p_K.
So every round emits 1..K+1 tokens and the output is distributed as the target's own sampling
(greedy: d_i is kept while it is the target's argmax, so the output is the target's greedy).
Both caches are written by position and attention reads only slots <= the query's position
(kernels.attention_cache_xla), so rejected positions need no rollback: the row's position
moves back and the next round overwrites them before anything reads them. Rows accept different
counts: each keeps its own position and output count.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tinyllama_jax.inference import decode as decode_lib


def check_draft(cfg_target, cfg_draft, *, draft_tokens, same_tokenizer):
  """A draft that cannot speak for the target: one line naming the flag."""
  if draft_tokens < 1:
    raise ValueError(f"--draft_tokens={draft_tokens}: draft at least 1 token a round")
  if cfg_draft.vocab_size != cfg_target.vocab_size:
    raise ValueError(f"the draft's vocab_size ({cfg_draft.vocab_size}) differs from the target's "
                     f"({cfg_target.vocab_size}): --draft_workdir needs a model of the same vocab")
  if not same_tokenizer:
    raise ValueError("the draft's tokenizer differs from the target's: --draft_workdir needs a "
                     "model trained with the same tokenizer")


def accept(target_BKV, draft_BK, q_BKV, key, knobs, greedy):
  """(n_accepted_B, the token after them_B) for drafts d_BK against the target's logits at the
  K+1 positions (target_BKV is [B, K+1, V], masked to valid ids) and the draft's q_BKV."""
  B, K = draft_BK.shape
  if greedy:
    want_BK1 = jnp.argmax(target_BKV, axis=-1).astype(jnp.int32)
    same_BK = (draft_BK == want_BK1[:, :K]).astype(jnp.int32)
    n_B = jnp.sum(jnp.cumprod(same_BK, axis=1), axis=1)
    return n_B, jnp.take_along_axis(want_BK1, n_B[:, None], axis=1)[:, 0]
  key_u, key_r = jax.random.split(key)
  p_BKV = jax.nn.softmax(decode_lib.nucleus(target_BKV, knobs["temperature"], knobs["top_p"]),
                         axis=-1)
  p_BK = jnp.take_along_axis(p_BKV[:, :K], draft_BK[..., None], axis=-1)[..., 0]
  q_BK = jnp.take_along_axis(q_BKV, draft_BK[..., None], axis=-1)[..., 0]
  # u < p / q without the division (q > 0: the draft drew the token).
  ok_BK = jax.random.uniform(key_u, (B, K)) * q_BK < p_BK
  n_B = jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1)
  # After K accepts q is 0, so the residual is p_K itself: the bonus token.
  q_pad_BKV = jnp.concatenate([q_BKV, jnp.zeros_like(q_BKV[:, :1])], axis=1)
  p_BV = jnp.take_along_axis(p_BKV, n_B[:, None, None], axis=1)[:, 0]
  q_BV = jnp.take_along_axis(q_pad_BKV, n_B[:, None, None], axis=1)[:, 0]
  r_BV = jnp.maximum(p_BV - q_BV, 0.0)
  # A rejection has p < q at the draft's token, so the residual has mass; rounding may leave none.
  r_BV = jnp.where(jnp.sum(r_BV, axis=-1, keepdims=True) > 0, r_BV, p_BV)
  return n_B, jax.random.categorical(key_r, jnp.log(r_BV), axis=-1).astype(jnp.int32)


def _advance(s, tokens_BK1, n_B, next_B, knobs, cache_t, cache_d):
  """The state after a round that accepted n_B drafts and then chose next_B: the round's tokens
  written out (the accepted drafts, then the target's own; cut after an EOS and at max_new,
  nothing for rows already done), positions, counts and acceptance statistics moved on."""
  B, k1 = tokens_BK1.shape
  d_BK = tokens_BK1[:, 1:]
  rows_B = jnp.arange(B)
  j_K1 = jnp.arange(k1, dtype=jnp.int32)
  new_BK1 = jnp.concatenate([d_BK, d_BK[:, :1]], axis=1).at[rows_B, n_B].set(next_B)
  live_BK1 = j_K1 <= n_B[:, None]
  eos_BK1 = live_BK1 & (new_BK1 == knobs["eos_id"])
  m_B = jnp.where(jnp.any(eos_BK1, axis=1), jnp.argmax(eos_BK1, axis=1) + 1, n_B + 1)
  m_B = jnp.where(s["done"], 0, jnp.minimum(m_B, knobs["max_new"] - s["count"]))
  slots_BK1 = s["count"][:, None] + j_K1
  kept_BK1 = j_K1 < m_B[:, None]
  out = s["out"].at[rows_B[:, None], slots_BK1].set(
      jnp.where(kept_BK1, new_BK1, decode_lib.NO_TOKEN))
  count_B = s["count"] + m_B
  done_B = s["done"] | jnp.any(eos_BK1 & kept_BK1, axis=1) | (count_B >= knobs["max_new"])
  live_B = (~s["done"]).astype(jnp.int32)
  # A row that goes on sits at its next token; one that is done stays (its writes are moot).
  step_B = jnp.where(done_B, 0, n_B + 1)
  return {"cache_t": cache_t, "cache_d": cache_d,
          "last": jnp.where(done_B, s["last"], next_B),
          "prev": jnp.where(done_B, s["prev"],
                            jnp.take_along_axis(tokens_BK1, n_B[:, None], axis=1)[:, 0]),
          "positions": s["positions"] + step_B, "count": count_B, "out": out,
          "done": done_B, "round": s["round"] + 1,
          "drafted": s["drafted"] + (k1 - 1) * live_B, "accepted": s["accepted"] + n_B * live_B,
          "calls": s["calls"] + live_B}


class Speculator:
  """Compiled prefill and rounds for one (target, draft, batch, cache length, greedy, K)."""

  def __init__(self, cfg_target, cfg_draft, *, batch, length, out_len, greedy, k, rounds):
    fwd_t, fwd_d = decode_lib.forward_fn(cfg_target), decode_lib.forward_fn(cfg_draft)
    pre_t, pre_d = (decode_lib.prefill_fn(cfg_target, length),
                    decode_lib.prefill_fn(cfg_draft, length))
    pick = decode_lib.pick_fn(greedy)
    logits_of = decode_lib.logits_of

    def prefill(params_t, params_d, tokens_BT, lengths_B, knobs):
      B = tokens_BT.shape[0]
      logits_BV, cache_t = pre_t(params_t, tokens_BT, lengths_B)
      _, cache_d = pre_d(params_d, tokens_BT, lengths_B)
      first_B = pick(logits_BV, knobs, jax.random.fold_in(knobs["key"], 0))
      zeros_B = jnp.zeros((B,), jnp.int32)
      return {"cache_t": cache_t, "cache_d": cache_d, "last": first_B,
              "prev": jnp.take_along_axis(tokens_BT, (lengths_B - 1)[:, None], axis=1)[:, 0],
              "positions": lengths_B, "count": zeros_B + 1,
              "out": jnp.full((B, out_len), decode_lib.NO_TOKEN, jnp.int32).at[:, 0].set(first_B),
              "done": (first_B == knobs["eos_id"]) | (knobs["max_new"] <= 1),
              "round": jnp.int32(0), "drafted": zeros_B, "accepted": zeros_B, "calls": zeros_B}

    def draft(params_d, s, knobs, key, layers_d):
      """K draft tokens d_BK and their distributions q_BKV (none, [B, K, 0], when greedy)."""
      B, V = s["last"].shape[0], 0 if greedy else cfg_draft.vocab_size
      keys = jax.random.split(key, k)

      def propose(logits_BV, j):
        logits_BV = decode_lib.only_valid(logits_BV, knobs["n_valid"])
        token_B = pick(logits_BV, knobs, keys[j])
        if greedy:
          return token_B, jnp.zeros((B, 0), jnp.float32)
        return token_B, jax.nn.softmax(
            decode_lib.nucleus(logits_BV, knobs["temperature"], knobs["top_p"]), axis=-1)

      pos_B = s["positions"]
      h_B2D, cache = fwd_d(params_d, jnp.stack([s["prev"], s["last"]], 1),
                           jnp.stack([pos_B - 1, pos_B], 1), s["cache_d"], layers_d)
      token_B, q_BV = propose(logits_of(params_d, h_B2D[:, 1]), 0)
      d_BK = jnp.zeros((B, k), jnp.int32).at[:, 0].set(token_B)
      q_BKV = jnp.zeros((B, k, V), jnp.float32).at[:, 0].set(q_BV)

      def step(j, carry):
        d_BK, q_BKV, cache = carry
        h_B1D, cache = fwd_d(params_d, d_BK[:, j - 1, None], (pos_B + j)[:, None], cache,
                             layers_d)
        token_B, q_BV = propose(logits_of(params_d, h_B1D[:, 0]), j)
        return d_BK.at[:, j].set(token_B), q_BKV.at[:, j].set(q_BV), cache
      d_BK, q_BKV, cache = jax.lax.fori_loop(1, k, step, (d_BK, q_BKV, cache))
      return d_BK, q_BKV, cache

    def one_round(params_t, params_d, s, knobs, layers_t, layers_d):
      key_d, key_a = jax.random.split(jax.random.fold_in(knobs["key"], s["round"] + 1))
      d_BK, q_BKV, cache_d = draft(params_d, s, knobs, key_d, layers_d)
      tokens_BK1 = jnp.concatenate([s["last"][:, None], d_BK], axis=1)
      j_K1 = jnp.arange(k + 1, dtype=jnp.int32)
      h_BK1D, cache_t = fwd_t(params_t, tokens_BK1, s["positions"][:, None] + j_K1, s["cache_t"],
                              layers_t)
      target_BK1V = decode_lib.only_valid(logits_of(params_t, h_BK1D), knobs["n_valid"])
      n_B, next_B = accept(target_BK1V, d_BK, q_BKV, key_a, knobs, greedy)
      return _advance(s, tokens_BK1, n_B, next_B, knobs, cache_t, cache_d)

    def run(params_t, params_d, layers_t, layers_d, state, knobs):
      # Split here (once a call, outside the loop) unless `layout_*` made them before.
      layers_t = layers_t or decode_lib.split_for_loop(params_t, cfg_target)
      layers_d = layers_d or decode_lib.split_for_loop(params_d, cfg_draft)

      def going(carry):
        i, s = carry
        return (i < rounds) & ~jnp.all(s["done"])

      def body(carry):
        i, s = carry
        return i + 1, one_round(params_t, params_d, s, knobs, layers_t, layers_d)
      return jax.lax.while_loop(going, body, (jnp.int32(0), state))[1]

    self.prefill = jax.jit(prefill)
    self.run = jax.jit(run, donate_argnums=4)
    # The fused decode layer where its steps fit: the target scores K+1 tokens a row, the
    # draft's first step two.
    self.layout_t = decode_lib.layout_fn(cfg_target, batch * (k + 1))
    self.layout_d = decode_lib.layout_fn(cfg_draft, batch * 2)


_SPECULATORS = {}


def decode(params_t, cfg_target, params_d, cfg_draft, prompts, lengths, *, draft_tokens,
           max_new_tokens, eos_id=None, temperature=0.0, top_p=1.0, seed=0, n_valid=None,
           on_token=None, chunk=decode_lib.CHUNK):
  """(new tokens for each prompt as decode.decode gives them, stats): the same output as the
  target alone (greedy: token for token; sampling: in distribution). Prompts checked by the
  caller (generate.check_request against the target). stats: the draft tokens accepted per
  drafted, and tokens per target call (a call scores K+1 positions of a row)."""
  k = draft_tokens
  # Room for the last round's K+1 positions past the final token (they are scored, then dropped).
  length = decode_lib.round_up(lengths.max() + max_new_tokens + k + 1)
  greedy = temperature == 0.0
  rounds = max(1, chunk // (k + 1))  # about CHUNK tokens a call at full acceptance
  out_len = max_new_tokens + k + 1
  key = (cfg_target.to_json(), cfg_draft.to_json(), len(prompts), length, out_len, greedy, k,
         rounds)
  spec = decode_lib.cached(_SPECULATORS, key, lambda: Speculator(
      cfg_target, cfg_draft, batch=len(prompts), length=length, out_len=out_len, greedy=greedy,
      k=k, rounds=rounds))
  params_t = decode_lib.cast_params(params_t, cfg_target)
  params_d = decode_lib.cast_params(params_d, cfg_draft)
  knobs = decode_lib.knobs_for(cfg_target, max_new_tokens=max_new_tokens, eos_id=eos_id,
                               temperature=temperature, top_p=top_p, seed=seed, n_valid=n_valid)
  shown = np.zeros(len(prompts), np.int64)

  def emit(out_BN, count_B):
    for i in range(len(prompts)):
      for token in out_BN[i, shown[i]:count_B[i]].tolist():
        if on_token is not None:
          on_token(i, token)
      shown[i] = count_B[i]

  layers_t, layers_d = spec.layout_t(params_t), spec.layout_d(params_d)
  state = spec.prefill(params_t, params_d, decode_lib.prompt_batch(prompts, length), lengths,
                       knobs)
  while True:
    out_BN, count_B, done_B = jax.device_get((state["out"], state["count"], state["done"]))
    emit(out_BN, count_B)
    if done_B.all():
      break
    state = spec.run(params_t, params_d, layers_t, layers_d, state, knobs)
  drafted, accepted, calls = (int(x.sum()) for x in jax.device_get(
      (state["drafted"], state["accepted"], state["calls"])))
  stats = {"acceptance": accepted / max(drafted, 1),
           "tokens_per_call": float(count_B.sum() - len(prompts)) / max(calls, 1),
           "target_calls": calls}
  return [out_BN[i, :count_B[i]].tolist() for i in range(len(prompts))], stats
