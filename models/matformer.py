"""MatFormer: Nested Transformer for Elastic Inference (Devvrit, Kudugunta et al., NeurIPS 2024):
MatLM (a decoder-only LM whose FFNs are nested; at full width also the zoo's softmax-attention
baseline LM, models/transformer_lm.py), MatViT (scenic's ViT with nested MLPs), Mix'n'Match and
extraction of sub-models.

    h = embed(tokens)                                   (no scale; dropout)
    h = h + Attention(LN(h));  h = h + NestedMlp(LN(h))     (per layer, pre-LN)
    logits = LN(h) @ embed^T                            (tied)

Each FFN's first m hidden units form a smaller FFN (`layers.NestedMlp`); attention, embeddings
and norms are shared and full size. The four nested widths (S, M, L, XL) are
{d_ff/8, d_ff/4, d_ff/2, d_ff}; `m(x, granularity=w)` runs every layer at width w, and a tuple
of widths, one per layer, runs a Mix'n'Match model. `extract(m, widths)` slices the weights into a
model of its own (fewer parameters, the same outputs); `mix_n_match(m, budget)` picks the widths
under a parameter or FLOP budget with the paper's "balanced" rule (`balanced_configs`). At full
width MatLM is a plain transformer LM: the zoo's softmax-attention baseline for the
linear-attention LMs. Joint training of the granularities is `tasks.nested` (summed or sampled).

Attention is causal `ops.attention` with a fused qkv projection, multi-head or multi-query
(`num_kv_heads`), and positions either RoPE (rotate-half, GPT-NeoX/OLMo layout) or ALiBi
(OLMo's slopes ``2^(-(h+1) * alibi_max / H)``). The `matlm_olmo_*` variants are the
MatFormer-OLMo reproduction's sizes and architecture (sequential pre-LN blocks, LayerNorm with
bias, exact GELU, biases everywhere, multi-query attention, ALiBi, mlp_ratio 8, tied embedding).

Generation: `init_cache(batch, max_len)` allocates a head-major KV cache (keys after RoPE, kv
heads only); `decode_step(tokens, cache)` writes the new keys and values at the cache's offset
and attends to every position written so far, block by block with an online softmax (the cost
follows the filled length, not max_len), so a prefill of T tokens and T single steps give the
same logits.
An extracted sub-model drafts for the full model in `models.generation.speculative_generate`.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ops
from models import layers
from models.convert import check_state_dict, layout
from models.registry import PretrainedCfg, register_model, register_pretrained
from ops.sharding import axes as logical

# OLMo's init_std: every kernel (layers.linear's init="normal") and the embedding ~ N(0, 0.02),
# biases 0
_INIT_STD = 0.02
_MASK_VALUE = -1e30  # additive bias of a masked key (finite: a row is never all -inf)
POSITIONS = ("rope", "alibi")


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


class CausalSelfAttention(nnx.Module):
  """Causal softmax attention: fused qkv (q: H heads, k and v: `num_kv_heads` heads each),
  RoPE or ALiBi, `ops.attention`, output projection."""

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, *, positions: str,
               use_bias: bool, rope_theta: float, alibi_max: float,
               attn_implementation: str | None, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    self.head_dim = dim // num_heads
    self.positions, self.rope_theta = positions, rope_theta
    self.slopes = (tuple(layers.alibi_slopes(num_heads, alibi_max, interleave=False))
                   if positions == "alibi" else None)
    self.attn_implementation = attn_implementation
    kw = dict(init="normal", use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = layers.linear(dim, dim + 2 * num_kv_heads * self.head_dim, axes=("embed", "heads"),
                             **kw)
    self.out = layers.linear(dim, dim, axes=("heads", "embed"), **kw)

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
    [B, kv_heads, max_len, head_dim] filled up to ``offset``."""
    q_positions = offset + jnp.arange(x.shape[1])
    q, k, v = self._qkv(x, q_positions)
    start = (0, 0, offset, 0)
    # Head-major: the new [B, T, kv_heads, D] rows are transposed, not the whole cache.
    keys, values = (jax.lax.dynamic_update_slice(cache[name], new.transpose(0, 2, 1, 3)
                                                 .astype(cache[name].dtype), start)
                    for name, new in (("k", k), ("v", v)))
    slopes = None if self.slopes is None else jnp.asarray(self.slopes, jnp.float32)
    out = _cached_attention(q, keys, values, q_positions, slopes=slopes)
    return self.out(out.reshape(*out.shape[:2], -1)), {"k": keys, "v": values}


# Key positions per block of the cached attention: the loop runs over the blocks written so far.
_CACHE_BLOCK = 256


