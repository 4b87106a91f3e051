"""`generate()`: autoregressive sampling for every LM of the zoo.

Any model with the zoo's LM API works: ``init_cache(batch, max_len)`` and ``decode_step(tokens,
cache) -> (logits, cache)``. A KV-cache model (MatLM) allocates prompt + new positions; a recurrent
model (TransNormerLLM) keeps a fixed-size state, so its memory does not grow with the generated
length. The prompt is one prefill call; then one token per step inside a `lax.scan`, the whole
loop compiled once per (model, shapes, sampling settings).

    tokens = generate(model, prompt, 100)                                    # greedy
    tokens = generate(model, prompt, 100, temperature=0.8, top_k=40, rng=jax.random.key(0))
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import TokenEmbed, check_token_ids


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a next token is chosen from logits (hashable: part of the compiled loop's key).

  temperature 0 is greedy (argmax). Otherwise logits / temperature, restricted to the `top_k`
  most likely tokens and to the smallest set whose probability reaches `top_p` (nucleus; the
  most likely token is always kept), then sampled.
  """
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be a positive int or None, got {self.top_k}")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

  def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
    """logits [B, V] -> int32 tokens [B]."""
    logits = logits.astype(jnp.float32)
    if self.temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / self.temperature
    if self.top_k is not None and self.top_k < logits.shape[-1]:
      kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    if self.top_p is not None and self.top_p < 1.0:
      logits = _nucleus(logits, self.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _nucleus(logits: jax.Array, top_p: float) -> jax.Array:
  """Keeps the most likely tokens until their probability reaches top_p; the rest -> -inf."""
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs   # probability of the more likely tokens
  keep_sorted = before < top_p                  # the first token always (before = 0)
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
      keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def _checked_prompt(prompt_tokens, model: nnx.Module) -> jax.Array:
  prompt_tokens = jnp.asarray(prompt_tokens)
  if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1 or not jnp.issubdtype(
      prompt_tokens.dtype, jnp.integer):
    raise ValueError(f"prompt_tokens must be integers [batch, length >= 1], got shape "
                     f"{tuple(prompt_tokens.shape)} and dtype {prompt_tokens.dtype}")
  # The model runs jitted, where its embedding cannot check the ids: checked here.
  embed = next((node for _, node in nnx.iter_graph(model) if isinstance(node, TokenEmbed)), None)
  if embed is not None:
    check_token_ids(prompt_tokens, embed.num_embeddings)
  return prompt_tokens


def _check_count(name: str, value, *, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def generate(model: nnx.Module, prompt_tokens: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             rng: jax.Array | None = None, **decode_kwargs) -> jax.Array:
  """Continues ``prompt_tokens`` [B, P] (P >= 1) by ``max_new_tokens`` tokens.

  Returns int32 [B, P + max_new_tokens] (the prompt, then the new tokens). ``rng`` (a key) is
  needed when sampling (temperature > 0); greedy decoding ignores it. ``decode_kwargs`` are
  passed to every ``model.decode_step`` call (e.g. MatLM's ``granularity``) and must be hashable.
  """
  prompt_tokens = _checked_prompt(prompt_tokens, model)
  _check_count("max_new_tokens", max_new_tokens, minimum=0)
  for method in ("init_cache", "decode_step"):
    if not callable(getattr(model, method, None)):
      raise ValueError(f"generate needs a model with init_cache and decode_step; "
                       f"{type(model).__name__} has no {method}")
  sampling = Sampling(temperature, top_k, top_p)
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng, a jax.random key")
  prompt_tokens = prompt_tokens.astype(jnp.int32)
  if max_new_tokens == 0:
    return prompt_tokens
  graphdef, state = nnx.split(model)
  key = jax.random.key(0) if rng is None else rng
  return _generate(graphdef, state, prompt_tokens, key, max_new_tokens=max_new_tokens,
                   sampling=sampling, decode_kwargs=tuple(sorted(decode_kwargs.items())))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling",
                                             "decode_kwargs"))
def _generate(graphdef, state, prompt, key, *, max_new_tokens: int, sampling: Sampling,
              decode_kwargs: tuple) -> jax.Array:
  model = nnx.merge(graphdef, state)
  decode = functools.partial(model.decode_step, **dict(decode_kwargs))
  cache = model.init_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
  keys = jax.random.split(key, max_new_tokens)
  logits, cache = decode(prompt, cache)
  first = sampling(logits[:, -1], keys[0])

  def step(carry, step_key):
    token, cache = carry
    logits, cache = decode(token[:, None], cache)
    token = sampling(logits[:, -1], step_key)
    return (token, cache), token

  _, rest = jax.lax.scan(step, (first, cache), keys[1:])   # the last token needs no step
  return jnp.concatenate([prompt, first[:, None], rest.T.astype(jnp.int32)], axis=1)


