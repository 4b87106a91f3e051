"""timm's feature API on the vision families: `forward_intermediates`, `feature_info` and
`models.features.features_only`. Every registered variant abstractly (shapes against its
feature_info), a tiny model of each family for real (values, train and eval)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models.biformer import BiFormer
from models.features import FeatureExtractor, features_only
from models.hornet import HorNet
from models.layers import feature_take_indices
from models.matformer import MatViT
from models.maxvit import MaxViT

VISION = (HorNet, MaxViT, BiFormer, MatViT)
VARIANTS = [name for name in models.list_models() if models.model_info(name).builder in VISION]
# Widths and strides do not depend on depth: one block per stage keeps the abstract builds cheap
# (tracing a full MaxViT-B init takes 14 s). MatViT's blocks are its stages: it keeps its depth.
ONE_BLOCK_PER_STAGE = {"hornet": dict(depths=(1, 1, 1, 1)), "maxvit": dict(depths=(1, 1, 1, 1)),
                       "biformer": dict(depths=(1, 1, 1, 1))}
# Tiny models with dropout or stochastic depth, so that train and eval differ; inputs of 64 x 64.
TINY = {
    "hornet": lambda: HorNet(3, base_dim=16, depths=(1, 1, 1, 1), orders=(2, 2, 2, 2),
                             drop_path_rate=0.5, layer_scale_init_value=1.0, rngs=nnx.Rngs(0)),
    "maxvit": lambda: MaxViT(embed_dims=(32, 64), depths=(1, 1), stem_widths=(16, 16),
                             num_classes=5, window_size=2, drop_path_rate=0.5, rngs=nnx.Rngs(0)),
    "biformer": lambda: BiFormer(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), n_win=2,
                                 topks=(1, 2, 4, -2), num_classes=3, drop_path_rate=0.5,
                                 rngs=nnx.Rngs(0)),
    "matvit": lambda: MatViT(img_size=64, patch_size=16, num_classes=3, dim=32, depth=3,
                             num_heads=2, mlp_dim=64, dropout=0.2, rngs=nnx.Rngs(0)),
}
IMAGES = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))


def _input_side(name):
  """The side a variant is built for: its name's suffix (`_384`), else 224."""
  match = re.search(r"_(\d+)$", name)
  return int(match.group(1)) if match else 224


@functools.cache
def _abstract(name):
  overrides = ONE_BLOCK_PER_STAGE.get(models.model_info(name).family, {})
  return nnx.eval_shape(lambda: models.create_model(name, **overrides))


def _submodule(model, path):
  for part in path.split("."):
    model = model[int(part)] if part.isdigit() else getattr(model, part)
  return model


def _close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-6, atol=1e-6)