def _cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, q_positions: jax.Array,
                      *, slopes: jax.Array | None, block: int = _CACHE_BLOCK) -> jax.Array:
  """Causal softmax attention of queries q [B, T, H, D] at ``q_positions`` [T] (consecutive)
  to a head-major cache [B, kv_heads, max_len, D] written up to ``q_positions[-1]``.

  The cost follows the filled length, not max_len: a loop over blocks of ``block`` key
  positions up to the last query's position, with an online softmax (f32 running max, sum and
  output). A group of H / kv_heads query heads shares each kv head through a reshape (no copies
  of K and V). ALiBi's ``slope_h * (k - q)`` is added when ``slopes`` [H] is given.
  Returns [B, T, H, D] in q's dtype."""
  batch, length, num_heads, head_dim = q.shape
  kv_heads, max_len = keys.shape[1], keys.shape[2]
  group = num_heads // kv_heads
  block = min(block, max_len)
  qf = q.astype(jnp.float32).reshape(batch, length, kv_heads, group, head_dim)
  qf = qf.transpose(0, 2, 3, 1, 4) * (1.0 / math.sqrt(head_dim))      # [B, KV, G, T, D]
  if slopes is not None:
    slopes = slopes.reshape(kv_heads, group)[:, :, None, None]

  def attend_block(i, carry):
    running_max, running_sum, acc = carry
    # The last block is clamped to end at max_len; keys before i * block were already counted.
    begin = jnp.minimum(i * block, max_len - block)
    k_blk, v_blk = (jax.lax.dynamic_slice_in_dim(t, begin, block, axis=2).astype(jnp.float32)
                    for t in (keys, values))
    k_positions = begin + jnp.arange(block)
    visible = ((k_positions[None, :] <= q_positions[:, None])
               & (k_positions[None, :] >= i * block))                  # [T, block]
    scores = jnp.einsum("bkgtd,bksd->bkgts", qf, k_blk)
    if slopes is not None:
      scores = scores + slopes * (k_positions[None, :] - q_positions[:, None])
    scores = jnp.where(visible, scores, _MASK_VALUE)
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    probs = jnp.where(visible, jnp.exp(scores - new_max[..., None]), 0.0)
    rescale = jnp.exp(running_max - new_max)
    running_sum = running_sum * rescale + probs.sum(axis=-1)
    acc = acc * rescale[..., None] + jnp.einsum("bkgts,bksd->bkgtd", probs, v_blk)
    return new_max, running_sum, acc

  stats_shape = (batch, kv_heads, group, length)
  init = (jnp.full(stats_shape, _MASK_VALUE, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
          jnp.zeros((*stats_shape, head_dim), jnp.float32))
  num_blocks = q_positions[-1] // block + 1
  _, total, acc = jax.lax.fori_loop(0, num_blocks, attend_block, init)
  out = acc / total[..., None]          # every query sees key 0, so the sum is positive
  return out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)


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
    self.mlp = layers.NestedMlp(dim, mlp_dim, gated=gated, act=act, drop=dropout, init="normal",
                                use_bias=use_bias, **kw)
    self.drop = layers.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, *, width: int, train: bool = False) -> jax.Array:
    x = x + self.drop(self.attn(self.attn_norm(x)), train=train)
    return x + self.mlp(self.ff_norm(x), width=width, train=train)

  def step(self, x: jax.Array, cache: dict, offset, *, width: int) -> tuple[jax.Array, dict]:
    attended, cache = self.attn.step(self.attn_norm(x), cache, offset)
    x = x + attended
    return x + self.mlp(self.ff_norm(x), width=width), cache


Granularity = int | Sequence[int] | None


def _per_layer_mlp_dims(mlp_dim: int | Sequence[int], depth: int) -> tuple[int, ...]:
  """`mlp_dim` (one width for every layer, or one per layer) as a tuple of `depth` ints >= 1."""
  dims = (mlp_dim,) * depth if isinstance(mlp_dim, (int, np.integer)) else tuple(mlp_dim)
  if len(dims) != depth or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in dims):
    raise ValueError(f"mlp_dim must be an int >= 1 or {depth} of them (one per layer), got "
                     f"{mlp_dim!r}")
  return tuple(int(d) for d in dims)


