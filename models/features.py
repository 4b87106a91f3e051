"""timm's `features_only` models: a backbone's stage maps for dense heads (detection, segmentation).

`features_only(model, out_indices)` wraps any model with timm's `forward_intermediates` and
`feature_info` (HorNet, MaxViT, BiFormer, MatViT); the wrapper's call returns the selected maps.
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from models.layers import feature_take_indices


class FeatureExtractor(nnx.Module):
  """`m(images, train=False) -> [the maps of the stages at out_indices]`, NHWC (timm's
  FeatureGetterNet).

  The whole model stays inside, head included, so its weights load and save under `model.` as
  the classifier's, and `train` reaches every dropout and BatchNorm; the stages after the last
  selected one do not run (`forward_intermediates(..., intermediates_only=True)`).
  """

  def __init__(self, model: nnx.Module, out_indices: int | Sequence[int] | None = None):
    self.model = model
    self.out_indices = tuple(feature_take_indices(len(model.feature_info), out_indices))

  @property
  def feature_info(self) -> list[dict]:
    """The model's feature_info of the selected stages: num_chs, reduction, module."""
    return [self.model.feature_info[i] for i in self.out_indices]

  def __call__(self, x: jax.Array, *, train: bool = False, **kwargs) -> list[jax.Array]:
    """`kwargs` go to the model's forward_intermediates (e.g. MatViT's `granularity`)."""
    return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True,
                                            train=train, **kwargs)


def features_only(model: nnx.Module,
                  out_indices: int | Sequence[int] | None = None) -> FeatureExtractor:
  """`model` as a feature extractor of the stages at `out_indices`.

  `out_indices` as forward_intermediates' `indices` (stage indices, negative from the end, or an
  int n for the last n); None: the model's `default_out_indices` if it has one (MatViT: the last
  3 blocks, as timm's ViT), else every stage ((0, 1, 2, 3) for HorNet, MaxViT and BiFormer).
  """
  if out_indices is None:
    out_indices = getattr(model, "default_out_indices", None)
  return FeatureExtractor(model, out_indices)
