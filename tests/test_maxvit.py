"""MaxViT: the published variants, parity with timm and the official TF code (golden fixtures),
converters (timm .safetensors through the CLI, TF variable names), input checks, the
relative-position table resize, partitions, BatchNorm statistics and stochastic depth in
training. The official parameter counts are the registry's (tests/test_models.py checks them)."""
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from conftest import eval_shape, load_golden
import models
from models.convert.__main__ import main as convert_main
from models.maxvit import (MaxViT, PartitionTransformer, RelPosAttention, block_partition,
                           block_unpartition, checkpoint_filter_fn, grid_partition,
                           grid_unpartition, read_tf_checkpoint, resize_rel_pos_table,
                           tf_variable_names)
from models.pretrained import assign_params

SMALL_FIXTURES = ("maxvit_custom_tf_d32", "maxvit_custom_tf_d32_w4")
FULL_FIXTURES = ("maxvit_tiny_tf_224", "maxvit_tiny_tf_official_224")
# Two stages, window 2: inputs are multiples of 16; cheap to build and compile.
SMALL = dict(embed_dims=(32, 64), depths=(1, 1), stem_widths=(16, 16), num_classes=5,
             window_size=2)
WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


_golden = functools.partial(load_golden, "maxvit")  # (spec, state_dict, arrays) of a fixture


@functools.cache
def _abstract(name=None, **kwargs):
  """A registered variant (or MaxViT(**kwargs)) from nnx.eval_shape: structure, shapes, no init."""
  if name is not None:
    return eval_shape(lambda: models.create_model(name, **kwargs))
  return eval_shape(lambda: MaxViT(**kwargs, rngs=nnx.Rngs(0)))


def _fresh_rng_leaf(leaf):
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.random.key(0)
  return jnp.zeros(leaf.shape, leaf.dtype)


def _with_weights(abstract_model, params):
  """A copy of an abstract model holding `params` (and batch statistics), without paying for a
  random init: fresh RNG streams, then the weights."""
  model = nnx.clone(abstract_model)
  nnx.update(model, jax.tree.map(_fresh_rng_leaf, nnx.state(model, nnx.RngState)))
  assign_params(model, params)
  return model


def _hashable(kwargs):
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


@functools.cache
def _golden_model(name):
  _, state_dict, _ = _golden(name)
  params, model_class, kwargs = checkpoint_filter_fn(state_dict)
  assert model_class is MaxViT
  # Both full-size fixtures are maxvit_tiny_tf_224: one abstract build and one compile for both.
  if name in FULL_FIXTURES:
    return _with_weights(_abstract("maxvit_tiny_tf_224"), params), kwargs
  return _with_weights(_abstract(**_hashable(kwargs)), params), kwargs


def _images(arrays):
  x = arrays["input"]
  return jnp.asarray(x if x.shape[-1] == 3 else x.transpose(0, 2, 3, 1))  # timm's are NCHW


@nnx.jit
def _features(model, images):
  """Stem, every stage, pooled + normed features, pre-logits and logits in one compiled call."""
  x = stem = model.stem(images)
  stages = []
  for stage in model.stages:
    x = stage(x)
    stages.append(x)
  return {"stem": stem, "stages": stages, "normed": model.head.norm(x.mean(axis=(1, 2))),
          "pre_logits": model.forward_head(x, pre_logits=True), "logits": model.forward_head(x)}


_eval = nnx.jit(lambda model, images: model(images))


@nnx.jit
def _train_step(model, images):
  """Loss and grads in training mode (batch statistics, drop-path); moves the running statistics."""
  return nnx.value_and_grad(lambda m: jnp.mean(m(images, train=True) ** 2))(model)


def _max_diff(actual, reference):
  return float(np.abs(np.asarray(actual, np.float64) - reference).max())


# --- variants -------------------------------------------------------------------------------------