class NestedFFNs:
  """What MatLM and MatViT share: the FFN of every layer (``self.blocks[i].mlp``, a
  `layers.NestedMlp`) is nested, and one call runs each layer at a width of its choice.

  A *granularity* names those widths: None (every hidden unit: the XL model), an int m (the first
  m units of every layer) or one width per layer (a Mix'n'Match model). ``granularities`` are the
  four trained ones, S, M, L, XL = d_ff/8, d_ff/4, d_ff/2, d_ff (per layer where the layers'
  d_ff differ, as in an extracted Mix'n'Match model).
  """
  blocks: nnx.List
  _init_args: tuple   # (name, value) pairs: static and hashable, so jit can key on the graphdef

  @property
  def init_kwargs(self) -> dict:
    """The constructor's arguments (``extract`` builds the sub-model's class from them)."""
    return dict(self._init_args)

  def _record_init_args(self, **kwargs) -> None:
    mlp_dim = kwargs["mlp_dim"]
    if not isinstance(mlp_dim, (int, np.integer)):
      kwargs["mlp_dim"] = tuple(mlp_dim)
    self._init_args = tuple(kwargs.items())

  @property
  def granularities(self) -> tuple:
    """S, M, L, XL: ints when every layer has the same d_ff, else one tuple of widths each."""
    dims = tuple(block.mlp.hidden_dim for block in self.blocks)
    table = [tuple(max(1, d // 2 ** i) for d in dims) for i in (3, 2, 1, 0)]
    return tuple(t[0] for t in table) if len(set(dims)) == 1 else tuple(table)

  def layer_widths(self, granularity: Granularity = None) -> tuple[int, ...]:
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

  def num_params(self, granularity: Granularity = None) -> int:
    """Parameters of the sub-model at ``granularity`` (= ``count_params(extract(self, g))``)."""
    total = sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
    return total - sum(block.mlp.num_params() - block.mlp.num_params(width)
                       for block, width in zip(self.blocks, self.layer_widths(granularity)))


class MatLM(NestedFFNs, nnx.Module):
  """Causal LM with nested FFNs: ``m(tokens [B, T], granularity=None) -> logits [B, T, vocab]`` f32.

  ``granularity``: None (every hidden unit: the XL model), an int m (the first m hidden units of
  every FFN; the trained ones are ``m.granularities``), or one int per layer (Mix'n'Match).
  Generation: ``cache = m.init_cache(batch, max_len)``, then ``logits, cache =
  m.decode_step(tokens, cache, granularity=...)`` with tokens [B, T] (T > 1: a prefill).

  Args:
    vocab_size, dim, depth, num_heads: embedding rows, width, layers, query heads.
    mlp_dim: FFN hidden width of the full model (d_ff; the nested widths are d_ff // 8, // 4,
      // 2 and d_ff), or one per layer (an extracted Mix'n'Match model).
    num_kv_heads: key/value heads (None: num_heads; 1: multi-query attention as MatFormer-OLMo).
    positions: 'rope' or 'alibi'.
    gated: a gated FFN (``act(x W_g) * (x W_x)``) instead of ``act(x W_1)``.
    act: 'gelu' (exact), 'gelu_tanh', 'relu' or 'silu'.
    use_bias: biases in every Linear (OLMo's include_bias).
    dropout: on the embedding, each branch output and the FFN hidden units (training only).
    attn_implementation: passed to ``ops.attention`` in the full forward (None: the
      platform's best); ``decode_step`` attends to its cache with its own blocked einsums.
  """

  def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int,
               mlp_dim: int | Sequence[int], *, num_kv_heads: int | None = None,
               positions: str = "rope", gated: bool = False, act: str = "gelu",
               use_bias: bool = True, dropout: float = 0.0, norm_eps: float = 1e-5,
               rope_theta: float = 10000.0, alibi_max: float = 8.0,
               attn_implementation: str | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self._record_init_args(
        vocab_size=vocab_size, dim=dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
        num_kv_heads=num_kv_heads, positions=positions, gated=gated, act=act, use_bias=use_bias,
        dropout=dropout, norm_eps=norm_eps, rope_theta=rope_theta, alibi_max=alibi_max,
        attn_implementation=attn_implementation, dtype=dtype, param_dtype=param_dtype)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if dim % num_heads or num_heads % num_kv_heads:
      raise ValueError(f"dim must be divisible by num_heads and num_heads by num_kv_heads, got "
                       f"dim={dim}, num_heads={num_heads}, num_kv_heads={num_kv_heads}")
    mlp_dims = _per_layer_mlp_dims(mlp_dim, depth)
    if positions not in POSITIONS:
      raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if positions == "rope" and (dim // num_heads) % 2:
      raise ValueError(f"RoPE needs an even head dim, got {dim // num_heads}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vocab_size, self.dim, self.dtype = vocab_size, dim, dtype
    self.embed = layers.TokenEmbed(vocab_size, dim,
                                   embedding_init=nnx.initializers.normal(_INIT_STD), **kw)
    self.drop = layers.Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List([
        MatLMBlock(dim, num_heads, num_kv_heads, layer_mlp_dim, positions=positions,
                   gated=gated, act=layers.get_activation(act), use_bias=use_bias,
                   dropout=dropout, norm_eps=norm_eps, rope_theta=rope_theta,
                   alibi_max=alibi_max, attn_implementation=attn_implementation, **kw)
        for layer_mlp_dim in mlp_dims])
    self.norm = layers.layer_norm(dim, eps=norm_eps, **kw)

  def head(self, h: jax.Array) -> jax.Array:
    """Final LayerNorm and the tied output projection -> f32 logits."""
    return self.embed.attend(self.norm(h)).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, *, train: bool = False,
               granularity: Granularity = None) -> jax.Array:
    """[B, T] int tokens -> [B, T, vocab] f32 logits."""
    layers.check_tokens(tokens)
    widths = self.layer_widths(granularity)
    h = self.drop(self.embed(tokens), train=train)
    for block, width in zip(self.blocks, widths):
      h = layers.shard_batch(block(h, width=width, train=train))
    return self.head(h)

  def flops(self, granularity: Granularity = None, *, seq_len: int) -> int:
    """Forward FLOPs (2 x multiply-adds) of one sequence of ``seq_len`` tokens: the weight
    matmuls, causal attention (T (T + 1) / 2 query-key pairs, scores and values) and the tied
    output projection; norms, biases and activations left out."""
    total = 2 * seq_len * self.dim * self.vocab_size
    pairs = seq_len * (seq_len + 1) // 2
    for block, width in zip(self.blocks, self.layer_widths(granularity)):
      attn = block.attn
      total += 2 * seq_len * self.dim * (attn.qkv.out_features + self.dim)
      total += 2 * 2 * pairs * attn.num_heads * attn.head_dim
      total += seq_len * block.mlp.flops_per_token(width)
    return total

  def init_cache(self, batch: int, max_len: int) -> dict:
    """An empty KV cache for ``max_len`` positions: per layer 'k' and 'v' [batch, kv_heads,
    max_len, head_dim] (head-major, the layout the decode step's matmuls contract) in the
    compute dtype, and the number of positions written ('offset')."""
    if batch < 1 or max_len < 1:
      raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
    caches = []
    for block in self.blocks:
      shape = (batch, block.attn.num_kv_heads, max_len, block.attn.head_dim)
      caches.append({"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)})
    return {"offset": jnp.zeros((), jnp.int32), "layers": tuple(caches)}

  def decode_step(self, tokens: jax.Array, cache: dict, *,
                  granularity: Granularity = None) -> tuple[jax.Array, dict]:
    """Next tokens [B, T] after ``cache`` -> (logits [B, T, vocab] f32, updated cache).

    The cache must have room for T more positions (``offset + T <= max_len``): this is checked
    when the offset is a concrete value; under jit it is the caller's contract (``generate``
    allocates ``prompt + new tokens``)."""
    layers.check_tokens(tokens)
    widths = self.layer_widths(granularity)
    self._check_cache(tokens, cache)
    offset = cache["offset"]
    h = self.embed(tokens)
    caches = []
    for block, width, layer_cache in zip(self.blocks, widths, cache["layers"]):
      h, layer_cache = block.step(h, layer_cache, offset, width=width)
      caches.append(layer_cache)
    return self.head(h), {"offset": offset + tokens.shape[1], "layers": tuple(caches)}

  def rewind_cache(self, cache: dict, length) -> dict:
    """``cache`` as it was after its first ``length`` positions (speculative decoding undoes
    rejected tokens this way): the keys past the offset are masked, then overwritten."""
    return {**cache, "offset": jnp.asarray(length, jnp.int32)}

  def _check_cache(self, tokens: jax.Array, cache: dict) -> None:
    got = [layer["k"].shape for layer in cache["layers"]]
    batch, length = tokens.shape
    max_len = got[0][2] if got else 0
    expected = [(batch, b.attn.num_kv_heads, max_len, b.attn.head_dim) for b in self.blocks]
    if got != expected:
      raise ValueError(f"cache does not fit this model and batch {batch}: expected keys of "
                       f"shapes {expected}, got {got}")
    offset = cache["offset"]
    end = length if isinstance(offset, jax.core.Tracer) else int(offset) + length
    if end > max_len:
      raise ValueError(f"the cache holds {max_len} positions; {length} tokens after offset "
                       f"{'?' if isinstance(offset, jax.core.Tracer) else int(offset)} need {end}")


# --- MatViT ---------------------------------------------------------------------------------------


class MatViTBlock(nnx.Module):
  """Pre-LN ViT encoder layer with a nested MLP: ``x + DropPath(Attention(LN(x)))``, then
  ``x + DropPath(NestedMlp(LN(x), width))`` (scenic's Encoder1DBlock)."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, act, dropout: float,
               attn_dropout: float, drop_path: float, norm_eps: float,
               attn_implementation: str | None, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layers.layer_norm(dim, eps=norm_eps, **kw)
    self.attn = layers.Attention(dim, num_heads, attn_drop=attn_dropout, proj_drop=dropout,
                                 attn_implementation=attn_implementation,
                                 init="scenic_attention", **kw)
    self.norm2 = layers.layer_norm(dim, eps=norm_eps, **kw)
    self.mlp = layers.NestedMlp(dim, mlp_dim, act=act, drop=dropout, init="scenic_mlp", **kw)
    self.drop_path = layers.DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array, *, width: int, train: bool = False) -> jax.Array:
    x = x + self.drop_path(self.attn(self.norm1(x), train=train), train=train)
    return x + self.drop_path(self.mlp(self.norm2(x), width=width, train=train), train=train)


class MatViT(NestedFFNs, nnx.Module):
  """ViT whose MLPs are nested (MatFormer's MatViT, scenic ``projects/matvit``).

  ``m(images [B, H, W, C], train=False, granularity=None) -> logits``; granularities as MatLM's
  (S, M, L, XL = mlp_dim / 8, / 4, / 2, / 1: scenic's ``matvit_dims``; one width per layer
  for Mix'n'Match). Patch embedding (a p x p stride-p conv), a class token, learned 1-D
  position embeddings, pre-LN blocks, a final LayerNorm, and the class token (``class_token``)
  or the mean of the patch tokens into a linear head (zero kernel, bias ``head_bias_init``;
  scenic's multi-label recipe uses -6.9). Scenic computes every width as the full MLP with its
  hidden units masked; here the weights are sliced, so compute shrinks with the width and the
  outputs are the same (the activation maps 0 to 0).

  Args:
    img_size, patch_size, in_chans: input side (square), patch side, channels.
    num_classes: logits (0: ``__call__`` returns the pooled features).
    dim, depth, num_heads, mlp_dim: width, layers, heads, MLP hidden width (or one per layer).
    class_token: pool with a class token (scenic's ``classifier='token'``) or by averaging.
    dropout, attn_dropout, drop_path: dropout on the embeddings, branch outputs and MLP hidden
      units; on attention probabilities; stochastic depth, growing linearly over the layers
      from 0 to ``drop_path``.
    act: 'gelu_tanh' (flax's nn.gelu, scenic's) or any `layers.ACTIVATIONS` name.
  """
  default_out_indices = 3  # what `features.features_only` takes: the last 3 blocks, as timm's ViT

  def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
               num_classes: int = 1000, dim: int = 768, depth: int = 12, num_heads: int = 12,
               mlp_dim: int | Sequence[int] = 3072, *, class_token: bool = True,
               dropout: float = 0.0, attn_dropout: float = 0.0, drop_path: float = 0.0,
               head_bias_init: float = 0.0, norm_eps: float = 1e-6, act: str = "gelu_tanh",
               attn_implementation: str | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self._record_init_args(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        dim=dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, class_token=class_token,
        dropout=dropout, attn_dropout=attn_dropout, drop_path=drop_path,
        head_bias_init=head_bias_init, norm_eps=norm_eps, act=act,
        attn_implementation=attn_implementation, dtype=dtype, param_dtype=param_dtype)
    if img_size % patch_size:
      raise ValueError(f"img_size must be a multiple of patch_size, got {img_size} and "
                       f"{patch_size}")
    mlp_dims = _per_layer_mlp_dims(mlp_dim, depth)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
    self.num_features, self.num_classes, self.class_token = dim, num_classes, class_token
    self.head_bias_init, self.dtype, self.param_dtype = head_bias_init, dtype, param_dtype
    num_patches = (img_size // patch_size) ** 2
    self.patch_embed = nnx.Conv(in_chans, dim, (patch_size, patch_size),
                                strides=(patch_size, patch_size), padding="VALID",
                                kernel_metadata=logical(None, None, "conv_in", "embed"),
                                bias_metadata=logical("embed"), **kw)
    self.cls_token = (nnx.Param(jnp.zeros((1, 1, dim), param_dtype), **logical(None, None, "embed"))
                      if class_token else None)
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (1, num_patches + class_token, dim), param_dtype),
        **logical(None, "length", "embed"))
    self.drop = layers.Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List([
        MatViTBlock(dim, num_heads, layer_mlp_dim, act=layers.get_activation(act),
                    dropout=dropout, attn_dropout=attn_dropout,
                    drop_path=drop_path * i / max(depth - 1, 1), norm_eps=norm_eps,
                    attn_implementation=attn_implementation, **kw)
        for i, layer_mlp_dim in enumerate(mlp_dims)])
    self.norm = layers.layer_norm(dim, eps=norm_eps, **kw)
    self.reset_classifier(num_classes, rngs=rngs)

  def forward_features(self, x: jax.Array, *, train: bool = False,
                       granularity: Granularity = None) -> jax.Array:
    """Images -> the normalised tokens [B, (1 +) patches, dim] (class token first)."""
    *_, x = self._block_outputs(x, train=train, granularity=granularity)
    return self.norm(x)

  def forward_intermediates(self, x: jax.Array, indices: int | Sequence[int] | None = None, *,
                            norm: bool = False, output_fmt: str = "NHWC",
                            intermediates_only: bool = False, train: bool = False,
                            granularity: Granularity = None):
    """timm's ViT forward_intermediates: (forward_features(x), [the block outputs at `indices`]).

    A block's output is taken as its patch tokens (the class token dropped), laid out as a map
    [B, H/p, W/p, dim] in `output_fmt` ('NLC': the tokens as they are); `norm` gives each one
    through the final LayerNorm, as timm's ViT does. `intermediates_only` returns the list alone
    and stops after the last block taken. `granularity` as in `forward_features`.
    """
    take = layers.feature_take_indices(len(self.blocks), indices)
    layout = layers.feature_layout(output_fmt)
    side = self.img_size // self.patch_size
    intermediates = []
    for i, tokens in enumerate(self._block_outputs(x, train=train, granularity=granularity)):
      if i in take:
        patches = (self.norm(tokens) if norm else tokens)[:, -side * side:]
        intermediates.append(layout(patches.reshape(-1, side, side, patches.shape[-1])))
      if intermediates_only and i == take[-1]:
        break
    return intermediates if intermediates_only else (self.norm(tokens), intermediates)

  @property
  def feature_info(self) -> list[dict]:
    """timm's feature_info: every block's width, stride (the patch size) and module name."""
    return [dict(num_chs=self.num_features, reduction=self.patch_size, module=f"blocks.{i}")
            for i in range(len(self.blocks))]

  def _block_outputs(self, x: jax.Array, *, train: bool, granularity: Granularity):
    """Yields every block's output tokens [B, (1 +) patches, dim]."""
    layers.check_images("MatViT", x, self.in_chans, size=self.img_size)
    widths = self.layer_widths(granularity)
    x = self.patch_embed(x.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = self.drop(x + self.pos_embed[...].astype(x.dtype), train=train)
    for block, width in zip(self.blocks, widths):
      x = layers.shard_batch(block(x, width=width, train=train))
      yield x

  def forward_head(self, x: jax.Array, *, pre_logits: bool = False) -> jax.Array:
    """Tokens -> logits (f32), or the pooled features with ``pre_logits=True``."""
    if x.ndim != 3 or x.shape[-1] != self.num_features:
      raise ValueError(f"forward_head expects tokens [batch, tokens, {self.num_features}], got "
                       f"shape {tuple(x.shape)}")
    pooled = x[:, 0] if self.cls_token is not None else jnp.mean(x, axis=1)
    if pre_logits or self.head is None:
      return pooled
    return self.head(pooled).astype(jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False,
               granularity: Granularity = None) -> jax.Array:
    return self.forward_head(self.forward_features(x, train=train, granularity=granularity))

  def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
    """A new logits layer (zero kernel, bias ``head_bias_init``); 0: none."""
    self.num_classes = num_classes
    self._record_init_args(**{**self.init_kwargs, "num_classes": num_classes})
    self.head = None if num_classes <= 0 else layers.Linear(
        self.num_features, num_classes, axes=("embed", None),
        kernel_init=nnx.initializers.zeros_init(),
        bias_init=nnx.initializers.constant(self.head_bias_init), dtype=self.dtype,
        param_dtype=self.param_dtype, rngs=rngs if rngs is not None else nnx.Rngs(0))

  def flops(self, granularity: Granularity = None) -> int:
    """Forward FLOPs (2 x multiply-adds) of one image: patch embedding, the weight matmuls,
    attention scores and values over all token pairs, the head."""
    patches = (self.img_size // self.patch_size) ** 2
    tokens = patches + (self.cls_token is not None)
    dim = self.num_features
    total = 2 * patches * self.patch_size ** 2 * self.in_chans * dim
    total += 2 * dim * max(self.num_classes, 0)
    for block, width in zip(self.blocks, self.layer_widths(granularity)):
      total += 2 * tokens * dim * 4 * dim + 2 * 2 * tokens * tokens * dim
      total += tokens * block.mlp.flops_per_token(width)
    return total


# --- Mix'n'Match and extraction -------------------------------------------------------------------


def extract(model: NestedFFNs, granularity: Granularity) -> NestedFFNs:
  """The sub-model at ``granularity`` as a model of its own: the same class with per-layer
  ``mlp_dim`` = the widths, every FFN's weights sliced to their first hidden units (input
  kernels' columns and biases, fc2's rows; fc2's bias kept), everything else copied. Its outputs
  equal ``model(x, granularity=granularity)`` and it has ``model.num_params(granularity)``
  parameters. Dropout and other RNG state are carried over."""
  widths = model.layer_widths(granularity)
  mlp_dim = widths[0] if len(set(widths)) == 1 else widths
  abstract = nnx.eval_shape(
      lambda: type(model)(**{**model.init_kwargs, "mlp_dim": mlp_dim}, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)

  def prefix(target, value):  # the nesting: a width-m FFN is the first m units on every axis
    return value[tuple(slice(0, n) for n in target.shape)]

  values = jax.tree.map(prefix, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.state(model)))
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def balanced_configs(model: NestedFFNs) -> list[tuple[int, ...]]:
  """Mix'n'Match's "balanced" per-layer widths from S to XL, smallest first.

  Between two neighbouring granularities only those two are mixed, and the later layers get the
  larger one (the paper's heuristic: change the granularity across layers as little as possible;
  Gemma 3n: more capacity for later blocks): all S, then the last layer at M, the last two, ...,
  all M, then the last layer at L, ... up to all XL. (G - 1) * depth + 1 configurations, each
  larger than the one before."""
  table = [model.layer_widths(g) for g in model.granularities]
  depth = len(table[0])
  configs = [table[0]]
  for smaller, larger in zip(table, table[1:]):
    configs += [smaller[:depth - j] + larger[depth - j:] for j in range(1, depth + 1)]
  return configs


COSTS = ("params", "flops")


def mix_n_match(model: NestedFFNs, budget: float, *, cost: str = "params",
                **cost_kwargs) -> tuple[int, ...]:
  """Per-layer widths of the largest balanced configuration (`balanced_configs`) whose cost is
  at most ``budget``: ``cost='params'`` counts the sub-model's parameters, ``'flops'`` its
  forward FLOPs (``model.flops(widths, **cost_kwargs)``, e.g. ``seq_len=`` for MatLM)."""
  if cost not in COSTS:
    raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
  measure = model.num_params if cost == "params" else functools.partial(model.flops,
                                                                        **cost_kwargs)
  configs = balanced_configs(model)
  fitting = [c for c in configs if measure(c) <= budget]
  if not fitting:
    raise ValueError(f"no sub-model fits a budget of {budget:,.0f} {cost}: the smallest "
                     f"(S) needs {measure(configs[0]):,}")
  return fitting[-1]


# --- variants -------------------------------------------------------------------------------------
# Named configs. matlm_tiny: the CPU size (byte vocabulary), d_ff chosen so that the model has the
# parameter count of transnormer_llm_tiny (within 0.2%). matlm_olmo_*: MatFormer-OLMo's released
# sizes (its example commands: d_model 512/1024/2048, 8 layers, 16 heads, mlp_ratio 8, multi-query,
# ALiBi; GPT-NeoX vocabulary padded to 50,304 rows). MatViT: scenic's ViT sizes
# (imagenet_augreg_matvit_config.py; its matvit_dims are mlp_dim / 8, / 4, / 2, / 1) at 224 with
# 1000 classes, and a CPU size for 28 x 28 grey images. The softmax-attention baselines of the
# TransNormerLLM comparison (`transformer_lm_*`, MatLM at full width): models/transformer_lm.py.

_OLMO = dict(vocab_size=50304, depth=8, num_heads=16, num_kv_heads=1, positions="alibi")
_CFGS = {
    "matlm_tiny": dict(vocab_size=256, dim=128, depth=4, num_heads=4, mlp_dim=584),
    "matlm_olmo_180m": dict(_OLMO, dim=512, mlp_dim=4096),
    "matlm_olmo_460m": dict(_OLMO, dim=1024, mlp_dim=8192),
    "matlm_olmo_1300m": dict(_OLMO, dim=2048, mlp_dim=16384),
    "matvit_tiny_patch16_224": dict(patch_size=16, dim=192, depth=12, num_heads=3, mlp_dim=768),
    "matvit_small_patch16_224": dict(patch_size=16, dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "matvit_base_patch16_224": dict(patch_size=16, dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "matvit_large_patch16_224": dict(patch_size=16, dim=1024, depth=24, num_heads=16,
                                     mlp_dim=4096),
    "matvit_huge_patch14_224": dict(patch_size=14, dim=1280, depth=32, num_heads=16, mlp_dim=5120),
    "matvit_nano_patch4_28": dict(patch_size=4, dim=64, depth=4, num_heads=4, mlp_dim=256,
                                  img_size=28, in_chans=1, num_classes=10),
}


# --- the official scenic MatViT checkpoint -> zoo params ------------------------------------------
#
# Scenic saves a flax TrainState; `models.convert.read_state_dict` flattens its 'params' into
# '/'-joined names (`Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel`). Flax kernels are
# already [in, out]; attention's query/key/value kernels are [dim, heads, head_dim] and its out
# kernel [heads, head_dim, dim]. The MLP's hidden units keep their order (the nesting).

_SCENIC_BLOCK = "Transformer/encoderblock_{}/"
_SCENIC_ATTN = "MultiHeadDotProductAttention_0/"
_QKV = ("query", "key", "value")


def _scenic_shapes(kw: Mapping) -> dict[str, tuple[int, ...]]:
  dim, heads, p = kw["dim"], kw["num_heads"], kw["patch_size"]
  tokens = (kw["img_size"] // p) ** 2 + kw["class_token"]
  shapes = {"embedding/kernel": (p, p, kw["in_chans"], dim), "embedding/bias": (dim,),
            "Transformer/posembed_input/pos_embedding": (1, tokens, dim),
            "Transformer/encoder_norm/scale": (dim,), "Transformer/encoder_norm/bias": (dim,)}
  if kw["class_token"]:
    shapes["cls"] = (1, 1, dim)
  if kw["num_classes"] > 0:
    shapes |= {"output_projection/kernel": (dim, kw["num_classes"]),
               "output_projection/bias": (kw["num_classes"],)}
  for i, mlp in enumerate(_per_layer_mlp_dims(kw["mlp_dim"], kw["depth"])):
    block = _SCENIC_BLOCK.format(i)
    for norm in ("LayerNorm_0", "LayerNorm_1"):
      shapes |= {f"{block}{norm}/scale": (dim,), f"{block}{norm}/bias": (dim,)}
    for name in _QKV:
      shapes |= {f"{block}{_SCENIC_ATTN}{name}/kernel": (dim, heads, dim // heads),
                 f"{block}{_SCENIC_ATTN}{name}/bias": (heads, dim // heads)}
    shapes |= {f"{block}{_SCENIC_ATTN}out/kernel": (heads, dim // heads, dim),
               f"{block}{_SCENIC_ATTN}out/bias": (dim,),
               f"{block}MlpBlock_0/Dense_0/kernel": (dim, mlp),
               f"{block}MlpBlock_0/Dense_0/bias": (mlp,),
               f"{block}MlpBlock_0/Dense_1/kernel": (mlp, dim),
               f"{block}MlpBlock_0/Dense_1/bias": (dim,)}
  return shapes


def _scenic_kwargs(sd: Mapping[str, np.ndarray]) -> dict:
  """MatViT constructor kwargs read from the shapes of a scenic MatViT state_dict."""
  patch, _, in_chans, dim = sd["embedding/kernel"].shape
  depth = len({k.split("/")[1] for k in sd if k.startswith("Transformer/encoderblock_")})
  class_token = "cls" in sd
  tokens = sd["Transformer/posembed_input/pos_embedding"].shape[1] - class_token
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f"the position embedding has {tokens} patch tokens, not a square grid")
  mlp_dims = tuple(sd[f"{_SCENIC_BLOCK.format(i)}MlpBlock_0/Dense_0/kernel"].shape[1]
                   for i in range(depth))
  head = sd.get("output_projection/kernel")
  return dict(img_size=side * patch, patch_size=patch, in_chans=in_chans,
              num_classes=0 if head is None else head.shape[1], dim=dim, depth=depth,
              num_heads=sd[f"{_SCENIC_BLOCK.format(0)}{_SCENIC_ATTN}query/kernel"].shape[1],
              mlp_dim=mlp_dims[0] if len(set(mlp_dims)) == 1 else mlp_dims,
              class_token=class_token)


def checkpoint_filter_fn(state_dict: Mapping[str, np.ndarray], **known_kwargs):
  """Scenic MatViT params (flattened, '/'-joined) -> (zoo params, MatViT, constructor kwargs).

  The architecture is read from the shapes (`known_kwargs`, e.g. a registered variant's
  defaults, take precedence and are checked against them). Missing, unexpected and mis-shaped
  keys raise one ValueError.
  """
  if "embedding/kernel" not in state_dict:
    raise ValueError("expected a scenic MatViT checkpoint (keys like embedding/kernel, "
                     "Transformer/encoderblock_0/...), got keys "
                     f"{sorted(state_dict)[:5]}")
  kwargs = {**_scenic_kwargs(state_dict), **known_kwargs}
  check_state_dict(state_dict, _scenic_shapes(kwargs))
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  dim = kwargs["dim"]
  dense, norm = functools.partial(layout.flax_dense, sd), functools.partial(layout.flax_norm, sd)

  def block(i):
    prefix = _SCENIC_BLOCK.format(i)
    attn = prefix + _SCENIC_ATTN
    # layers.Attention's fused qkv output axis is (3, heads, head_dim): q | k | v, heads in order
    qkv = layout.linear_params(
        np.concatenate([sd[f"{attn}{n}/kernel"].reshape(dim, dim) for n in _QKV], axis=1),
        np.concatenate([sd[f"{attn}{n}/bias"].reshape(dim) for n in _QKV]))
    proj = layout.linear_params(sd[f"{attn}out/kernel"].reshape(dim, dim), sd[f"{attn}out/bias"])
    return {"norm1": norm(prefix + "LayerNorm_0"), "attn": {"qkv": qkv, "proj": proj},
            "norm2": norm(prefix + "LayerNorm_1"),
            "mlp": {"fc1": dense(prefix + "MlpBlock_0/Dense_0"),
                    "fc2": dense(prefix + "MlpBlock_0/Dense_1")}}

  params = {"patch_embed": layout.flax_conv(sd, "embedding"),
            "pos_embed": sd["Transformer/posembed_input/pos_embedding"],
            "blocks": {i: block(i) for i in range(kwargs["depth"])},
            "norm": norm("Transformer/encoder_norm")}
  if kwargs["class_token"]:
    params["cls_token"] = sd["cls"]
  if kwargs["num_classes"] > 0:
    params["head"] = dense("output_projection")
  return params, MatViT, kwargs


# --- registrations --------------------------------------------------------------------------------
# num_params: matlm_olmo_*, MatFormer-OLMo's own count (`Olmo.num_params()` of its olmo/model.py at
# 4b96067, configs/pile-tiny.yaml with the example commands' sizes; tied embedding); matvit_*,
# timm's vit_*_patch16_224 and vit_huge_patch14_224 (the layers of scenic's ViT: conv patches,
# class token, learned positions, pre-LN blocks, 1000-class head). matlm_tiny and
# matvit_nano_patch4_28 are the zoo's CPU sizes, with no official count.

register_model("matlm_tiny", MatLM, family="matformer", **_CFGS["matlm_tiny"])
register_model("matlm_olmo_180m", MatLM, family="matformer",
               paper_metric="MatFormer-OLMo-180M (20B Pile tokens)", num_params=63_829_504,
               **_CFGS["matlm_olmo_180m"])
register_model("matlm_olmo_460m", MatLM, family="matformer",
               paper_metric="MatFormer-OLMo-460M (40B Pile tokens)", num_params=203_680_768,
               **_CFGS["matlm_olmo_460m"])
register_model("matlm_olmo_1300m", MatLM, family="matformer",
               paper_metric="MatFormer-OLMo-1300M (160B Pile tokens)", num_params=711_448_576,
               **_CFGS["matlm_olmo_1300m"])

register_model("matvit_tiny_patch16_224", MatViT, family="matformer",
               num_params=5_717_416, **_CFGS["matvit_tiny_patch16_224"])
register_model("matvit_small_patch16_224", MatViT, family="matformer",
               num_params=22_050_664, **_CFGS["matvit_small_patch16_224"])
register_model("matvit_base_patch16_224", MatViT, family="matformer",
               paper_metric="MatViT-B/16 IN-1k (figures only)", num_params=86_567_656,
               **_CFGS["matvit_base_patch16_224"])
register_model("matvit_large_patch16_224", MatViT, family="matformer",
               paper_metric="MatViT-L/16 IN-21k + IN-1k (figures only)",
               num_params=304_326_632, **_CFGS["matvit_large_patch16_224"])
register_model("matvit_huge_patch14_224", MatViT, family="matformer",
               num_params=632_045_800, **_CFGS["matvit_huge_patch14_224"])
register_model("matvit_nano_patch4_28", MatViT, family="matformer",
               **_CFGS["matvit_nano_patch4_28"])


# --- pretrained weights: scenic's release (Apache-2.0) -------------------------------------------
# MatViT-B/16 on ImageNet-1k as scenic publishes it (a flax checkpoint of the scenic model, read
# as msgpack), evaluated as its config does: resize the short side to 256 (area), center 224,
# pixels to [-1, 1]. scenic's MatViT-L/16 (ImageNet-21k + 1k) is not registered: its fine-tuning
# resolution and preprocessing are not published.
register_pretrained("matvit_base_patch16_224.in1k", PretrainedCfg(
    license="Apache-2.0", metric="none published (the scenic MatViT README gives no accuracy)",
    url="https://storage.googleapis.com/scenic-bucket/matvit/MatViT-B16-IN1K",
    filename="matvit_base_patch16_224.in1k.msgpack", num_classes=1000, label_set="imagenet-1k",
    input_size=(3, 224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.875,
    interpolation="box", classifier="head",
    notes="The file's format (one flax checkpoint file) is as scenic writes checkpoints; it was "
          "not downloaded here."))
