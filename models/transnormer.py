"""TransNormer (v1): "The Devil in Linear Transformer" (Qin et al., EMNLP 2022).

A port of the official fairseq code (github.com/OpenNLPLab/fairseq-evo @ 38fa81f2:
`NormAttentionDecoder/EncoderLayer`, `NormLinearAttention`, `NormLocalAttention`, `Urpe`, `GLU`,
`SimpleRMSNorm`), exactly as it behaves rather than as the paper describes it:

* The first half of the layers use DiagAttention (attention inside absolute-aligned blocks of 64
  tokens), the second half NormAttention (linear attention + SimpleRMSNorm over all heads).
* T1: NormAttention kernel ``elu`` (signed features), DiagAttention ``ReLU(q k^T) v`` +
  SimpleRMSNorm. T2: kernel ``1 + elu``, DiagAttention softmax without norm.
* URPE on q and k: a fixed random Householder reflection (stored in checkpoints: a `Buffer` here)
  then a rotary rotation with learned frequencies; absolute positions in NormAttention, positions
  inside the block in DiagAttention.
* The FFN is an activation-free bilinear GLU ``l3(l1 x * l2 x)``: the configs ask for "swish",
  which the official helper does not know and maps to the identity.
* SimpleRMSNorm ``x / (||x|| / sqrt(d) + 1e-8)`` (no parameters) for the sub-layer norms.

Two model classes: the causal LM (`transnormer_t1/t2`: fairseq `base_lm_architecture`, pre-norm,
sqrt(d)-scaled embedding + sinusoidal positions, final SimpleRMSNorm, tied output) and the
bidirectional masked LM (`roberta_transnormer_t1/t2`: RoBERTa-base, post-norm, learned positions,
LayerNorm on the embedding, RoBERTa's LM head). Token padding follows fairseq: positions skip the
pad token (id 1); attention does not mask padding, as in the official layers.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.convert import check_state_dict, layout
from models.layers import (ACTIVATIONS, Buffer, Dropout, Linear, TokenEmbed, check_tokens,
                           layer_norm, linear, shard_batch)
from models.registry import register_model
from ops import diag_attention, lightning_decode_step, norm_attention, simple_rms_norm
from ops.sharding import axes as logical

KERNELS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "elu": jax.nn.elu,                       # T1: signed features
    "1+elu": lambda x: 1.0 + jax.nn.elu(x),  # T2
}
_BLOCK = 64  # DiagAttention's block (fairseq decoder/encoder_chunk_size)


def _xavier(gain: float = 1.0):
  """torch.nn.init.xavier_uniform_ with a gain."""
  return nnx.initializers.variance_scaling(gain ** 2, "fan_avg", "uniform")


def _reinit(layer: Linear, init: str, *, rngs: nnx.Rngs, gain: float = 1.0,
            zero_bias: bool = False) -> Linear:
  """`layer`, built with torch's init, re-initialised as the official code does once its modules
  are built: "fairseq" (the LM's `reset_parameters`): xavier_uniform(gain) weight, torch's or a
  zero bias; "bert" (RoBERTa's `init_bert_params`): N(0, 0.02) weight, zero bias; "torch": as it
  is."""
  shape = (layer.in_features, layer.out_features)
  if init == "bert":
    layer.kernel[...] = nnx.initializers.normal(0.02)(rngs.params(), shape, layer.param_dtype)
    layer.bias[...] = jnp.zeros((layer.out_features,), layer.param_dtype)
  elif init == "fairseq":
    layer.kernel[...] = _xavier(gain)(rngs.params(), shape, layer.param_dtype)
    if zero_bias:
      layer.bias[...] = jnp.zeros((layer.out_features,), layer.param_dtype)
  return layer


class Urpe(nnx.Module):
  """Unitary relative positional encoding (URPE, `core_matrix=1`, `p_matrix=3`): a reflection
  ``x - 2 (x.v) v`` by a fixed random unit vector, then a rotary rotation of the pairs
  ``(x_2i, x_2i+1)`` by ``theta_i * position`` with learned ``theta`` (init
  ``10000^(-2i/head_dim)``). An odd head dim leaves its last feature unrotated."""

  def __init__(self, head_dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.theta = nnx.Param(jnp.asarray(10000.0 ** (-2.0 / head_dim * np.arange(head_dim // 2)),
                                       param_dtype), **logical("kv"))
    direction = jax.random.normal(rngs.params(), (head_dim,), jnp.float32)
    self.v = Buffer((direction / jnp.linalg.norm(direction)).astype(param_dtype))

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """``x`` [B, T, H, D] at ``positions`` [T] -> the same shape."""
    xf = x.astype(jnp.float32)
    v = self.v[...].astype(jnp.float32)
    xf = xf - 2.0 * jnp.sum(xf * v, axis=-1, keepdims=True) * v
    rotated = 2 * self.theta.shape[0]
    angle = positions.astype(jnp.float32)[:, None, None] * self.theta[...].astype(jnp.float32)
    cos, sin = jnp.cos(angle), jnp.sin(angle)                      # [T, 1, D/2]
    even, odd = xf[..., 0:rotated:2], xf[..., 1:rotated:2]
    pairs = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    out = jnp.concatenate([pairs.reshape(*xf.shape[:-1], rotated), xf[..., rotated:]], axis=-1)
    return out.astype(x.dtype)


class _Attention(nnx.Module):
  """What both attentions share: q, k, v, out projections (with bias) and URPE on q and k."""

  def __init__(self, dim: int, num_heads: int, init: str, *, qkv_gain: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
    kw = dict(init="torch", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.q_proj = _reinit(linear(dim, dim, axes=("embed", "heads"), **kw), init, gain=qkv_gain,
                          rngs=rngs)
    self.k_proj = _reinit(linear(dim, dim, axes=("embed", "heads"), **kw), init, gain=qkv_gain,
                          rngs=rngs)
    self.v_proj = _reinit(linear(dim, dim, axes=("embed", "heads"), **kw), init, gain=qkv_gain,
                          rngs=rngs)
    self.out_proj = _reinit(linear(dim, dim, axes=("heads", "embed"), **kw), init, zero_bias=True,
                            rngs=rngs)
    self.urpe = Urpe(self.head_dim, param_dtype=param_dtype, rngs=rngs)

  def _heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

  def _out(self, out: jax.Array) -> jax.Array:
    return self.out_proj(out.reshape(*out.shape[:2], -1))


class NormAttention(_Attention):
  """`NormLinearAttention`: ``SimpleRMSNorm(phi(q) phi(k)^T [causal mask] v)`` over all heads, with
  ``phi`` = elu (T1) or 1 + elu (T2) and URPE at absolute positions; no scale, no denominator."""

  def __init__(self, dim: int, num_heads: int, *, kernel: str, causal: bool, init: str = "fairseq",
               attn_implementation: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    super().__init__(dim, num_heads, init, qkv_gain=2 ** -0.5, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    if kernel not in KERNELS:
      raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
    self.kernel, self.causal = kernel, causal
    self.attn_implementation = attn_implementation

  def _qkv(self, x: jax.Array, positions: jax.Array):
    phi = KERNELS[self.kernel]
    q = self.urpe(phi(self._heads(self.q_proj(x))), positions)
    k = self.urpe(phi(self._heads(self.k_proj(x))), positions)
    return q, k, self._heads(self.v_proj(x))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # no attention dropout (use_dropout=False)
    q, k, v = self._qkv(x, jnp.arange(x.shape[1]))
    return self._out(norm_attention(q, k, v, causal=self.causal,
                                    implementation=self.attn_implementation))

  def init_state(self, batch: int) -> jax.Array:
    return jnp.zeros((batch, self.num_heads, self.head_dim, self.head_dim), jnp.float32)

  def step(self, x: jax.Array, state: jax.Array, position) -> tuple[jax.Array, jax.Array]:
    """One token [B, 1, dim] at ``position`` continuing the f32 state [B, H, D, D]."""
    q, k, v = self._qkv(x, jnp.reshape(position, (1,)))
    out, state = lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], state)
    out = simple_rms_norm(out.reshape(out.shape[0], 1, -1))
    return self.out_proj(out), state


class DiagAttention(_Attention):
  """`NormLocalAttention` (group_type "chunk"): attention inside absolute-aligned blocks of 64
  tokens, q scaled by ``head_dim^-0.5``, URPE at the position inside the block; T1 ``ReLU`` +
  SimpleRMSNorm, T2 ``softmax`` (``softmax=True``). Attention dropout on the block probabilities
  while training."""

  def __init__(self, dim: int, num_heads: int, *, softmax: bool, causal: bool,
               attn_drop: float = 0.0, init: str = "fairseq",
               attn_implementation: str | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(dim, num_heads, init, qkv_gain=1.0, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    self.softmax, self.causal = softmax, causal
    # Only the softmax form has a kernel (ops.attention); the ReLU form is one blocked einsum.
    self.attn_implementation = attn_implementation if softmax else None
    self.attn_drop = Dropout(attn_drop, rngs=rngs)

  def _qkv(self, x: jax.Array, positions: jax.Array):
    q = self.urpe(self._heads(self.q_proj(x)) * self.head_dim ** -0.5, positions)
    k = self.urpe(self._heads(self.k_proj(x)), positions)
    return q, k, self._heads(self.v_proj(x))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    q, k, v = self._qkv(x, jnp.arange(x.shape[1]) % _BLOCK)
    dropout = None
    if train and self.attn_drop.rate > 0:
      dropout = lambda probs: self.attn_drop(probs, train=True)
    out = diag_attention(q, k, v, block_size=_BLOCK, causal=self.causal, softmax=self.softmax,
                         dropout=dropout, implementation=self.attn_implementation)
    return self._out(out)

  def init_state(self, batch: int) -> dict:
    """The current block's keys (after URPE) and values, [B, 64, H, D] each."""
    shape = (batch, _BLOCK, self.num_heads, self.head_dim)
    return {"k": jnp.zeros(shape, self.q_proj.dtype), "v": jnp.zeros(shape, self.q_proj.dtype)}

  def step(self, x: jax.Array, state: dict, position) -> tuple[jax.Array, dict]:
    """One token [B, 1, dim] at ``position``: it joins slot ``position % 64`` of the block."""
    slot = position % _BLOCK
    q, k, v = self._qkv(x, jnp.reshape(slot, (1,)))
    keys = jax.lax.dynamic_update_slice_in_dim(state["k"], k.astype(state["k"].dtype), slot, 1)
    values = jax.lax.dynamic_update_slice_in_dim(state["v"], v.astype(state["v"].dtype), slot, 1)
    scores = jnp.einsum("bhd,bkhd->bhk", q[:, 0].astype(jnp.float32), keys.astype(jnp.float32))
    seen = jnp.arange(_BLOCK) <= slot  # earlier slots hold the previous block's tokens
    if self.softmax:
      probs = jax.nn.softmax(jnp.where(seen, scores, -1e8), axis=-1)
    else:
      probs = jnp.where(seen, jax.nn.relu(scores), 0.0)
    out = jnp.einsum("bhk,bkhd->bhd", probs, values.astype(jnp.float32))
    out = out.reshape(out.shape[0], 1, -1).astype(x.dtype)
    if not self.softmax:
      out = simple_rms_norm(out)
    return self.out_proj(out), {"k": keys, "v": values}


class GLU(nnx.Module):
  """The official `GLU` with its configured activation "swish" resolved to the identity:
  ``l3(l1(x) * l2(x))``, all with bias."""

  def __init__(self, dim: int, hidden_dim: int, init: str = "fairseq", *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(init="torch", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    reinit = "bert" if init == "bert" else "torch"  # fairseq's GLU keeps torch's init
    self.l1 = _reinit(linear(dim, hidden_dim, axes=("embed", "mlp"), **kw), reinit, rngs=rngs)
    self.l2 = _reinit(linear(dim, hidden_dim, axes=("embed", "mlp"), **kw), reinit, rngs=rngs)
    self.l3 = _reinit(linear(hidden_dim, dim, axes=("mlp", "embed"), **kw), reinit, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.l3(self.l1(x) * self.l2(x))


class TransNormerLayer(nnx.Module):
  """`NormAttentionDecoderLayer` (pre-norm, ``post_norm=False``) or `NormAttentionEncoderLayer`
  (post-norm): attention and GLU branches with dropout, SimpleRMSNorm as both sub-layer norms."""

  def __init__(self, dim: int, num_heads: int, *, diag: bool, kernel: str, diag_softmax: bool,
               causal: bool, post_norm: bool, dropout: float = 0.1, attn_drop: float = 0.0,
               init: str = "fairseq", attn_implementation: str | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(init=init, attn_implementation=attn_implementation, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
    if diag:
      self.attn = DiagAttention(dim, num_heads, softmax=diag_softmax, causal=causal,
                                attn_drop=attn_drop, **kw)
    else:
      self.attn = NormAttention(dim, num_heads, kernel=kernel, causal=causal, **kw)
    self.glu = GLU(dim, int(8 / 3 * dim), init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.drop = Dropout(dropout, rngs=rngs)
    self.post_norm = post_norm

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.post_norm:
      x = simple_rms_norm(x + self.drop(self.attn(x, train=train), train=train))
      return simple_rms_norm(x + self.drop(self.glu(x), train=train))
    x = x + self.drop(self.attn(simple_rms_norm(x), train=train), train=train)
    return x + self.drop(self.glu(simple_rms_norm(x)), train=train)

  def step(self, x: jax.Array, state, position):
    """One token through the causal (pre-norm) layer, continuing its attention's state."""
    h, state = self.attn.step(simple_rms_norm(x), state, position)
    x = x + h
    return x + self.glu(simple_rms_norm(x)), state


def _layers(depth: int, dim: int, num_heads: int, **kw) -> nnx.List:
  """DiagAttention in the first half, NormAttention in the second ([2] * (L//2) + [1] * (L//2))."""
  if depth % 2:
    raise ValueError(f"depth must be even (half Diag, half Norm layers), got {depth}")
  return nnx.List([TransNormerLayer(dim, num_heads, diag=i < depth // 2, **kw)
                   for i in range(depth)])


def fairseq_positions(tokens: jax.Array, pad_token_id: int, start=0) -> jax.Array:
  """fairseq `make_positions`: non-pad tokens count from ``pad + 1`` (after ``start`` earlier
  non-pad tokens per row), pad tokens get ``pad``."""
  real = (tokens != pad_token_id).astype(jnp.int32)
  return (jnp.cumsum(real, axis=1) + jnp.reshape(start, (-1, 1))) * real + pad_token_id


def sinusoidal_embedding(positions: jax.Array, dim: int, pad_token_id: int) -> jax.Array:
  """fairseq `SinusoidalPositionalEmbedding`: [sin | cos] halves with frequencies
  ``exp(-i log(10000) / (dim/2 - 1))``; the pad position is zero. f32."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  angle = positions.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return jnp.where((positions == pad_token_id)[..., None], 0.0, emb)


def _embedding(vocab_size: int, dim: int, std: float, pad_token_id: int, **kw) -> nnx.Embed:
  """nn.Embedding(padding_idx) of tokens initialised N(0, std) with a zero pad row."""
  def init(key, shape, dtype):
    return nnx.initializers.normal(std)(key, shape, dtype).at[pad_token_id].set(0)
  return TokenEmbed(vocab_size, dim, embedding_init=init, **kw)


class TransNormerLM(nnx.Module):
  """Causal LM (fairseq `norm_attention_lm`): ``m(tokens [B, T]) -> logits [B, T, vocab]`` (f32).

  ``sqrt(d) * embed + sinusoidal positions`` -> dropout -> pre-norm layers -> SimpleRMSNorm -> tied
  head. Generation: ``cache = m.init_cache(batch, max_len)``; ``logits, cache =
  m.decode_step(tokens, cache)`` runs the tokens one by one: NormAttention layers carry their
  linear-attention state, DiagAttention layers the keys and values of the current 64-token block,
  so memory does not grow with the length. ``attn_implementation`` goes to the causal NormAttention
  (Lightning) and the softmax DiagAttention.
  """

  def __init__(self, vocab_size: int = 267744, dim: int = 512, depth: int = 6, num_heads: int = 8,
               kernel: str = "elu", diag_softmax: bool = False, dropout: float = 0.1,
               attn_drop: float = 0.0, pad_token_id: int = 1,
               attn_implementation: str | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dim, self.pad_token_id, self.dtype = dim, pad_token_id, dtype
    self.embed_tokens = _embedding(vocab_size, dim, dim ** -0.5, pad_token_id, **kw)
    self.embed_drop = Dropout(dropout, rngs=rngs)
    self.layers = _layers(depth, dim, num_heads, kernel=kernel, diag_softmax=diag_softmax,
                          causal=True, post_norm=False, dropout=dropout, attn_drop=attn_drop,
                          attn_implementation=attn_implementation, **kw)

  def embed(self, tokens: jax.Array, start=0) -> jax.Array:
    """``sqrt(d) * embedding + sinusoidal(fairseq positions)``; ``start``: earlier non-pads."""
    positions = fairseq_positions(tokens, self.pad_token_id, start)
    h = math.sqrt(self.dim) * self.embed_tokens(tokens).astype(jnp.float32)
    return (h + sinusoidal_embedding(positions, self.dim, self.pad_token_id)).astype(self.dtype)

  def head(self, h: jax.Array) -> jax.Array:
    return self.embed_tokens.attend(simple_rms_norm(h)).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    check_tokens(tokens)
    h = self.embed_drop(self.embed(tokens), train=train)
    for layer in self.layers:
      h = shard_batch(layer(h, train=train))
    return self.head(h)

  def init_cache(self, batch: int, max_len: int | None = None) -> dict:
    """Empty generation state; constant in size, so ``max_len`` (the zoo LM API's KV-cache size) is
    not needed. ``position``: tokens so far (URPE, blocks); ``seen``: non-pad tokens per row."""
    del max_len
    return {"position": jnp.zeros((), jnp.int32), "seen": jnp.zeros((batch,), jnp.int32),
            "layers": tuple(layer.attn.init_state(batch) for layer in self.layers)}

  def decode_step(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Next tokens [B, T] continuing ``cache`` -> (logits [B, T, vocab] f32, updated cache)."""
    check_tokens(tokens)
    if cache["seen"].shape != (tokens.shape[0],):
      raise ValueError(f"cache is for batch {cache['seen'].shape[0]}, got tokens for batch "
                       f"{tokens.shape[0]}")

    def one_token(cache, token):                                    # token [B]
      h = self.embed(token[:, None], cache["seen"])
      states = []
      for layer, state in zip(self.layers, cache["layers"]):
        h, state = layer.step(h, state, cache["position"])
        states.append(state)
      new = {"position": cache["position"] + 1,
             "seen": cache["seen"] + (token != self.pad_token_id), "layers": tuple(states)}
      return new, self.head(h)[:, 0]

    cache, logits = jax.lax.scan(one_token, cache, tokens.T)
    return jnp.swapaxes(logits, 0, 1), cache


class TransNormerMLM(nnx.Module):
  """Bidirectional masked LM (fairseq `roberta_norm_attention`, RoBERTa-base defaults):
  ``m(tokens [B, T]) -> logits [B, T, vocab]`` (f32).

  ``embed + learned positions`` -> LayerNorm -> dropout -> post-norm layers (no final norm) ->
  RoBERTa's LM head ``LayerNorm(gelu(dense(h))) @ embed^T + bias``. Weights initialised as
  `init_bert_params`.
  """

  def __init__(self, vocab_size: int = 50265, dim: int = 768, depth: int = 12, num_heads: int = 12,
               kernel: str = "elu", diag_softmax: bool = False, dropout: float = 0.1,
               attn_drop: float = 0.1, max_positions: int = 512, pad_token_id: int = 1,
               attn_implementation: str | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pad_token_id, self.max_positions = pad_token_id, max_positions
    self.embed_tokens = _embedding(vocab_size, dim, 0.02, pad_token_id, **kw)
    self.embed_positions = _embedding(max_positions + pad_token_id + 1, dim, 0.02, pad_token_id,
                                      **kw)
    self.layernorm_embedding = layer_norm(dim, **kw)
    self.embed_drop = Dropout(dropout, rngs=rngs)
    self.layers = _layers(depth, dim, num_heads, kernel=kernel, diag_softmax=diag_softmax,
                          causal=False, post_norm=True, dropout=dropout, attn_drop=attn_drop,
                          init="bert", attn_implementation=attn_implementation, **kw)
    self.lm_head_dense = linear(dim, dim, init="torch", axes=("embed", None), **kw)
    self.lm_head_norm = layer_norm(dim, **kw)
    self.lm_head_bias = nnx.Param(jnp.zeros((vocab_size,), param_dtype), **logical("vocab"))

  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    check_tokens(tokens)
    if tokens.shape[1] > self.max_positions:
      raise ValueError(f"at most max_positions={self.max_positions} tokens, got {tokens.shape[1]}")
    positions = fairseq_positions(tokens, self.pad_token_id)
    h = self.embed_tokens(tokens) + self.embed_positions(positions)
    h = self.embed_drop(self.layernorm_embedding(h), train=train)
    for layer in self.layers:
      h = shard_batch(layer(h, train=train))
    h = self.lm_head_norm(ACTIVATIONS["gelu"](self.lm_head_dense(h)))
    return (self.embed_tokens.attend(h) + self.lm_head_bias[...]).astype(jnp.float32)


# --- variants -------------------------------------------------------------------------------------
# Named configs: T1 and T2 differ in the NormAttention kernel and the DiagAttention form; the sizes
# are the constructors' defaults (the LM: fairseq's base_lm_architecture on WikiText-103, a word
# vocabulary of 267,744 entries, 156 M params; the MLM: RoBERTa-base with GPT-2 BPE).

_CFGS = {
    "transnormer_t1": dict(kernel="elu", diag_softmax=False),
    "transnormer_t2": dict(kernel="1+elu", diag_softmax=True),
    "transnormer_t1_mlm": dict(kernel="elu", diag_softmax=False),
    "transnormer_t2_mlm": dict(kernel="1+elu", diag_softmax=True),
}


# --- fairseq state_dict -> zoo params -------------------------------------------------------------

_LM_PREFIX = "decoder."
_MLM_PREFIX = "encoder.sentence_encoder."
_IGNORED = re.compile(r".*(\.version|_float_tensor)$|encoder\.lm_head\.weight$|"
                      r"decoder\.output_projection\.weight$")  # buffers and the tied heads


def layer_params(sd: Mapping[str, np.ndarray], prefix: str) -> dict:
  """One fairseq `NormAttention*Layer` (keys ``{prefix}self_attn.*``, ``{prefix}glu.*``) -> zoo
  layer params (the URPE vector included)."""
  attn = f"{prefix}self_attn."
  projections = {p: layout.torch_linear(sd, f"{attn}{p}")
                 for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
  urpe = {"theta": sd[f"{attn}urpe.theta"].reshape(-1), "v": sd[f"{attn}urpe.v"]}
  return {"attn": {**projections, "urpe": urpe},
          "glu": {n: layout.torch_linear(sd, f"{prefix}glu.{n}") for n in ("l1", "l2", "l3")}}


def _layer_shapes(prefix: str, dim: int, num_heads: int) -> dict[str, tuple[int, ...]]:
  hidden, head_dim = int(8 / 3 * dim), dim // num_heads
  shapes = {f"{prefix}self_attn.urpe.theta": (1, 1, head_dim // 2),
            f"{prefix}self_attn.urpe.v": (head_dim,)}
  for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
    shapes |= {f"{prefix}self_attn.{p}.weight": (dim, dim), f"{prefix}self_attn.{p}.bias": (dim,)}
  for n, (o, i) in (("l1", (hidden, dim)), ("l2", (hidden, dim)), ("l3", (dim, hidden))):
    shapes |= {f"{prefix}glu.{n}.weight": (o, i), f"{prefix}glu.{n}.bias": (o,)}
  return shapes


def checkpoint_filter_fn(state_dict: Mapping[str, np.ndarray], **known_kwargs):
  """Official fairseq checkpoint (LM `decoder.*` or RoBERTa `encoder.sentence_encoder.*`) -> (zoo
  params, TransNormerLM or TransNormerMLM, constructor kwargs).

  Sizes come from the shapes; the head count too (dim / the URPE vector's length). T1 and T2 have
  the same keys: pass ``kernel`` and ``diag_softmax`` (or the registered variant's defaults); T1 is
  assumed otherwise. Missing, unexpected and mis-shaped keys raise one ValueError.
  """
  sd = {k: v for k, v in state_dict.items() if not _IGNORED.fullmatch(k)}
  mlm = any(k.startswith(_MLM_PREFIX) for k in sd)
  prefix = _MLM_PREFIX if mlm else _LM_PREFIX
  if f"{prefix}embed_tokens.weight" not in sd:
    raise ValueError(f"expected a fairseq TransNormer checkpoint with {_LM_PREFIX}* (LM) or "
                     f"{_MLM_PREFIX}* (RoBERTa) keys, got e.g. {sorted(sd)[:5]}")
  vocab, dim = sd[f"{prefix}embed_tokens.weight"].shape
  layer_key = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
  layers = {int(m.group(1)) for k in sd if (m := layer_key.match(k))}
  head_dim = sd[f"{prefix}layers.0.self_attn.urpe.v"].shape[0]
  kwargs = {"vocab_size": vocab, "dim": dim, "depth": len(layers), "num_heads": dim // head_dim,
            **known_kwargs}
  shapes = {f"{prefix}embed_tokens.weight": (vocab, dim)}
  for i in range(kwargs["depth"]):
    shapes |= _layer_shapes(f"{prefix}layers.{i}.", dim, kwargs["num_heads"])
  if mlm:
    kwargs["max_positions"] = sd[f"{prefix}embed_positions.weight"].shape[0] - 2
    shapes |= {f"{prefix}embed_positions.weight": (kwargs["max_positions"] + 2, dim),
               f"{prefix}layernorm_embedding.weight": (dim,),
               f"{prefix}layernorm_embedding.bias": (dim,),
               "encoder.lm_head.dense.weight": (dim, dim), "encoder.lm_head.dense.bias": (dim,),
               "encoder.lm_head.layer_norm.weight": (dim,),
               "encoder.lm_head.layer_norm.bias": (dim,), "encoder.lm_head.bias": (vocab,)}
  check_state_dict(sd, shapes)
  params = {"embed_tokens": {"embedding": sd[f"{prefix}embed_tokens.weight"]},
            "layers": {i: layer_params(sd, f"{prefix}layers.{i}.") for i in range(kwargs["depth"])}}
  if not mlm:
    return params, TransNormerLM, kwargs
  params |= {"embed_positions": {"embedding": sd[f"{prefix}embed_positions.weight"]},
             "layernorm_embedding": layout.torch_norm(sd, f"{prefix}layernorm_embedding"),
             "lm_head_dense": layout.torch_linear(sd, "encoder.lm_head.dense"),
             "lm_head_norm": layout.torch_norm(sd, "encoder.lm_head.layer_norm"),
             "lm_head_bias": sd["encoder.lm_head.bias"]}
  return params, TransNormerMLM, kwargs


# --- registrations --------------------------------------------------------------------------------

register_model("transnormer_t1", TransNormerLM, family="transnormer", **_CFGS["transnormer_t1"])
register_model("transnormer_t2", TransNormerLM, family="transnormer",
               paper_metric="WikiText-103 test PPL 31.01 (secondary source)",
               **_CFGS["transnormer_t2"])
register_model("transnormer_t1_mlm", TransNormerMLM, family="transnormer",
               paper_metric="GLUE avg 79.38 (secondary source)", **_CFGS["transnormer_t1_mlm"])
register_model("transnormer_t2_mlm", TransNormerMLM, family="transnormer",
               paper_metric="GLUE avg 78.78 (secondary source)", **_CFGS["transnormer_t2_mlm"])
