"""HorNet: High-Order Spatial Interactions with Recursive Gated Convolutions (NeurIPS 2022).

A port of the official code (github.com/raoyongming/HorNet @ ac9e2105, `hornet.py`): a
ConvNeXt-shaped backbone whose token mixer is g^nConv, a recursive gating chain of order n; each
step multiplies a 1x1 projection of the previous one with a channel slice of a depthwise 7x7 conv
or global-filter mixing.

Layout: NHWC images `[batch, height, width, channels]` (the official code is NCHW); height and width
must be divisible by 32 (a stride-4 stem and three stride-2 downsamplings).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.convert import check_state_dict, layout
from models.layers import (ACTIVATIONS, CONV_AXES, DepthwiseConv, DropPath, LayerScale,
                           check_images, collect_intermediates, layer_norm, linear, shard_batch)
from models.registry import (IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg, register_model,
                             register_pretrained)
from ops.sharding import axes as logical

_EPS = 1e-6  # every LayerNorm of HorNet, the final one included
# The official init, timm's trunc_normal_(std=.02), truncates at +-2 in absolute terms, i.e. at 100
# standard deviations: a plain normal (and cheaper to trace than jax's truncated_normal). Its
# Linears and 1x1 convs: layers.linear's init="normal" (this weight init, zero biases).
_INIT = jax.nn.initializers.normal(0.02)
_GELU = ACTIVATIONS["gelu"]  # the exact erf form, as torch.nn.GELU()


def _patchify(in_features: int, out_features: int, stride: int, *, dtype, param_dtype,
              rngs: nnx.Rngs) -> nnx.Conv:
  """The stem's and the downsamplings' conv: kernel = stride, no padding."""
  return nnx.Conv(in_features, out_features, (stride, stride), strides=stride, padding="VALID",
                  kernel_init=_INIT, bias_init=nnx.initializers.zeros, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs, **CONV_AXES)


def _depthwise(dim: int, kernel: int, *, use_bias: bool = True, dtype, param_dtype,
               rngs: nnx.Rngs) -> DepthwiseConv:
  # An odd kernel with 'SAME' padding is the official symmetric padding (kernel // 2).
  return DepthwiseConv(dim, (kernel, kernel), use_bias=use_bias, kernel_init=_INIT,
                       bias_init=nnx.initializers.zeros, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)


def _align_corners_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] linear-interpolation weights sampling at linspace(0, size_in-1, size_out).

  This is torch's `interpolate(mode='bilinear', align_corners=True)` along one axis: the end samples
  sit on the end pixels. `jax.image.resize` samples at half-pixel centres (align_corners=False).
  """
  positions = np.linspace(0.0, size_in - 1, size_out) if size_out > 1 else np.zeros(1)
  lower = np.floor(positions).astype(int)
  upper = np.minimum(lower + 1, size_in - 1)
  frac = positions - lower
  matrix = np.zeros((size_out, size_in))
  np.add.at(matrix, (np.arange(size_out), lower), 1.0 - frac)
  np.add.at(matrix, (np.arange(size_out), upper), frac)
  return matrix.astype(np.float32)


