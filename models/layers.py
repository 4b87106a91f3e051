"""Shared blocks: Linear and its one factory `linear` (each official code's init by name), Mlp,
multi-head self-attention, DropPath, transformer encoder Block; the input checks of every family
(`check_images`, `check_tokens`), ALiBi's slopes, and the stage selection and layouts of timm's
feature API (`forward_intermediates`).

Every module takes `dtype` (compute) and `param_dtype` (storage) and is called with `train=` (dropout on/off).
Softmax and norm statistics run in float32 whatever `dtype` is.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ops
from ops.sharding import axes as logical

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # PyTorch's F.gelu is the exact erf form; jax.nn.gelu defaults to the tanh approximation.
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    # Flax's nn.gelu default (scenic, big_vision): the tanh approximation.
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

# Metadata naming the parameters of flax's convolutions and norms (ops.sharding): a conv kernel
# [kh, kw, in, out] and its bias by channels, a norm's scale and bias as per-channel vectors.
CONV_AXES = dict(kernel_metadata=logical(None, None, "conv_in", "conv_out"),
                 bias_metadata=logical("conv_out"))
NORM_AXES = dict(scale_metadata=logical("norm"), bias_metadata=logical("norm"))


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
  return ACTIVATIONS[name]


def _keep_mask(key: jax.Array, shape: tuple[int, ...], keep: float) -> jax.Array:
  """Bernoulli(keep) from 32 random bits: P(bits < round(keep * 2**32)) = keep to within 2**-32."""
  return ops.random_bits(key, shape) < np.uint32(min(round(keep * 2.0**32), 2**32 - 1))


class Linear(nnx.Linear):
  """`nnx.Linear` with logical axis names, its output laid out over the mesh (on XLA:CPU its input
  is multiplied as a [rows, features] matrix: `ops.xla_cpu.on_rows`).

  `axes` names the kernel's (input, output) dimensions for sharding (`ops.sharding`); the bias
  takes the output's name. The default fits a layer that reads the model width. Under a mesh the
  output is laid out by example and, for a hidden or head axis, by its name (`output_axes`).
  """

  def __init__(self, in_features: int, out_features: int, *,
               axes: tuple[str | None, str | None] = ("embed", "mlp"), **kwargs):
    super().__init__(in_features, out_features, kernel_metadata=logical(*axes),
                     bias_metadata=logical(axes[1]), **kwargs)
    self.output_name = axes[1]

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if out_sharding is not None:
      return super().__call__(inputs, out_sharding)
    return ops.sharding.constrain(ops.xla_cpu.on_rows(super().__call__, inputs),
                                  output_axes(inputs.ndim, self.output_name))


class TokenEmbed(nnx.Embed):
  """`nnx.Embed` of token ids, laid out as (`vocab`, `embed`), that refuses ids outside the
  vocabulary where they are known (an eager call: `model(tokens)`, `models.generate`).

  Why: the lookup would give NaN rows for ids >= vocab_size and the last row for -1, silently.
  Inside a jitted step the ids are not known; there they come from a corpus whose vocabulary
  made the model's (`tasks.language_modeling`).
  """

  def __init__(self, num_embeddings: int, features: int, **kwargs):
    super().__init__(num_embeddings, features, embedding_metadata=logical("vocab", "embed"),
                     **kwargs)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    check_token_ids(inputs, self.num_embeddings)
    return super().__call__(inputs)


def check_token_ids(tokens, vocab_size: int) -> None:
  """Raises ValueError naming the first id outside [0, vocab_size); nothing under jit."""
  if isinstance(tokens, jax.core.Tracer) or not jnp.size(tokens):
    return
  low, high = jax.device_get((jnp.min(tokens), jnp.max(tokens)))
  if low < 0 or high >= vocab_size:
    raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary: ids must "
                     f"be in [0, {vocab_size})")


def check_tokens(tokens: jax.Array) -> None:
  """Raises ValueError unless `tokens` is an integer array [batch, length] (an LM's input)."""
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an integer array [batch, length], got shape "
                     f"{tuple(tokens.shape)} and dtype {tokens.dtype}")


