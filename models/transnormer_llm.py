"""TransNormerLLM: a linear-attention LLM with Lightning Attention (Qin et al., 2023; ICML 2024).

A port of the released Hugging Face code (`modeling_transnormer.py`, OpenNLPLab/TransNormerLLM-*):

    h = sqrt(d) * embed(tokens)
    h = h + GLA(SRMSNorm(h));  h = h + SGLU(SRMSNorm(h))          (per layer, pre-norm)
    logits = lm_head(SRMSNorm(h))                        (tied to the embedding by default)

GLA (gated linear attention, the "token mixer"): one fused ``qkvu`` projection; silu on q and k
only; LRPE (``[x cos(theta p), x sin(theta p)]``, doubling the q/k width) in the layers of
``lrpe_layers`` (the released models: the first); causal linear attention with a fixed per-head
decay (``ops.lightning_attention``); SRMSNorm over all heads; times the gate u; out projection.
SGLU (the "channel mixer"): ``l3(l1(x) * l2(x))`` with no activation. No biases, no dropout, no
absolute positions; SRMSNorm has no parameters (``x * rsqrt(mean(x^2) + 1e-6)`` in f32).

The decay follows the released code, not the paper's formula: ALiBi slopes per head times a layer
temperature ``1 - l / (L - 1) + 1e-5``, ``lambda = exp(-rate)``.

Generation carries the recurrent state (f32 ``[B, H, D_k, D_v]`` per layer) and the position offset
for LRPE, so memory is constant in the generated length: ``decode_step`` with one token runs the
recurrence ``S = lambda S + k v^T``, with several tokens a chunked prefill from the state.
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.convert import check_state_dict, layout
# alibi_slopes: the released code's `_build_slope_tensor` (also imported from here)
from models.layers import TokenEmbed, alibi_slopes, check_tokens, linear, shard_batch
from models.registry import PretrainedCfg, register_model, register_pretrained
from ops import lightning_attention, lightning_decode_step, lightning_prefill
from ops.sharding import axes as logical

_NORM_EPS = 1e-6
# TransnormerConfig.init_std: every Linear (no biases: layers.linear's init="normal") and the
# embedding ~ N(0, 0.02)
_INIT_STD = 0.02


def decay_rates(num_heads: int, depth: int) -> np.ndarray:
  """``[depth, heads]`` rates (lambda = exp(-rate)): slope_h * (1 - l / (depth - 1) + 1e-5).

  The +1e-5 keeps the last layer's rate above 0. The released code divides by ``depth - 1``; a
  single layer (a zero division there) gets the first layer's factor 1 + 1e-5 here."""
  slopes = np.asarray(alibi_slopes(num_heads), np.float64)
  layer = np.arange(depth) / max(depth - 1, 1)
  return (slopes[None, :] * (1.0 - layer[:, None] + 1e-5)).astype(np.float32)


def srms_norm(x: jax.Array) -> jax.Array:
  """TransNormerLLM's SimpleRMSNorm: ``x * rsqrt(mean(x^2) + 1e-6)`` in f32, no parameters."""
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + _NORM_EPS)).astype(x.dtype)


class Lrpe(nnx.Module):
  """Linearized relative positional encoding: ``x -> [x cos(theta p), x sin(theta p)]`` on q and k,
  so ``q'.k' = sum_i q_i k_i cos(theta_i (t - s))``. ``theta`` [H, head_dim] is learned, initialised
  as one ladder ``10000^(-2 i / (H * head_dim))`` over all heads (each head a contiguous slice)."""

  def __init__(self, num_heads: int, head_dim: int, *, param_dtype=jnp.float32):
    total = num_heads * head_dim
    ladder = 10000.0 ** (-2.0 / total * np.arange(total))
    self.theta = nnx.Param(jnp.asarray(ladder.reshape(num_heads, head_dim), param_dtype),
                           **logical("heads", "kv"))

  def __call__(self, x: jax.Array, offset) -> jax.Array:
    """``x`` [B, T, H, D] at positions offset, ..., offset + T - 1 -> [B, T, H, 2 D]."""
    positions = offset + jnp.arange(x.shape[1], dtype=jnp.float32)
    angle = positions[:, None, None] * self.theta[...].astype(jnp.float32)   # [T, H, D] in f32
    xf = x.astype(jnp.float32)
    return jnp.concatenate([xf * jnp.cos(angle), xf * jnp.sin(angle)], axis=-1).astype(x.dtype)