def resize_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of the two leading axes of `x` to `size`, align_corners=True (see above)."""
  rows = _align_corners_matrix(x.shape[0], size[0])
  cols = _align_corners_matrix(x.shape[1], size[1])
  return jnp.einsum("ph,qw,hw...->pq...", rows, cols, x, precision=jax.lax.Precision.HIGHEST)


class GlobalLocalFilter(nnx.Module):
  """The GF layer: a 3x3 depthwise conv on half the channels, a learned global filter on the rest.

  The global half is multiplied in the 2-D rFFT domain by `complex_weight` [h, w, C/2, (re, im)],
  where (h, w) = (H, W // 2 + 1) is the rFFT grid it was trained for; a feature map of another size
  resizes it (bilinear, align_corners=True) on every call, as the official code does. The halves
  are interleaved channel by channel, between a LayerNorm before and one after.
  """

  def __init__(self, dim: int, h: int, w: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if dim % 2:
      raise ValueError(f"GlobalLocalFilter halves its channels: dim must be even, got {dim}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    half = dim // 2
    self.pre_norm = layer_norm(dim, eps=_EPS, **kw)
    self.dw = _depthwise(half, 3, use_bias=False, **kw)
    self.complex_weight = nnx.Param(_INIT(rngs.params(), (h, w, half, 2), param_dtype),
                                    **logical(None, None, "conv_out", None))
    self.post_norm = layer_norm(dim, eps=_EPS, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.pre_norm(x)
    local, global_ = jnp.split(x, 2, axis=-1)
    local = self.dw(local)
    height, width = global_.shape[1:3]
    # The global filter runs in float32 whatever the compute dtype (the official code casts, too).
    spectrum = jnp.fft.rfft2(global_.astype(jnp.float32), axes=(1, 2), norm="ortho")
    weight = self.complex_weight[...].astype(jnp.float32)
    if weight.shape[:2] != spectrum.shape[1:3]:
      weight = resize_align_corners(weight, spectrum.shape[1:3])
    spectrum = spectrum * jax.lax.complex(weight[..., 0], weight[..., 1])
    # s=(H, W) fixes the output width: an odd W has the same rFFT grid as W - 1.
    global_ = jnp.fft.irfft2(spectrum, s=(height, width), axes=(1, 2), norm="ortho")
    # Interleaved (local k -> channel 2k, global k -> 2k + 1), promoted to float32 as the official
    # concatenation does; a plain concatenation would feed the wrong channels to g^nConv's split.
    x = jnp.stack([local, global_], axis=-1).reshape(*x.shape)
    return self.post_norm(x)


class GnConv(nnx.Module):
  """g^nConv of order n: recursive gating over the widths dims = [C / 2^(n-1), ..., C / 2, C].

  proj_in (C -> 2C) splits into `pwa` (dims[0] channels) and `abc` (sum(dims) channels); `abc`
  goes through the spatial mixing (a 7x7 depthwise conv, or the GF layer for `global_filter` =
  (h, w)), is scaled by `scale` and split by `dims` into gates q_0..q_{n-1}; then x = pwa * q_0,
  x = pws[i](x) * q_{i+1} for i < n - 1, and proj_out. `return_gates=True` also returns the gates
  (q_0, ..., q_{n-1}), the spatially mixed maps that order k multiplies in.
  """

  def __init__(self, dim: int, order: int, *, global_filter: Sequence[int] | None = None,
               scale: float = 1.0 / 3.0, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if order < 1 or dim % 2 ** (order - 1):
      raise ValueError(f"g^nConv of order {order} halves its width {order - 1} times: dim must be "
                       f"divisible by 2^(order - 1) and order >= 1, got dim={dim}, order={order}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dims = tuple(dim // 2 ** i for i in reversed(range(order)))
    self.scale = scale
    mixed = sum(self.dims)
    self.proj_in = linear(dim, 2 * dim, init="normal", axes=("embed", None), **kw)
    if global_filter is None:
      self.dwconv = _depthwise(mixed, 7, **kw)
    else:
      self.dwconv = GlobalLocalFilter(mixed, *global_filter, **kw)
    self.pws = nnx.List([linear(self.dims[i], self.dims[i + 1], init="normal",
                                axes=("embed", None), **kw)
                          for i in range(order - 1)])
    self.proj_out = linear(dim, dim, init="normal", axes=("embed", None), **kw)

  def __call__(self, x: jax.Array, *, return_gates: bool = False
               ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
    pwa, abc = jnp.split(self.proj_in(x), [self.dims[0]], axis=-1)
    # The scale multiplies the whole mixing output (after the GF post-norm), not pwa or each step.
    gates = jnp.split(self.dwconv(abc) * self.scale, np.cumsum(self.dims)[:-1].tolist(), axis=-1)
    x = pwa * gates[0]
    for pw, gate in zip(self.pws, gates[1:]):
      x = pw(x) * gate
    out = self.proj_out(x)
    return (out, tuple(gates)) if return_gates else out


class HorNetBlock(nnx.Module):
  """x + drop_path(gamma1 * gnconv(norm1(x))), then x + drop_path(gamma2 * mlp(norm2(x))).

  The MLP is Linear(C -> 4C), exact GELU, Linear(4C -> C). `return_gates=True` also returns the
  g^nConv gates (see GnConv).
  """

  def __init__(self, dim: int, order: int, *, global_filter: Sequence[int] | None = None,
               scale: float = 1.0 / 3.0, drop_path: float = 0.0,
               layer_scale_init_value: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layer_norm(dim, eps=_EPS, **kw)
    self.gnconv = GnConv(dim, order, global_filter=global_filter, scale=scale, **kw)
    self.gamma1 = LayerScale(dim, layer_scale_init_value, dtype=dtype, param_dtype=param_dtype)
    self.norm2 = layer_norm(dim, eps=_EPS, **kw)
    self.pwconv1 = linear(dim, 4 * dim, init="normal", axes=("embed", "mlp"), **kw)
    self.pwconv2 = linear(4 * dim, dim, init="normal", axes=("mlp", "embed"), **kw)
    self.gamma2 = LayerScale(dim, layer_scale_init_value, dtype=dtype, param_dtype=param_dtype)
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, return_gates: bool = False
               ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
    mixed, gates = self.gnconv(self.norm1(x), return_gates=True)
    x = x + self.drop_path(self.gamma1(mixed), train=train)
    mlp = self.pwconv2(_GELU(self.pwconv1(self.norm2(x))))
    x = x + self.drop_path(self.gamma2(mlp), train=train)
    return (x, gates) if return_gates else x


class Stem(nnx.Module):
  """A 4x4 stride-4 patchify conv, then LayerNorm (the reverse order of Downsample)."""

  def __init__(self, in_chans: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = _patchify(in_chans, dim, 4, **kw)
    self.norm = layer_norm(dim, eps=_EPS, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x))


class Downsample(nnx.Module):
  """LayerNorm, then a 2x2 stride-2 conv (before stages 2-4)."""

  def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = layer_norm(in_dim, eps=_EPS, **kw)
    self.conv = _patchify(in_dim, out_dim, 2, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(self.norm(x))


class HorNet(nnx.Module):
  """HorNet classifier: `m(images [B, H, W, in_chans], train=...) -> logits [B, num_classes]`.

  Stem, four stages of widths base_dim * (1, 2, 4, 8) (a Downsample before stages 2-4), global
  average pooling, LayerNorm and a Linear head. Per stage, `orders` gives the g^nConv order and
  `global_filter_sizes` None (7x7 depthwise conv) or the (h, w) rFFT grid of a GF layer. `scale` is
  g^nConv's s: 1/3 in every published variant (the official class defaults to 1). Drop-path rates
  rise linearly over all blocks up to `drop_path_rate`. `num_classes=0` builds no head: the model
  then returns the pooled, normalised features.
  """

  def __init__(self, num_classes: int = 1000, *, in_chans: int = 3, base_dim: int = 64,
               depths: Sequence[int] = (2, 3, 18, 2), orders: Sequence[int] = (2, 3, 4, 5),
               global_filter_sizes: Sequence[Sequence[int] | None] = (None, None, None, None),
               scale: float = 1.0 / 3.0, drop_path_rate: float = 0.0,
               layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not len(depths) == len(orders) == len(global_filter_sizes) == 4:
      raise ValueError(f"depths, orders and global_filter_sizes need one entry per stage (4), got "
                       f"{list(depths)}, {list(orders)}, {list(global_filter_sizes)}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_chans = in_chans
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.head_init_scale = head_init_scale
    dims = [base_dim * 2 ** i for i in range(4)]
    self.embed_dims = tuple(dims)
    self.num_features = dims[-1]
    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    first = np.cumsum([0, *depths]).tolist()  # index of each stage's first block
    self.stem = Stem(in_chans, dims[0], **kw)
    self.downsamples = nnx.List([Downsample(dims[i], dims[i + 1], **kw) for i in range(3)])
    self.stages = nnx.List([
        nnx.List([HorNetBlock(dims[s], orders[s], global_filter=global_filter_sizes[s], scale=scale,
                              drop_path=rates[first[s] + j],
                              layer_scale_init_value=layer_scale_init_value, **kw)
                  for j in range(depths[s])])
        for s in range(4)])
    self.norm = layer_norm(dims[-1], eps=_EPS, **kw)
    self.reset_classifier(num_classes, rngs=rngs)

  def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
    """A freshly initialised head for `num_classes` (0: none); `rngs` defaults to nnx.Rngs(0)."""
    if num_classes < 0:
      raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    self.num_classes = num_classes
    head = None
    if num_classes:
      head = linear(self.num_features, num_classes, init="normal", axes=("embed", None),
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    rngs=rngs if rngs is not None else nnx.Rngs(0))
      head.kernel[...] = head.kernel[...] * self.head_init_scale
    self.head = nnx.data(head)  # a module or None: either way part of the model's state

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.forward_head(self.forward_features(x, train=train))

  def forward_features(self, x: jax.Array, *, train: bool = False, return_gates: bool = False):
    """[B, H, W, in_chans] -> the last stage's map [B, H/32, W/32, 8 * base_dim], before pooling.

    `return_gates=True` returns (features, gates) with gates[stage][block] the tuple of the block's
    g^nConv gates (q_0, ..., q_{order-1}), each [B, h, w, width / 2^(order-1-k)] at the stage's
    resolution (see GnConv): what each order of the recursive gating multiplies in, to inspect
    or plot.
    """
    gates = []
    *_, x = self._stage_outputs(x, train=train, gates=gates)
    return (x, gates) if return_gates else x

  def forward_intermediates(self, x: jax.Array, indices: int | Sequence[int] | None = None, *,
                            norm: bool = False, output_fmt: str = "NHWC",
                            intermediates_only: bool = False, train: bool = False):
    """timm's forward_intermediates: (forward_features(x), [the stage maps at `indices`]).

    See `layers.collect_intermediates`. `norm` changes nothing: HorNet's final LayerNorm acts on
    the pooled features, in the head (as timm's ConvNeXt).
    """
    return collect_intermediates(self._stage_outputs(x, train=train), len(self.stages), indices,
                                 output_fmt=output_fmt, intermediates_only=intermediates_only)

  @property
  def feature_info(self) -> list[dict]:
    """timm's feature_info: each stage's width, stride and module name."""
    return [dict(num_chs=dim, reduction=4 * 2 ** s, module=f"stages.{s}")
            for s, dim in enumerate(self.embed_dims)]

  def _stage_outputs(self, x: jax.Array, *, train: bool, gates: list | None = None):
    """Yields every stage's output map; appends to `gates` (if given) each stage's block gates."""
    check_images("HorNet", x, self.in_chans, multiple=32, why="the total stride")
    x = self.stem(x)
    for s, blocks in enumerate(self.stages):
      if s:
        x = self.downsamples[s - 1](x)
      stage_gates = []
      for block in blocks:
        x, block_gates = block(x, train=train, return_gates=True)
        x = shard_batch(x)
        stage_gates.append(block_gates)
      if gates is not None:
        gates.append(stage_gates)
      yield x

  def forward_head(self, x: jax.Array, *, pre_logits: bool = False) -> jax.Array:
    """Global average pooling, LayerNorm, then the head (skipped for `pre_logits` or no head)."""
    if x.ndim != 4 or x.shape[-1] != self.num_features:
      raise ValueError(f"forward_head expects features [batch, h, w, {self.num_features}], got "
                       f"shape {tuple(x.shape)}")
    x = self.norm(jnp.mean(x, axis=(1, 2)))
    return x if pre_logits or self.head is None else self.head(x)


# --- variants: the official constructors (hornet.py) ----------------------------------------------
# Named configs: every variant has depths (2, 3, 18, 2), orders (2, 3, 4, 5) and scale 1/3; they
# differ in width, the rFFT grids of the global-filter stages (the 14x14 and 7x7 maps of stages 3
# and 4 at 224, 24x24 and 12x12 at 384; none: the 7x7 depthwise conv everywhere) and the drop-path
# rate of the official recipe (TRAINING.md).

_HORNET = dict(num_classes=1000, depths=(2, 3, 18, 2), orders=(2, 3, 4, 5), scale=1.0 / 3.0)
_GF_224 = (None, None, (14, 8), (7, 4))
_GF_384 = (None, None, (24, 13), (12, 7))
_7X7 = (None, None, None, None)
_CFGS = {
    "hornet_tiny_7x7": dict(_HORNET, base_dim=64, global_filter_sizes=_7X7, drop_path_rate=0.2),
    "hornet_tiny_gf": dict(_HORNET, base_dim=64, global_filter_sizes=_GF_224, drop_path_rate=0.2),
    "hornet_small_7x7": dict(_HORNET, base_dim=96, global_filter_sizes=_7X7, drop_path_rate=0.4),
    "hornet_small_gf": dict(_HORNET, base_dim=96, global_filter_sizes=_GF_224, drop_path_rate=0.4),
    "hornet_base_7x7": dict(_HORNET, base_dim=128, global_filter_sizes=_7X7, drop_path_rate=0.5),
    "hornet_base_gf": dict(_HORNET, base_dim=128, global_filter_sizes=_GF_224, drop_path_rate=0.5),
    # The official `hornet_base_gf_img384`: a constructor, no recipe or checkpoint (B's rate kept).
    "hornet_base_gf_384": dict(_HORNET, base_dim=128, global_filter_sizes=_GF_384,
                               drop_path_rate=0.5),
    # L: ImageNet-22K pre-training (the released heads have ~10.4k classes, no IN-1k checkpoint).
    "hornet_large_7x7": dict(_HORNET, base_dim=192, global_filter_sizes=_7X7, drop_path_rate=0.2),
    "hornet_large_gf": dict(_HORNET, base_dim=192, global_filter_sizes=_GF_224,
                            drop_path_rate=0.2),
    # The official `hornet_large_gf_img384`.
    "hornet_large_gf_384": dict(_HORNET, base_dim=192, global_filter_sizes=_GF_384,
                                drop_path_rate=0.4),
}


# --- official state_dict -> zoo params ------------------------------------------------------------

def _block_params(sd: Mapping[str, np.ndarray], block: str, order: int, gf: bool) -> dict:
  gn = f"{block}.gnconv"
  if gf:
    dwconv = {"pre_norm": layout.torch_norm(sd, f"{gn}.dwconv.pre_norm"),
              "dw": layout.torch_conv(sd, f"{gn}.dwconv.dw"),
              # (C, h, w, 2) -> (h, w, C, 2), the channels-last spectrum's layout
              "complex_weight": sd[f"{gn}.dwconv.complex_weight"].transpose(1, 2, 0, 3),
              "post_norm": layout.torch_norm(sd, f"{gn}.dwconv.post_norm")}
  else:
    dwconv = layout.torch_conv(sd, f"{gn}.dwconv")
  gnconv = {"proj_in": layout.torch_linear(sd, f"{gn}.proj_in"), "dwconv": dwconv,
            "pws": {i: layout.torch_linear(sd, f"{gn}.pws.{i}") for i in range(order - 1)},
            "proj_out": layout.torch_linear(sd, f"{gn}.proj_out")}
  return {"norm1": layout.torch_norm(sd, f"{block}.norm1"), "gnconv": gnconv,
          "gamma1": {"gamma": sd[f"{block}.gamma1"]},
          "norm2": layout.torch_norm(sd, f"{block}.norm2"),
          "pwconv1": layout.torch_linear(sd, f"{block}.pwconv1"),
          "pwconv2": layout.torch_linear(sd, f"{block}.pwconv2"),
          "gamma2": {"gamma": sd[f"{block}.gamma2"]}}


# Hyper-parameters the shapes fix; a given value that disagrees with the checkpoint is an error.
_ARCHITECTURE = ("in_chans", "base_dim", "depths", "orders", "global_filter_sizes")


def _infer_kwargs(sd: Mapping[str, np.ndarray]) -> dict:
  """Architecture and head size from the shapes; raises for a state_dict of no HorNet classifier."""
  needed = [k for k in ("downsample_layers.0.0.weight", "head.weight") if k not in sd]
  if needed:
    raise ValueError(f"not a HorNet classifier state_dict: it lacks {needed} "
                     f"(its first keys: {list(sd)[:5]})")
  base_dim, in_chans = sd["downsample_layers.0.0.weight"].shape[:2]
  blocks = [set() for _ in range(4)]
  for key in sd:
    if match := re.match(r"stages\.([0-3])\.(\d+)\.", key):
      blocks[int(match.group(1))].add(int(match.group(2)))
  if not all(blocks):
    raise ValueError(f"a HorNet state_dict has blocks in 4 stages, found block counts "
                     f"{[len(b) for b in blocks]}")
  orders, grids = [], []
  for s in range(4):
    pws = [k for k in sd if re.fullmatch(rf"stages\.{s}\.0\.gnconv\.pws\.\d+\.weight", k)]
    orders.append(len(pws) + 1)
    complex_weight = sd.get(f"stages.{s}.0.gnconv.dwconv.complex_weight")
    grids.append(None if complex_weight is None else tuple(complex_weight.shape[1:3]))
  return dict(num_classes=sd["head.weight"].shape[0], in_chans=in_chans, base_dim=base_dim,
              depths=tuple(max(b) + 1 for b in blocks), orders=tuple(orders),
              global_filter_sizes=tuple(grids))


def _official_shapes(kwargs: Mapping) -> dict[str, tuple[int, ...]]:
  """Every key of the official model built with `kwargs`, with its shape."""
  dims = [kwargs["base_dim"] * 2 ** i for i in range(4)]
  shapes = {"downsample_layers.0.0.weight": (dims[0], kwargs["in_chans"], 4, 4),
            "downsample_layers.0.0.bias": (dims[0],), "downsample_layers.0.1.weight": (dims[0],),
            "downsample_layers.0.1.bias": (dims[0],)}
  for i in range(1, 4):
    layer = f"downsample_layers.{i}"
    shapes |= {f"{layer}.0.weight": (dims[i - 1],), f"{layer}.0.bias": (dims[i - 1],),
               f"{layer}.1.weight": (dims[i], dims[i - 1], 2, 2), f"{layer}.1.bias": (dims[i],)}
  stages = zip(dims, kwargs["depths"], kwargs["orders"], kwargs["global_filter_sizes"])
  for s, (dim, depth, order, grid) in enumerate(stages):
    split = [dim // 2 ** i for i in reversed(range(order))]
    mixed = sum(split)
    for j in range(depth):
      block, gn = f"stages.{s}.{j}", f"stages.{s}.{j}.gnconv"
      shapes |= {f"{block}.{name}": (dim,) for name in ("gamma1", "gamma2", "norm1.weight",
                                                        "norm1.bias", "norm2.weight", "norm2.bias")}
      shapes |= {f"{gn}.proj_in.weight": (2 * dim, dim, 1, 1), f"{gn}.proj_in.bias": (2 * dim,),
                 f"{gn}.proj_out.weight": (dim, dim, 1, 1), f"{gn}.proj_out.bias": (dim,)}
      for i in range(order - 1):
        shapes |= {f"{gn}.pws.{i}.weight": (split[i + 1], split[i], 1, 1),
                   f"{gn}.pws.{i}.bias": (split[i + 1],)}
      if grid is None:
        shapes |= {f"{gn}.dwconv.weight": (mixed, 1, 7, 7), f"{gn}.dwconv.bias": (mixed,)}
      else:
        shapes |= {f"{gn}.dwconv.{name}": (mixed,) for name in (
            "pre_norm.weight", "pre_norm.bias", "post_norm.weight", "post_norm.bias")}
        shapes |= {f"{gn}.dwconv.dw.weight": (mixed // 2, 1, 3, 3),
                   f"{gn}.dwconv.complex_weight": (mixed // 2, *grid, 2)}
      shapes |= {f"{block}.pwconv1.weight": (4 * dim, dim), f"{block}.pwconv1.bias": (4 * dim,),
                 f"{block}.pwconv2.weight": (dim, 4 * dim), f"{block}.pwconv2.bias": (dim,)}
  classes = kwargs["num_classes"]
  return shapes | {"norm.weight": (dims[-1],), "norm.bias": (dims[-1],),
                   "head.weight": (classes, dims[-1]), "head.bias": (classes,)}


def _as_tuples(value):
  """Lists (e.g. kwargs read back from JSON) as tuples, to compare with the inferred kwargs."""
  return tuple(map(_as_tuples, value)) if isinstance(value, (list, tuple)) else value


def checkpoint_filter_fn(state_dict: Mapping[str, np.ndarray], **known_kwargs):
  """Official HorNet state_dict -> (zoo params, HorNet, constructor kwargs).

  The architecture and the head size are read from the shapes, so ImageNet-22K checkpoints convert
  whatever their head size: the checkpoint's head replaces a `num_classes` in `known_kwargs` (such
  as a registered variant's 1000). Other `known_kwargs` pass through (`scale`, invisible in the
  shapes, stays the published 1/3 unless given); one that contradicts the shapes raises a
  ValueError, as do missing, unexpected and mis-shaped keys.
  """
  inferred = _infer_kwargs(state_dict)
  conflicts = [f"{k}={known_kwargs[k]!r}, the checkpoint has {inferred[k]!r}" for k in _ARCHITECTURE
               if k in known_kwargs and _as_tuples(known_kwargs[k]) != inferred[k]]
  if conflicts:
    raise ValueError("the checkpoint does not fit the given variant: " + "; ".join(conflicts))
  kwargs = {**known_kwargs, **inferred}
  check_state_dict(state_dict, _official_shapes(kwargs))
  sd = state_dict
  params = {
      "stem": {"conv": layout.torch_conv(sd, "downsample_layers.0.0"),
               "norm": layout.torch_norm(sd, "downsample_layers.0.1")},
      "downsamples": {i - 1: {"norm": layout.torch_norm(sd, f"downsample_layers.{i}.0"),
                              "conv": layout.torch_conv(sd, f"downsample_layers.{i}.1")}
                      for i in range(1, 4)},
      "stages": {s: {j: _block_params(sd, f"stages.{s}.{j}", kwargs["orders"][s],
                                      kwargs["global_filter_sizes"][s] is not None)
                     for j in range(kwargs["depths"][s])}
                 for s in range(4)},
      "norm": layout.torch_norm(sd, "norm"),
      "head": layout.torch_linear(sd, "head")}
  return params, HorNet, kwargs


# --- registrations: the README's ImageNet-1K top-1 --------------------------------------------
# num_params: the official constructors' counts with 1000 classes, as run on the official code
# (mmpretrain's metafile lists the same for T, S and B).

register_model("hornet_tiny_7x7", HorNet, family="hornet", paper_metric="IN-1k top-1 82.8",
               num_params=22_409_512, **_CFGS["hornet_tiny_7x7"])
register_model("hornet_tiny_gf", HorNet, family="hornet", paper_metric="IN-1k top-1 83.0",
               num_params=22_991_848, **_CFGS["hornet_tiny_gf"])
register_model("hornet_small_7x7", HorNet, family="hornet", paper_metric="IN-1k top-1 83.8",
               num_params=49_528_264, **_CFGS["hornet_small_7x7"])
register_model("hornet_small_gf", HorNet, family="hornet", paper_metric="IN-1k top-1 84.0",
               num_params=50_401_768, **_CFGS["hornet_small_gf"])
register_model("hornet_base_7x7", HorNet, family="hornet", paper_metric="IN-1k top-1 84.2",
               num_params=87_256_680, **_CFGS["hornet_base_7x7"])
register_model("hornet_base_gf", HorNet, family="hornet", paper_metric="IN-1k top-1 84.3",
               num_params=88_421_352, **_CFGS["hornet_base_gf"])
register_model("hornet_base_gf_384", HorNet, family="hornet", num_params=92_099_560,
               **_CFGS["hornet_base_gf_384"])
register_model("hornet_large_7x7", HorNet, family="hornet", paper_metric="IN-22k pre-trained",
               num_params=194_542_504, **_CFGS["hornet_large_7x7"])
register_model("hornet_large_gf", HorNet, family="hornet", paper_metric="IN-22k pre-trained",
               num_params=196_289_512, **_CFGS["hornet_large_gf"])
register_model("hornet_large_gf_384", HorNet, family="hornet",
               paper_metric="IN-22k pre-trained, fine-tuned at 384", num_params=201_806_824,
               **_CFGS["hornet_large_gf_384"])


# --- pretrained weights: the official releases (MIT) ---------------------------------------------


def _official(name: str, share: str, top1: str | None) -> PretrainedCfg:
  """The official file of `name` (a `.pth`, the weights under "model") at Tsinghua Cloud share
  `share`, evaluated as the official code does: bicubic, ImageNet mean/std, crop 224/256 (the
  whole image at 384). ImageNet-22k heads: their class count and order are not published; a
  `num_classes` of the head's size keeps the head (the warning names it)."""
  res = 384 if "_384." in name else 224
  in22k = name.endswith(".in22k")
  return PretrainedCfg(
      license="MIT", metric=top1 or "none published (ImageNet-22k pre-training)",
      url=f"https://cloud.tsinghua.edu.cn/f/{share}/?dl=1", filename=f"{name}.pth",
      num_classes=None if in22k else 1000,
      label_set="imagenet-22k (the authors' class list)" if in22k else "imagenet-1k",
      input_size=(3, res, res), mean=IMAGENET_MEAN, std=IMAGENET_STD,
      crop_pct=0.875 if res == 224 else 1.0, classifier="head",
      notes="Tsinghua Cloud may refuse scripted downloads: then download the link in a browser "
            "and pass the file as pretrained=.")


# Tsinghua Cloud shares; top-1 on ImageNet-1k val from the official README's Model Zoo.
register_pretrained("hornet_tiny_7x7.in1k", _official(
    "hornet_tiny_7x7.in1k", "bac9690c72944d19aca1", "top-1 82.8"))
register_pretrained("hornet_tiny_gf.in1k", _official(
    "hornet_tiny_gf.in1k", "460e759c82324ea6bfa3", "top-1 83.0"))
register_pretrained("hornet_small_7x7.in1k", _official(
    "hornet_small_7x7.in1k", "8ef64277da0e469ea857", "top-1 83.8"))
register_pretrained("hornet_small_gf.in1k", _official(
    "hornet_small_gf.in1k", "959603ca287d4c09ad49", "top-1 84.0"))
register_pretrained("hornet_base_7x7.in1k", _official(
    "hornet_base_7x7.in1k", "13a748487711492e9704", "top-1 84.2"))
register_pretrained("hornet_base_gf.in1k", _official(
    "hornet_base_gf.in1k", "c212d1d8a3914b47a5c1", "top-1 84.3"))
register_pretrained("hornet_large_7x7.in22k", _official(
    "hornet_large_7x7.in22k", "c2fc23caae084a3aa73d", None))
register_pretrained("hornet_large_gf.in22k", _official(
    "hornet_large_gf.in22k", "8600206ebdfa485f98d0", None))
register_pretrained("hornet_large_gf_384.in22k", _official(
    "hornet_large_gf_384.in22k", "eec48d5eca5a48d98fd2", None))