# --- every registered variant, abstractly ---------------------------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_stage_maps_have_the_widths_and_strides_of_feature_info(name):
  model = _abstract(name)
  side = _input_side(name)
  images = jax.ShapeDtypeStruct((1, side, side, model.in_chans), jnp.float32)
  _, maps = nnx.eval_shape(lambda m, x: m.forward_intermediates(x), model, images)
  info = model.feature_info
  assert [m.shape for m in maps] == [
      (1, side // i["reduction"], side // i["reduction"], i["num_chs"]) for i in info]
  for i in info:
    assert isinstance(_submodule(model, i["module"]), nnx.Module), i["module"]


@pytest.mark.parametrize("name, widths, reductions", [
    ("hornet_tiny_7x7", (64, 128, 256, 512), (4, 8, 16, 32)),
    ("maxvit_tiny_tf_224", (64, 128, 256, 512), (4, 8, 16, 32)),
    ("biformer_tiny", (64, 128, 256, 512), (4, 8, 16, 32)),
    ("matvit_tiny_patch16_224", (192,) * 12, (16,) * 12),
])
def test_feature_info_of_the_tiny_variants_is_the_published_one(name, widths, reductions):
  info = _abstract(name).feature_info
  assert tuple(i["num_chs"] for i in info) == widths
  assert tuple(i["reduction"] for i in info) == reductions


# --- tiny models, for real -------------------------------------------------------------------------

@functools.cache
def _tiny(family):
  return TINY[family]()


def _patch_map(model, tokens):
  """forward_features' tokens as a map without the class token, like an intermediate."""
  side = model.img_size // model.patch_size
  return tokens[:, 1:].reshape(tokens.shape[0], side, side, -1)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("family", TINY)
def test_the_last_map_normalised_is_forward_features(family, train):
  """Same RNG streams (clones), so the same dropout masks; in training the final BatchNorm
  updates its statistics once, as forward_features does."""
  model, reference = nnx.clone(_tiny(family)), nnx.clone(_tiny(family))
  features, maps = model.forward_intermediates(IMAGES, norm=True, train=train)
  expected = reference.forward_features(IMAGES, train=train)
  _close(features, expected)
  _close(maps[-1], _patch_map(model, expected) if family == "matvit" else expected)
  assert len(maps) == len(model.feature_info)
  jax.tree.map(_close, nnx.state(model, nnx.BatchStat), nnx.state(reference, nnx.BatchStat))
  if train:  # the flag reached dropout, stochastic depth or BatchNorm
    evaluated = _tiny(family).forward_features(IMAGES)
    assert np.abs(np.asarray(expected) - np.asarray(evaluated)).max() > 1e-3


@pytest.mark.parametrize("family", TINY)
def test_indices_formats_and_intermediates_only(family):
  model = _tiny(family)
  _, maps = model.forward_intermediates(IMAGES)
  last = len(maps) - 1
  for indices, expected in (((-1, 0), [0, last]), (2, [last - 1, last]), ([1], [1])):
    _, taken = model.forward_intermediates(IMAGES, indices)
    assert len(taken) == len(expected)
    jax.tree.map(_close, taken, [maps[i] for i in expected])
  _, nchw = model.forward_intermediates(IMAGES, output_fmt="NCHW")
  jax.tree.map(_close, nchw, [m.transpose(0, 3, 1, 2) for m in maps])
  _, nlc = model.forward_intermediates(IMAGES, output_fmt="NLC")
  jax.tree.map(_close, nlc, [m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps])
  only = model.forward_intermediates(IMAGES, (0, -1), intermediates_only=True)
  jax.tree.map(_close, only, [maps[0], maps[-1]])
  for bad in (0, last + 2, (last + 1,), (-last - 2,), ()):
    with pytest.raises(ValueError, match="indices"):
      model.forward_intermediates(IMAGES, bad)
  with pytest.raises(ValueError, match="output_fmt"):
    model.forward_intermediates(IMAGES, output_fmt="NWHC")


def test_feature_take_indices_is_timm_s_selection_in_stage_order():
  assert feature_take_indices(4) == [0, 1, 2, 3]
  assert feature_take_indices(4, 3) == [1, 2, 3]
  assert feature_take_indices(4, (3, -4, 1, -1)) == [0, 1, 3]


def _batch_stats(model):
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}


@pytest.mark.parametrize("family", ["maxvit", "biformer"])
def test_intermediates_only_stops_after_the_last_stage_taken(family):
  """In training the stages after it would update their BatchNorm statistics."""
  model = nnx.clone(_tiny(family))
  before = _batch_stats(model)
  model.forward_intermediates(IMAGES, (0,), intermediates_only=True, train=True)
  after = _batch_stats(model)
  changed = [path for path in before if not np.array_equal(before[path], after[path])]
  first_stage = {("stem",), ("downsample_layers", 0), ("stages", 0)}  # MaxViT's stem, BiFormer's
  assert changed and all(path[:1] in first_stage or path[:2] in first_stage for path in changed)


@pytest.mark.parametrize("family", TINY)
def test_features_only_returns_the_selected_maps_in_train_and_eval(family):
  model = _tiny(family)
  default = features_only(model)
  assert default.out_indices == ((0, 1, 2) if family == "matvit" else
                                 tuple(range(len(model.feature_info))))
  extractor = features_only(nnx.clone(model), (-1, 0))
  last = len(model.feature_info) - 1
  assert extractor.feature_info == [model.feature_info[0], model.feature_info[last]]
  _, maps = model.forward_intermediates(IMAGES)
  jax.tree.map(_close, extractor(IMAGES), [maps[0], maps[last]])
  reference = nnx.clone(extractor.model)
  trained = extractor(IMAGES, train=True)
  expected = reference.forward_intermediates(IMAGES, (0, last), intermediates_only=True,
                                             train=True)
  jax.tree.map(_close, trained, expected)
  assert np.abs(np.asarray(trained[-1]) - np.asarray(maps[last])).max() > 1e-3
  assert [m.shape[-1] for m in trained] == [i["num_chs"] for i in extractor.feature_info]


def test_create_model_features_only():
  """`create_model(name, features_only=True, out_indices=...)`: the registered backbone as a
  FeatureExtractor of those stages, its maps of the widths and strides feature_info gives."""
  extractor = models.create_model("hornet_tiny_7x7", features_only=True, out_indices=(1, -1),
                                  depths=(1, 1, 1, 1))
  assert isinstance(extractor, FeatureExtractor)
  assert [(i["num_chs"], i["reduction"]) for i in extractor.feature_info] == [(128, 8), (512, 32)]
  maps = jax.eval_shape(lambda x: extractor(x), jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert [m.shape for m in maps] == [(2, 8, 8, 128), (2, 2, 2, 512)]