class GatedLinearAttention(nnx.Module):
  """The token mixer: qkvu projection, silu(q), silu(k), optional LRPE, decayed causal linear
  attention, SRMSNorm over the heads, gate u, out projection."""

  def __init__(self, dim: int, hidden_dim: int, num_heads: int, decay: Sequence[float], *,
               use_lrpe: bool, attn_implementation: str | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(init="normal", use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    self.head_dim = hidden_dim // num_heads
    self.decay = tuple(float(r) for r in decay)  # static: fixed per layer, no gradient
    self.attn_implementation = attn_implementation
    self.qkvu_proj = linear(dim, 4 * hidden_dim, axes=("embed", "heads"), **kw)
    self.lrpe = Lrpe(num_heads, self.head_dim, param_dtype=param_dtype) if use_lrpe else None
    self.out_proj = linear(hidden_dim, dim, axes=("heads", "embed"), **kw)

  @property
  def key_dim(self) -> int:
    """Width of q and k per head after LRPE (the state is [key_dim, head_dim])."""
    return 2 * self.head_dim if self.lrpe is not None else self.head_dim

  def _qkvu(self, x: jax.Array, offset):
    batch, length, _ = x.shape
    q, k, v, u = jnp.split(self.qkvu_proj(x), 4, axis=-1)
    q, k, v = (t.reshape(batch, length, self.num_heads, self.head_dim) for t in (q, k, v))
    q, k = jax.nn.silu(q), jax.nn.silu(k)
    if self.lrpe is not None:
      q, k = self.lrpe(q, offset), self.lrpe(k, offset)
    return q, k, v, u

  def _output(self, out: jax.Array, u: jax.Array) -> jax.Array:
    out = srms_norm(out.reshape(*out.shape[:2], -1)).astype(u.dtype)
    return self.out_proj(u * out)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Full sequence from position 0: [B, T, dim] -> [B, T, dim]."""
    q, k, v, u = self._qkvu(x, 0)
    out = lightning_attention(q, k, v, decay=jnp.asarray(self.decay),
                              implementation=self.attn_implementation)
    return self._output(out, u)

  def step(self, x: jax.Array, state: jax.Array, offset) -> tuple[jax.Array, jax.Array]:
    """Tokens at positions offset, ... continuing from ``state`` [B, H, key_dim, head_dim] f32."""
    q, k, v, u = self._qkvu(x, offset)
    decay = jnp.asarray(self.decay)
    if x.shape[1] == 1:  # the O(1) recurrence
      out, state = lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], state, decay)
      out = out[:, None]
    else:
      out, state = lightning_prefill(q, k, v, state, decay=decay,
                                     implementation=self.attn_implementation)
    return self._output(out, u), state


class SimpleGLU(nnx.Module):
  """The channel mixer: ``l3(l1(x) * l2(x))``, no activation, no bias."""

  def __init__(self, dim: int, glu_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(init="normal", use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.l1 = linear(dim, glu_dim, axes=("embed", "mlp"), **kw)
    self.l2 = linear(dim, glu_dim, axes=("embed", "mlp"), **kw)
    self.l3 = linear(glu_dim, dim, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.l3(self.l1(x) * self.l2(x))


class TransNormerLLMBlock(nnx.Module):
  """Pre-norm layer: ``h + GLA(SRMSNorm(h))``, then ``h + SGLU(SRMSNorm(h))``."""

  def __init__(self, dim: int, hidden_dim: int, num_heads: int, glu_dim: int,
               decay: Sequence[float], *, use_lrpe: bool, attn_implementation: str | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_mixer = GatedLinearAttention(dim, hidden_dim, num_heads, decay, use_lrpe=use_lrpe,
                                            attn_implementation=attn_implementation, **kw)
    self.channel_mixer = SimpleGLU(dim, glu_dim, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.token_mixer(srms_norm(x))
    return x + self.channel_mixer(srms_norm(x))

  def step(self, x: jax.Array, state: jax.Array, offset) -> tuple[jax.Array, jax.Array]:
    mixed, state = self.token_mixer.step(srms_norm(x), state, offset)
    x = x + mixed
    return x + self.channel_mixer(srms_norm(x)), state


class TransNormerLLM(nnx.Module):
  """Causal LM: ``m(tokens [B, T]) -> logits [B, T, vocab]`` (f32).

  Generation: ``cache = m.init_cache(batch, max_len)``, then ``logits, cache = m.decode_step(tokens,
  cache)`` with tokens [B, T] (T = 1: one recurrence step; T > 1: a chunked prefill from the cache).

  Args:
    vocab_size, dim, depth, num_heads, glu_dim: the HF config's vocab_size, decoder_embed_dim,
      decoder_layers, decoder_attention_heads, glu_dim.
    hidden_dim: width of q, k, v, u (HF hidden_dim); default ``dim``.
    lrpe_layers: indices of the layers with LRPE (HF linear_use_lrpe_list; released models: (0,)).
    tie_embeddings: the LM head is the embedding's transpose (HF default, all released models).
    pad_token_id: its embedding row starts at zero (as nn.Embedding(padding_idx) initialises it).
    attn_implementation: passed to ``ops.lightning_attention`` (None: the platform's best).
  """

  def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, glu_dim: int,
               hidden_dim: int | None = None, lrpe_layers: Sequence[int] = (0,),
               tie_embeddings: bool = True, pad_token_id: int | None = 0,
               attn_implementation: str | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    hidden_dim = dim if hidden_dim is None else hidden_dim
    if hidden_dim % num_heads:
      raise ValueError(f"hidden_dim must be divisible by num_heads, got hidden_dim={hidden_dim}, "
                       f"num_heads={num_heads}")
    if any(not 0 <= i < depth for i in lrpe_layers):
      raise ValueError(f"lrpe_layers must index the {depth} layers, got {tuple(lrpe_layers)}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vocab_size, self.dim, self.dtype = vocab_size, dim, dtype

    def embedding_init(key, shape, dtype):
      table = nnx.initializers.normal(_INIT_STD)(key, shape, dtype)
      return table if pad_token_id is None else table.at[pad_token_id].set(0)

    self.embed_tokens = TokenEmbed(vocab_size, dim, embedding_init=embedding_init, **kw)
    rates = decay_rates(num_heads, depth)
    self.layers = nnx.List([
        TransNormerLLMBlock(dim, hidden_dim, num_heads, glu_dim, rates[i],
                            use_lrpe=i in lrpe_layers, attn_implementation=attn_implementation,
                            **kw)
        for i in range(depth)])
    self.lm_head = None if tie_embeddings else linear(dim, vocab_size, init="normal",
                                                      use_bias=False, axes=("embed", "vocab"),
                                                      **kw)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """``sqrt(dim) * embedding`` (HF embed_scale)."""
    return (math.sqrt(self.dim) * self.embed_tokens(tokens)).astype(self.dtype)

  def head(self, h: jax.Array) -> jax.Array:
    """Final SRMSNorm and the LM head -> f32 logits."""
    h = srms_norm(h)
    logits = self.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
    return logits.astype(jnp.float32)

  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, T] int tokens -> [B, T, vocab] f32 logits. ``train`` is accepted for the shared loop
    (TransNormerLLM has no dropout)."""
    del train
    check_tokens(tokens)
    h = self.embed(tokens)
    for layer in self.layers:
      h = shard_batch(layer(h))
    return self.head(h)

  def init_cache(self, batch: int, max_len: int | None = None) -> dict:
    """Empty generation state: per layer an f32 ``[batch, H, key_dim, head_dim]`` recurrent state,
    and the position offset (LRPE). Its size does not depend on the length, so ``max_len`` (part of
    the zoo's LM API, a KV cache's size) is not needed."""
    del max_len
    states = tuple(
        jnp.zeros((batch, layer.token_mixer.num_heads, layer.token_mixer.key_dim,
                   layer.token_mixer.head_dim), jnp.float32) for layer in self.layers)
    return {"offset": jnp.zeros((), jnp.int32), "states": states}

  def decode_step(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Next tokens [B, T] continuing ``cache`` -> (logits [B, T, vocab] f32, updated cache)."""
    check_tokens(tokens)
    expected = self.init_cache(tokens.shape[0])["states"]
    got = cache["states"]
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected)):
      raise ValueError(
          f"cache does not fit this model and batch {tokens.shape[0]}: expected states "
          f"{[b.shape for b in expected]}, got {[a.shape for a in got]}")
    offset = cache["offset"]
    h = self.embed(tokens)
    states = []
    for layer, state in zip(self.layers, got):
      h, state = layer.step(h, state, offset)
      states.append(state)
    return self.head(h), {"offset": offset + tokens.shape[1], "states": tuple(states)}


# --- variants -------------------------------------------------------------------------------------
# Released configs [TNL-HF] (385M: the config defaults; 1B, 7B: dims matching the README's parameter
# counts, config.json not retrieved) and TransNormerLLM3-15B (model card: d 5120, 42 layers, 40
# heads; its glu_dim, hidden_dim and vocabulary are not public: LLaMA-13B's 13824, d, and a ~100K
# tokenizer are assumed). "tiny" is for CPU experiments (byte vocabulary).

_CFGS = {
    "transnormer_llm_385m": dict(vocab_size=64000, dim=1024, depth=24, num_heads=8, glu_dim=2816),
    "transnormer_llm_1b": dict(vocab_size=64000, dim=2048, depth=16, num_heads=16, glu_dim=5632),
    "transnormer_llm_7b": dict(vocab_size=64000, dim=4096, depth=30, num_heads=32, glu_dim=11008),
    "transnormer_llm_15b": dict(vocab_size=100352, dim=5120, depth=42, num_heads=40, glu_dim=13824),
    "transnormer_llm_tiny": dict(vocab_size=256, dim=128, depth=4, num_heads=4, glu_dim=352),
}


# --- HF state_dict -> zoo params ------------------------------------------------------------------

_LAYER = "model.layers.{}."
_IGNORED = re.compile(r"(.*\.)?version$")  # metaseq's decoder.version (HF ignores it on load)


def _infer_kwargs(sd: Mapping[str, np.ndarray]) -> dict:
  """Hyper-parameters readable from the shapes."""
  kwargs = {}
  if "model.embed_tokens.weight" in sd:
    kwargs["vocab_size"], kwargs["dim"] = sd["model.embed_tokens.weight"].shape
  layers = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k))}
  kwargs["depth"] = max(layers) + 1 if layers else 0
  qkvu = sd.get(_LAYER.format(0) + "token_mixer.qkvu_proj.weight")
  if qkvu is not None:
    kwargs["hidden_dim"] = qkvu.shape[0] // 4
  l1 = sd.get(_LAYER.format(0) + "channel_mixer.l1.weight")
  if l1 is not None:
    kwargs["glu_dim"] = l1.shape[0]
  lrpe = [i for i in sorted(layers) if _LAYER.format(i) + "token_mixer.lrpe.theta" in sd]
  kwargs["lrpe_layers"] = tuple(lrpe)
  if lrpe:
    kwargs["num_heads"] = sd[_LAYER.format(lrpe[0]) + "token_mixer.lrpe.theta"].shape[0]
  head = sd.get("lm_head.weight")
  kwargs["tie_embeddings"] = head is None or np.array_equal(head, sd["model.embed_tokens.weight"])
  return kwargs


def _official_shapes(kw: Mapping) -> dict[str, tuple[int, ...]]:
  d, hidden, glu, heads = kw["dim"], kw["hidden_dim"], kw["glu_dim"], kw["num_heads"]
  shapes = {"model.embed_tokens.weight": (kw["vocab_size"], d)}
  for i in range(kw["depth"]):
    layer = _LAYER.format(i)
    shapes |= {f"{layer}token_mixer.qkvu_proj.weight": (4 * hidden, d),
               f"{layer}token_mixer.out_proj.weight": (d, hidden),
               f"{layer}channel_mixer.l1.weight": (glu, d),
               f"{layer}channel_mixer.l2.weight": (glu, d),
               f"{layer}channel_mixer.l3.weight": (d, glu)}
    if i in kw["lrpe_layers"]:
      shapes[f"{layer}token_mixer.lrpe.theta"] = (heads, 1, hidden // heads)
  return shapes | {"lm_head.weight": (kw["vocab_size"], d)}


def checkpoint_filter_fn(state_dict: Mapping[str, np.ndarray], **known_kwargs):
  """HF TransNormerLLM state_dict (``TransnormerForCausalLM``) -> (zoo params, TransNormerLLM,
  constructor kwargs).

  Shapes give everything but the head count when no layer has LRPE (then pass ``num_heads``).
  ``lm_head.weight`` may be absent (tied weights saved once); a head different from the embedding
  makes an untied model. Missing, unexpected and mis-shaped keys raise one ValueError.
  """
  sd = {k: v for k, v in state_dict.items() if not _IGNORED.fullmatch(k)}
  kwargs = {**_infer_kwargs(sd), **known_kwargs}
  needed = {"vocab_size", "dim", "hidden_dim", "glu_dim", "num_heads"}
  if needed - kwargs.keys():
    raise ValueError(f"cannot read {sorted(needed - kwargs.keys())} from the state_dict's shapes "
                     f"(num_heads needs a layer with LRPE); pass them as keyword arguments")
  expected = _official_shapes(kwargs)
  if "lm_head.weight" not in sd:
    expected.pop("lm_head.weight")
  check_state_dict(sd, expected)

  layers = {}
  for i in range(kwargs["depth"]):
    layer = _LAYER.format(i)
    mixer = {"qkvu_proj": layout.torch_linear(sd, f"{layer}token_mixer.qkvu_proj"),
             "out_proj": layout.torch_linear(sd, f"{layer}token_mixer.out_proj")}
    if i in kwargs["lrpe_layers"]:
      theta = sd[f"{layer}token_mixer.lrpe.theta"]
      mixer["lrpe"] = {"theta": theta.reshape(theta.shape[0], theta.shape[2])}
    layers[i] = {"token_mixer": mixer,
                 "channel_mixer": {n: layout.torch_linear(sd, f"{layer}channel_mixer.{n}")
                                   for n in ("l1", "l2", "l3")}}
  params = {"embed_tokens": {"embedding": sd["model.embed_tokens.weight"]}, "layers": layers}
  if not kwargs["tie_embeddings"]:
    params["lm_head"] = layout.torch_linear(sd, "lm_head")
  return params, TransNormerLLM, kwargs


# --- registrations: zero-shot HellaSwag and PIQA from the official README -----------------------
# num_params: 385M, the official code's count at its released config (the config defaults; the
# README's "0.39 B"): the official TransnormerForCausalLM's state_dict has per layer qkvu_proj
# (4 d x d), out_proj (d x d), l1, l2, l3 (3 d x glu_dim), LRPE theta (d) in the first layer only,
# and the embedding tied with lm_head. None for 1B and 7B (their config.json was not retrieved, the
# dims are fitted to the README's rounded counts), for 15B (glu_dim and vocabulary assumed; the
# model card's 14.83 B differs) and for the CPU size "tiny".

register_model("transnormer_llm_385m", TransNormerLLM, family="transnormer_llm",
               paper_metric="HellaSwag 46.27, PIQA 66.70 (0-shot)", num_params=398_984_192,
               **_CFGS["transnormer_llm_385m"])
register_model("transnormer_llm_1b", TransNormerLLM, family="transnormer_llm",
               paper_metric="HellaSwag 56.49, PIQA 72.09 (0-shot)", **_CFGS["transnormer_llm_1b"])
register_model("transnormer_llm_7b", TransNormerLLM, family="transnormer_llm",
               paper_metric="HellaSwag 75.21, PIQA 80.09 (0-shot)", **_CFGS["transnormer_llm_7b"])
register_model("transnormer_llm_15b", TransNormerLLM, family="transnormer_llm",
               paper_metric="HellaSwag 82.18, PIQA 81.56 (0-shot)", **_CFGS["transnormer_llm_15b"])
register_model("transnormer_llm_tiny", TransNormerLLM, family="transnormer_llm",
               **_CFGS["transnormer_llm_tiny"])


# --- pretrained weights: the official releases on the hub ----------------------------------------


def _official(size: str, filename: str, metric: str) -> PretrainedCfg:
  """OpenNLPLab/TransNormerLLM-<size> (HF `TransnormerForCausalLM` weights, bf16) and its
  tokenizer (Baichuan's SentencePiece `tokenizer.model`)."""
  return PretrainedCfg(
      license="Apache-2.0 and the Community License for TransNormerLLM (commercial use needs the "
              "authors' approval)",
      metric=metric, hf_hub_id=f"OpenNLPLab/TransNormerLLM-{size}", filename=filename,
      tokenizer=f"OpenNLPLab/TransNormerLLM-{size}/tokenizer.model")


# Zero-shot (BoolQ, PIQA, HellaSwag) from the official README's Model Results (lm-eval-harness).
# The weights of the base models; the corpus is not named ("up to 1.4 trillion tokens").
register_pretrained("transnormer_llm_385m.base", _official(
    "385M", "pytorch_model.bin", "BoolQ 62.14, PIQA 66.70, HellaSwag 46.27 (1.0T tokens)"))
register_pretrained("transnormer_llm_1b.base", _official(
    "1B", "pytorch_model.bin", "BoolQ 63.27, PIQA 72.09, HellaSwag 56.49 (1.2T tokens)"))
register_pretrained("transnormer_llm_7b.base", _official(
    "7B", "pytorch_model.bin.index.json", "BoolQ 75.87, PIQA 80.09, HellaSwag 75.21 (1.4T tokens)"))