# The official TF variants' BatchNorm running statistics (floats, not parameters; spec 2.3).
BN_STATISTICS = {"tiny": 47_616, "small": 71_296, "base": 147_328, "large": 196_608,
                 "xlarge": 294_912}


def test_every_published_variant_is_registered():
  sizes, resolutions = BN_STATISTICS, (224, 384, 512)
  expected = sorted(f"maxvit_{s}_tf_{r}" for s in sizes for r in resolutions)
  assert models.list_models("maxvit*") == expected
  info = models.model_info("maxvit_tiny_tf_384")
  assert info.paper_metric == "top-1 85.24" and info.defaults["img_size"] == 384
  assert models.model_info("maxvit_large_tf_224").defaults["drop_path_rate"] == 0.6


# Tracing every initializer: B, L and XL take 3-6 s each on 2 cores.
@pytest.mark.parametrize("size", [
    "tiny", "small", *(pytest.param(s, marks=pytest.mark.slow) for s in ("base", "large",
                                                                            "xlarge"))])
def test_batchnorm_statistics_at_224_equal_the_official(size):
  model = _abstract(f"maxvit_{size}_tf_224")
  stats = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
  assert stats == BN_STATISTICS[size]


def test_tables_at_384_in_the_timm_and_the_tf_layouts():
  """The registry's count at 384 is timm's, whose tables are 23 x 23; TF stores 13 x 13 tables at
  every resolution, so its count is the one at 224."""
  model = _abstract("maxvit_tiny_tf_384")
  tables = [v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if path[-1] == "rel_pos_table"]
  assert len(tables) == 22 and {t.shape[1:] for t in tables} == {(23, 23)}
  tf_tables = sum(t.shape[0] * 13 * 13 for t in tables)
  assert (models.count_params(model) - sum(t.size for t in tables) + tf_tables
          == models.model_info("maxvit_tiny_tf_224").num_params)


def test_drop_path_follows_the_tf_schedule():
  model = _abstract("maxvit_tiny_tf_224")  # rate 0.2 over 11 blocks
  rates = [(b.mbconv.drop_path.rate, b.block_attn.drop_path.rate, b.grid_attn.drop_path.rate)
           for stage in model.stages for b in stage.blocks]
  np.testing.assert_allclose(rates, [[0.2 * i / 11] * 3 for i in range(11)], rtol=0, atol=1e-12)


# --- parity with the official code ----------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL_FIXTURES + FULL_FIXTURES)
def test_golden_parity_logits_and_stage_features(name):
  _, _, arrays = _golden(name)
  model, _ = _golden_model(name)
  out = _features(model, _images(arrays))
  actual = {"logits": out["logits"]}
  if "feat/stage_1" in arrays:  # the official TF fixture: NHWC, stage_1..4, normed features
    actual |= {f"feat/stage_{i + 1}": x for i, x in enumerate(out["stages"])}
    actual["feat/normed_features"] = out["normed"]
  else:  # timm: NCHW
    actual |= {f"feat/stages.{i}": x.transpose(0, 3, 1, 2) for i, x in enumerate(out["stages"])}
    actual["feat/head.pre_logits"] = out["pre_logits"]
  if "feat/stem" in arrays:
    actual["feat/stem"] = out["stem"].transpose(0, 3, 1, 2)
  assert actual.keys() == {k for k in arrays if k.startswith("feat/")} | {"logits"}
  for key, value in actual.items():
    ref = arrays[key]
    if name in SMALL_FIXTURES:
      tolerance = 1e-4 * max(1.0, np.abs(ref).max())
    else:
      tolerance = 1e-3 * np.abs(ref).max()
    assert _max_diff(value, ref) <= tolerance, (key, _max_diff(value, ref))