def check_images(model: str, x: jax.Array, in_chans: int, *, size: int | None = None,
                 multiple: int | None = None, why: str = "") -> None:
  """Raises a ValueError that names `model`, what it expects and what it got, unless `x` is
  floating-point images [batch, height, width, in_chans] (NHWC): square of side `size` where
  given (a model built for one resolution), with sides that are multiples of `multiple` where
  given (`why` says why, e.g. "the total stride")."""
  sides = "height, width" if size is None else f"{size}, {size}"
  if x.ndim != 4 or x.shape[-1] != in_chans or (size is not None and
                                                tuple(x.shape[1:3]) != (size, size)):
    raise ValueError(f"{model} expects images [batch, {sides}, {in_chans}] (NHWC), got shape "
                     f"{tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{model} expects floating-point images, got dtype {x.dtype}")
  if multiple and (x.shape[1] % multiple or x.shape[2] % multiple):
    reason = f" ({why})" if why else ""
    raise ValueError(f"{model} expects height and width that are multiples of {multiple}{reason}, "
                     f"got {x.shape[1]}x{x.shape[2]}")


def alibi_slopes(num_heads: int, max_bias: float = 8.0, *, interleave: bool = True) -> np.ndarray:
  """ALiBi's per-head slopes (Press et al.), float64. For a power-of-two head count the geometric
  ladder ``2^(-max_bias * (h + 1) / num_heads)``, h = 0 .. num_heads - 1; for another head count,
  with `interleave` (ALiBi's reference code, TransNormerLLM's `_build_slope_tensor`) the ladder of
  the power of two below, then every other slope of the next power's ladder, and without (OLMo)
  the same formula as for a power of two."""
  if not interleave:
    return 2.0 ** (-(np.arange(1, num_heads + 1, dtype=np.float64) * max_bias / num_heads))

  def ladder(n):
    start = 2.0 ** (-max_bias / n)
    return [start * start ** i for i in range(n)]

  if math.log2(num_heads).is_integer():
    return np.asarray(ladder(num_heads))
  below = 2 ** math.floor(math.log2(num_heads))
  every_other = alibi_slopes(2 * below, max_bias)[0::2][:num_heads - below]
  return np.asarray(ladder(below) + list(every_other))


def output_axes(ndim: int, name: str | None) -> tuple[str | None, ...]:
  """Logical axes of a dense layer's output [batch, ..., features] whose kernel names its output
  `name`. The batch takes the data axes first, so a feature axis named like the weights' model
  width ("embed" -> fsdp) stays whole, and a hidden or head axis ("mlp", "heads" -> tensor) splits.
  Constraining every dense output also keeps XLA's partitioner on a layout it gets right: left to
  itself on a data x fsdp x tensor mesh, XLA:CPU (jax 0.10.2) computed `h + (h @ w1) @ w2` with
  rows of other examples (benchmarks/RESULTS.md, "Sharded training")."""
  return ("batch",) + (None,) * (ndim - 2) + (name,) if ndim >= 2 else (name,)


