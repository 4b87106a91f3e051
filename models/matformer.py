"""MatFormer's MatLM (Devvrit, Kudugunta et al., 2023): a decoder-only transformer whose FFNs are
nested, and the zoo's softmax-attention baseline LM.

    h = embed(tokens)                                   (no scale; dropout)
    h = h + Attention(LN(h));  h = h + NestedMlp(LN(h))     (per layer, pre-LN)
    logits = LN(h) @ embed^T                            (tied)

Each FFN's first m hidden units form a smaller FFN (`layers.NestedMlp`); attention, embeddings
and norms are shared and full size. The four nested widths (S, M, L, XL) are
{d_ff/8, d_ff/4, d_ff/2, d_ff}; `m(tokens, granularity=w)` runs every layer at width w, and a
tuple of widths, one per layer, runs a Mix'n'Match model. At full width MatLM is a plain
transformer LM: the zoo's softmax-attention baseline for the linear-attention LMs.

Attention is causal `ops.attention` with a fused qkv projection, multi-head or multi-query
(`num_kv_heads`), and positions either RoPE (rotate-half, GPT-NeoX/OLMo layout) or ALiBi
(OLMo's slopes ``2^(-(h+1) * alibi_max / H)``). The `matlm_olmo_*` variants are the
MatFormer-OLMo reproduction's sizes and architecture (sequential pre-LN blocks, LayerNorm with
bias, exact GELU, biases everywhere, multi-query attention, ALiBi, mlp_ratio 8, tied embedding).

Generation: `init_cache(batch, max_len)` allocates a KV cache (keys after RoPE, kv heads only);
`decode_step(tokens, cache)` writes the new keys and values at the cache's offset and attends to
every position written so far, so a prefill of T tokens and T single steps give the same logits.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ops
from models import layers
from models.registry import register_model

_INIT_STD = 0.02  # OLMo's init_std: every kernel and the embedding ~ N(0, 0.02), biases 0
_MASK_VALUE = -1e30  # additive bias of a masked key (finite: a row is never all -inf)
POSITIONS = ("rope", "alibi")


def _linear(din: int, dout: int, *, use_bias: bool = True, dtype=jnp.float32,
            param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=nnx.initializers.normal(_INIT_STD),
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of ``x`` [B, T, H, D] at ``positions`` [T], rotate-half layout: feature i
  pairs with i + D/2 at frequency ``theta^(-2i/D)``. Computed in f32."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / theta ** (np.arange(half, dtype=np.float32) * 2 / x.shape[-1])
  angle = positions.astype(jnp.float32)[:, None] * inv_freq          # [T, D/2]
  cos = jnp.tile(jnp.cos(angle), 2)[None, :, None, :]
  sin = jnp.tile(jnp.sin(angle), 2)[None, :, None, :]
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


def alibi_slopes(num_heads: int, alibi_max: float = 8.0) -> np.ndarray:
  """OLMo's ALiBi slopes: head h gets ``2^(-(h+1) * alibi_max / num_heads)``."""
  return 2.0 ** (-(np.arange(1, num_heads + 1, dtype=np.float64) * alibi_max / num_heads))