def test_bfloat16_compute_stays_close_to_float32():
  _, _, arrays = _golden("maxvit_custom_tf_d32")
  model, kwargs = _golden_model("maxvit_custom_tf_d32")
  abstract16 = _abstract(**_hashable(kwargs), dtype=jnp.bfloat16)
  model16 = _with_weights(abstract16, nnx.to_pure_dict(nnx.state(model, WEIGHTS)))
  logits16 = _eval(model16, _images(arrays))
  assert logits16.dtype == jnp.bfloat16
  ref = arrays["logits"]
  assert _max_diff(logits16, ref) <= 0.05 * np.abs(ref).max()


# --- converters -----------------------------------------------------------------------------------

def test_safetensors_round_trip_through_the_cli(tmp_path):
  from safetensors.numpy import save_file
  _, state_dict, _ = _golden("maxvit_custom_tf_d32")
  official = tmp_path / "official.safetensors"
  save_file(state_dict, official)
  assert convert_main(["maxvit", str(official), str(tmp_path / "zoo")]) == 0
  info = json.loads((tmp_path / "zoo" / "model.json").read_text())
  assert info["family"] == "maxvit" and info["class"] == "MaxViT"
  kwargs = info["kwargs"]
  assert kwargs["embed_dims"] == [32, 64, 96, 128] and kwargs["depths"] == [1, 1, 2, 1]
  assert kwargs["window_size"] == 2 and kwargs["num_classes"] == 10
  reference = dict(nnx.to_flat_state(nnx.state(_golden_model("maxvit_custom_tf_d32")[0], WEIGHTS)))
  for source in (tmp_path / "zoo", official):  # the converted directory; converted on the fly
    model = nnx.clone(_abstract(**_hashable(kwargs)))
    models.load_pretrained(model, source)  # params and batch statistics
    loaded = dict(nnx.to_flat_state(nnx.state(model, WEIGHTS)))
    assert loaded.keys() == reference.keys()
    for path, value in loaded.items():
      np.testing.assert_array_equal(value[...], reference[path][...])


def test_cli_with_a_registered_variant_reports_mismatches(tmp_path, capsys):
  from safetensors.numpy import save_file
  _, state_dict, _ = _golden("maxvit_custom_tf_d32")
  save_file(state_dict, tmp_path / "official.safetensors")
  assert convert_main(["maxvit", str(tmp_path / "official.safetensors"), str(tmp_path / "zoo"),
                       "--model", "maxvit_tiny_tf_224"]) == 1
  err = capsys.readouterr().err
  assert "mis-shaped: stem.conv1.weight expected (64, 3, 3, 3), got (16, 3, 3, 3)" in err
  assert "missing: stages.0.blocks.1.conv.pre_norm.weight (64,)" in err


def test_converter_lists_missing_unexpected_and_misshaped_keys():
  _, state_dict, _ = _golden("maxvit_custom_tf_d32")
  broken = dict(state_dict)
  del broken["stages.1.blocks.0.attn_grid.mlp.fc2.bias"]
  broken["stages.1.blocks.0.attn_grid.extra"] = np.zeros(3, np.float32)
  broken["stages.2.blocks.1.conv.se.fc1.bias"] = np.zeros(7, np.float32)
  with pytest.raises(ValueError, match="3 problems") as info:
    checkpoint_filter_fn(broken)
  message = str(info.value)
  assert "missing: stages.1.blocks.0.attn_grid.mlp.fc2.bias (64,)" in message
  assert "unexpected: stages.1.blocks.0.attn_grid.extra (3,)" in message
  assert "mis-shaped: stages.2.blocks.1.conv.se.fc1.bias expected (24,), got (7,)" in message
  with pytest.raises(ValueError, match="not a timm MaxViT state_dict"):
    checkpoint_filter_fn({"head.weight": np.zeros((10, 4), np.float32)})


