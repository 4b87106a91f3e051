"""iTransformer: Inverted Transformers Are Effective for Time Series Forecasting (Liu et al., ICLR 2024).

A port of the official code (github.com/thuml/iTransformer @ c2426e68, `model/iTransformer.py`): every variate's
whole lookback window becomes one token, and a plain post-norm Transformer encoder attends across variates.
The classification head is the one of the Time-Series-Library (TSLib) version of the model.

Layout: `x` is [batch, seq_len, variates]; time marks `x_mark` [batch, seq_len, marks] become extra tokens.
"""
from __future__ import annotations

import collections
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.convert import check_state_dict, layout
from models.layers import Block, Dropout, get_activation, layer_norm, linear, shard_batch
from models.registry import register_model

_NORM_EPS = 1e-5  # the official instance normalisation and PyTorch's LayerNorm default


def instance_norm(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Non-stationary-Transformer normalisation per sample and variate over the lookback axis 1.

  Returns (normalised x, mean, std). As in the official code the mean is detached but the std is not, so
  gradients flow through the std into the input; the variance is the biased one, eps inside the sqrt.
  """
  x = x.astype(jnp.float32)
  mean = jax.lax.stop_gradient(jnp.mean(x, axis=1, keepdims=True))
  x = x - mean
  std = jnp.sqrt(jnp.var(x, axis=1, keepdims=True) + _NORM_EPS)
  return x / std, mean, std


def _check_rank3(name: str, array: jax.Array, layout: str) -> None:
  if array.ndim != 3:
    raise ValueError(f"{name} must have shape {layout}, got shape {tuple(array.shape)}")
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")


class _InvertedEncoder(nnx.Module):
  """What both heads share: a Linear(seq_len -> d_model) token per series, post-norm blocks, a final LayerNorm."""

  def __init__(self, seq_len: int, d_model: int, n_heads: int, e_layers: int, d_ff: int, dropout: float,
               activation: str, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.seq_len = seq_len
    self.dtype = dtype
    self.embed = linear(seq_len, d_model, init="torch", axes=(None, "embed"), **kw)
    self.embed_drop = Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List([
        Block(d_model, n_heads, d_ff, post_norm=True, drop=dropout, attn_drop=dropout,
              act=get_activation(activation), norm_eps=_NORM_EPS, **kw)
        for _ in range(e_layers)])
    self.norm = layer_norm(d_model, eps=_NORM_EPS, **kw)

  def embed_tokens(self, series: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, L, T] series (variates and marks along T) -> [B, T, d_model] tokens."""
    tokens = self.embed(jnp.swapaxes(series, 1, 2).astype(self.dtype))
    return self.embed_drop(tokens, train=train)

  def encode(self, series: jax.Array, *, train: bool = False, keep_tokens: int | None = None) -> jax.Array:
    """[B, L, T] -> [B, T, d_model] after the final LayerNorm, or only the first `keep_tokens` tokens.

    Only attention mixes tokens, so the last block then computes queries, Mlp and norms for the kept tokens
    alone: the time-mark tokens' outputs are never read (a tenth of an ETTh1 training step).
    """
    x = self.embed_tokens(series, train=train)
    for i, block in enumerate(self.blocks):
      x = shard_batch(
          block(x, train=train, num_queries=keep_tokens if i == len(self.blocks) - 1 else None))
    return self.norm(x[:, :keep_tokens])

  def _check_series(self, x: jax.Array) -> None:
    _check_rank3("x", x, f"[batch, seq_len={self.seq_len}, variates]")
    if x.shape[1] != self.seq_len:
      raise ValueError(f"x must have seq_len={self.seq_len} steps on axis 1, got shape {tuple(x.shape)}")


class iTransformer(_InvertedEncoder):
  """Forecaster: `m(x [B, L, N], x_mark [B, L, C] | None, train=...) -> [B, pred_len, N]`."""

  def __init__(self, seq_len: int, pred_len: int, d_model: int, n_heads: int, e_layers: int, d_ff: int,
               dropout: float = 0.1, activation: str = "gelu", use_norm: bool = True, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(seq_len, d_model, n_heads, e_layers, d_ff, dropout, activation, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    self.pred_len = pred_len
    self.use_norm = use_norm
    self.projector = linear(d_model, pred_len, init="torch", axes=("embed", None), dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, x_mark: jax.Array | None = None, *, train: bool = False) -> jax.Array:
    self._check_inputs(x, x_mark)
    num_variates = x.shape[-1]
    if self.use_norm:
      x, mean, std = instance_norm(x)
    # Marks join as extra tokens after the variates, without normalisation; their outputs are cut below.
    series = x if x_mark is None else jnp.concatenate([x, x_mark.astype(x.dtype)], axis=-1)
    tokens = self.encode(series, train=train, keep_tokens=num_variates)
    y = jnp.swapaxes(self.projector(tokens), 1, 2).astype(jnp.float32)  # [B, pred_len, N]
    return y * std + mean if self.use_norm else y

  def _check_inputs(self, x: jax.Array, x_mark: jax.Array | None) -> None:
    self._check_series(x)
    if x_mark is None:
      return
    _check_rank3("x_mark", x_mark, f"[batch, seq_len={self.seq_len}, marks]")
    if x_mark.shape[:2] != x.shape[:2]:
      raise ValueError(f"x_mark must match x in batch and length {tuple(x.shape[:2])}, "
                       f"got shape {tuple(x_mark.shape)}")


class iTransformerClassifier(_InvertedEncoder):
  """TSLib's classification head: `m(x [B, L, N] | images [B, H, W, C], train=...) -> logits [B, num_classes]`.

  No instance normalisation and no marks; encoder -> gelu -> dropout -> flatten(N * d_model) -> Linear.
  """

  def __init__(self, seq_len: int, num_variates: int, num_classes: int, d_model: int, n_heads: int,
               e_layers: int, d_ff: int, dropout: float = 0.1, activation: str = "gelu", *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(seq_len, d_model, n_heads, e_layers, d_ff, dropout, activation, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    self.num_variates = num_variates
    self.head_drop = Dropout(dropout, rngs=rngs)
    self.head = linear(num_variates * d_model, num_classes, init="torch", axes=("embed", None),
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if x.ndim == 4:  # an image [B, H, W, C] is read row by row: H steps of W * C variates
      x = x.reshape(*x.shape[:2], -1)
    self._check_series(x)
    if x.shape[2] != self.num_variates:
      raise ValueError(f"x must have num_variates={self.num_variates} on axis 2, got shape {tuple(x.shape)}")
    features = jax.nn.gelu(self.encode(x, train=train), approximate=False)  # TSLib: F.gelu, always
    features = self.head_drop(features, train=train)
    return self.head(features.reshape(x.shape[0], -1))


# --- variants: every setting of the official scripts/multivariate_forecasting/* -------------------------
# Named configs: a 96-step lookback, 8 heads, dropout 0.1 and GELU throughout (_FORECAST); per dataset and
# horizon the script's depth (e_layers), width (d_model = d_ff) and instance normalisation (use_norm).

_FORECAST = dict(seq_len=96, n_heads=8, dropout=0.1, activation="gelu")
_CFGS = {
    "itransformer_etth1_96": dict(_FORECAST, pred_len=96, e_layers=2, d_model=256, d_ff=256, use_norm=True),
    "itransformer_etth1_192": dict(_FORECAST, pred_len=192, e_layers=2, d_model=256, d_ff=256, use_norm=True),
    "itransformer_etth1_336": dict(_FORECAST, pred_len=336, e_layers=2, d_model=512, d_ff=512, use_norm=True),
    "itransformer_etth1_720": dict(_FORECAST, pred_len=720, e_layers=2, d_model=512, d_ff=512, use_norm=True),
    "itransformer_etth2_96": dict(_FORECAST, pred_len=96, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_etth2_192": dict(_FORECAST, pred_len=192, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_etth2_336": dict(_FORECAST, pred_len=336, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_etth2_720": dict(_FORECAST, pred_len=720, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_ettm1_96": dict(_FORECAST, pred_len=96, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_ettm1_192": dict(_FORECAST, pred_len=192, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_ettm1_336": dict(_FORECAST, pred_len=336, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_ettm1_720": dict(_FORECAST, pred_len=720, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_ettm2_96": dict(_FORECAST, pred_len=96, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_ettm2_192": dict(_FORECAST, pred_len=192, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_ettm2_336": dict(_FORECAST, pred_len=336, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_ettm2_720": dict(_FORECAST, pred_len=720, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_weather_96": dict(_FORECAST, pred_len=96, e_layers=3, d_model=512, d_ff=512, use_norm=True),
    "itransformer_weather_192": dict(_FORECAST, pred_len=192, e_layers=3, d_model=512, d_ff=512, use_norm=True),
    "itransformer_weather_336": dict(_FORECAST, pred_len=336, e_layers=3, d_model=512, d_ff=512, use_norm=True),
    "itransformer_weather_720": dict(_FORECAST, pred_len=720, e_layers=3, d_model=512, d_ff=512, use_norm=True),
    "itransformer_exchange_96": dict(_FORECAST, pred_len=96, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_exchange_192": dict(_FORECAST, pred_len=192, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_exchange_336": dict(_FORECAST, pred_len=336, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_exchange_720": dict(_FORECAST, pred_len=720, e_layers=2, d_model=128, d_ff=128, use_norm=True),
    "itransformer_ecl_96": dict(_FORECAST, pred_len=96, e_layers=3, d_model=512, d_ff=512, use_norm=True),
    "itransformer_ecl_192": dict(_FORECAST, pred_len=192, e_layers=3, d_model=512, d_ff=512, use_norm=True),
    "itransformer_ecl_336": dict(_FORECAST, pred_len=336, e_layers=3, d_model=512, d_ff=512, use_norm=True),
    "itransformer_ecl_720": dict(_FORECAST, pred_len=720, e_layers=3, d_model=512, d_ff=512, use_norm=True),
    "itransformer_traffic_96": dict(_FORECAST, pred_len=96, e_layers=4, d_model=512, d_ff=512, use_norm=True),
    "itransformer_traffic_192": dict(_FORECAST, pred_len=192, e_layers=4, d_model=512, d_ff=512, use_norm=True),
    "itransformer_traffic_336": dict(_FORECAST, pred_len=336, e_layers=4, d_model=512, d_ff=512, use_norm=True),
    "itransformer_traffic_720": dict(_FORECAST, pred_len=720, e_layers=4, d_model=512, d_ff=512, use_norm=True),
    "itransformer_solar_96": dict(_FORECAST, pred_len=96, e_layers=2, d_model=512, d_ff=512, use_norm=True),
    "itransformer_solar_192": dict(_FORECAST, pred_len=192, e_layers=2, d_model=512, d_ff=512, use_norm=True),
    "itransformer_solar_336": dict(_FORECAST, pred_len=336, e_layers=2, d_model=512, d_ff=512, use_norm=True),
    "itransformer_solar_720": dict(_FORECAST, pred_len=720, e_layers=2, d_model=512, d_ff=512, use_norm=True),
    "itransformer_pems03_12": dict(_FORECAST, pred_len=12, e_layers=4, d_model=512, d_ff=512, use_norm=True),
    "itransformer_pems03_24": dict(_FORECAST, pred_len=24, e_layers=4, d_model=512, d_ff=512, use_norm=True),
    "itransformer_pems03_48": dict(_FORECAST, pred_len=48, e_layers=4, d_model=512, d_ff=512, use_norm=True),
    "itransformer_pems03_96": dict(_FORECAST, pred_len=96, e_layers=4, d_model=512, d_ff=512, use_norm=True),
    "itransformer_pems04_12": dict(_FORECAST, pred_len=12, e_layers=4, d_model=1024, d_ff=1024, use_norm=False),
    "itransformer_pems04_24": dict(_FORECAST, pred_len=24, e_layers=4, d_model=1024, d_ff=1024, use_norm=False),
    "itransformer_pems04_48": dict(_FORECAST, pred_len=48, e_layers=4, d_model=1024, d_ff=1024, use_norm=False),
    "itransformer_pems04_96": dict(_FORECAST, pred_len=96, e_layers=4, d_model=1024, d_ff=1024, use_norm=False),
    "itransformer_pems07_12": dict(_FORECAST, pred_len=12, e_layers=2, d_model=512, d_ff=512, use_norm=False),
    "itransformer_pems07_24": dict(_FORECAST, pred_len=24, e_layers=2, d_model=512, d_ff=512, use_norm=False),
    "itransformer_pems07_48": dict(_FORECAST, pred_len=48, e_layers=4, d_model=512, d_ff=512, use_norm=False),
    "itransformer_pems07_96": dict(_FORECAST, pred_len=96, e_layers=4, d_model=512, d_ff=512, use_norm=False),
    "itransformer_pems08_12": dict(_FORECAST, pred_len=12, e_layers=2, d_model=512, d_ff=512, use_norm=True),
    "itransformer_pems08_24": dict(_FORECAST, pred_len=24, e_layers=2, d_model=512, d_ff=512, use_norm=True),
    "itransformer_pems08_48": dict(_FORECAST, pred_len=48, e_layers=4, d_model=512, d_ff=512, use_norm=False),
    "itransformer_pems08_96": dict(_FORECAST, pred_len=96, e_layers=4, d_model=512, d_ff=512, use_norm=False),
    # The README quick-start: scikit-learn digits, 8x8 images read as 8 steps x 8 variates, 10 classes.
    "itransformer_cls_digits": dict(seq_len=8, num_variates=8, num_classes=10, d_model=64, n_heads=4,
                                    e_layers=2, d_ff=128, dropout=0.1, activation="gelu"),
}


# --- official state_dict -> zoo params ----------------------------------------------------------------------

_EMBED = "enc_embedding.value_embedding"
_LAYER = "encoder.attn_layers.{}."
_QKV = ("query", "key", "value")


def _head_name(state_dict: Mapping[str, np.ndarray]) -> str:
  """The official code calls the head `projector`, TSLib `projection`."""
  return "projection" if "projection.weight" in state_dict else "projector"


def _infer_kwargs(state_dict: Mapping[str, np.ndarray], head: str, classify: bool) -> dict:
  """Hyper-parameters readable from the shapes; a key that is absent leaves its value out.

  A head wider than d_model is TSLib's classifier over the flattened tokens (`classify` forces that reading).
  """
  kwargs = {}
  if f"{_EMBED}.weight" in state_dict:
    kwargs["d_model"], kwargs["seq_len"] = state_dict[f"{_EMBED}.weight"].shape
  # Every layer's two convolutions give d_ff: the most common reading, so that one mis-shaped
  # tensor is reported as such rather than making the others look wrong.
  widths = [w.shape[axis] for k, w in state_dict.items() for name, axis in (("conv1", 0), ("conv2", 1))
            if re.fullmatch(rf"encoder\.attn_layers\.\d+\.{name}\.weight", k) and w.ndim > axis]
  if widths:
    kwargs["d_ff"] = collections.Counter(widths).most_common(1)[0][0]
  layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.attn_layers\.(\d+)\.", k))}
  kwargs["e_layers"] = max(layers) + 1 if layers else 0
  if f"{head}.weight" in state_dict and "d_model" in kwargs:
    out_features, in_features = state_dict[f"{head}.weight"].shape
    if classify or in_features != kwargs["d_model"]:
      kwargs["num_classes"], kwargs["num_variates"] = out_features, in_features // kwargs["d_model"]
    else:
      kwargs["pred_len"] = out_features
  return kwargs


def _official_shapes(kwargs: Mapping, head: str) -> dict[str, tuple[int, ...]]:
  d, ff = kwargs["d_model"], kwargs["d_ff"]
  shapes = {f"{_EMBED}.weight": (d, kwargs["seq_len"]), f"{_EMBED}.bias": (d,)}
  for i in range(kwargs["e_layers"]):
    layer = _LAYER.format(i)
    for proj in (*_QKV, "out"):
      shapes |= {f"{layer}attention.{proj}_projection.weight": (d, d), f"{layer}attention.{proj}_projection.bias": (d,)}
    shapes |= {f"{layer}conv1.weight": (ff, d, 1), f"{layer}conv1.bias": (ff,),
               f"{layer}conv2.weight": (d, ff, 1), f"{layer}conv2.bias": (d,)}
    for norm in ("norm1", "norm2"):
      shapes |= {f"{layer}{norm}.weight": (d,), f"{layer}{norm}.bias": (d,)}
  shapes |= {"encoder.norm.weight": (d,), "encoder.norm.bias": (d,)}
  if "num_classes" in kwargs:
    out_features, in_features = kwargs["num_classes"], kwargs["num_variates"] * d
  else:
    out_features, in_features = kwargs["pred_len"], d
  return shapes | {f"{head}.weight": (out_features, in_features), f"{head}.bias": (out_features,)}


def _block(sd: Mapping[str, np.ndarray], layer: str) -> dict:
  attn = f"{layer}attention."
  # The fused qkv output axis is (3, heads, head_dim): concatenating q, k, v keeps each head contiguous.
  qkv = layout.linear_params(
      np.concatenate([sd[f"{attn}{p}_projection.weight"].T for p in _QKV], axis=1),
      np.concatenate([sd[f"{attn}{p}_projection.bias"] for p in _QKV]))
  return {"attn": {"qkv": qkv, "proj": layout.torch_linear(sd, f"{attn}out_projection")},
          "norm1": layout.torch_norm(sd, f"{layer}norm1"),
          "mlp": {"fc1": layout.torch_linear(sd, f"{layer}conv1"),
                  "fc2": layout.torch_linear(sd, f"{layer}conv2")},
          "norm2": layout.torch_norm(sd, f"{layer}norm2")}


def checkpoint_filter_fn(state_dict: Mapping[str, np.ndarray], **known_kwargs):
  """Official (or TSLib) iTransformer state_dict -> (zoo params, model class, constructor kwargs).

  `known_kwargs` (e.g. a registered variant's defaults) fix hyper-parameters; the rest are read from the shapes
  (n_heads cannot be, it defaults to 8). Missing, unexpected and mis-shaped keys raise one ValueError.
  """
  head = _head_name(state_dict)
  inferred = _infer_kwargs(state_dict, head, classify="num_classes" in known_kwargs)
  kwargs = {"n_heads": 8, **inferred, **known_kwargs}
  needed = {"seq_len", "d_model", "d_ff"} | ({"num_classes", "num_variates"} if "num_classes" in kwargs
                                              else {"pred_len"})
  if needed - kwargs.keys():
    raise ValueError(f"cannot read {sorted(needed - kwargs.keys())} from the state_dict's shapes (it needs "
                     f"{_EMBED}.weight, {_LAYER.format(0)}conv1.weight and {head}.weight); name the variant")
  check_state_dict(state_dict, _official_shapes(kwargs, head))
  params = {"embed": layout.torch_linear(state_dict, _EMBED),
            "blocks": {i: _block(state_dict, _LAYER.format(i)) for i in range(kwargs["e_layers"])},
            "norm": layout.torch_norm(state_dict, "encoder.norm")}
  if "num_classes" in kwargs:
    return params | {"head": layout.torch_linear(state_dict, head)}, iTransformerClassifier, kwargs
  return params | {"projector": layout.torch_linear(state_dict, head)}, iTransformer, kwargs


# --- registrations: the paper's MSE / MAE (Tables 9, 10) ------------------------------------------------
# num_params: measured on the official code (thuml/iTransformer at c2426e6: model/iTransformer.py built from
# run.py's defaults and each run's flags in scripts/multivariate_forecasting/*/iTransformer*.sh). The count does
# not depend on the number of variates. itransformer_cls_digits is the zoo's own classifier, with none.

register_model("itransformer_etth1_96", iTransformer, family="itransformer", paper_metric="0.386/0.405",
               num_params=841_568, **_CFGS["itransformer_etth1_96"])
register_model("itransformer_etth1_192", iTransformer, family="itransformer", paper_metric="0.441/0.436",
               num_params=866_240, **_CFGS["itransformer_etth1_192"])
register_model("itransformer_etth1_336", iTransformer, family="itransformer", paper_metric="0.487/0.458",
               num_params=3_379_024, **_CFGS["itransformer_etth1_336"])
register_model("itransformer_etth1_720", iTransformer, family="itransformer", paper_metric="0.503/0.491",
               num_params=3_576_016, **_CFGS["itransformer_etth1_720"])

register_model("itransformer_etth2_96", iTransformer, family="itransformer", paper_metric="0.297/0.349",
               num_params=224_224, **_CFGS["itransformer_etth2_96"])
register_model("itransformer_etth2_192", iTransformer, family="itransformer", paper_metric="0.380/0.400",
               num_params=236_608, **_CFGS["itransformer_etth2_192"])
register_model("itransformer_etth2_336", iTransformer, family="itransformer", paper_metric="0.428/0.432",
               num_params=255_184, **_CFGS["itransformer_etth2_336"])
register_model("itransformer_etth2_720", iTransformer, family="itransformer", paper_metric="0.427/0.445",
               num_params=304_720, **_CFGS["itransformer_etth2_720"])

register_model("itransformer_ettm1_96", iTransformer, family="itransformer", paper_metric="0.334/0.368",
               num_params=224_224, **_CFGS["itransformer_ettm1_96"])
register_model("itransformer_ettm1_192", iTransformer, family="itransformer", paper_metric="0.377/0.391",
               num_params=236_608, **_CFGS["itransformer_ettm1_192"])
register_model("itransformer_ettm1_336", iTransformer, family="itransformer", paper_metric="0.426/0.420",
               num_params=255_184, **_CFGS["itransformer_ettm1_336"])
register_model("itransformer_ettm1_720", iTransformer, family="itransformer", paper_metric="0.491/0.459",
               num_params=304_720, **_CFGS["itransformer_ettm1_720"])

register_model("itransformer_ettm2_96", iTransformer, family="itransformer", paper_metric="0.180/0.264",
               num_params=224_224, **_CFGS["itransformer_ettm2_96"])
register_model("itransformer_ettm2_192", iTransformer, family="itransformer", paper_metric="0.250/0.309",
               num_params=236_608, **_CFGS["itransformer_ettm2_192"])
register_model("itransformer_ettm2_336", iTransformer, family="itransformer", paper_metric="0.311/0.348",
               num_params=255_184, **_CFGS["itransformer_ettm2_336"])
register_model("itransformer_ettm2_720", iTransformer, family="itransformer", paper_metric="0.412/0.407",
               num_params=304_720, **_CFGS["itransformer_ettm2_720"])

register_model("itransformer_weather_96", iTransformer, family="itransformer", paper_metric="0.174/0.214",
               num_params=4_833_888, **_CFGS["itransformer_weather_96"])
register_model("itransformer_weather_192", iTransformer, family="itransformer", paper_metric="0.221/0.254",
               num_params=4_883_136, **_CFGS["itransformer_weather_192"])
register_model("itransformer_weather_336", iTransformer, family="itransformer", paper_metric="0.278/0.296",
               num_params=4_957_008, **_CFGS["itransformer_weather_336"])
register_model("itransformer_weather_720", iTransformer, family="itransformer", paper_metric="0.358/0.347",
               num_params=5_154_000, **_CFGS["itransformer_weather_720"])

register_model("itransformer_exchange_96", iTransformer, family="itransformer", paper_metric="0.086/0.206",
               num_params=224_224, **_CFGS["itransformer_exchange_96"])
register_model("itransformer_exchange_192", iTransformer, family="itransformer", paper_metric="0.177/0.299",
               num_params=236_608, **_CFGS["itransformer_exchange_192"])
register_model("itransformer_exchange_336", iTransformer, family="itransformer", paper_metric="0.331/0.417",
               num_params=255_184, **_CFGS["itransformer_exchange_336"])
register_model("itransformer_exchange_720", iTransformer, family="itransformer", paper_metric="0.847/0.691",
               num_params=304_720, **_CFGS["itransformer_exchange_720"])

register_model("itransformer_ecl_96", iTransformer, family="itransformer", paper_metric="0.148/0.240",
               num_params=4_833_888, **_CFGS["itransformer_ecl_96"])
register_model("itransformer_ecl_192", iTransformer, family="itransformer", paper_metric="0.162/0.253",
               num_params=4_883_136, **_CFGS["itransformer_ecl_192"])
register_model("itransformer_ecl_336", iTransformer, family="itransformer", paper_metric="0.178/0.269",
               num_params=4_957_008, **_CFGS["itransformer_ecl_336"])
register_model("itransformer_ecl_720", iTransformer, family="itransformer", paper_metric="0.225/0.317",
               num_params=5_154_000, **_CFGS["itransformer_ecl_720"])

register_model("itransformer_traffic_96", iTransformer, family="itransformer", paper_metric="0.395/0.268",
               num_params=6_411_872, **_CFGS["itransformer_traffic_96"])
register_model("itransformer_traffic_192", iTransformer, family="itransformer", paper_metric="0.417/0.276",
               num_params=6_461_120, **_CFGS["itransformer_traffic_192"])
register_model("itransformer_traffic_336", iTransformer, family="itransformer", paper_metric="0.433/0.283",
               num_params=6_534_992, **_CFGS["itransformer_traffic_336"])
register_model("itransformer_traffic_720", iTransformer, family="itransformer", paper_metric="0.467/0.302",
               num_params=6_731_984, **_CFGS["itransformer_traffic_720"])

register_model("itransformer_solar_96", iTransformer, family="itransformer", paper_metric="0.203/0.237",
               num_params=3_255_904, **_CFGS["itransformer_solar_96"])
register_model("itransformer_solar_192", iTransformer, family="itransformer", paper_metric="0.233/0.261",
               num_params=3_305_152, **_CFGS["itransformer_solar_192"])
register_model("itransformer_solar_336", iTransformer, family="itransformer", paper_metric="0.248/0.273",
               num_params=3_379_024, **_CFGS["itransformer_solar_336"])
register_model("itransformer_solar_720", iTransformer, family="itransformer", paper_metric="0.249/0.275",
               num_params=3_576_016, **_CFGS["itransformer_solar_720"])

register_model("itransformer_pems03_12", iTransformer, family="itransformer", paper_metric="0.071/0.174",
               num_params=6_368_780, **_CFGS["itransformer_pems03_12"])
register_model("itransformer_pems03_24", iTransformer, family="itransformer", paper_metric="0.093/0.201",
               num_params=6_374_936, **_CFGS["itransformer_pems03_24"])
register_model("itransformer_pems03_48", iTransformer, family="itransformer", paper_metric="0.125/0.236",
               num_params=6_387_248, **_CFGS["itransformer_pems03_48"])
register_model("itransformer_pems03_96", iTransformer, family="itransformer", paper_metric="0.164/0.275",
               num_params=6_411_872, **_CFGS["itransformer_pems03_96"])

register_model("itransformer_pems04_12", iTransformer, family="itransformer", paper_metric="0.078/0.183",
               num_params=25_320_460, **_CFGS["itransformer_pems04_12"])
register_model("itransformer_pems04_24", iTransformer, family="itransformer", paper_metric="0.095/0.205",
               num_params=25_332_760, **_CFGS["itransformer_pems04_24"])
register_model("itransformer_pems04_48", iTransformer, family="itransformer", paper_metric="0.120/0.233",
               num_params=25_357_360, **_CFGS["itransformer_pems04_48"])
register_model("itransformer_pems04_96", iTransformer, family="itransformer", paper_metric="0.150/0.262",
               num_params=25_406_560, **_CFGS["itransformer_pems04_96"])

register_model("itransformer_pems07_12", iTransformer, family="itransformer", paper_metric="0.067/0.165",
               num_params=3_212_812, **_CFGS["itransformer_pems07_12"])
register_model("itransformer_pems07_24", iTransformer, family="itransformer", paper_metric="0.088/0.190",
               num_params=3_218_968, **_CFGS["itransformer_pems07_24"])
register_model("itransformer_pems07_48", iTransformer, family="itransformer", paper_metric="0.110/0.215",
               num_params=6_387_248, **_CFGS["itransformer_pems07_48"])
register_model("itransformer_pems07_96", iTransformer, family="itransformer", paper_metric="0.139/0.245",
               num_params=6_411_872, **_CFGS["itransformer_pems07_96"])

register_model("itransformer_pems08_12", iTransformer, family="itransformer", paper_metric="0.079/0.182",
               num_params=3_212_812, **_CFGS["itransformer_pems08_12"])
register_model("itransformer_pems08_24", iTransformer, family="itransformer", paper_metric="0.115/0.219",
               num_params=3_218_968, **_CFGS["itransformer_pems08_24"])
register_model("itransformer_pems08_48", iTransformer, family="itransformer", paper_metric="0.186/0.235",
               num_params=6_387_248, **_CFGS["itransformer_pems08_48"])
register_model("itransformer_pems08_96", iTransformer, family="itransformer", paper_metric="0.221/0.267",
               num_params=6_411_872, **_CFGS["itransformer_pems08_96"])

register_model("itransformer_cls_digits", iTransformerClassifier, family="itransformer",
               **_CFGS["itransformer_cls_digits"])
