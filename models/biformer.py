"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023).

A port of the official code (github.com/rayleizhu/BiFormer @ 1697bbbe, `models/biformer.py`,
`ops/bra_legacy.py`, `models/_common.py`), NHWC throughout:

* stem: two 3x3 stride-2 convs (symmetric padding 1, not 'SAME'), each followed by BatchNorm,
  with an exact GELU between them; each later stage starts with a 3x3 stride-2 conv + BatchNorm;
* block: `x + dwconv3x3(x)` (conditional position encoding, residual, before the norm), then
  `x + attn(LN(x))` and `x + mlp(LN(x))` (LayerNorm eps 1e-6, exact GELU, no layer scale);
* stages 1-3 attend with bi-level routing attention (`ops.routing_attention`): qkv from one Linear
  ordered [q | k | v], routing and token attention scaled by `qk_dim ** -0.5` (the full qk width),
  plus a 5x5 depthwise conv of v over the whole map (LCE), then `wo`;
* stage 4 is plain multi-head attention with 8 heads whatever the width (`AttentionLePE`: qkv
  without bias, head-dim scale, the 5x5 depthwise conv applied to the block input rather than v);
* head: BatchNorm on the map, global average pool, Linear.

`auto_pad=True` is the official legacy padding of the detection/segmentation backbones: a map whose
sides are not multiples of `n_win` is padded with zeros at the bottom and right *after* the norm and
before the qkv projection (the padded tokens take part in routing and attention, unmasked) and
cropped after `wo`. The classification models have `auto_pad=False` and need every routed stage's
map to be a multiple of `n_win` (224 = 7 * 32).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ops
from models.convert import check_state_dict, layout
from models.layers import (CONV_AXES, NORM_AXES, DepthwiseConv, DropPath, check_images,
                           collect_intermediates, get_activation, layer_norm, linear,
                           promote_keeping_statistics, shard_batch, torch_uniform)
from models.registry import (IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg, register_model,
                             register_pretrained)

_LN_EPS = 1e-6                      # every LayerNorm of the official model
_BN_EPS, _BN_MOMENTUM = 1e-5, 0.9   # torch BatchNorm2d defaults (torch momentum 0.1)
_FULL_ATTENTION_HEADS = 8           # AttentionLePE's default: the official code never passes nheads
_GELU = get_activation("gelu")      # exact erf form, as torch.nn.GELU
# Linears: the official `_init_weights`, trunc-normal(0.02) weights and zero biases
# (layers.linear's init="trunc_normal"); convs keep torch's default init.


def _torch_conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, dtype, param_dtype,
                rngs: nnx.Rngs) -> nnx.Conv:
  """Conv with torch's default init and symmetric padding `kernel // 2` (with stride 2 on even
  sizes Flax 'SAME' pads 0 top, 1 bottom)."""
  init = torch_uniform(in_ch * kernel * kernel)
  pad = kernel // 2
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                  kernel_init=init, bias_init=init, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs, **CONV_AXES)