class CausalSelfAttention(nnx.Module):
  """Causal softmax attention: fused qkv (q: H heads, k and v: `num_kv_heads` heads each),
  RoPE or ALiBi, `ops.attention`, output projection."""

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, *, positions: str,
               use_bias: bool, rope_theta: float, alibi_max: float,
               attn_implementation: str | None, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    self.head_dim = dim // num_heads
    self.positions, self.rope_theta = positions, rope_theta
    self.slopes = tuple(alibi_slopes(num_heads, alibi_max)) if positions == "alibi" else None
    self.attn_implementation = attn_implementation
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = _linear(dim, dim + 2 * num_kv_heads * self.head_dim, **kw)
    self.out = _linear(dim, dim, **kw)

  def _qkv(self, x: jax.Array, positions: jax.Array):
    batch, length, dim = x.shape
    kv_dim = self.num_kv_heads * self.head_dim
    q, k, v = jnp.split(self.qkv(x), [dim, dim + kv_dim], axis=-1)
    q = q.reshape(batch, length, self.num_heads, self.head_dim)
    k, v = (t.reshape(batch, length, self.num_kv_heads, self.head_dim) for t in (k, v))
    if self.positions == "rope":
      q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)
    return q, k, v

  def _alibi(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array | None:
    """[H, Tq, Tk] f32 bias ``slope_h * (k - q)`` (<= 0 on the visible keys), None for RoPE."""
    if self.slopes is None:
      return None
    distance = (k_positions[None, :] - q_positions[:, None]).astype(jnp.float32)
    return jnp.asarray(self.slopes, jnp.float32)[:, None, None] * distance

  def _attend(self, q, k, v, *, bias, causal: bool) -> jax.Array:
    if self.num_kv_heads != self.num_heads:  # multi-query / grouped: each kv head serves a group
      group = self.num_heads // self.num_kv_heads
      k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    out = ops.attention(q, k, v, bias=bias, causal=causal, implementation=self.attn_implementation)
    return self.out(out.reshape(*out.shape[:2], -1))

  def __call__(self, x: jax.Array) -> jax.Array:
    """The whole sequence from position 0: [B, T, dim] -> [B, T, dim]."""
    positions = jnp.arange(x.shape[1])
    q, k, v = self._qkv(x, positions)
    return self._attend(q, k, v, bias=self._alibi(positions, positions), causal=True)

  def step(self, x: jax.Array, cache: dict, offset: jax.Array) -> tuple[jax.Array, dict]:
    """Tokens at positions offset, offset + 1, ... after the ``cache`` {'k', 'v'}
    [B, max_len, kv_heads, head_dim] filled up to ``offset``."""
    q_positions = offset + jnp.arange(x.shape[1])
    q, k, v = self._qkv(x, q_positions)
    start = (0, offset, 0, 0)
    keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
    values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
    k_positions = jnp.arange(keys.shape[1])
    visible = k_positions[None, :] <= q_positions[:, None]          # [T, max_len]
    alibi = self._alibi(q_positions, k_positions)
    bias = jnp.where(visible, 0.0 if alibi is None else alibi, _MASK_VALUE)
    out = self._attend(q, keys.astype(q.dtype), values.astype(q.dtype), bias=bias, causal=False)
    return out, {"k": keys, "v": values}


class MatLMBlock(nnx.Module):
  """Pre-LN layer: ``h + Attention(LN(h))``, then ``h + NestedMlp(LN(h), width)``."""

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_dim: int, *,
               positions: str, gated: bool, act, use_bias: bool, dropout: float,
               norm_eps: float, rope_theta: float, alibi_max: float,
               attn_implementation: str | None, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = layers.layer_norm(dim, eps=norm_eps, **kw)
    self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads, positions=positions,
                                    use_bias=use_bias, rope_theta=rope_theta,
                                    alibi_max=alibi_max,
                                    attn_implementation=attn_implementation, **kw)
    self.ff_norm = layers.layer_norm(dim, eps=norm_eps, **kw)
    self.mlp = layers.NestedMlp(dim, mlp_dim, gated=gated, act=act, drop=dropout,
                                linear=functools.partial(_linear, use_bias=use_bias), **kw)
    self.drop = layers.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, width: int, train: bool = False) -> jax.Array:
    x = x + self.drop(self.attn(self.attn_norm(x)), train=train)
    return x + self.mlp(self.ff_norm(x), width=width, train=train)

  def step(self, x: jax.Array, cache: dict, offset, *, width: int) -> tuple[jax.Array, dict]:
    attended, cache = self.attn.step(self.attn_norm(x), cache, offset)
    x = x + attended
    return x + self.mlp(self.ff_norm(x), width=width), cache