def test_tf_layout_mapping():
  _, state_dict, _ = _golden("maxvit_tiny_tf_official_224")
  params, _, kwargs = checkpoint_filter_fn(state_dict)
  assert (kwargs["window_size"], kwargs["img_size"], kwargs["num_classes"]) == (7, 224, 1000)
  block, tf = params["stages"][1]["blocks"][0], "maxvit/block_01_00/"
  qkv = block["grid_attn"]["attn"]["qkv"]["kernel"].reshape(128, 3, 4, 32)  # (in, (3, heads, 32))
  for i, p in enumerate("qkv"):  # attention_1: the grid branch
    np.testing.assert_array_equal(qkv[:, i], state_dict[f"{tf}attention_1/{p}/weight:0"])
  np.testing.assert_array_equal(block["grid_attn"]["attn"]["proj"]["kernel"],
                                state_dict[f"{tf}attention_1/o/weight:0"].reshape(128, 128))
  depthwise = state_dict[f"{tf}mbconv/depthwise_conv/depthwise_kernel:0"]  # (3, 3, C, 1)
  np.testing.assert_array_equal(block["mbconv"]["depthwise"]["kernel"][:, :, 0, :],
                                depthwise[:, :, :, 0])
  np.testing.assert_array_equal(block["mbconv"]["shortcut"]["kernel"],
                                state_dict[f"{tf}mbconv/shortcut_conv/kernel:0"][0, 0])
  np.testing.assert_array_equal(block["mbconv"]["pre_norm"]["var"],
                                state_dict[f"{tf}mbconv/pre_norm/moving_variance:0"])


def test_converter_takes_a_registered_variants_settings():
  _, state_dict, _ = _golden("maxvit_tiny_tf_224")  # timm layout
  defaults = models.model_info("maxvit_tiny_tf_224").defaults
  params, _, kwargs = checkpoint_filter_fn(state_dict, **defaults)
  assert kwargs == {**defaults, "in_chans": 3, "head_hidden_size": 512, "window_size": 7}
  assign_params(nnx.clone(_abstract("maxvit_tiny_tf_224")), params)  # what the CLI does


def test_tf_variable_names_prefer_ema_and_drop_scopes_and_slots():
  ema = "/ExponentialMovingAverage"
  names = ["maxvit/stem/conv_0/kernel", f"maxvit/stem/conv_0/kernel{ema}",
           f"maxvit/block_00_00/mbconv/pre_norm/moving_mean{ema}",
           "maxvit/block_00_00/mbconv/pre_norm/moving_mean",
           "maxvit/block_00_00/attention/q/weight/Adam", "global_step",
           "maxvit/cls_head/logit_dense/bias", "maxvit/final_layer_norm/gamma:0"]
  assert tf_variable_names(names) == {
      "conv_0/kernel": f"maxvit/stem/conv_0/kernel{ema}",
      "block_00_00/mbconv/pre_norm/moving_mean": f"maxvit/block_00_00/mbconv/pre_norm/moving_mean"
                                                 f"{ema}",
      "logit_dense/bias": "maxvit/cls_head/logit_dense/bias",
      "final_layer_norm/gamma": "maxvit/final_layer_norm/gamma:0"}


def test_reading_a_tf_checkpoint_without_tensorflow_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
  with pytest.raises(ImportError, match=r"needs TensorFlow \(pip install tensorflow-cpu\)"):
    read_tf_checkpoint(tmp_path / "ckpt")


# --- relative-position tables at other resolutions ------------------------------------------------

def _tf_bilinear(table: np.ndarray, size: int) -> np.ndarray:
  """tf.image.resize(bilinear) by its definition: half-pixel centres, edges clamped, no
  antialiasing; separable over the two table axes."""
  src = table.shape[-1]
  pos = np.clip((np.arange(size) + 0.5) * src / size - 0.5, 0, src - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, src - 1)
  frac = pos - lo
  rows = table[:, lo] * (1 - frac)[None, :, None] + table[:, hi] * frac[None, :, None]
  return rows[:, :, lo] * (1 - frac) + rows[:, :, hi] * frac


