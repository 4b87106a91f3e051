"""MaxViT: Multi-Axis Vision Transformer (Tu et al., ECCV 2022).

A port of the official TF code (github.com/google-research/maxvit @ 70a47072,
`maxvit/models/maxvit.py`), checked against it and against timm's faithful PyTorch port
(`maxvit_*_tf_*`, timm 1.0.31). Images are NHWC. A stage is a run of MaxViT blocks, each

  MBConv (pre-norm BatchNorm, 1x1 expand to 4x the *output* width, 3x3 depthwise carrying the
  stage's stride 2, squeeze-excitation, 1x1 shrink) -> block attention -> FFN -> grid attention
  -> FFN,

every sub-layer a pre-norm residual. Block attention attends inside non-overlapping P x P windows;
grid attention inside a P x P grid dilated over the whole map (tokens (i * H/P + a, j * W/P + b)
for i, j < P); both add a learned relative-position bias indexed key minus query
(`ops.window_attention`). Stem: conv3x3/2 -> BN -> GELU -> conv3x3. Head: global average pool ->
LayerNorm -> Dense -> tanh -> Dense. Kept from TF: the tanh GELU, BatchNorm eps 1e-3 (momentum
0.99), LayerNorm eps 1e-5, 'SAME' padding (asymmetric on the stride-2 convs), and no padding of the
input: height and width must be multiples of 2^(stages + 1) * P (224 for P = 7).

Relative-position tables and resolution (`rel_pos_size`). The window P is img_size // 32 (7, 12,
16 at 224, 384, 512), and attention needs a (2P-1) x (2P-1) table per head. The sources differ:

* TF stores the table at its 224 size, 13 x 13, at *every* resolution and resizes it to (2P-1)^2
  on each forward (`tf.image.resize`: bilinear, half-pixel centres, no antialiasing). Its
  parameter count does not change with the resolution, and a 384 fine-tune learns 13 x 13 tables.
* timm stores the already resized 23 x 23 / 31 x 31 tables, so its 384 and 512 models have more
  parameters (T: 30,977,008 at 384 against 30,916,528).

Here a model stores `rel_pos_size` x `rel_pos_size` tables and, when that is not 2P-1, resizes
them on each forward exactly as TF does (`jax.image.resize(..., "linear", antialias=False)`). The
registered variants keep timm's layout (`rel_pos_size=None` means 2P-1: nothing is resized), so
timm's hub weights load as they are and the parameter counts are timm's: the official TF counts
at 224, larger at 384/512. `rel_pos_size=13` gives TF's layout at any resolution: TF's parameter
count, and TF's fine-tuning recipe, where a 224 checkpoint loads unchanged into
`create_model("maxvit_tiny_tf_384", rel_pos_size=13)`. The converter brings a checkpoint's tables
to the size the target model stores with the same bilinear resize; for a TF checkpoint at 384/512
that reproduces the official outputs exactly.

Stochastic depth follows TF: block b (0-based over all blocks) drops each of its five residual
branches with probability drop_path_rate * b / num_blocks (timm: linspace(0, rate, num_blocks)).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.convert import check_state_dict, layout
from models.layers import (ACTIVATIONS, CONV_AXES, NORM_AXES, DepthwiseConv, DropPath, Mlp,
                           check_images, collect_intermediates, layer_norm, linear,
                           promote_keeping_statistics, shard_batch)
from models.registry import (IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg, register_model,
                             register_pretrained)
from ops.sharding import axes as logical
from ops.window_attention import relative_position_bias, window_attention

_HEAD_DIM = 32
_LN_EPS = 1e-5
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.99  # TF's: running = 0.99 * running + 0.01 * batch
_EXPANSION = 4  # MBConv and FFN hidden width = 4 x the block's output width
_SE_RATIO = 0.25  # of the block's output width
_STEM_STRIDE = 2

gelu = ACTIVATIONS["gelu_tanh"]  # TF's activation_fn('gelu'): tanh form
# TF: every kernel, conv and relative bias ~ N(0, 0.02) (layers.linear's init="normal"); biases 0
_init = nnx.initializers.normal(0.02)


def conv3x3(in_features: int, out_features: int, *, stride: int = 1, dtype=jnp.float32,
            param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """3x3 conv with TF's 'SAME' padding: on a stride 2 it pads (0, 1), not (1, 1)."""
  return nnx.Conv(in_features, out_features, (3, 3), strides=stride, padding="SAME",
                  kernel_init=_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  **CONV_AXES)


def batch_norm(dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs) -> nnx.BatchNorm:
  """TF's BatchNorm: eps 1e-3, momentum 0.99; statistics in float32 (running ones too, whatever
  the compute dtype), two-pass variance."""
  return nnx.BatchNorm(dim, momentum=_BN_MOMENTUM, epsilon=_BN_EPS, use_fast_variance=False,
                       promote_dtype=promote_keeping_statistics, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs, **NORM_AXES)


def resize_rel_pos_table(table, size: int):
  """[H, S, S] -> [H, size, size], bilinear with half-pixel centres: `tf.image.resize`'s default.

  jax's 'linear' resize is that interpolation; antialiasing is off, so shrinking matches TF too.
  Takes numpy (converters) or jax arrays and returns the same kind; a no-op at the same size.
  """
  if tuple(table.shape[1:]) == (size, size):
    return table
  resized = jax.image.resize(jnp.asarray(table, jnp.float32), (table.shape[0], size, size),
                             "linear", antialias=False)
  if isinstance(table, np.ndarray):
    return np.asarray(resized).astype(table.dtype)
  return resized.astype(table.dtype)