def torch_uniform(fan_in: int):
  """torch's default init of nn.Linear and nn.Conv weights and biases: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def uniform(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return uniform


# The inits of `linear`, named after the codes that train from them: fan_in -> (kernel init, bias
# init). The official codes' runs are reproduced from their own init.
LINEAR_INITS: dict[str, Callable[[int], tuple[Callable, Callable]]] = {
    # torch.nn.Linear (and Conv1d/Conv2d with a 1x1 kernel): weight and bias ~ U(+-1/sqrt(fan_in)).
    "torch": lambda fan_in: (torch_uniform(fan_in), torch_uniform(fan_in)),
    # N(0, 0.02) weight, zero bias: TF MaxViT, OLMo, TransNormerLLM, and timm's
    # trunc_normal_(std=.02) (HorNet), which truncates at +-2 in absolute terms, i.e. at 100
    # standard deviations.
    "normal": lambda fan_in: (nnx.initializers.normal(0.02), nnx.initializers.zeros_init()),
    # N(0, 0.02) truncated at 2 standard deviations, zero bias: BiFormer's _init_weights.
    "trunc_normal": lambda fan_in: (nnx.initializers.truncated_normal(0.02),
                                    nnx.initializers.zeros_init()),
    # scenic's attention projections: xavier-uniform over each [dim, dim] projection, i.e.
    # U(+-sqrt(3 / fan_in)) also for a fused qkv kernel; zero bias.
    "scenic_attention": lambda fan_in: (nnx.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                                        nnx.initializers.zeros_init()),
    # scenic's MlpBlock Dense: xavier-uniform weight, N(0, 1e-6) bias.
    "scenic_mlp": lambda fan_in: (nnx.initializers.xavier_uniform(),
                                  nnx.initializers.normal(1e-6)),
}


def linear(in_features: int, out_features: int, *, init: str = "torch", use_bias: bool = True,
           axes: tuple[str | None, str | None] = ("embed", "mlp"), dtype=jnp.float32,
           param_dtype=jnp.float32, rngs: nnx.Rngs) -> Linear:
  """A `Linear` (or a 1x1 convolution on channels-last features) initialised as `init` names
  (`LINEAR_INITS`: "torch", "normal", "trunc_normal", "scenic_attention", "scenic_mlp").

  `axes` names the kernel's (input, output) dimensions for sharding (see `Linear`).
  """
  if init not in LINEAR_INITS:
    raise ValueError(f"init must be one of {sorted(LINEAR_INITS)}, got {init!r}")
  kernel_init, bias_init = LINEAR_INITS[init](in_features)
  return Linear(in_features, out_features, use_bias=use_bias, axes=axes, kernel_init=kernel_init,
                bias_init=bias_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def layer_norm(dim: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  """PyTorch-compatible LayerNorm: eps 1e-5 (Flax defaults to 1e-6), two-pass variance in float32."""
  return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs, **NORM_AXES)


def promote_keeping_statistics(args, /, *, dtype=None, inexact: bool = True):
  """`promote_dtype` for `nnx.BatchNorm`'s (x, mean, var, scale, bias): x, scale and bias go to the
  compute dtype, the running mean and variance stay (at least) float32. Flax's default casts them
  too, so a bfloat16 BatchNorm in evaluation would centre and scale by bf16-rounded statistics,
  all in bf16. Strongly typed, so that `x - mean` is float32 even for a weakly typed mean."""
  x, mean, var, scale, bias = args
  x, scale, bias = nnx.nn.dtypes.promote_dtype((x, scale, bias), dtype=dtype, inexact=inexact)
  mean, var = (jnp.asarray(s, jnp.promote_types(s.dtype, jnp.float32)) for s in (mean, var))
  return x, mean, var, scale, bias


class DepthwiseConv(nnx.Module):
  """Depthwise conv with zero 'SAME' padding (`ops.depthwise_conv2d`), its parameters laid out as
  `nnx.Conv(C, C, k, strides=stride, feature_group_count=C)`'s (`kernel [kh, kw, 1, C]`,
  `bias [C]`), so converters and checkpoints see no difference."""

  def __init__(self, channels: int, kernel_size: int | tuple[int, int], *, stride: int = 1,
               use_bias: bool = True,
               kernel_init=nnx.initializers.lecun_normal(), bias_init=nnx.initializers.zeros_init(),
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
      raise ValueError(f"DepthwiseConv needs odd kernel sides ('same' padding k // 2), got {(kh, kw)}")
    self.dtype = dtype
    self.stride = stride
    self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, 1, channels), param_dtype),
                            **logical(None, None, None, "conv_out"))
    self.bias = (nnx.Param(bias_init(rngs.params(), (channels,), param_dtype), **logical("norm"))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = None if self.bias is None else self.bias[...]
    x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
    y = ops.depthwise_conv2d(x, kernel[:, :, 0], self.stride)
    return y if bias is None else y + bias


class Buffer(nnx.Variable):
  """A fixed tensor that is part of a model's weights but never trained, like torch's
  `nn.Parameter(requires_grad=False)` (TransNormer's URPE Householder vector): converters fill it,
  checkpoints save it (train.py's model_state, `pretrained.WEIGHTS`), optimizers (wrt=nnx.Param) and
  `count_params` leave it out."""


class Mlp(nnx.Module):
  """fc1 -> act -> dropout -> fc2 -> dropout (timm's Mlp; the Conv1d(k=1) pair of the official
  iTransformer).

  `init` names the init of the two layers (`linear`): torch's by default; a family trained from
  another (e.g. TF's normal(0.02)) names its own. The hidden units are split over the mesh's
  `tensor` axis (`ops.sharding`).
  """

  def __init__(self, dim: int, hidden_dim: int, *, act: Callable = ACTIVATIONS["gelu"],
               drop: float = 0.0, init: str = "torch", dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = linear(dim, hidden_dim, axes=("embed", "mlp"), **kw)
    self.fc2 = linear(hidden_dim, dim, axes=("mlp", "embed"), **kw)
    self.act = act
    self.drop = Dropout(drop, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = self.drop(self.act(self.fc1(x)), train=train)
    x = ops.sharding.constrain(x, hidden_axes(x))
    return self.drop(self.fc2(x), train=train)


def shard_batch(x: jax.Array) -> jax.Array:
  """`x` split over the mesh's data axes by its first (example) dimension (ops.sharding): the
  residual stream between blocks, so that XLA gathers FSDP-split weights around each block rather
  than splitting activations like the weights."""
  return ops.sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def hidden_axes(x: jax.Array) -> tuple[str | None, ...]:
  """Logical axes of a feed-forward block's hidden activations [batch, ..., mlp]."""
  return ("batch",) + (None,) * (x.ndim - 2) + ("mlp",)


def prefix_dense(layer: Linear, x: jax.Array, *, outputs: int | None = None,
                 inputs: int | None = None) -> jax.Array:
  """`layer(x)` restricted to its first `outputs` output units or its first `inputs` input units.

  The kernel and bias are sliced statically before the matmul, so the compute shrinks with the
  slice. An output slice slices the bias too; an input slice keeps the whole bias.
  """
  kernel = layer.kernel[...][:inputs, :outputs]
  bias = None if layer.bias is None else layer.bias[...][:outputs]
  x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)
  y = ops.xla_cpu.on_rows(lambda rows: jnp.dot(rows, kernel, precision=layer.precision), x)
  y = y if bias is None else y + bias
  return ops.sharding.constrain(y, output_axes(x.ndim, layer.output_name))


class NestedMlp(nnx.Module):
  """An Mlp whose first `width` hidden units form a smaller Mlp (MatFormer's nested FFN).

  Plain: `fc2(act(fc1(x)))`; gated: `fc2(act(fc1_g(x)) * fc1_x(x))` (timm's SwiGLU names). A call
  with `width=m` uses hidden units `[:m]` only: the first m columns of the input layers' kernels
  (and biases), the first m rows of fc2's kernel; fc2's bias is shared by every width, never
  sliced. `width` is static: each width is its own compilation, and the compute is proportional
  to it. Dropout and `init` as in `Mlp`; `use_bias` gives every layer a bias or none. Any
  transformer of the zoo can take it in place of `Mlp`.
  """

  def __init__(self, dim: int, hidden_dim: int, *, gated: bool = False,
               act: Callable = ACTIVATIONS["gelu"], drop: float = 0.0, init: str = "torch",
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(init=init, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.hidden_dim = hidden_dim
    self.gated = gated
    if gated:
      self.fc1_g = linear(dim, hidden_dim, axes=("embed", "mlp"), **kw)
      self.fc1_x = linear(dim, hidden_dim, axes=("embed", "mlp"), **kw)
    else:
      self.fc1 = linear(dim, hidden_dim, axes=("embed", "mlp"), **kw)
    self.fc2 = linear(hidden_dim, dim, axes=("mlp", "embed"), **kw)
    self.act = act
    self.drop = Dropout(drop, rngs=rngs)

  def check_width(self, width: int | None) -> int:
    """`width` (None: all hidden units) as an int, or ValueError if it is not in 1..hidden_dim."""
    if width is None:
      return self.hidden_dim
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not (
        1 <= width <= self.hidden_dim):
      raise ValueError(f"width must be an int in 1..{self.hidden_dim} (hidden units used), "
                       f"got {width!r}")
    return int(width)

  def num_params(self, width: int | None = None) -> int:
    """Parameters a call with `width` uses: the sliced input layers, fc2's first `width` rows
    and its whole (shared) bias."""
    width = self.check_width(width)
    inputs = (self.fc1_g, self.fc1_x) if self.gated else (self.fc1,)
    dim = self.fc2.out_features
    used = sum(dim * width + (width if layer.bias is not None else 0) for layer in inputs)
    return used + width * dim + (dim if self.fc2.bias is not None else 0)

  def flops_per_token(self, width: int | None = None) -> int:
    """Multiply-adds x 2 of a call with `width`, per token (biases and the activation left out)."""
    width = self.check_width(width)
    return 2 * (2 + self.gated) * self.fc2.out_features * width

  def __call__(self, x: jax.Array, *, width: int | None = None, train: bool = False) -> jax.Array:
    width = self.check_width(width)
    if self.gated:
      hidden = (self.act(prefix_dense(self.fc1_g, x, outputs=width))
                * prefix_dense(self.fc1_x, x, outputs=width))
    else:
      hidden = self.act(prefix_dense(self.fc1, x, outputs=width))
    hidden = ops.sharding.constrain(self.drop(hidden, train=train), hidden_axes(hidden))
    return self.drop(prefix_dense(self.fc2, hidden, inputs=width), train=train)


HEADS_AXES = ("batch", None, "heads", None)  # logical axes of q, k, v [B, L, H, D] (ops.attention)


class Attention(nnx.Module):
  """Multi-head self-attention over tokens [B, T, C], scale 1/sqrt(head_dim).

  q, k and v come from one fused Linear whose output axis is laid out (3, heads, head_dim), as in timm's ViT;
  each head is a contiguous slice of q, k and v, as in PyTorch's `view(B, T, H, C // H)`.
  `attn_drop` drops attention probabilities, `proj_drop` the output projection; `attn_implementation` picks
  the `ops.attention` implementation (None: the platform's best). With `num_queries` only the
  first tokens attend (all still serve as keys and values), for callers that read only those outputs.
  `init` names the init of qkv and proj (`linear`; torch's by default).
  """

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, attn_drop: float = 0.0,
               proj_drop: float = 0.0, attn_implementation: str | None = None,
               init: str = "torch", dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
    self.num_heads = num_heads
    self.attn_implementation = attn_implementation
    kw = dict(init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = linear(dim, 3 * dim, use_bias=qkv_bias, axes=("embed", "heads"), **kw)
    self.proj = linear(dim, dim, axes=("heads", "embed"), **kw)
    self.attn_drop = Dropout(attn_drop, rngs=rngs)
    self.proj_drop = Dropout(proj_drop, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, num_queries: int | None = None) -> jax.Array:
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    q, k, v = (ops.sharding.constrain(t, HEADS_AXES)
               for t in (qkv[:, :num_queries, 0], qkv[:, :, 1], qkv[:, :, 2]))
    if train and self.attn_drop.rate > 0:
      out = self._attend_with_dropout(q, k, v)
    else:  # ops.attention (softmax in float32); it has no dropout on the probabilities
      out = ops.attention(q, k, v, implementation=self.attn_implementation)
    return self.proj_drop(self.proj(out.reshape(batch, q.shape[1], dim)), train=train)

  def _attend_with_dropout(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1)
    probs = self.attn_drop(probs, train=True).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Dropout(nnx.Module):
  """Inverted dropout while training: zero with probability `rate`, scale the rest by 1 / (1 - rate).

  nnx.Dropout's semantics and RNG stream ('dropout'), with the mask drawn by `ops.random_bits`.
  """

  def __init__(self, rate: float = 0.0, *, rngs: nnx.Rngs):
    self.rate = rate
    self.rngs = rngs["dropout"].fork()

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    return jnp.where(_keep_mask(self.rngs(), x.shape, keep), x / keep, jnp.zeros_like(x))


class DropPath(Dropout):
  """Stochastic depth: drops a whole residual branch per sample with probability `rate` while training."""

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = _keep_mask(self.rngs(), (x.shape[0],) + (1,) * (x.ndim - 1), keep)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class LayerScale(nnx.Module):
  """Learnable per-channel scale of a residual branch (CaiT, ConvNeXt, HorNet): x * gamma, last axis.

  A small `init_value` (1e-6 in HorNet) starts each branch near zero, a deep net near the identity.
  """

  def __init__(self, dim: int, init_value: float = 1e-5, *, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, param_dtype), **logical("norm"))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.asarray(x, self.dtype) * jnp.asarray(self.gamma[...], self.dtype)


class Block(nnx.Module):
  """Transformer encoder layer: self-attention and Mlp branches, each added back to the residual stream.

  `post_norm=False` (ViT): x + branch(norm(x)). `post_norm=True` (original Transformer, iTransformer's
  EncoderLayer): norm(x + branch(x)). `drop` is the dropout on each branch output and the Mlp hidden layer.
  `num_queries` keeps only the first tokens in the output (see Attention), skipping their Mlp and norms.
  """

  def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, *, post_norm: bool = False,
               qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
               act: Callable = ACTIVATIONS["gelu"], norm_eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_norm = post_norm
    self.norm1 = layer_norm(dim, eps=norm_eps, **kw)
    self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, **kw)
    self.norm2 = layer_norm(dim, eps=norm_eps, **kw)
    self.mlp = Mlp(dim, mlp_hidden_dim, act=act, drop=drop, **kw)
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, num_queries: int | None = None) -> jax.Array:
    def branch(f, h, **kwargs):
      return self.drop_path(f(h, train=train, **kwargs), train=train)

    if self.post_norm:
      x = self.norm1(x[:, :num_queries] + branch(self.attn, x, num_queries=num_queries))
      return self.norm2(x + branch(self.mlp, x))
    x = x[:, :num_queries] + branch(self.attn, self.norm1(x), num_queries=num_queries)
    return x + branch(self.mlp, self.norm2(x))


# --- timm's feature API: forward_intermediates and feature_info ----------------------------------

_FEATURE_LAYOUTS: dict[str, Callable[[jax.Array], jax.Array]] = {  # from an NHWC map
    "NHWC": lambda x: x,
    "NCHW": lambda x: jnp.transpose(x, (0, 3, 1, 2)),  # torch's layout, timm's default
    "NLC": lambda x: x.reshape(x.shape[0], -1, x.shape[-1]),  # tokens, row-major
}


def feature_layout(output_fmt: str) -> Callable[[jax.Array], jax.Array]:
  """The function laying an NHWC map out as `output_fmt` (looked up before the forward runs)."""
  if output_fmt not in _FEATURE_LAYOUTS:
    raise ValueError(f"output_fmt must be one of {list(_FEATURE_LAYOUTS)}, got {output_fmt!r}")
  return _FEATURE_LAYOUTS[output_fmt]


def feature_take_indices(num_stages: int, indices: int | Sequence[int] | None = None) -> list[int]:
  """The stages `forward_intermediates` returns, in stage order (timm's `feature_take_indices`).

  None: every stage; an int n: the last n; a sequence: those stages, negative ones from the end.
  """
  if indices is None:
    indices = num_stages
  if isinstance(indices, int):
    if not 0 < indices <= num_stages:
      raise ValueError(f"indices={indices}: there are {num_stages} stages to take the last of")
    return list(range(num_stages - indices, num_stages))
  if not indices or any(not -num_stages <= i < num_stages for i in indices):
    raise ValueError(f"indices must name stages of {num_stages} (negative: from the end), got "
                     f"{list(indices)}")
  return sorted({i % num_stages for i in indices})


def collect_intermediates(stage_outputs: Iterable[jax.Array], num_stages: int,
                          indices: int | Sequence[int] | None, *, output_fmt: str,
                          intermediates_only: bool, norm: bool = False,
                          final_norm: Callable[[jax.Array], jax.Array] | None = None):
  """timm's `forward_intermediates` over the NHWC maps a hierarchical model's stages yield.

  Returns (features, [the maps of the stages at `indices`, as `output_fmt`]), the features being
  `final_norm` (default none) of the last map: what the model's forward_features returns. `norm`
  gives the last stage's map, if taken, through `final_norm` too. `intermediates_only` returns the
  list alone and stops after the last stage taken (timm's stop_early): the stages after it would
  only cost compute and, in training, update their BatchNorm statistics.
  """
  take = feature_take_indices(num_stages, indices)
  layout = feature_layout(output_fmt)
  intermediates = []
  for stage, x in enumerate(stage_outputs):
    if stage in take:
      intermediates.append(x)
    if intermediates_only and stage == take[-1]:
      break
  norm_last = norm and take[-1] == num_stages - 1
  features = None
  if not intermediates_only or norm_last:
    # Once: a BatchNorm in training updates its running statistics on every call.
    features = x if final_norm is None else final_norm(x)
    if norm_last:
      intermediates[-1] = features
  intermediates = [layout(y) for y in intermediates]
  return intermediates if intermediates_only else (features, intermediates)