@pytest.mark.parametrize("src, size", [(13, 23), (13, 31), (7, 5)])
def test_table_resize_is_tf_bilinear(src, size):
  table = np.random.default_rng(0).normal(size=(3, src, src)).astype(np.float32)
  resized = resize_rel_pos_table(table, size)
  assert isinstance(resized, np.ndarray) and resized.shape == (3, size, size)
  # float32 interpolation weights against a float64 reference
  np.testing.assert_allclose(resized, _tf_bilinear(table, size), rtol=0, atol=1e-5)
  if size > src:  # upsampling: jax.image.resize's default antialiasing plays no part
    expected = jax.image.resize(table, (3, size, size), "linear")
    np.testing.assert_allclose(resized, expected, rtol=0, atol=1e-6)


def test_converter_brings_tables_to_the_target_size():
  _, state_dict, _ = _golden("maxvit_tiny_tf_official_224")
  table = state_dict["maxvit/block_02_03/attention_1/relative_bias:0"]  # 13 x 13 in every TF ckpt
  params, _, kwargs = checkpoint_filter_fn(state_dict, img_size=384)
  assert kwargs["window_size"] == 12
  converted = params["stages"][2]["blocks"][3]["grid_attn"]["attn"]["rel_pos_table"]
  np.testing.assert_allclose(converted, jax.image.resize(table, (8, 23, 23), "linear"), rtol=0,
                             atol=1e-6)
  params, _, _ = checkpoint_filter_fn(state_dict, img_size=384, rel_pos_size=13)  # TF's layout
  converted = params["stages"][2]["blocks"][3]["grid_attn"]["attn"]["rel_pos_table"]
  np.testing.assert_array_equal(converted, table)


@functools.cache
def _attention():
  """RelPosAttention with TF's init: stores 5 x 5 tables, attends in 4 x 4 windows (7 x 7 bias)."""
  return RelPosAttention(64, window=4, rel_pos_size=5, rngs=nnx.Rngs(0))


def test_init_is_tf_normal_002_with_zero_biases():
  attn = _attention()
  for kernel in (attn.qkv.kernel, attn.proj.kernel, attn.rel_pos_table):
    assert abs(float(jnp.std(kernel[...])) - 0.02) < 2e-3
    assert abs(float(jnp.mean(kernel[...]))) < 2e-3
  assert not np.any(attn.qkv.bias[...]) and not np.any(attn.proj.bias[...])


def test_stored_table_is_resized_on_the_fly_like_a_pre_resized_one():
  stored = nnx.clone(_attention())
  table = np.random.default_rng(0).normal(size=(2, 5, 5)).astype(np.float32)  # O(1), as trained
  stored.rel_pos_table[...] = table
  pre_resized = nnx.clone(stored)
  pre_resized.rel_pos_table = nnx.Param(jax.image.resize(table, (2, 7, 7), "linear"))
  x = jax.random.normal(jax.random.key(0), (3, 16, 64))
  out = np.asarray(stored(x))
  assert _max_diff(pre_resized(x), out) <= 1e-6 * np.abs(out).max()
  pre_resized.rel_pos_table[...] = np.pad(table, ((0, 0), (1, 1), (1, 1)))  # another bias shows
  assert _max_diff(pre_resized(x), out) > 1e-2 * np.abs(out).max()


# --- partitions, inputs, attention implementation -------------------------------------------------