def speculative_generate(target: nnx.Module, draft: nnx.Module, prompt_tokens: jax.Array,
                         max_new_tokens: int, *, num_draft: int = 4,
                         target_kwargs: dict | None = None,
                         draft_kwargs: dict | None = None) -> tuple[jax.Array, dict]:
  """Greedy decoding of ``target`` sped up by a cheaper ``draft`` (speculative decoding).

  Each round the draft proposes ``num_draft`` tokens greedily, one step each; the target scores
  the last token and the proposals in one call and keeps the proposals up to the first one it
  would not have chosen, plus its own next token there. The output is exactly
  ``generate(target, prompt_tokens, max_new_tokens)``; only the number of target calls changes.
  MatFormer's use: a sub-model extracted from the target (``models.matformer.extract``) as the
  draft, whose predictions agree with the full model more often than an independent model's.

  Both models need a cache that can be rewound (``rewind_cache(cache, length)``: a KV cache such
  as MatLM's, not a recurrent state), to undo rejected proposals. In a batch every row advances
  by the smallest number of accepted
  proposals (rows that agreed longer redo those positions next round, with the same result).
  ``target_kwargs`` / ``draft_kwargs`` go to each model's ``decode_step`` (e.g. a MatLM's
  ``granularity``: the target's own weights at a smaller width also make a draft).

  Returns (tokens int32 [B, P + max_new_tokens], stats) with stats: ``rounds`` (target calls
  after the prompt), ``accepted`` (proposals kept, summed over rounds), ``proposed``
  (``rounds * num_draft``) and ``acceptance_rate`` = accepted / proposed.
  """
  prompt_tokens = _checked_prompt(prompt_tokens, target)
  _check_count("max_new_tokens", max_new_tokens, minimum=1)
  _check_count("num_draft", num_draft, minimum=1)
  for name, model in (("target", target), ("draft", draft)):
    if not all(callable(getattr(model, method, None))
               for method in ("init_cache", "decode_step", "rewind_cache")):
      raise ValueError(f"speculative decoding needs LMs whose cache can be rewound "
                       f"(init_cache, decode_step, rewind_cache: a KV cache as MatLM's); the "
                       f"{name} {type(model).__name__} has none")
  target_def, target_state = nnx.split(target)
  draft_def, draft_state = nnx.split(draft)
  tokens, rounds, accepted = _speculative(
      target_def, target_state, draft_def, draft_state, prompt_tokens.astype(jnp.int32),
      max_new_tokens=max_new_tokens, num_draft=num_draft,
      target_kwargs=tuple(sorted((target_kwargs or {}).items())),
      draft_kwargs=tuple(sorted((draft_kwargs or {}).items())))
  rounds, accepted = int(rounds), int(accepted)
  stats = {"rounds": rounds, "accepted": accepted, "proposed": rounds * num_draft,
           "acceptance_rate": accepted / max(rounds * num_draft, 1)}
  return tokens, stats


def _greedy(logits: jax.Array) -> jax.Array:
  return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("target_def", "draft_def", "max_new_tokens",
                                             "num_draft", "target_kwargs", "draft_kwargs"))
def _speculative(target_def, target_state, draft_def, draft_state, prompt, *,
                 max_new_tokens: int, num_draft: int, target_kwargs: tuple,
                 draft_kwargs: tuple):
  target_model, draft_model = nnx.merge(target_def, target_state), nnx.merge(draft_def, draft_state)
  target = functools.partial(target_model.decode_step, **dict(target_kwargs))
  draft = functools.partial(draft_model.decode_step, **dict(draft_kwargs))
  batch, prompt_len = prompt.shape
  total = prompt_len + max_new_tokens
  room = total + num_draft + 1   # the last round may write past the end
  tokens = jnp.zeros((batch, room), jnp.int32).at[:, :prompt_len].set(prompt)

  # Invariant at the top of a round, with n tokens known: the target's cache holds tokens[:n-1]
  # and the draft's tokens[:n-2], so that each round the draft reads the last two tokens (the
  # first rewrites a position it holds, with the same values).
  logits, target_cache = target(prompt, target_model.init_cache(batch, room))
  tokens = tokens.at[:, prompt_len].set(_greedy(logits[:, -1]))
  _, draft_cache = draft(prompt, draft_model.init_cache(batch, room))
  draft_cache = draft_model.rewind_cache(draft_cache, prompt_len - 1)

  def round_(carry):
    tokens, n, target_cache, draft_cache, rounds, accepted = carry
    logits, draft_cache = draft(jax.lax.dynamic_slice(tokens, (0, n - 2), (batch, 2)),
                                draft_cache)
    first = _greedy(logits[:, -1])

    def propose(carry, _):
      token, cache = carry
      logits, cache = draft(token[:, None], cache)
      token = _greedy(logits[:, -1])
      return (token, cache), token

    (_, draft_cache), rest = jax.lax.scan(propose, (first, draft_cache), None,
                                          length=num_draft - 1)
    proposals = jnp.concatenate([first[:, None], rest.T], axis=1)           # [B, k]
    last = jax.lax.dynamic_slice(tokens, (0, n - 1), (batch, 1))
    logits, target_cache = target(jnp.concatenate([last, proposals], axis=1), target_cache)
    chosen = _greedy(logits)                                                # [B, k + 1]
    agree = jnp.cumprod(proposals == chosen[:, :-1], axis=1).sum(axis=1)
    kept = agree.min()
    # chosen[:, :kept] are the kept proposals and chosen[:, kept] the target's own next token;
    # what lies beyond is overwritten by the next round.
    tokens = jax.lax.dynamic_update_slice(tokens, chosen, (0, n))
    n = n + kept + 1
    target_cache = target_model.rewind_cache(target_cache, n - 1)
    draft_cache = draft_model.rewind_cache(draft_cache, n - 2)
    return tokens, n, target_cache, draft_cache, rounds + 1, accepted + kept

  carry = (tokens, jnp.asarray(prompt_len + 1, jnp.int32), target_cache, draft_cache,
           jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
  tokens, _, _, _, rounds, accepted = jax.lax.while_loop(lambda c: c[1] < total, round_, carry)
  return tokens[:, :total], rounds, accepted