class MatLM(nnx.Module):
  """Causal LM with nested FFNs: ``m(tokens [B, T], granularity=None) -> logits [B, T, vocab]`` f32.

  ``granularity``: None (every hidden unit: the XL model), an int m (the first m hidden units of
  every FFN; the trained ones are ``m.granularities``), or one int per layer (Mix'n'Match).
  Generation: ``cache = m.init_cache(batch, max_len)``, then ``logits, cache =
  m.decode_step(tokens, cache, granularity=...)`` with tokens [B, T] (T > 1: a prefill).

  Args:
    vocab_size, dim, depth, num_heads: embedding rows, width, layers, query heads.
    mlp_dim: FFN hidden width of the full model (d_ff), a multiple of 8 (the smallest width is
      d_ff / 8).
    num_kv_heads: key/value heads (None: num_heads; 1: multi-query attention as MatFormer-OLMo).
    positions: 'rope' or 'alibi'.
    gated: a gated FFN (``act(x W_g) * (x W_x)``) instead of ``act(x W_1)``.
    act: 'gelu' (exact), 'relu' or 'silu'.
    use_bias: biases in every Linear (OLMo's include_bias).
    dropout: on the embedding, each branch output and the FFN hidden units (training only).
    attn_implementation: passed to ``ops.attention`` (None: the platform's best).
  """

  def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, mlp_dim: int, *,
               num_kv_heads: int | None = None, positions: str = "rope", gated: bool = False,
               act: str = "gelu", use_bias: bool = True, dropout: float = 0.0,
               norm_eps: float = 1e-5, rope_theta: float = 10000.0, alibi_max: float = 8.0,
               attn_implementation: str | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if dim % num_heads or num_heads % num_kv_heads:
      raise ValueError(f"dim must be divisible by num_heads and num_heads by num_kv_heads, got "
                       f"dim={dim}, num_heads={num_heads}, num_kv_heads={num_kv_heads}")
    if mlp_dim % 8:
      raise ValueError(f"mlp_dim must be a multiple of 8 (the smallest nested width is "
                       f"mlp_dim / 8), got {mlp_dim}")
    if positions not in POSITIONS:
      raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if positions == "rope" and (dim // num_heads) % 2:
      raise ValueError(f"RoPE needs an even head dim, got {dim // num_heads}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vocab_size, self.dim, self.mlp_dim, self.dtype = vocab_size, dim, mlp_dim, dtype
    self.embed = nnx.Embed(vocab_size, dim, embedding_init=nnx.initializers.normal(_INIT_STD),
                           **kw)
    self.drop = layers.Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List([
        MatLMBlock(dim, num_heads, num_kv_heads, mlp_dim, positions=positions, gated=gated,
                   act=layers.get_activation(act), use_bias=use_bias, dropout=dropout,
                   norm_eps=norm_eps, rope_theta=rope_theta, alibi_max=alibi_max,
                   attn_implementation=attn_implementation, **kw)
        for _ in range(depth)])
    self.norm = layers.layer_norm(dim, eps=norm_eps, **kw)

  @property
  def granularities(self) -> tuple[int, ...]:
    """The four nested FFN widths S, M, L, XL: d_ff/8, d_ff/4, d_ff/2, d_ff."""
    return tuple(self.mlp_dim // 2 ** i for i in (3, 2, 1, 0))

  def layer_widths(self, granularity: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """The FFN width of every layer that ``granularity`` names (see the class docstring)."""
    depth = len(self.blocks)
    if granularity is None or isinstance(granularity, (int, np.integer)):
      widths = (granularity,) * depth
    else:
      widths = tuple(granularity)
      if len(widths) != depth:
        raise ValueError(f"granularity per layer needs {depth} widths, got {len(widths)}: "
                         f"{widths}")
    return tuple(block.mlp.check_width(w) for block, w in zip(self.blocks, widths))

  def head(self, h: jax.Array) -> jax.Array:
    """Final LayerNorm and the tied output projection -> f32 logits."""
    return self.embed.attend(self.norm(h)).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, *, train: bool = False,
               granularity: int | Sequence[int] | None = None) -> jax.Array:
    """[B, T] int tokens -> [B, T, vocab] f32 logits."""
    _check_tokens(tokens)
    widths = self.layer_widths(granularity)
    h = self.drop(self.embed(tokens), train=train)
    for block, width in zip(self.blocks, widths):
      h = block(h, width=width, train=train)
    return self.head(h)

  def init_cache(self, batch: int, max_len: int) -> dict:
    """An empty KV cache for ``max_len`` positions: per layer 'k' and 'v' [batch, max_len,
    kv_heads, head_dim] in the compute dtype, and the number of positions written ('offset')."""
    if batch < 1 or max_len < 1:
      raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
    caches = []
    for block in self.blocks:
      shape = (batch, max_len, block.attn.num_kv_heads, block.attn.head_dim)
      caches.append({"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)})
    return {"offset": jnp.zeros((), jnp.int32), "layers": tuple(caches)}

  def decode_step(self, tokens: jax.Array, cache: dict, *,
                  granularity: int | Sequence[int] | None = None) -> tuple[jax.Array, dict]:
    """Next tokens [B, T] after ``cache`` -> (logits [B, T, vocab] f32, updated cache).

    The cache must have room for T more positions (``offset + T <= max_len``): this is checked
    when the offset is a concrete value; under jit it is the caller's contract (``generate``
    allocates ``prompt + new tokens``)."""
    _check_tokens(tokens)
    widths = self.layer_widths(granularity)
    self._check_cache(tokens, cache)
    offset = cache["offset"]
    h = self.embed(tokens)
    caches = []
    for block, width, layer_cache in zip(self.blocks, widths, cache["layers"]):
      h, layer_cache = block.step(h, layer_cache, offset, width=width)
      caches.append(layer_cache)
    return self.head(h), {"offset": offset + tokens.shape[1], "layers": tuple(caches)}

  def _check_cache(self, tokens: jax.Array, cache: dict) -> None:
    got = [layer["k"].shape for layer in cache["layers"]]
    batch, length = tokens.shape
    max_len = got[0][1] if got else 0
    expected = [(batch, max_len, b.attn.num_kv_heads, b.attn.head_dim) for b in self.blocks]
    if got != expected:
      raise ValueError(f"cache does not fit this model and batch {batch}: expected keys of "
                       f"shapes {expected}, got {got}")
    offset = cache["offset"]
    end = length if isinstance(offset, jax.core.Tracer) else int(offset) + length
    if end > max_len:
      raise ValueError(f"the cache holds {max_len} positions; {length} tokens after offset "
                       f"{'?' if isinstance(offset, jax.core.Tracer) else int(offset)} need {end}")


def _check_tokens(tokens: jax.Array) -> None:
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an integer array [batch, length], got shape "
                     f"{tuple(tokens.shape)} and dtype {tokens.dtype}")


# --- variants -------------------------------------------------------------------------------------
# matlm_tiny: the CPU size (byte vocabulary), d_ff chosen so that the model has the parameter count
# of transnormer_llm_tiny (within 0.2%). matlm_olmo_*: MatFormer-OLMo's released sizes (its
# example commands: d_model 512/1024/2048, 8 layers, 16 heads, mlp_ratio 8, multi-query, ALiBi;
# GPT-NeoX vocabulary padded to 50,304 rows). transformer_lm_*: the softmax-attention baselines of
# the TransNormerLLM comparison: MatLM at full width with TNL's vocabulary, width and depth, and
# d_ff chosen to match the TNL variant's parameter count (tiny: the dims of matlm_tiny).

_VARIANTS = {  # name: (vocab, dim, depth, heads, mlp_dim, extra kwargs, paper metric)
    "matlm_tiny": (256, 128, 4, 4, 584, {}, ""),
    "matlm_olmo_180m": (50304, 512, 8, 16, 4096, dict(num_kv_heads=1, positions="alibi"),
                        "MatFormer-OLMo-180M (20B Pile tokens)"),
    "matlm_olmo_460m": (50304, 1024, 8, 16, 8192, dict(num_kv_heads=1, positions="alibi"),
                        "MatFormer-OLMo-460M (40B Pile tokens)"),
    "matlm_olmo_1300m": (50304, 2048, 8, 16, 16384, dict(num_kv_heads=1, positions="alibi"),
                         "MatFormer-OLMo-1300M (160B Pile tokens)"),
    "transformer_lm_tiny": (256, 128, 4, 4, 584, {}, "baseline of transnormer_llm_tiny"),
    "transformer_lm_385m": (64000, 1024, 24, 8, 4728, {},
                            "TNL paper's Transformer at 385M: loss 2.362 / PPL 5.160"),
    "transformer_lm_1b": (64000, 2048, 16, 16, 9464, {},
                          "TNL paper's Transformer at 1B: loss 2.061 / PPL 4.765"),
}

for _name, (_vocab, _dim, _depth, _heads, _mlp, _extra, _metric) in _VARIANTS.items():
  register_model(_name, MatLM, family="matformer", paper_metric=_metric, vocab_size=_vocab,
                 dim=_dim, depth=_depth, num_heads=_heads, mlp_dim=_mlp, **_extra)