def test_block_and_grid_partitions():
  b, h, w, p = 2, 8, 12, 4
  x = jnp.arange(b * h * w * 2, dtype=jnp.float32).reshape(b, h, w, 2)
  blocks, grids = block_partition(x, p), grid_partition(x, p)
  assert blocks.shape == grids.shape == (b * (h // p) * (w // p), p * p, 2)
  np.testing.assert_array_equal(block_unpartition(blocks, p, x.shape), x)
  np.testing.assert_array_equal(grid_unpartition(grids, p, x.shape), x)
  # window 1 of image 0 is the p x p block right of the top-left one, tokens row-major
  np.testing.assert_array_equal(blocks[1].reshape(p, p, 2), x[0, :p, p:2 * p])
  # grid group (1, 2) of image 0 gathers the tokens (i * h/p + 1, j * w/p + 2): strides h/p, w/p
  np.testing.assert_array_equal(grids[1 * (w // p) + 2].reshape(p, p, 2),
                                x[0, 1::h // p, 2::w // p])


@pytest.mark.parametrize("shape, dtype, message", [
    ((2, 24, 32, 3), jnp.float32, r"MaxViT expects height and width that are multiples of 16 "
                                  r"\(2\^3 x window 2; the official code does not pad\), got 24x32"),
    ((2, 32, 48, 3), jnp.float32, None),
    ((2, 32, 32, 1), jnp.float32,
     r"images \[batch, height, width, 3\] \(NHWC\), got shape \(2, 32, 32, 1\)"),
    ((32, 32, 3), jnp.float32, r"got shape \(32, 32, 3\)"),
    ((2, 32, 32, 3), jnp.int32, "floating-point images, got dtype int32"),
])
def test_inputs_of_the_wrong_size_rank_channels_or_dtype_are_refused(shape, dtype, message):
  model = _abstract(**SMALL)
  images = jax.ShapeDtypeStruct(shape, dtype)
  if message is None:  # any multiple of 16 in each direction is fine
    features = nnx.eval_shape(lambda m, x: m.forward_features(x), model, images)
    assert features.shape == (2, 4, 6, 64)
    return
  with pytest.raises(ValueError, match=message):
    model(images)


def test_constructor_refuses_inconsistent_settings():
  with pytest.raises(ValueError, match=r"embed_dims=\(32, 64\), depths=\(1,\)"):
    MaxViT(embed_dims=(32, 64), depths=(1,), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"two stem conv widths, got \(16,\)"):
    MaxViT(stem_widths=(16,), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"window_size must be >= 1, got 0 \(img_size=16\)"):
    MaxViT(img_size=16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="multiple of head_dim=32, got 48"):
    RelPosAttention(48, window=2, rel_pos_size=3, rngs=nnx.Rngs(0))


def test_attn_implementation_reaches_window_attention():
  attn = nnx.clone(_attention())
  x = jax.random.normal(jax.random.key(0), (3, 16, 64))
  default = attn(x)
  attn.implementation = "xla"
  np.testing.assert_array_equal(attn(x), default)
  attn.implementation = "bogus"
  with pytest.raises(ValueError, match="expected implementation in"):
    attn(x)
  model = _abstract(**SMALL, attn_implementation="xla")
  assert {b.grid_attn.attn.implementation for s in model.stages for b in s.blocks} == {"xla"}


# --- training mode --------------------------------------------------------------------------------

def _random_weights(abstract_model, seed=0):
  """Params ~ N(0, 0.2) and running statistics (variances in [0.5, 1.5]) for a model."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract_model, WEIGHTS)))
  return traverse_util.unflatten_dict({
      k: (rng.uniform(0.5, 1.5, v.shape) if k[-1] == "var" else rng.normal(0, 0.2, v.shape))
      .astype(np.float32) for k, v in flat.items()})


def test_a_train_step_updates_batch_statistics_and_draws_drop_paths():
  abstract = _abstract(**SMALL, drop_path_rate=0.5)
  model = _with_weights(abstract, _random_weights(abstract))
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  before = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  conv1 = np.asarray(model.stem.conv1(x), np.float64)
  eval_before = _eval(model, x)

  loss1, grads = _train_step(model, x)
  after = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  # TF's momentum 0.99 towards the batch statistics (biased variance) the stem BN normalises with
  for stat, batch in (("mean", conv1.mean(axis=(0, 1, 2))), ("var", conv1.var(axis=(0, 1, 2)))):
    key = ("stem", "norm1", stat)
    np.testing.assert_allclose(after[key], 0.99 * before[key] + 0.01 * batch, rtol=1e-5,
                               atol=1e-6)
  assert len(after) == 2 * 7 and all(np.abs(after[k] - before[k]).max() > 1e-4 for k in after)
  attn_grads = nnx.to_pure_dict(grads)["stages"][1]["blocks"][0]["grid_attn"]["attn"]
  assert np.abs(attn_grads["rel_pos_table"]).max() > 0
  # a second step on the same batch draws new drop-path masks (rate 0.5): another loss
  loss2, _ = _train_step(model, x)
  assert abs(float(loss1) - float(loss2)) > 1e-4 * abs(float(loss1))
  # eval mode reads the moved running statistics, deterministically
  eval_after = _eval(model, x)
  assert _max_diff(eval_after, np.asarray(eval_before)) > 1e-4
  np.testing.assert_array_equal(eval_after, _eval(model, x))


def test_reset_classifier_and_pre_logits():
  model = nnx.clone(_golden_model("maxvit_custom_tf_d32")[0])
  features = jnp.ones((2, 2, 2, 128))
  assert model.forward_head(features, pre_logits=True).shape == (2, 128)
  model.reset_classifier(7)
  assert model.num_classes == 7 and model.forward_head(features).shape == (2, 7)
  assert not np.any(model.head.fc.bias[...])
  model.reset_classifier(0)
  np.testing.assert_array_equal(model.forward_head(features),
                                model.forward_head(features, pre_logits=True))
  with pytest.raises(ValueError, match=r"feature map \[batch, h, w, 128\], got shape \(2, 128\)"):
    model.forward_head(jnp.ones((2, 128)))


# --- attention weights (forward_with_attention) ---------------------------------------------------

def test_attention_probs_are_the_weights_window_attention_applies():
  attn = _attention()  # 4 x 4 windows, a 5 x 5 table resized to 7 x 7 on the fly
  x = jax.random.normal(jax.random.key(0), (3, 16, 64))
  probs = attn.attention_probs(x)
  assert probs.shape == (3, 2, 16, 16) and probs.dtype == jnp.float32
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=0, atol=1e-6)
  v = attn.qkv(x).reshape(3, 16, 3, 2, 32)[:, :, 2]
  out = attn.proj(jnp.einsum("ghqk,gkhd->gqhd", probs, v).reshape(3, 16, 64))
  np.testing.assert_allclose(out, attn(x), rtol=0, atol=1e-5 * float(jnp.abs(out).max()))


@pytest.mark.parametrize("partition", ["block", "grid"])
def test_attention_probs_layout_names_the_pixels_of_each_group(partition):
  """Rebuilds the attention branch of a layer pixel by pixel from its weights, reading groups and
  tokens as `PartitionTransformer.attention_probs` documents them."""
  p, h, w, dim = 2, 4, 6, 64
  layer = PartitionTransformer(dim, partition=partition, window=p, rel_pos_size=3, drop_path=0.0,
                               implementation=None, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, h, w, dim))
  probs = np.asarray(layer.attention_probs(x))[0]
  assert probs.shape == (h // p, w // p, 2, p * p, p * p)
  v = np.asarray(layer.attn.qkv(layer.norm1(x)))[0].reshape(h, w, 3, 2, 32)[:, :, 2]

  def pixel(group, token):
    (a, b), (u, t) = group, divmod(token, p)
    return (a * p + u, b * p + t) if partition == "block" else (u * (h // p) + a, t * (w // p) + b)

  expected = np.zeros((h, w, 2, 32), np.float32)
  for group in np.ndindex(h // p, w // p):
    for query in range(p * p):
      expected[pixel(group, query)] = sum(
          probs[group][:, query, key, None] * v[pixel(group, key)] for key in range(p * p))
  split, merge = ((block_partition, block_unpartition) if partition == "block"
                  else (grid_partition, grid_unpartition))
  attended = merge(layer.attn(split(layer.norm1(x), p)), p, x.shape)
  np.testing.assert_allclose(layer.attn.proj(expected.reshape(1, h, w, dim)), attended, rtol=0,
                             atol=1e-5)


def test_forward_with_attention_returns_stages_and_every_attention():
  _, _, arrays = _golden("maxvit_custom_tf_d32")
  model, _ = _golden_model("maxvit_custom_tf_d32")
  images = _images(arrays)
  stages, probs = nnx.jit(lambda m, x: m.forward_with_attention(x))(model, images)
  reference = _features(model, images)
  for actual, expected in zip(stages, reference["stages"], strict=True):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)
  # depths (1, 1, 2, 1), window 2 on maps of 16, 8, 4, 2; heads = width / 32
  shapes = {f"stages.{s}.blocks.{b}.{kind}": (2, side // 2, side // 2, heads, 4, 4)
            for s, (depth, side, heads) in enumerate(zip((1, 1, 2, 1), (16, 8, 4, 2),
                                                         (1, 2, 3, 4)))
            for b in range(depth) for kind in ("block_attn", "grid_attn")}
  assert {k: v.shape for k, v in probs.items()} == shapes
  for value in probs.values():
    np.testing.assert_allclose(value.sum(-1), 1.0, rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="multiples of 64"):
    model.forward_with_attention(jnp.ones((1, 32, 32, 3)))


# --- fine-tuning converted weights through the training loop --------------------------------------

@pytest.mark.slow  # the whole loop: converter CLI, train.py with init_from, checkpoint, reload
def test_finetuning_a_converted_checkpoint_loads_the_backbone_and_starts_a_new_head(tmp_path):
  """Official weights (a 7-class head) -> the CLI -> configs/maxvit.py:finetune on digits
  (10 classes) through train.py: the backbone starts from the checkpoint, the head is new."""
  import train
  from configs import maxvit as maxvit_config
  from safetensors.numpy import save_file

  _, state_dict, _ = _golden("maxvit_custom_tf_d32")
  state_dict = dict(state_dict)
  for key in ("head.fc.weight", "head.fc.bias"):
    state_dict[key] = state_dict[key][:7]
  save_file(state_dict, tmp_path / "official.safetensors")
  assert convert_main(["maxvit", str(tmp_path / "official.safetensors"),
                       str(tmp_path / "converted")]) == 0
  kwargs = json.loads((tmp_path / "converted" / "model.json").read_text())["kwargs"]
  assert kwargs["num_classes"] == 7

  config = maxvit_config.get_config("finetune,data=digits,runlocal")
  assert config.init_from.dont_load == ("head/(pre_logits|fc)/.*",)
  config.unlock()
  for key in ("embed_dims", "depths", "stem_widths", "head_hidden_size", "img_size",
              "window_size"):
    config.model[key] = tuple(kwargs[key]) if isinstance(kwargs[key], list) else kwargs[key]
  config.input.image_size = kwargs["img_size"]
  config.init_from.path = str(tmp_path / "converted")
  config.checkpoint.async_save = False
  config.lock()
  lr, steps = config.optimizer.lr, config.total_steps
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert final["steps"] == steps and 0 <= final["test/accuracy"] <= 1

  def params_of(path, num_classes):
    model = nnx.clone(_abstract(**_hashable({**kwargs, "num_classes": num_classes})))
    models.load_pretrained(model, path)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {"/".join(map(str, path)): np.asarray(value) for path, value in flat.items()}

  converted, tuned = params_of(tmp_path / "converted", 7), params_of(tmp_path / "run", 10)
  assert converted.keys() == tuned.keys()
  assert tuned["head/fc/kernel"].shape == (128, 10)
  for key in converted:
    if key.startswith(("head/pre_logits/", "head/fc/")):  # fresh (TF's init), not the checkpoint's
      if tuned[key].shape == converted[key].shape:
        assert np.abs(tuned[key] - converted[key]).max() > 0.01, key
    else:  # the checkpoint's, moved by at most a few Adam steps of size ~lr
      assert np.abs(tuned[key] - converted[key]).max() <= 4 * lr * steps, key