def _torch_dwconv(dim: int, kernel: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> DepthwiseConv:
  """Depthwise conv (stride 1, padding `kernel // 2`) with torch's default init."""
  init = torch_uniform(kernel * kernel)
  return DepthwiseConv(dim, kernel, kernel_init=init, bias_init=init, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


def _batch_norm(dim: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # The running statistics stay float32 in a bf16 model (promote_keeping_statistics).
  return nnx.BatchNorm(dim, momentum=_BN_MOMENTUM, epsilon=_BN_EPS, use_fast_variance=False,
                       promote_dtype=promote_keeping_statistics, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs, **NORM_AXES)


class ConvBN(nnx.Module):
  """Conv3x3 (stride 2, padding 1) -> BatchNorm: the official downsample layers."""

  def __init__(self, in_ch: int, out_ch: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = _torch_conv(in_ch, out_ch, 3, stride=2, **kw)
    self.norm = _batch_norm(out_ch, **kw)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.norm(self.conv(x), use_running_average=not train)


class Stem(nnx.Module):
  """ConvBN(3 -> C/2) -> GELU -> ConvBN(C/2 -> C): 4x downsampling with overlapping 3x3 convs."""

  def __init__(self, in_ch: int, out_ch: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = ConvBN(in_ch, out_ch // 2, **kw)
    self.conv2 = ConvBN(out_ch // 2, out_ch, **kw)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.conv2(_GELU(self.conv1(x, train=train)), train=train)


class BiLevelRoutingAttention(nnx.Module):
  """BRA on a normed NHWC map: qkv -> ops.routing_attention + LCE(v) -> wo."""

  def __init__(self, dim: int, qk_dim: int, num_heads: int, n_win: int, topk: int, *,
               side_dwconv: int = 5, auto_pad: bool = False, attn_implementation: str | None = None,
               dtype, param_dtype, rngs: nnx.Rngs):
    if qk_dim % num_heads or dim % num_heads:
      raise ValueError(f"qk_dim and dim must be divisible by num_heads, got qk_dim={qk_dim}, "
                       f"dim={dim}, num_heads={num_heads}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qk_dim, self.num_heads, self.n_win, self.topk = qk_dim, num_heads, n_win, topk
    self.scale = qk_dim ** -0.5     # the full qk width, as the official code (not the head width)
    self.auto_pad = auto_pad
    self.attn_implementation = attn_implementation
    self.qkv = linear(dim, 2 * qk_dim + dim, init="trunc_normal", axes=("embed", "heads"),
                      **kw)  # [q | k | v]
    self.lepe = _torch_dwconv(dim, side_dwconv, **kw)
    self.wo = linear(dim, dim, init="trunc_normal", axes=("heads", "embed"), **kw)

  def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    if self.auto_pad:
      pad_b, pad_r = (-x.shape[1]) % self.n_win, (-x.shape[2]) % self.n_win
      x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    return tuple(jnp.split(self.qkv(x), [self.qk_dim, 2 * self.qk_dim], axis=-1))

  def __call__(self, x: jax.Array) -> jax.Array:
    height, width = x.shape[1:3]
    q, k, v = self._project(x)
    out = ops.routing_attention(q, k, v, num_heads=self.num_heads, n_win=self.n_win, topk=self.topk,
                                scale=self.scale, implementation=self.attn_implementation)
    out = self.wo(out + self.lepe(v))
    return out[:, :height, :width]

  def routes(self, x: jax.Array) -> jax.Array:
    """The routed key regions of every query region, ``int32 [B, n_win**2, topk]`` (row-major)."""
    q, k, _ = self._project(x)
    return ops.region_routes(q, k, n_win=self.n_win, topk=self.topk, scale=self.scale)


class AttentionLePE(nnx.Module):
  """Stage 4: multi-head self-attention over every token, plus a depthwise conv of the input."""

  def __init__(self, dim: int, num_heads: int = _FULL_ATTENTION_HEADS, *, side_dwconv: int = 5,
               attn_implementation: str | None = None, dtype, param_dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    self.attn_implementation = attn_implementation
    # output laid out (3, heads, d)
    self.qkv = linear(dim, 3 * dim, init="trunc_normal", use_bias=False,
                      axes=("embed", "heads"), **kw)
    self.lepe = _torch_dwconv(dim, side_dwconv, **kw)
    self.proj = linear(dim, dim, init="trunc_normal", axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
    out = ops.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                        implementation=self.attn_implementation)
    return self.proj(out.reshape(b, h, w, c) + self.lepe(x))


class Block(nnx.Module):
  """x + dwconv(x), then pre-norm attention and Mlp branches (with stochastic depth)."""

  def __init__(self, dim: int, *, qk_dim: int, num_heads: int, n_win: int, topk: int,
               mlp_ratio: float, side_dwconv: int = 5, before_attn_dwconv: int = 3,
               drop_path: float = 0.0, auto_pad: bool = False,
               attn_implementation: str | None = None, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pos_embed = _torch_dwconv(dim, before_attn_dwconv, **kw)
    self.norm1 = layer_norm(dim, eps=_LN_EPS, **kw)
    if topk > 0:
      self.attn = BiLevelRoutingAttention(
          dim, qk_dim, num_heads, n_win, topk, side_dwconv=side_dwconv, auto_pad=auto_pad,
          attn_implementation=attn_implementation, **kw)
    elif topk == -2:
      self.attn = AttentionLePE(dim, side_dwconv=side_dwconv,
                                attn_implementation=attn_implementation, **kw)
    else:
      raise ValueError(f"topk must be > 0 (routing attention) or -2 (full attention with LePE), "
                       f"got {topk}")
    self.norm2 = layer_norm(dim, eps=_LN_EPS, **kw)
    hidden = int(mlp_ratio * dim)
    # Linear -> GELU -> Linear, no dropout: the official nn.Sequential (its index 1 is an Identity).
    self.mlp = nnx.Sequential(
        linear(dim, hidden, init="trunc_normal", axes=("embed", "mlp"), **kw), _GELU,
        linear(hidden, dim, init="trunc_normal", axes=("mlp", "embed"), **kw))
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def attention_input(self, x: jax.Array) -> jax.Array:
    """What the attention branch sees: ``norm1(x + pos_embed(x))``."""
    return self.norm1(x + self.pos_embed(x))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x + self.pos_embed(x)
    x = x + self.drop_path(self.attn(self.norm1(x)), train=train)
    return x + self.drop_path(self.mlp(self.norm2(x)), train=train)


class BiFormer(nnx.Module):
  """BiFormer classifier: `m(images [B, H, W, C] float, train=False) -> logits [B, num_classes]`.

  `topks[i] > 0` makes stage i a routing-attention stage with `n_win x n_win` regions; `-2` makes
  it full attention with LePE (the last stage of every released model). Heads per routed stage are
  `qk_dims[i] // head_dim`. `attn_implementation` goes to `ops.routing_attention` and
  `ops.attention` (None, "xla" or "pallas").
  """

  def __init__(self, depths: Sequence[int] = (2, 2, 8, 2),
               embed_dims: Sequence[int] = (64, 128, 256, 512),
               qk_dims: Sequence[int] | None = None, head_dim: int = 32,
               mlp_ratios: Sequence[float] = (3, 3, 3, 3), n_win: int = 7,
               topks: Sequence[int] = (1, 4, 16, -2), side_dwconv: int = 5,
               before_attn_dwconv: int = 3, num_classes: int = 1000, in_chans: int = 3,
               drop_path_rate: float = 0.0, auto_pad: bool = False,
               attn_implementation: str | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    qk_dims = tuple(embed_dims) if qk_dims is None else tuple(qk_dims)
    per_stage = dict(embed_dims=embed_dims, qk_dims=qk_dims, mlp_ratios=mlp_ratios, topks=topks)
    for name, value in per_stage.items():
      if len(value) != len(depths):
        raise ValueError(
            f"{name} must have one entry per stage ({len(depths)}), got {tuple(value)}")
    if attn_implementation not in ops.routing.IMPLEMENTATIONS:
      raise ValueError(f"attn_implementation must be one of {ops.routing.IMPLEMENTATIONS}, "
                       f"got {attn_implementation!r}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_chans, self.n_win, self.auto_pad = in_chans, n_win, auto_pad
    self.topks = tuple(topks)
    self.embed_dims = tuple(embed_dims)
    self.num_features = embed_dims[-1]
    self.dtype, self.param_dtype = dtype, param_dtype
    self.downsample_layers = nnx.List(
        [Stem(in_chans, embed_dims[0], **kw)]
        + [ConvBN(embed_dims[i - 1], embed_dims[i], **kw) for i in range(1, len(depths))])
    rates = iter(np.linspace(0.0, drop_path_rate, sum(depths)).tolist())
    self.stages = nnx.List([
        nnx.List([Block(embed_dims[i], qk_dim=qk_dims[i], num_heads=qk_dims[i] // head_dim,
                        n_win=n_win, topk=topks[i], mlp_ratio=mlp_ratios[i],
                        side_dwconv=side_dwconv, before_attn_dwconv=before_attn_dwconv,
                        drop_path=next(rates), auto_pad=auto_pad,
                        attn_implementation=attn_implementation, **kw)
                  for _ in range(depths[i])])
        for i in range(len(depths))])
    self.norm = _batch_norm(embed_dims[-1], **kw)
    self.head = linear(embed_dims[-1], num_classes, init="trunc_normal", axes=("embed", None),
                       **kw)

  def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
    """A fresh head for `num_classes` (the official `reset_classifier` has a bug: it reads the
    list of widths as the feature size)."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.head = linear(self.num_features, num_classes, init="trunc_normal", axes=("embed", None),
                       dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

  def _check_images(self, x: jax.Array) -> None:
    check_images("BiFormer", x, self.in_chans)
    if self.auto_pad:
      return
    sizes = [x.shape[1:3]]
    for _ in range(len(self.stages) + 1):
      sizes.append(tuple((s + 1) // 2 for s in sizes[-1]))            # stride-2 conv, padding 1
    sizes = sizes[2:]                                                  # the stem downsamples twice
    for i, (size, topk) in enumerate(zip(sizes, self.topks)):
      if topk > 0 and (size[0] % self.n_win or size[1] % self.n_win):
        raise ValueError(
            f"images of {x.shape[1]}x{x.shape[2]} give stage {i + 1} a {size[0]}x{size[1]} map, "
            f"not divisible by n_win={self.n_win} (use sides that are multiples of "
            f"{32 * self.n_win}, e.g. 224, or auto_pad=True)")

  def _stage_outputs(self, x: jax.Array, *, train: bool, routes: dict | None = None):
    """Yields every stage's output; fills `routes` (if given) with each routed block's regions."""
    self._check_images(x)
    x = x.astype(self.dtype)
    for s, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages)):
      x = downsample(x, train=train)
      for b, block in enumerate(stage):
        if routes is not None and isinstance(block.attn, BiLevelRoutingAttention):
          routes[f"stages.{s}.{b}"] = block.attn.routes(block.attention_input(x))
        x = shard_batch(block(x, train=train))
      yield x

  def forward_features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, H, W, C] images -> [B, H/32, W/32, embed_dims[-1]] after the final BatchNorm."""
    *_, x = self._stage_outputs(x, train=train)
    return self.norm(x, use_running_average=not train)

  def forward_intermediates(self, x: jax.Array, indices: int | Sequence[int] | None = None, *,
                            norm: bool = False, output_fmt: str = "NHWC",
                            intermediates_only: bool = False, train: bool = False):
    """timm's forward_intermediates: (forward_features(x), [the stage maps at `indices`]).

    See `layers.collect_intermediates`: the maps are taken before the final BatchNorm; `norm`
    gives the last stage's through it.
    """
    return collect_intermediates(
        self._stage_outputs(x, train=train), len(self.stages), indices, output_fmt=output_fmt,
        intermediates_only=intermediates_only, norm=norm,
        final_norm=lambda last: self.norm(last, use_running_average=not train))

  @property
  def feature_info(self) -> list[dict]:
    """timm's feature_info: each stage's width, stride and module name."""
    return [dict(num_chs=dim, reduction=4 * 2 ** s, module=f"stages.{s}")
            for s, dim in enumerate(self.embed_dims)]

  def forward_with_routes(self, x: jax.Array) -> tuple[list[jax.Array], dict[str, jax.Array]]:
    """Inference pass that also returns what the routing chose.

    Returns every stage's output (NHWC, before the final norm) and, per routed block
    (`"stages.<s>.<b>"`, the official module names), its routed key regions: int32
    `[B, n_win**2, topk]`, region `p` at row `p // n_win`, column `p % n_win` of the map.
    """
    routes = {}
    return list(self._stage_outputs(x, train=False, routes=routes)), routes

  def forward_head(self, x: jax.Array, *, pre_logits: bool = False) -> jax.Array:
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    return x if pre_logits else self.head(x)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.forward_head(self.forward_features(x, train=train))


# --- variants (official `models/biformer.py`) -----------------------------------------------------
# Named configs. Every released model has the settings of _DEFAULTS (the converter assumes them
# where the shapes do not tell) and qk_dims = embed_dims.

_DEFAULTS = dict(head_dim=32, mlp_ratios=(3, 3, 3, 3), n_win=7, topks=(1, 4, 16, -2), side_dwconv=5,
                 before_attn_dwconv=3)
_CFGS = {
    "biformer_tiny": dict(_DEFAULTS, depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512),
                          qk_dims=(64, 128, 256, 512)),
    "biformer_small": dict(_DEFAULTS, depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512),
                           qk_dims=(64, 128, 256, 512)),
    "biformer_base": dict(_DEFAULTS, depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768),
                          qk_dims=(96, 192, 384, 768)),
}


# --- official state_dict -> zoo params ----------------------------------------------------------

def _infer_kwargs(sd: Mapping[str, np.ndarray]) -> dict:
  """Hyper-parameters readable from the shapes (n_win, topks and head_dim are not)."""
  kwargs = {}
  stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"stages\.(\d+)\.", k))})
  if not stages or "downsample_layers.0.0.weight" not in sd:
    return kwargs
  kwargs["in_chans"] = sd["downsample_layers.0.0.weight"].shape[1]
  kwargs["depths"] = tuple(1 + max(int(m.group(1)) for k in sd
                                   if (m := re.match(rf"stages\.{s}\.(\d+)\.", k)))
                           for s in stages)
  dims, qk_dims, ratios = [], [], []
  for s in stages:
    block = f"stages.{s}.0."
    dim = sd[f"{block}norm1.weight"].shape[0]
    hidden = sd[f"{block}mlp.0.weight"].shape[0]
    dims.append(dim)
    ratios.append(hidden // dim if hidden % dim == 0 else hidden / dim)
    qkv = sd.get(f"{block}attn.qkv.qkv.weight")  # routed stages only
    qk_dims.append(dim if qkv is None else (qkv.shape[0] - dim) // 2)
  kwargs.update(embed_dims=tuple(dims), qk_dims=tuple(qk_dims), mlp_ratios=tuple(ratios))
  kwargs["side_dwconv"] = sd[f"stages.{stages[0]}.0.attn.lepe.weight"].shape[-1]
  kwargs["before_attn_dwconv"] = sd[f"stages.{stages[0]}.0.pos_embed.weight"].shape[-1]
  if "head.weight" in sd:
    kwargs["num_classes"] = sd["head.weight"].shape[0]
  return kwargs


def _official_shapes(kwargs: Mapping) -> dict[str, tuple[int, ...]]:
  """Every key of the official state_dict with its shape, for constructor `kwargs`."""
  dims, qk_dims = kwargs["embed_dims"], kwargs.get("qk_dims") or kwargs["embed_dims"]
  shapes = {}

  def conv_bn(prefix, conv, bn, c_in, c_out):
    shapes.update({f"{prefix}.{conv}.weight": (c_out, c_in, 3, 3),
                   f"{prefix}.{conv}.bias": (c_out,)})
    for p in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.{bn}.{p}"] = (c_out,)
    shapes[f"{prefix}.{bn}.num_batches_tracked"] = ()

  conv_bn("downsample_layers.0", 0, 1, kwargs.get("in_chans", 3), dims[0] // 2)
  conv_bn("downsample_layers.0", 3, 4, dims[0] // 2, dims[0])
  for i in range(1, len(dims)):
    conv_bn(f"downsample_layers.{i}", 0, 1, dims[i - 1], dims[i])
  side, cpe = kwargs["side_dwconv"], kwargs["before_attn_dwconv"]
  for s, (depth, dim) in enumerate(zip(kwargs["depths"], dims)):
    hidden = int(kwargs["mlp_ratios"][s] * dim)
    for b in range(depth):
      p = f"stages.{s}.{b}."
      shapes.update({f"{p}pos_embed.weight": (dim, 1, cpe, cpe), f"{p}pos_embed.bias": (dim,),
                     f"{p}attn.lepe.weight": (dim, 1, side, side), f"{p}attn.lepe.bias": (dim,),
                     f"{p}mlp.0.weight": (hidden, dim), f"{p}mlp.0.bias": (hidden,),
                     f"{p}mlp.3.weight": (dim, hidden), f"{p}mlp.3.bias": (dim,)})
      for norm in ("norm1", "norm2"):
        shapes.update({f"{p}{norm}.weight": (dim,), f"{p}{norm}.bias": (dim,)})
      if kwargs["topks"][s] > 0:
        qkv_out = 2 * qk_dims[s] + dim
        shapes.update({f"{p}attn.qkv.qkv.weight": (qkv_out, dim),
                       f"{p}attn.qkv.qkv.bias": (qkv_out,),
                       f"{p}attn.wo.weight": (dim, dim), f"{p}attn.wo.bias": (dim,)})
      else:
        shapes.update({f"{p}attn.qkv.weight": (3 * dim, dim), f"{p}attn.proj.weight": (dim, dim),
                       f"{p}attn.proj.bias": (dim,)})
  for p in ("weight", "bias", "running_mean", "running_var"):
    shapes[f"norm.{p}"] = (dims[-1],)
  shapes["norm.num_batches_tracked"] = ()
  num_classes = kwargs.get("num_classes", 1000)
  return shapes | {"head.weight": (num_classes, dims[-1]), "head.bias": (num_classes,)}


def _block(sd: Mapping[str, np.ndarray], p: str, routed: bool) -> dict:
  if routed:
    attn = {"qkv": layout.torch_linear(sd, f"{p}attn.qkv.qkv"),
            "wo": layout.torch_linear(sd, f"{p}attn.wo")}
  else:
    attn = {"qkv": layout.torch_linear(sd, f"{p}attn.qkv"),
            "proj": layout.torch_linear(sd, f"{p}attn.proj")}
  attn["lepe"] = layout.torch_conv(sd, f"{p}attn.lepe")
  return {"pos_embed": layout.torch_conv(sd, f"{p}pos_embed"),
          "norm1": layout.torch_norm(sd, f"{p}norm1"), "attn": attn,
          "norm2": layout.torch_norm(sd, f"{p}norm2"),
          "mlp": {"layers": {0: layout.torch_linear(sd, f"{p}mlp.0"),
                             2: layout.torch_linear(sd, f"{p}mlp.3")}}}


def checkpoint_filter_fn(state_dict: Mapping[str, np.ndarray], **known_kwargs):
  """Official BiFormer state_dict (`checkpoint["model"]`) -> (zoo params, BiFormer, kwargs).

  `params` holds the params and the BatchNorm running statistics (`mean`, `var`). `known_kwargs`
  (e.g. a registered variant's defaults) fix hyper-parameters; the rest are read from the shapes,
  except `n_win`, `head_dim` and `topks`, which default to the released models' (7, 32 and
  (1, 4, 16, -2)). Missing, unexpected and mis-shaped keys raise one ValueError.
  """
  kwargs = {**_DEFAULTS, **_infer_kwargs(state_dict), **known_kwargs}
  if not {"depths", "embed_dims"} <= kwargs.keys():
    raise ValueError("cannot read the stages from the state_dict (it needs "
                     "downsample_layers.0.0.weight and stages.<i>.<j>.* keys); name the variant")
  check_state_dict(state_dict, _official_shapes(kwargs))
  sd = state_dict

  def conv_bn(conv: str, norm: str) -> dict:  # a ConvBN
    return {"conv": layout.torch_conv(sd, conv), "norm": layout.torch_batch_norm(sd, norm)}

  stem = "downsample_layers.0"
  downsample = [{"conv1": conv_bn(f"{stem}.0", f"{stem}.1"),
                 "conv2": conv_bn(f"{stem}.3", f"{stem}.4")}]
  downsample += [conv_bn(f"downsample_layers.{i}.0", f"downsample_layers.{i}.1")
                 for i in range(1, len(kwargs["depths"]))]
  stages = {s: {b: _block(sd, f"stages.{s}.{b}.", kwargs["topks"][s] > 0) for b in range(depth)}
            for s, depth in enumerate(kwargs["depths"])}
  params = {"downsample_layers": dict(enumerate(downsample)), "stages": stages,
            "norm": layout.torch_batch_norm(sd, "norm"), "head": layout.torch_linear(sd, "head")}
  return params, BiFormer, kwargs


# --- registrations: top-1 on ImageNet-1k at 224 from the official README -------------------------
# num_params: the official constructors' counts with 1000 classes, as run on the official code (the
# README's 13.1M, 25.5M, 56.8M).

register_model("biformer_tiny", BiFormer, family="biformer", paper_metric="81.4",
               num_params=13_142_760, **_CFGS["biformer_tiny"])
register_model("biformer_small", BiFormer, family="biformer", paper_metric="83.8",
               num_params=25_536_232, **_CFGS["biformer_small"])
register_model("biformer_base", BiFormer, family="biformer", paper_metric="84.3",
               num_params=56_804_968, **_CFGS["biformer_base"])


# --- pretrained weights: the official releases (MIT) ---------------------------------------------


def _official(name: str, share: str, top1: str) -> PretrainedCfg:
  """The official file of `name` (a `.pth`, the weights under "model"), from the OneDrive share
  the official code downloads, evaluated as it does: resize to 256 (bicubic), center 224, ImageNet
  mean/std."""
  return PretrainedCfg(
      license="MIT", metric=top1, url=f"https://api.onedrive.com/v1.0/shares/{share}/root/content",
      filename=name.replace(".", "_") + ".pth", num_classes=1000, label_set="imagenet-1k",
      input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
      crop_pct=0.875, classifier="head",
      notes="OneDrive may refuse scripted downloads: then download the link in a browser and pass "
            "the file as pretrained=.")


# OneDrive shares; top-1 on ImageNet-1k val from the official README.
register_pretrained("biformer_tiny.in1k", _official(
    "biformer_tiny.in1k", "s!AkBbczdRlZvChHEOoGkgwgQzEDlM", "top-1 81.4"))
register_pretrained("biformer_small.in1k", _official(
    "biformer_small.in1k", "s!AkBbczdRlZvChHDyM-x9KWRBZ832", "top-1 83.8"))
register_pretrained("biformer_base.in1k", _official(
    "biformer_base.in1k", "s!AkBbczdRlZvChHI_XPhoadjaNxtO", "top-1 84.3"))
