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


def generate(model: nnx.Module, prompt_tokens: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             rng: jax.Array | None = None, **decode_kwargs) -> jax.Array:
  """Continues ``prompt_tokens`` [B, P] (P >= 1) by ``max_new_tokens`` tokens.

  Returns int32 [B, P + max_new_tokens] (the prompt, then the new tokens). ``rng`` (a key) is
  needed when sampling (temperature > 0); greedy decoding ignores it. ``decode_kwargs`` are
  passed to every ``model.decode_step`` call (e.g. MatLM's ``granularity``) and must be hashable.
  """
  prompt_tokens = jnp.asarray(prompt_tokens)
  if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1 or not jnp.issubdtype(
      prompt_tokens.dtype, jnp.integer):
    raise ValueError(f"prompt_tokens must be integers [batch, length >= 1], got shape "
                     f"{tuple(prompt_tokens.shape)} and dtype {prompt_tokens.dtype}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
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