def avg_pool2(x: jax.Array) -> jax.Array:
  """2x2 average pool, stride 2, on even sizes (the input check guarantees them): 'SAME' pads
  nothing there."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def block_partition(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B * H/p * W/p, p * p, C]: contiguous p x p windows, tokens row-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, p * p, c)


def block_unpartition(x: jax.Array, p: int, shape: tuple[int, ...]) -> jax.Array:
  b, h, w, c = shape
  return x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(shape)


def grid_partition(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B * H/p * W/p, p * p, C]: group (a, b) holds the tokens
  (i * H/p + a, j * W/p + b) for i, j < p, a p x p grid with stride H/p whose (i, j) is the
  position the bias sees."""
  b, h, w, c = x.shape
  x = x.reshape(b, p, h // p, p, w // p, c).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(-1, p * p, c)


def grid_unpartition(x: jax.Array, p: int, shape: tuple[int, ...]) -> jax.Array:
  b, h, w, c = shape
  return x.reshape(b, h // p, w // p, p, p, c).transpose(0, 3, 1, 4, 2, 5).reshape(shape)


class Stem(nnx.Module):
  """conv3x3/2 -> BN -> GELU -> conv3x3 (no norm or activation after the second conv)."""

  def __init__(self, in_chans: int, widths: Sequence[int], *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = conv3x3(in_chans, widths[0], stride=_STEM_STRIDE, **kw)
    self.norm1 = batch_norm(widths[0], **kw)
    self.conv2 = conv3x3(widths[0], widths[1], **kw)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.conv2(gelu(self.norm1(self.conv1(x), use_running_average=not train)))


class SqueezeExcite(nnx.Module):
  """x * sigmoid(expand(silu(reduce(mean over H, W of x))))."""

  def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.reduce = linear(dim, hidden, init="normal", axes=("embed", None), **kw)
    self.expand = linear(hidden, dim, init="normal", axes=(None, "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = self.expand(jax.nn.silu(self.reduce(x.mean(axis=(1, 2), keepdims=True))))
    return x * jax.nn.sigmoid(gate)


class MBConv(nnx.Module):
  """Inverted residual with squeeze-excitation; the stride sits in the depthwise conv.

  residual: BN (no act) -> 1x1 expand (no bias) -> BN -> GELU -> 3x3 depthwise /stride (no bias)
  -> BN -> GELU -> SE -> 1x1 shrink (bias). shortcut: 2x2 avg pool if strided, then a 1x1 conv
  (bias) if the width changes.
  """

  def __init__(self, in_dim: int, out_dim: int, *, stride: int, drop_path: float,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hidden = _EXPANSION * out_dim
    self.stride = stride
    self.shortcut = (linear(in_dim, out_dim, init="normal", axes=("embed", None), **kw)
                     if in_dim != out_dim else None)
    self.pre_norm = batch_norm(in_dim, **kw)
    self.expand = linear(in_dim, hidden, init="normal", use_bias=False, axes=("embed", "mlp"),
                         **kw)
    self.expand_norm = batch_norm(hidden, **kw)
    # nnx.Conv's layout ([3, 3, 1, C]); layers.DepthwiseConv avoids XLA:CPU's slow grouped conv.
    self.depthwise = DepthwiseConv(hidden, 3, stride=stride, use_bias=False, kernel_init=_init,
                                   **kw)
    self.depthwise_norm = batch_norm(hidden, **kw)
    self.se = SqueezeExcite(hidden, max(1, int(out_dim * _SE_RATIO)), **kw)
    self.shrink = linear(hidden, out_dim, init="normal", axes=("mlp", "embed"), **kw)
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    stats = dict(use_running_average=not train)
    shortcut = avg_pool2(x) if self.stride == 2 else x
    if self.shortcut is not None:
      shortcut = self.shortcut(shortcut)
    h = self.expand(self.pre_norm(x, **stats))
    h = gelu(self.expand_norm(h, **stats))
    h = self.depthwise(h)
    h = gelu(self.depthwise_norm(h, **stats))
    h = self.shrink(self.se(h))
    return shortcut + self.drop_path(h, train=train)


class RelPosAttention(nnx.Module):
  """Multi-head attention inside P x P token groups with a learned relative-position bias.

  q, k, v come from one Linear whose output axis is (3, heads, head_dim) (timm's
  `head_first=False`; TF's separate q/k/v [C, heads, head_dim] side by side). The table is
  [heads, S, S] with S = `rel_pos_size`, resized to 2P-1 on the fly when S differs (module
  docstring). `implementation` goes to `ops.window_attention`.
  """

  def __init__(self, dim: int, *, window: int, rel_pos_size: int, head_dim: int = _HEAD_DIM,
               implementation: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if dim % head_dim:
      raise ValueError(f"width must be a multiple of head_dim={head_dim}, got {dim}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = dim // head_dim
    self.window = window
    self.implementation = implementation
    self.qkv = linear(dim, 3 * dim, init="normal", axes=("embed", "heads"), **kw)
    self.proj = linear(dim, dim, init="normal", axes=("heads", "embed"), **kw)
    self.rel_pos_table = nnx.Param(
        _init(rngs.params(), (self.num_heads, rel_pos_size, rel_pos_size), param_dtype),
        **logical("heads", None, None))

  def _qkv_and_table(self, x: jax.Array):
    groups, tokens, _ = x.shape
    q, k, v = jnp.moveaxis(self.qkv(x).reshape(groups, tokens, 3, self.num_heads, -1), 2, 0)
    return q, k, v, resize_rel_pos_table(self.rel_pos_table[...], 2 * self.window - 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v, table = self._qkv_and_table(x)
    out = window_attention(q, k, v, table, window=(self.window, self.window),
                           scale=1.0 / math.sqrt(q.shape[-1]), implementation=self.implementation)
    return self.proj(out.reshape(x.shape))

  def attention_probs(self, x: jax.Array) -> jax.Array:
    """[groups, P*P, C] -> the softmax weights [groups, heads, P*P (query), P*P (key)], float32.

    The same logits as `__call__` (scaled q.k plus the relative-position bias), written out:
    the fused attention paths never form them.
    """
    q, k, _, table = self._qkv_and_table(x)
    logits = jnp.einsum("gqhd,gkhd->ghqk", q.astype(jnp.float32), k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) / math.sqrt(q.shape[-1])
    bias = relative_position_bias(table.astype(jnp.float32), (self.window, self.window))
    return jax.nn.softmax(logits + bias, axis=-1)


class PartitionTransformer(nnx.Module):
  """x + attn(LN(x)) over block or grid groups, then x + FFN(LN(x)); FFN 4x with tanh GELU."""

  def __init__(self, dim: int, *, partition: str, window: int, rel_pos_size: int,
               drop_path: float, implementation: str | None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.partition = partition
    self.window = window
    self.norm1 = layer_norm(dim, eps=_LN_EPS, **kw)
    self.attn = RelPosAttention(dim, window=window, rel_pos_size=rel_pos_size,
                                implementation=implementation, **kw)
    self.norm2 = layer_norm(dim, eps=_LN_EPS, **kw)
    self.mlp = Mlp(dim, _EXPANSION * dim, act=gelu, init="normal", **kw)
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def _partitions(self):
    return ((block_partition, block_unpartition) if self.partition == "block"
            else (grid_partition, grid_unpartition))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    split, merge = self._partitions()
    attended = merge(self.attn(split(self.norm1(x), self.window)), self.window, x.shape)
    x = x + self.drop_path(attended, train=train)
    return x + self.drop_path(self.mlp(self.norm2(x), train=train), train=train)

  def attention_probs(self, x: jax.Array) -> jax.Array:
    """The attention weights of this layer on its input map x [B, H, W, C]:
    [B, H/P, W/P, heads, P*P, P*P] (group, head, query token, key token), float32.

    Block: group (i, j) is the window of rows i*P.. and columns j*P..; token t is its pixel
    (i*P + t // P, j*P + t % P). Grid: group (a, b) holds the pixels
    ((t // P) * H/P + a, (t % P) * W/P + b).
    """
    split, _ = self._partitions()
    b, h, w, _ = x.shape
    probs = self.attn.attention_probs(split(self.norm1(x), self.window))
    return probs.reshape(b, h // self.window, w // self.window, *probs.shape[1:])


class MaxViTBlock(nnx.Module):
  """MBConv -> block attention (+FFN) -> grid attention (+FFN), with separate norms and FFNs."""

  def __init__(self, in_dim: int, dim: int, *, stride: int, window: int, rel_pos_size: int,
               drop_path: float, implementation: str | None, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    attn_kw = dict(window=window, rel_pos_size=rel_pos_size, drop_path=drop_path,
                   implementation=implementation, **kw)
    self.mbconv = MBConv(in_dim, dim, stride=stride, drop_path=drop_path, **kw)
    self.block_attn = PartitionTransformer(dim, partition="block", **attn_kw)
    self.grid_attn = PartitionTransformer(dim, partition="grid", **attn_kw)

  def __call__(self, x: jax.Array, *, train: bool = False,
               attention_probs: dict | None = None) -> jax.Array:
    """`attention_probs`, if given, receives the 'block_attn' and 'grid_attn' weights."""
    x = self.mbconv(x, train=train)
    for name, layer in (("block_attn", self.block_attn), ("grid_attn", self.grid_attn)):
      if attention_probs is not None:
        attention_probs[name] = layer.attention_probs(x)
      x = layer(x, train=train)
    return x


class Stage(nnx.Module):
  """`depth` MaxViT blocks; the first halves the resolution and changes the width."""

  def __init__(self, in_dim: int, dim: int, depth: int, *, drop_paths: Sequence[float],
               **block_kw):
    self.blocks = nnx.List([
        MaxViTBlock(in_dim if i == 0 else dim, dim, stride=2 if i == 0 else 1,
                    drop_path=drop_paths[i], **block_kw)
        for i in range(depth)])

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    for block in self.blocks:
      x = shard_batch(block(x, train=train))
    return x


class Head(nnx.Module):
  """Global average pool -> LayerNorm -> Dense -> tanh (pre-logits) -> Dense (logits)."""

  def __init__(self, dim: int, hidden: int, num_classes: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = layer_norm(dim, eps=_LN_EPS, **kw)
    self.pre_logits = linear(dim, hidden, init="normal", axes=("embed", "mlp"), **kw)
    self.fc = (linear(hidden, num_classes, init="normal", axes=("mlp", None), **kw)
               if num_classes > 0 else None)

  def __call__(self, x: jax.Array, *, pre_logits: bool = False) -> jax.Array:
    x = jnp.tanh(self.pre_logits(self.norm(x.mean(axis=(1, 2)))))
    return x if pre_logits or self.fc is None else self.fc(x)


class MaxViT(nnx.Module):
  """MaxViT: `m(images [B, H, W, in_chans] float, train=False) -> logits [B, num_classes]`.

  Args:
    embed_dims, depths: width and number of blocks of each stage.
    stem_widths: widths of the two stem convs.
    num_classes: logits; 0 leaves the pre-logits (tanh) features as the output.
    head_hidden_size: width of the pre-logits Dense (default the last stage's, TF's cls_hsize -1).
    img_size: the resolution the model is built for; sets the default window.
    window_size: P, the block window and grid size (default img_size // 32).
    rel_pos_size: side of the stored relative-position tables (default 2P-1; module docstring).
    drop_path_rate: stochastic depth of the last block (TF's schedule, rising linearly from 0).
    attn_implementation: for `ops.window_attention` (None picks the best for the platform).
  """

  def __init__(self, embed_dims: Sequence[int] = (64, 128, 256, 512),
               depths: Sequence[int] = (2, 2, 5, 2), stem_widths: Sequence[int] = (64, 64),
               num_classes: int = 1000, head_hidden_size: int | None = None, in_chans: int = 3,
               img_size: int = 224, window_size: int | None = None,
               rel_pos_size: int | None = None, drop_path_rate: float = 0.0,
               attn_implementation: str | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if len(embed_dims) != len(depths) or not depths or min(depths) < 1:
      raise ValueError(f"embed_dims and depths must give each stage a width and >= 1 block, got "
                       f"embed_dims={tuple(embed_dims)}, depths={tuple(depths)}")
    if len(stem_widths) != 2:
      raise ValueError(f"stem_widths must hold the two stem conv widths, got {tuple(stem_widths)}")
    self.window_size = window_size or img_size // 32
    if self.window_size < 1:
      raise ValueError(f"window_size must be >= 1, got {self.window_size} (img_size={img_size})")
    self.img_size = img_size
    self.in_chans = in_chans
    self.num_classes = num_classes
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.embed_dims = tuple(embed_dims)
    self.num_features = embed_dims[-1]
    self.head_hidden_size = head_hidden_size or embed_dims[-1]
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stem = Stem(in_chans, stem_widths, **kw)
    num_blocks = sum(depths)
    rates = [drop_path_rate * b / num_blocks for b in range(num_blocks)]  # the last block < rate
    first = np.cumsum((0, *depths))
    in_dims = (stem_widths[1], *embed_dims[:-1])
    block_kw = dict(window=self.window_size, rel_pos_size=rel_pos_size or 2 * self.window_size - 1,
                    implementation=attn_implementation, **kw)
    self.stages = nnx.List([
        Stage(in_dims[i], embed_dims[i], depths[i], drop_paths=rates[first[i]:first[i + 1]],
              **block_kw)
        for i in range(len(depths))])
    self.head = Head(self.num_features, self.head_hidden_size, num_classes, **kw)

  @property
  def input_multiple(self) -> int:
    """Height and width must be multiples of this: the last stage's map divides into P x P."""
    return _STEM_STRIDE * 2 ** len(self.stages) * self.window_size

  def _check_images(self, x: jax.Array) -> None:
    check_images("MaxViT", x, self.in_chans, multiple=self.input_multiple,
                 why=f"2^{len(self.stages) + 1} x window {self.window_size}; the official code "
                     f"does not pad")

  def forward_features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images -> the last stage's map [B, H/32, W/32, C] (for 4 stages)."""
    *_, x = self._stage_outputs(x, train=train)
    return x

  def forward_intermediates(self, x: jax.Array, indices: int | Sequence[int] | None = None, *,
                            norm: bool = False, output_fmt: str = "NHWC",
                            intermediates_only: bool = False, train: bool = False):
    """timm's forward_intermediates: (forward_features(x), [the stage maps at `indices`]).

    See `layers.collect_intermediates`. `norm` changes nothing: the final LayerNorm acts on the
    pooled features, in the head (timm's MaxViT-TF likewise has no norm before its head).
    """
    return collect_intermediates(self._stage_outputs(x, train=train), len(self.stages), indices,
                                 output_fmt=output_fmt, intermediates_only=intermediates_only)

  @property
  def feature_info(self) -> list[dict]:
    """timm's feature_info: each stage's width, stride and module name."""
    return [dict(num_chs=dim, reduction=_STEM_STRIDE * 2 ** (s + 1), module=f"stages.{s}")
            for s, dim in enumerate(self.embed_dims)]

  def _stage_outputs(self, x: jax.Array, *, train: bool):
    """Yields every stage's output map."""
    self._check_images(x)
    x = self.stem(x.astype(self.dtype), train=train)
    for stage in self.stages:
      x = stage(x, train=train)
      yield x

  def forward_with_attention(self, x: jax.Array) -> tuple[list[jax.Array], dict[str, jax.Array]]:
    """Inference pass that also returns what the attention looked at.

    Returns every stage's output map (NHWC) and, per block, the softmax weights of its block and
    grid attention under `"stages.<s>.blocks.<b>.block_attn"` / `".grid_attn"` (timm's module
    names): float32 [B, H/P, W/P, heads, P*P, P*P] over that block's map of H x W; see
    `PartitionTransformer.attention_probs` for which pixels a group and a token are.
    """
    self._check_images(x)
    x = self.stem(x.astype(self.dtype))
    stage_outputs, probs = [], {}
    for s, stage in enumerate(self.stages):
      for b, block in enumerate(stage.blocks):
        block_probs = {}
        x = block(x, attention_probs=block_probs)
        probs |= {f"stages.{s}.blocks.{b}.{name}": p for name, p in block_probs.items()}
      stage_outputs.append(x)
    return stage_outputs, probs

  def forward_head(self, x: jax.Array, *, pre_logits: bool = False) -> jax.Array:
    """Stage map -> logits, or the tanh pre-logits features with `pre_logits=True`."""
    if x.ndim != 4 or x.shape[-1] != self.num_features:
      raise ValueError(f"forward_head expects a feature map [batch, h, w, {self.num_features}], "
                       f"got shape {tuple(x.shape)}")
    return self.head(x, pre_logits=pre_logits)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    return self.forward_head(self.forward_features(x, train=train))

  def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
    """A new, freshly initialised logits layer (0: none, the model returns pre-logits)."""
    self.num_classes = num_classes
    self.head.fc = None
    if num_classes > 0:
      self.head.fc = linear(self.head_hidden_size, num_classes, init="normal", axes=("mlp", None),
                            dtype=self.dtype, param_dtype=self.param_dtype,
                            rngs=rngs if rngs is not None else nnx.Rngs(0))


# --- variants: every published MaxViT (hp/vision.py) ---------------------------------------------
# Named configs of the five sizes: the two stem widths, each stage's width and depth, and the
# drop-path rate of the official ImageNet-1k recipe (1 - survival_prob, vision_i1k). Each is
# registered at the three released resolutions (224, 384, 512) at the end of this file.

_CFGS = {
    "maxvit_tiny_tf": dict(stem_widths=(64, 64), embed_dims=(64, 128, 256, 512),
                           depths=(2, 2, 5, 2), drop_path_rate=0.2, num_classes=1000),
    "maxvit_small_tf": dict(stem_widths=(64, 64), embed_dims=(96, 192, 384, 768),
                            depths=(2, 2, 5, 2), drop_path_rate=0.3, num_classes=1000),
    "maxvit_base_tf": dict(stem_widths=(64, 64), embed_dims=(96, 192, 384, 768),
                           depths=(2, 6, 14, 2), drop_path_rate=0.4, num_classes=1000),
    "maxvit_large_tf": dict(stem_widths=(128, 128), embed_dims=(128, 256, 512, 1024),
                            depths=(2, 6, 14, 2), drop_path_rate=0.6, num_classes=1000),
    # IN-21k pretraining only: the official code has no IN-1k recipe (nor drop-path rate) for XL.
    "maxvit_xlarge_tf": dict(stem_widths=(192, 192), embed_dims=(192, 384, 768, 1536),
                             depths=(2, 6, 14, 2), drop_path_rate=0.0, num_classes=1000),
}


# --- official checkpoints -> zoo params -----------------------------------------------------------
#
# Two sources: timm's PyTorch state_dict (`maxvit_*_tf_*`: conv OIHW, Linear (out, in), fused
# qkv) and the official TF variables (name -> array: HWIO kernels, q/k/v [C, heads, 32], o
# [heads, 32, C]). Each is read for its architecture, checked key by key against the shapes that
# architecture implies, then mapped onto the zoo tree.

_TF_EMA = "/ExponentialMovingAverage"
_TF_MODEL_VARIABLE = re.compile(
    r"(conv_\d|norm_\d|block_\d\d_\d\d|final_layer_norm|inner_dense|logit_dense)/")
_TF_OPTIMIZER_SLOT = re.compile(r"/(Adam|Momentum|RMSProp|ExponentialMovingAverage)")


def _block_widths(arch: Mapping):
  """(stage, block, input width, width) of every block, in order."""
  in_dim = arch["stem_widths"][1]
  for i, (dim, depth) in enumerate(zip(arch["embed_dims"], arch["depths"])):
    for j in range(depth):
      yield i, j, in_dim if j == 0 else dim, dim
    in_dim = dim


# timm ---------------------------------------------------------------------------------------------

def _timm_arch(sd: Mapping[str, np.ndarray]) -> tuple[dict, int]:
  """Architecture and relative-position table size read from a timm state_dict's shapes."""
  depths = []
  while f"stages.{len(depths)}.blocks.0.conv.conv3_1x1.weight" in sd:
    stage = re.compile(rf"stages\.{len(depths)}\.blocks\.(\d+)\.")
    depths.append(1 + max(int(m.group(1)) for k in sd if (m := stage.match(k))))
  if not depths or "stem.conv1.weight" not in sd or "head.pre_logits.fc.weight" not in sd:
    raise ValueError("not a timm MaxViT state_dict: expected stem.conv1.weight, "
                     "stages.0.blocks.0.* and head.pre_logits.fc.weight")
  arch = {"embed_dims": tuple(int(sd[f"stages.{i}.blocks.0.conv.conv3_1x1.weight"].shape[0])
                              for i in range(len(depths))),
          "depths": tuple(depths),
          "stem_widths": tuple(int(sd[f"stem.conv{i}.weight"].shape[0]) for i in (1, 2)),
          "in_chans": int(sd["stem.conv1.weight"].shape[1]),
          "head_hidden_size": int(sd["head.pre_logits.fc.weight"].shape[0]),
          "num_classes": int(sd["head.fc.weight"].shape[0]) if "head.fc.weight" in sd else 0}
  table = sd["stages.0.blocks.0.attn_block.attn.rel_pos.relative_position_bias_table"]
  return arch, int(table.shape[-1])


def _timm_shapes(arch: Mapping, table_size: int) -> dict[str, tuple[int, ...]]:
  def bn(name, c):
    return {f"{name}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")}

  def ln(name, c):
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}

  def lin(name, out, inp, bias=True, conv=False):
    weight = {f"{name}.weight": (out, inp, 1, 1) if conv else (out, inp)}
    return weight | ({f"{name}.bias": (out,)} if bias else {})

  s0, s1 = arch["stem_widths"]
  shapes = {"stem.conv1.weight": (s0, arch["in_chans"], 3, 3), "stem.conv1.bias": (s0,),
            **bn("stem.norm1", s0), "stem.conv2.weight": (s1, s0, 3, 3), "stem.conv2.bias": (s1,)}
  for i, j, c_in, dim in _block_widths(arch):
    b = f"stages.{i}.blocks.{j}."
    hidden, se = _EXPANSION * dim, max(1, int(dim * _SE_RATIO))
    if c_in != dim:
      shapes |= lin(f"{b}conv.shortcut.expand", dim, c_in, conv=True)
    shapes |= bn(f"{b}conv.pre_norm", c_in) | lin(f"{b}conv.conv1_1x1", hidden, c_in, False, True)
    shapes |= bn(f"{b}conv.norm1", hidden) | {f"{b}conv.conv2_kxk.weight": (hidden, 1, 3, 3)}
    shapes |= bn(f"{b}conv.norm2", hidden) | lin(f"{b}conv.se.fc1", se, hidden, conv=True)
    shapes |= lin(f"{b}conv.se.fc2", hidden, se, conv=True)
    shapes |= lin(f"{b}conv.conv3_1x1", dim, hidden, conv=True)
    for p in (f"{b}attn_block.", f"{b}attn_grid."):
      table = (dim // _HEAD_DIM, table_size, table_size)
      shapes |= ln(f"{p}norm1", dim) | ln(f"{p}norm2", dim)
      shapes |= {f"{p}attn.rel_pos.relative_position_bias_table": table}
      shapes |= lin(f"{p}attn.qkv", 3 * dim, dim) | lin(f"{p}attn.proj", dim, dim)
      shapes |= lin(f"{p}mlp.fc1", _EXPANSION * dim, dim)
      shapes |= lin(f"{p}mlp.fc2", dim, _EXPANSION * dim)
  c, hidden = arch["embed_dims"][-1], arch["head_hidden_size"]
  shapes |= ln("head.norm", c) | lin("head.pre_logits.fc", hidden, c)
  return shapes | (lin("head.fc", arch["num_classes"], hidden) if arch["num_classes"] else {})


def _from_timm(sd: Mapping[str, np.ndarray], arch: Mapping) -> dict:
  conv, lin, bn, ln = (functools.partial(convert, sd) for convert in (
      layout.torch_conv, layout.torch_linear, layout.torch_batch_norm, layout.torch_norm))

  def branch(p):
    return {"norm1": ln(f"{p}norm1"), "norm2": ln(f"{p}norm2"),
            "attn": {"qkv": lin(f"{p}attn.qkv"), "proj": lin(f"{p}attn.proj"),
                     "rel_pos_table": sd[f"{p}attn.rel_pos.relative_position_bias_table"]},
            "mlp": {"fc1": lin(f"{p}mlp.fc1"), "fc2": lin(f"{p}mlp.fc2")}}

  def block(b):
    mbconv = {"pre_norm": bn(f"{b}conv.pre_norm"), "expand": lin(f"{b}conv.conv1_1x1"),
              "expand_norm": bn(f"{b}conv.norm1"), "depthwise": conv(f"{b}conv.conv2_kxk"),
              "depthwise_norm": bn(f"{b}conv.norm2"),
              "se": {"reduce": lin(f"{b}conv.se.fc1"), "expand": lin(f"{b}conv.se.fc2")},
              "shrink": lin(f"{b}conv.conv3_1x1")}
    if f"{b}conv.shortcut.expand.weight" in sd:
      mbconv["shortcut"] = lin(f"{b}conv.shortcut.expand")
    return {"mbconv": mbconv, "block_attn": branch(f"{b}attn_block."),
            "grid_attn": branch(f"{b}attn_grid.")}

  stem = {"conv1": conv("stem.conv1"), "norm1": bn("stem.norm1"), "conv2": conv("stem.conv2")}
  head = {"norm": ln("head.norm"), "pre_logits": lin("head.pre_logits.fc")}
  if arch["num_classes"]:
    head["fc"] = lin("head.fc")
  return {"stem": stem, "head": head,
          "stages": {i: {"blocks": {j: block(f"stages.{i}.blocks.{j}.") for j in range(depth)}}
                     for i, depth in enumerate(arch["depths"])}}


# TF -----------------------------------------------------------------------------------------------

def tf_variable_names(names) -> dict[str, str]:
  """Canonical name -> checkpoint name of the model's TF variables, EMA shadows preferred.

  Canonical names drop the `:0` suffix and the `maxvit/`, `stem/`, `cls_head/` scopes (eager and
  graph builds scope the stem and head differently). The training EMA
  (`<var>/ExponentialMovingAverage`: what the official eval restores, BN moving statistics
  included) replaces the raw variable where present; optimizer slots and counters are left out.
  """
  chosen: dict[str, str] = {}
  for name in names:
    base = name.removesuffix(":0")
    is_ema = base.endswith(_TF_EMA)
    canonical = re.sub(r"^(maxvit/)?((stem|cls_head)/)?", "", base.removesuffix(_TF_EMA))
    if not _TF_MODEL_VARIABLE.match(canonical) or _TF_OPTIMIZER_SLOT.search(canonical):
      continue
    if is_ema or canonical not in chosen:
      chosen[canonical] = name
  return chosen


def read_tf_checkpoint(path) -> dict[str, np.ndarray]:
  """An official TF checkpoint (prefix or directory) -> {canonical variable name: array}.

  Needs TensorFlow, which the zoo does not depend on: the timm .safetensors of the same weights
  convert without it.
  """
  try:
    import tensorflow as tf
  except ImportError as e:
    raise ImportError("reading a TF checkpoint needs TensorFlow (pip install tensorflow-cpu); "
                      "the timm .safetensors of the same weights convert without it") from e
  reader = tf.train.load_checkpoint(str(path))
  names = tf_variable_names(reader.get_variable_to_shape_map())
  return {canonical: reader.get_tensor(name) for canonical, name in names.items()}


def _tf_arch(sd: Mapping[str, np.ndarray]) -> tuple[dict, int]:
  """Architecture and relative-position table size read from canonical TF variables."""
  depths: dict[int, int] = {}
  for key in sd:
    if m := re.match(r"block_(\d\d)_(\d\d)/", key):
      stage, block = int(m.group(1)), int(m.group(2))
      depths[stage] = max(depths.get(stage, 0), block + 1)
  if not depths or "conv_0/kernel" not in sd or "logit_dense/weight" not in sd:
    raise ValueError("not an official TF MaxViT checkpoint: expected conv_0/kernel, "
                     "block_00_00/... and logit_dense/weight (after dropping the maxvit/, stem/, "
                     "cls_head/ scopes and ':0')")
  arch = {"embed_dims": tuple(int(sd[f"block_{i:02d}_00/mbconv/shrink_conv/kernel"].shape[-1])
                              for i in sorted(depths)),
          "depths": tuple(depths[i] for i in sorted(depths)),
          "stem_widths": tuple(int(sd[f"conv_{i}/kernel"].shape[-1]) for i in (0, 1)),
          "in_chans": int(sd["conv_0/kernel"].shape[2]),
          "head_hidden_size": int(sd["inner_dense/weight"].shape[-1]),
          "num_classes": int(sd["logit_dense/weight"].shape[-1])}
  return arch, int(sd["block_00_00/attention/relative_bias"].shape[-1])


def _tf_shapes(arch: Mapping, table_size: int) -> dict[str, tuple[int, ...]]:
  def bn(name, c):
    return {f"{name}/{p}": (c,) for p in ("gamma", "beta", "moving_mean", "moving_variance")}

  def ln(name, c):
    return {f"{name}/gamma": (c,), f"{name}/beta": (c,)}

  def conv1x1(name, c_in, c_out, bias=True):
    return {f"{name}/kernel": (1, 1, c_in, c_out)} | ({f"{name}/bias": (c_out,)} if bias else {})

  def tf_dense(name, c_in, c_out):
    return {f"{name}/weight": (c_in, c_out), f"{name}/bias": (c_out,)}

  s0, s1 = arch["stem_widths"]
  shapes = {"conv_0/kernel": (3, 3, arch["in_chans"], s0), "conv_0/bias": (s0,),
            **bn("norm_0", s0), "conv_1/kernel": (3, 3, s0, s1), "conv_1/bias": (s1,)}
  for i, j, c_in, dim in _block_widths(arch):
    b, m = f"block_{i:02d}_{j:02d}/", f"block_{i:02d}_{j:02d}/mbconv/"
    hidden, se, heads = _EXPANSION * dim, max(1, int(dim * _SE_RATIO)), dim // _HEAD_DIM
    if c_in != dim:
      shapes |= conv1x1(f"{m}shortcut_conv", c_in, dim)
    shapes |= bn(f"{m}pre_norm", c_in) | conv1x1(f"{m}expand_conv", c_in, hidden, bias=False)
    shapes |= bn(f"{m}expand_norm", hidden) | bn(f"{m}depthwise_norm", hidden)
    shapes |= {f"{m}depthwise_conv/depthwise_kernel": (3, 3, hidden, 1)}
    shapes |= conv1x1(f"{m}se/reduce_conv2d", hidden, se)
    shapes |= conv1x1(f"{m}se/expand_conv2d", se, hidden)
    shapes |= conv1x1(f"{m}shrink_conv", hidden, dim)
    for suffix in ("", "_1"):  # no suffix: block attention; _1: grid attention
      a = f"{b}attention{suffix}/"
      shapes |= ln(f"{b}attn_layer_norm{suffix}", dim) | ln(f"{b}ffn_layer_norm{suffix}", dim)
      shapes |= {f"{a}relative_bias": (heads, table_size, table_size)}
      shapes |= {f"{a}{p}/weight": (dim, heads, _HEAD_DIM) for p in "qkv"}
      shapes |= {f"{a}{p}/bias": (heads, _HEAD_DIM) for p in "qkv"}
      shapes |= {f"{a}o/weight": (heads, _HEAD_DIM, dim), f"{a}o/bias": (dim,)}
      shapes |= tf_dense(f"{b}ffn{suffix}/expand_dense", dim, hidden)
      shapes |= tf_dense(f"{b}ffn{suffix}/shrink_dense", hidden, dim)
  c, hidden = arch["embed_dims"][-1], arch["head_hidden_size"]
  return shapes | ln("final_layer_norm", c) | tf_dense("inner_dense", c, hidden) | tf_dense(
      "logit_dense", hidden, arch["num_classes"])


def _from_tf(sd: Mapping[str, np.ndarray], arch: Mapping) -> dict:
  conv1x1 = functools.partial(layout.flax_dense, sd)
  bn = functools.partial(layout.tf_batch_norm, sd)

  def ln(name):
    return layout.flax_norm(sd, name, scale="gamma", bias="beta")

  def tf_dense(name):
    return layout.flax_dense(sd, name, kernel="weight")

  def branch(b, suffix):
    a = f"{b}attention{suffix}/"
    dim = sd[f"{a}q/weight"].shape[0]
    # q, k, v [C, heads, 32] side by side: the [C, (3, heads, 32)] kernel of the fused Linear
    qkv = layout.linear_params(
        np.concatenate([sd[f"{a}{p}/weight"].reshape(dim, -1) for p in "qkv"], axis=1),
        np.concatenate([sd[f"{a}{p}/bias"].reshape(-1) for p in "qkv"]))
    proj = layout.linear_params(sd[f"{a}o/weight"].reshape(-1, dim), sd[f"{a}o/bias"])
    return {"norm1": ln(f"{b}attn_layer_norm{suffix}"), "norm2": ln(f"{b}ffn_layer_norm{suffix}"),
            "attn": {"qkv": qkv, "proj": proj,
                     "rel_pos_table": sd[f"{a}relative_bias"]},
            "mlp": {"fc1": tf_dense(f"{b}ffn{suffix}/expand_dense"),
                    "fc2": tf_dense(f"{b}ffn{suffix}/shrink_dense")}}

  def block(b):
    m = f"{b}mbconv/"
    depthwise = np.swapaxes(sd[f"{m}depthwise_conv/depthwise_kernel"], 2, 3)  # -> (3, 3, 1, C)
    mbconv = {"pre_norm": bn(f"{m}pre_norm"), "expand": conv1x1(f"{m}expand_conv"),
              "expand_norm": bn(f"{m}expand_norm"), "depthwise": {"kernel": depthwise},
              "depthwise_norm": bn(f"{m}depthwise_norm"),
              "se": {"reduce": conv1x1(f"{m}se/reduce_conv2d"),
                     "expand": conv1x1(f"{m}se/expand_conv2d")},
              "shrink": conv1x1(f"{m}shrink_conv")}
    if f"{m}shortcut_conv/kernel" in sd:
      mbconv["shortcut"] = conv1x1(f"{m}shortcut_conv")
    return {"mbconv": mbconv, "block_attn": branch(b, ""), "grid_attn": branch(b, "_1")}

  stem = {"conv1": layout.flax_conv(sd, "conv_0"), "norm1": bn("norm_0"),
          "conv2": layout.flax_conv(sd, "conv_1")}
  head = {"norm": ln("final_layer_norm"), "pre_logits": tf_dense("inner_dense"),
          "fc": tf_dense("logit_dense")}
  return {"stem": stem, "head": head,
          "stages": {i: {"blocks": {j: block(f"block_{i:02d}_{j:02d}/") for j in range(depth)}}
                     for i, depth in enumerate(arch["depths"])}}


def _resize_tables(params: dict, size: int) -> dict:
  """Every relative-position table brought to `size` x `size` with TF's bilinear resize."""
  return {k: resize_rel_pos_table(v, size) if k == "rel_pos_table"
          else _resize_tables(v, size) if isinstance(v, dict) else v
          for k, v in params.items()}


def checkpoint_filter_fn(state_dict: Mapping[str, np.ndarray], **known_kwargs):
  """timm (`maxvit_*_tf_*`) or official TF MaxViT weights -> (zoo params, MaxViT, kwargs).

  TF weights are a dict of variable names (e.g. from `read_tf_checkpoint`). Widths, depths, stem,
  head and classes are read from the shapes; `known_kwargs` (e.g. a registered variant's
  defaults) override them. The window is not always in the shapes: a timm table is (2P-1)^2, so
  P follows from it, but TF stores 13 x 13 tables at every resolution, so a TF checkpoint is taken
  as 224 unless `img_size` / `window_size` say otherwise. The tables are then resized to the size
  the target model stores (`rel_pos_size`, default 2P-1) with TF's bilinear resize, which is what
  TF computes on every forward. Missing, unexpected and mis-shaped keys raise one ValueError.
  """
  if any("/" in key for key in state_dict):
    sd = {canonical: np.asarray(state_dict[name])
          for canonical, name in tf_variable_names(state_dict).items()}
    arch, table_size = _tf_arch(sd)
    expected = _tf_shapes({**arch, **known_kwargs}, table_size)
    convert, window = _from_tf, 224 // 32
  else:
    # BatchNorm's step counter holds no weights (TF and Flax BatchNorm use a fixed momentum).
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    arch, table_size = _timm_arch(sd)
    expected = _timm_shapes({**arch, **known_kwargs}, table_size)
    convert, window = _from_timm, (table_size + 1) // 2
  check_state_dict(sd, expected)
  kwargs = {**arch, **known_kwargs}
  if kwargs.get("window_size") is None:
    kwargs["window_size"] = kwargs["img_size"] // 32 if "img_size" in kwargs else window
  kwargs.setdefault("img_size", 32 * kwargs["window_size"])
  stored = kwargs.get("rel_pos_size") or 2 * kwargs["window_size"] - 1
  return _resize_tables(convert(sd, kwargs), stored), MaxViT, kwargs


# --- registrations: the README's ImageNet-1k top-1 (none for the 21k-only XL) ----------------
# num_params, counted with 1000 classes on the code of the weights: at 224 the official TF
# code's count, which timm's equals; at 384 and 512 timm's, whose weights store the relative
# position tables resized to 23 x 23 and 31 x 31 (TF keeps 13 x 13 tables at every resolution,
# so its count does not grow).

register_model("maxvit_tiny_tf_224", MaxViT, family="maxvit", paper_metric="top-1 83.62",
               num_params=30_916_528, img_size=224, **_CFGS["maxvit_tiny_tf"])
register_model("maxvit_tiny_tf_384", MaxViT, family="maxvit", paper_metric="top-1 85.24",
               num_params=30_977_008, img_size=384, **_CFGS["maxvit_tiny_tf"])
register_model("maxvit_tiny_tf_512", MaxViT, family="maxvit", paper_metric="top-1 85.72",
               num_params=31_049_584, img_size=512, **_CFGS["maxvit_tiny_tf"])

register_model("maxvit_small_tf_224", MaxViT, family="maxvit", paper_metric="top-1 84.45",
               num_params=68_927_956, img_size=224, **_CFGS["maxvit_small_tf"])
register_model("maxvit_small_tf_384", MaxViT, family="maxvit", paper_metric="top-1 85.74",
               num_params=69_018_676, img_size=384, **_CFGS["maxvit_small_tf"])
register_model("maxvit_small_tf_512", MaxViT, family="maxvit", paper_metric="top-1 86.19",
               num_params=69_127_540, img_size=512, **_CFGS["maxvit_small_tf"])

register_model("maxvit_base_tf_224", MaxViT, family="maxvit", paper_metric="top-1 84.95",
               num_params=119_467_708, img_size=224, **_CFGS["maxvit_base_tf"])
register_model("maxvit_base_tf_384", MaxViT, family="maxvit", paper_metric="top-1 86.34",
               num_params=119_653_468, img_size=384, **_CFGS["maxvit_base_tf"])
register_model("maxvit_base_tf_512", MaxViT, family="maxvit", paper_metric="top-1 86.66",
               num_params=119_876_380, img_size=512, **_CFGS["maxvit_base_tf"])

register_model("maxvit_large_tf_224", MaxViT, family="maxvit", paper_metric="top-1 85.17",
               num_params=211_785_560, img_size=224, **_CFGS["maxvit_large_tf"])
register_model("maxvit_large_tf_384", MaxViT, family="maxvit", paper_metric="top-1 86.40",
               num_params=212_033_240, img_size=384, **_CFGS["maxvit_large_tf"])
register_model("maxvit_large_tf_512", MaxViT, family="maxvit", paper_metric="top-1 86.70",
               num_params=212_330_456, img_size=512, **_CFGS["maxvit_large_tf"])

register_model("maxvit_xlarge_tf_224", MaxViT, family="maxvit",
               num_params=474_951_952, img_size=224, **_CFGS["maxvit_xlarge_tf"])
register_model("maxvit_xlarge_tf_384", MaxViT, family="maxvit",
               num_params=475_323_472, img_size=384, **_CFGS["maxvit_xlarge_tf"])
register_model("maxvit_xlarge_tf_512", MaxViT, family="maxvit",
               num_params=475_769_296, img_size=512, **_CFGS["maxvit_xlarge_tf"])


# --- pretrained weights -------------------------------------------------------------------------


def _timm(name: str, metric: str) -> PretrainedCfg:
  """timm's port of the official TF weights `name` (`maxvit_<size>_tf_<res>.<tag>`), as timm's
  default_cfgs give it: ImageNet mean/std and a 0.95 crop for the in1k 224 weights, 0.5 / 0.5
  for the others; 384 and 512 squash the whole image; in21k heads have 21843 classes."""
  res, tag = int(name.split(".")[0].rsplit("_", 1)[1]), name.split(".")[1]
  imagenet = res == 224 and tag == "in1k"
  return PretrainedCfg(
      license="apache-2.0", metric=metric, hf_hub_id=f"timm/{name}",
      num_classes=21843 if tag == "in21k" else 1000,
      label_set="imagenet-21k-goog" if tag == "in21k" else "imagenet-1k", input_size=(3, res, res),
      mean=IMAGENET_MEAN if imagenet else (0.5, 0.5, 0.5),
      std=IMAGENET_STD if imagenet else (0.5, 0.5, 0.5),
      crop_pct=0.95 if res == 224 else 1.0, crop_mode="center" if res == 224 else "squash",
      classifier="head/fc")


# On the hub as timm/<name> (model.safetensors); top-1 / top-5 on ImageNet-1k val from timm's
# results/results-imagenet.csv.
_IN21K = "none published (an ImageNet-21k classifier)"

register_pretrained("maxvit_tiny_tf_224.in1k", _timm(
    "maxvit_tiny_tf_224.in1k", "top-1 83.426, top-5 96.584"))
register_pretrained("maxvit_tiny_tf_384.in1k", _timm(
    "maxvit_tiny_tf_384.in1k", "top-1 85.106, top-5 97.382"))
register_pretrained("maxvit_tiny_tf_512.in1k", _timm(
    "maxvit_tiny_tf_512.in1k", "top-1 85.658, top-5 97.592"))
register_pretrained("maxvit_small_tf_224.in1k", _timm(
    "maxvit_small_tf_224.in1k", "top-1 84.452, top-5 96.824"))
register_pretrained("maxvit_small_tf_384.in1k", _timm(
    "maxvit_small_tf_384.in1k", "top-1 85.534, top-5 97.466"))
register_pretrained("maxvit_small_tf_512.in1k", _timm(
    "maxvit_small_tf_512.in1k", "top-1 86.102, top-5 97.758"))
register_pretrained("maxvit_base_tf_224.in1k", _timm(
    "maxvit_base_tf_224.in1k", "top-1 84.884, top-5 97.002"))
register_pretrained("maxvit_base_tf_384.in1k", _timm(
    "maxvit_base_tf_384.in1k", "top-1 86.290, top-5 97.802"))
register_pretrained("maxvit_base_tf_512.in1k", _timm(
    "maxvit_base_tf_512.in1k", "top-1 86.598, top-5 97.924"))
register_pretrained("maxvit_large_tf_224.in1k", _timm(
    "maxvit_large_tf_224.in1k", "top-1 84.938, top-5 96.980"))
register_pretrained("maxvit_large_tf_384.in1k", _timm(
    "maxvit_large_tf_384.in1k", "top-1 86.242, top-5 97.684"))
register_pretrained("maxvit_large_tf_512.in1k", _timm(
    "maxvit_large_tf_512.in1k", "top-1 86.534, top-5 97.884"))
register_pretrained("maxvit_base_tf_224.in21k", _timm(
    "maxvit_base_tf_224.in21k", _IN21K))
register_pretrained("maxvit_base_tf_384.in21k_ft_in1k", _timm(
    "maxvit_base_tf_384.in21k_ft_in1k", "top-1 87.930, top-5 98.546"))
register_pretrained("maxvit_base_tf_512.in21k_ft_in1k", _timm(
    "maxvit_base_tf_512.in21k_ft_in1k", "top-1 88.214, top-5 98.538"))
register_pretrained("maxvit_large_tf_224.in21k", _timm(
    "maxvit_large_tf_224.in21k", _IN21K))
register_pretrained("maxvit_large_tf_384.in21k_ft_in1k", _timm(
    "maxvit_large_tf_384.in21k_ft_in1k", "top-1 87.994, top-5 98.576"))
register_pretrained("maxvit_large_tf_512.in21k_ft_in1k", _timm(
    "maxvit_large_tf_512.in21k_ft_in1k", "top-1 88.236, top-5 98.608"))
register_pretrained("maxvit_xlarge_tf_224.in21k", _timm(
    "maxvit_xlarge_tf_224.in21k", _IN21K))
register_pretrained("maxvit_xlarge_tf_384.in21k_ft_in1k", _timm(
    "maxvit_xlarge_tf_384.in21k_ft_in1k", "top-1 88.302, top-5 98.538"))
register_pretrained("maxvit_xlarge_tf_512.in21k_ft_in1k", _timm(
    "maxvit_xlarge_tf_512.in21k_ft_in1k", "top-1 88.540, top-5 98.650"))
