"""Official tensor layouts -> the zoo's params: one helper per kind of layer, shared by every
family's `checkpoint_filter_fn`.

* PyTorch state_dicts (`<name>.weight`, `<name>.bias`, ...): `torch_linear`, `torch_conv`,
  `torch_norm`, `torch_batch_norm`.
* TF and flax variables (`<name>/kernel`, ...): `flax_dense`, `flax_conv`, `flax_norm`,
  `tf_batch_norm`.
* `linear_params(kernel, bias)`: a Linear's params from a kernel a converter laid out itself
  (e.g. q, k and v fused into one qkv).

Each returns the dict a zoo layer's params have (`nnx.to_pure_dict` of it): a Linear's or a
conv's {"kernel", "bias"}, a norm's {"scale", "bias"}, a BatchNorm's also {"mean", "var"}. A bias
is taken where the checkpoint has one: converters check every key against the shapes the model
implies first (`models.convert.check_state_dict`), so a bias present is a bias the model has.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

StateDict = Mapping[str, np.ndarray]


def linear_params(kernel: np.ndarray, bias: np.ndarray | None = None) -> dict:
  """A Linear's params from a kernel already [in, out] and its bias (None: no bias)."""
  return {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}


def torch_linear(sd: StateDict, name: str) -> dict:
  """torch nn.Linear, or a Conv1d/Conv2d with a 1x1 kernel (the same map per token or pixel):
  weight (out, in[, 1, 1]) -> kernel (in, out)."""
  weight = sd[f"{name}.weight"]
  return linear_params(weight.reshape(weight.shape[0], -1).T, sd.get(f"{name}.bias"))


def torch_conv(sd: StateDict, name: str) -> dict:
  """torch nn.Conv2d: weight (out, in / groups, kh, kw) -> kernel (kh, kw, in / groups, out); a
  depthwise (C, 1, kh, kw) becomes the (kh, kw, 1, C) of `layers.DepthwiseConv`."""
  return linear_params(np.transpose(sd[f"{name}.weight"], (2, 3, 1, 0)), sd.get(f"{name}.bias"))


def torch_norm(sd: StateDict, name: str) -> dict:
  """torch nn.LayerNorm (weight, bias) -> scale, bias."""
  return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def torch_batch_norm(sd: StateDict, name: str) -> dict:
  """torch nn.BatchNorm2d: weight, bias and the running statistics (num_batches_tracked holds no
  weights: the zoo's BatchNorm has a fixed momentum, as TF's and flax's)."""
  return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"],
          "mean": sd[f"{name}.running_mean"], "var": sd[f"{name}.running_var"]}


def flax_dense(sd: StateDict, name: str, *, kernel: str = "kernel") -> dict:
  """A flax or TF Dense, or a 1x1 conv (`<name>/<kernel>` [..., in, out], `<name>/bias`) ->
  kernel (in, out). `kernel` names the kernel variable where the code calls it otherwise (TF
  MaxViT's dense layers: "weight")."""
  weight = sd[f"{name}/{kernel}"]
  return linear_params(weight.reshape(-1, weight.shape[-1]), sd.get(f"{name}/bias"))


def flax_conv(sd: StateDict, name: str) -> dict:
  """A flax or TF conv: the kernel is already (kh, kw, in, out)."""
  return linear_params(sd[f"{name}/kernel"], sd.get(f"{name}/bias"))


def flax_norm(sd: StateDict, name: str, *, scale: str = "scale", bias: str = "bias") -> dict:
  """A flax LayerNorm (`scale`, `bias`), or a TF one (scale="gamma", bias="beta")."""
  return {"scale": sd[f"{name}/{scale}"], "bias": sd[f"{name}/{bias}"]}


def tf_batch_norm(sd: StateDict, name: str) -> dict:
  """A TF BatchNormalization: gamma, beta, moving_mean, moving_variance."""
  return {"scale": sd[f"{name}/gamma"], "bias": sd[f"{name}/beta"],
          "mean": sd[f"{name}/moving_mean"], "var": sd[f"{name}/moving_variance"]}
