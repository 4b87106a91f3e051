"""HorNet: the GF variants' filter sizes, parity with the official code (golden fixtures), the GF
filter's align_corners resize, the converter (CLI, 22K heads), input checks, bfloat16 and drop
path. The official parameter counts are the registry's (tests/test_models.py checks them)."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import eval_shape, load_golden
import models
from models.convert.__main__ import main as convert_main
from models.hornet import (GnConv, HorNet, HorNetBlock, _align_corners_matrix, checkpoint_filter_fn,
                           resize_align_corners)
from models.pretrained import assign_params

SMALL_FIXTURES = ("hornet_custom_7x7_d16", "hornet_custom_gf_d16")


_golden = functools.partial(load_golden, "hornet")  # (spec, state_dict, arrays) of a fixture


def _abstract(model_class=HorNet, **kwargs):
  """The model's structure without initialising its weights (tracing is cheap, eager init is not);
  the drop-path RNG streams, its only other state, are made concrete so that it can run."""
  model = nnx.eval_shape(lambda: model_class(**kwargs, rngs=nnx.Rngs(0)))
  nnx.reseed(model, default=0)
  return model


def _converted(state_dict, **known):
  params, model_class, kwargs = checkpoint_filter_fn(state_dict, **known)
  model = _abstract(model_class, **kwargs)
  assign_params(model, params)
  return model, kwargs


def _nhwc(images):
  return jnp.asarray(images.transpose(0, 2, 3, 1))


@nnx.jit
def _logits(model, x):
  return model(x)


@nnx.jit
def _features(model, x):
  """The official fixture's outputs: stem, each stage's last block, pooled + normed, logits."""
  out = {"feat/downsample_layers.0": model.stem(x)}
  h = out["feat/downsample_layers.0"]
  for s, blocks in enumerate(model.stages):
    h = model.downsamples[s - 1](h) if s else h
    for block in blocks:
      h = block(h)
    out[f"feat/stages.{s}"] = h
  return out | {"feat/norm": model.forward_head(h, pre_logits=True), "logits": model(x)}


def _small_config_bound(reference):
  """Small configs: float noise only (the fixtures' threads-2-vs-1 noise is ~1e-6)."""
  return 1e-4 * max(1.0, np.abs(reference).max())


def _max_diff(actual, reference):
  actual = np.asarray(actual, np.float64)
  actual = actual.transpose(0, 3, 1, 2) if actual.ndim == 4 else actual  # NHWC -> NCHW
  return np.abs(actual - reference).max()


# --- variants -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", models.list_models("hornet_*_gf*"))
def test_gf_filters_are_sized_for_the_variant_resolution(name):
  """Filters on the rFFT grids of the stage 3 and 4 maps at the variant's resolution (one block
  per stage: the filters do not depend on depth)."""
  model = eval_shape(lambda: models.create_model(name, depths=(1, 1, 1, 1)))
  grids = {"gf": ((14, 8), (7, 4)), "gf_384": ((24, 13), (12, 7))}[name.split("_", 2)[-1]]
  for stage, grid in zip(model.stages[2:], grids):
    assert stage[0].gnconv.dwconv.complex_weight.shape == (*grid, sum(stage[0].gnconv.dims) // 2, 2)


def test_gnconv_splits_into_ascending_widths():
  gnconv = nnx.eval_shape(lambda: GnConv(256, 4, rngs=nnx.Rngs(0)))
  assert gnconv.dims == (32, 64, 128, 256)
  assert gnconv.proj_in.kernel.shape == (256, 512)  # pwa 32 + mixed 480 channels
  assert gnconv.dwconv.kernel.shape == (7, 7, 1, 480)
  assert [tuple(pw.kernel.shape) for pw in gnconv.pws] == [(32, 64), (64, 128), (128, 256)]


def test_returned_gates_are_what_each_order_multiplies_in():
  def run(gnconv, x):
    out, gates = gnconv(x, return_gates=True)
    pwa, abc = jnp.split(gnconv.proj_in(x), [4], axis=-1)
    recursion = pwa * gates[0]
    for pw, gate in zip(gnconv.pws, gates[1:]):
      recursion = pw(recursion) * gate
    return out, gates, gnconv(x), gnconv.dwconv(abc) / 3, gnconv.proj_out(recursion)

  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
  out, gates, plain, mixed, recomputed = nnx.jit(run)(GnConv(16, 3, rngs=nnx.Rngs(0)), x)
  assert [g.shape for g in gates] == [(2, 8, 8, 4), (2, 8, 8, 8), (2, 8, 8, 16)]
  np.testing.assert_array_equal(out, plain)
  np.testing.assert_allclose(jnp.concatenate(gates, -1), mixed, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(recomputed, out, rtol=1e-6, atol=1e-7)

  model = nnx.jit(lambda: HorNet(10, base_dim=16, depths=(1, 2, 1, 1), rngs=nnx.Rngs(0)))()
  images = jax.random.normal(jax.random.key(2), (1, 64, 64, 3))
  plain, (features, model_gates) = nnx.jit(lambda m, x: (
      m.forward_features(x), m.forward_features(x, return_gates=True)))(model, images)
  np.testing.assert_array_equal(features, plain)
  assert [len(stage) for stage in model_gates] == [1, 2, 1, 1]
  # stage s: order s + 2 gates of widths 8, 16, ... at 16 / 2^s pixels a side
  for s, stage in enumerate(model_gates):
    side = 16 // 2 ** s
    assert [g.shape for g in stage[-1]] == [(1, side, side, 8 * 2 ** k) for k in range(s + 2)]


# --- parity with the official code ----------------------------------------------------------------

@pytest.mark.parametrize("name", [*SMALL_FIXTURES, "hornet_tiny_7x7_224"])
def test_golden_parity_of_features_and_logits(name):
  spec, state_dict, arrays = _golden(name)
  model, kwargs = _converted(state_dict)
  outputs = _features(model, _nhwc(arrays["input"]))
  reference_keys = [k for k in outputs if k in arrays]
  assert len(reference_keys) >= 6
  for key in reference_keys:
    ref = arrays[key]
    # full size: HorNet-T multiplies O(1) gates, its threads-2-vs-1 noise reaches 4e-5 relative
    bound = _small_config_bound(ref) if name in SMALL_FIXTURES else 1e-3 * np.abs(ref).max()
    assert _max_diff(outputs[key], ref) <= bound, key
  assert _max_diff(outputs["logits"], arrays["logits"]) <= _small_config_bound(arrays["logits"])
  if name == "hornet_custom_gf_d16":
    # The filters were built for 224 (grids 14x8, 7x4); this input's stage maps are 4x6 and 2x3
    # (odd width), so the official forward resized them: parity covers the resize and irfft2's s.
    assert kwargs["global_filter_sizes"] == (None, None, (14, 8), (7, 4))
    assert outputs["feat/stages.2"].shape[1:3] == (4, 6)
    assert outputs["feat/stages.3"].shape[1:3] == (2, 3)


# --- the GF filter's resize -----------------------------------------------------------------------

def test_align_corners_resize_against_hand_computed_values():
  x = np.array([[1.0, 2.0, 4.0], [3.0, 5.0, 9.0]], np.float32)[..., None, None]  # [2, 3, C=1, 1]
  # rows 2 -> 4 sample at 0, 1/3, 2/3, 1; columns 3 -> 2 at 0 and 2 (the end pixels)
  expected = np.array([[1.0, 4.0], [1 + 2 / 3, 4 + 5 / 3], [1 + 4 / 3, 4 + 10 / 3], [3.0, 9.0]])
  resized = resize_align_corners(jnp.asarray(x), (4, 2))
  assert resized.shape == (4, 2, 1, 1)
  np.testing.assert_allclose(resized[..., 0, 0], expected, atol=1e-6)
  # 2x2 -> 3x3 puts the midpoints between the corners
  corners = jnp.asarray([[0.0, 1.0], [2.0, 3.0]])
  np.testing.assert_allclose(resize_align_corners(corners, (3, 3)),
                             [[0, 0.5, 1], [1, 1.5, 2], [2, 2.5, 3]], atol=1e-6)
  np.testing.assert_allclose(_align_corners_matrix(5, 1), [[1, 0, 0, 0, 0]])  # one sample: pixel 0
  # jax.image.resize samples at half-pixel centres: a different resize
  half_pixel = jax.image.resize(jnp.asarray(x[..., 0, 0]), (4, 2), "linear")
  assert np.abs(half_pixel - expected).max() > 0.1


# --- the converter --------------------------------------------------------------------------------

def test_safetensors_round_trip_through_the_cli(tmp_path):
  from safetensors.numpy import save_file
  _, state_dict, arrays = _golden("hornet_custom_gf_d16")
  save_file(state_dict, tmp_path / "official.safetensors")
  assert convert_main(["hornet", f"{tmp_path}/official.safetensors", f"{tmp_path}/zoo"]) == 0
  info = json.loads((tmp_path / "zoo" / "model.json").read_text())
  assert info["family"] == "hornet" and info["class"] == "HorNet"
  kwargs = info["kwargs"]
  assert (kwargs["num_classes"], kwargs["base_dim"], kwargs["depths"]) == (10, 16, [1, 1, 2, 1])
  model = models.load_pretrained(_abstract(**kwargs), tmp_path / "zoo")
  logits = _logits(model, _nhwc(arrays["input"]))
  assert _max_diff(logits, arrays["logits"]) <= _small_config_bound(arrays["logits"])


def _with_22k_head(state_dict, classes=21841, seed=0):
  """The state_dict with a 22K head whose first rows are the original head's."""
  head = np.random.default_rng(seed).normal(0, 0.02, (classes, state_dict["head.weight"].shape[1]))
  head[:len(state_dict["head.weight"])] = state_dict["head.weight"]
  bias = np.zeros(classes)
  bias[:len(state_dict["head.bias"])] = state_dict["head.bias"]
  return state_dict | {"head.weight": head.astype(np.float32), "head.bias": bias.astype(np.float32)}


def test_22k_head_converts_to_a_21841_class_model(tmp_path):
  _, state_dict, arrays = _golden("hornet_custom_gf_d16")
  state_dict = _with_22k_head(state_dict)
  # a num_classes of 1000 (a registered variant's default) gives way to the checkpoint's head
  model, kwargs = _converted(state_dict, num_classes=1000)
  assert kwargs["num_classes"] == 21841 and model.head.kernel.shape == (128, 21841)
  logits = _logits(model, _nhwc(arrays["input"]))
  assert logits.shape == (2, 21841)
  assert _max_diff(logits[:, :10], arrays["logits"]) <= _small_config_bound(arrays["logits"])
  # fine-tuning: the official file straight into a 10-class model, the body loaded, the head kept
  from safetensors.numpy import save_file
  save_file(state_dict, tmp_path / "in22k.safetensors")
  fresh = _abstract(**(kwargs | {"num_classes": 10}))
  fresh.head.kernel.set_value(jnp.full((128, 10), 0.5))  # (an abstract param: no item assignment)
  models.load_pretrained(fresh, tmp_path / "in22k.safetensors", dont_load=("head/.*",))
  np.testing.assert_array_equal(fresh.head.kernel[...], 0.5)
  np.testing.assert_array_equal(fresh.norm.scale[...], state_dict["norm.weight"])


def test_registered_variant_with_a_22k_checkpoint_and_conflicting_variants():
  _, state_dict, _ = _golden("hornet_tiny_7x7_224")
  params, _, kwargs = checkpoint_filter_fn(_with_22k_head(state_dict),
                                           **models.model_info("hornet_tiny_7x7").defaults)
  assert kwargs["num_classes"] == 21841 and params["head"]["kernel"].shape == (512, 21841)
  assert kwargs["drop_path_rate"] == 0.2  # the variant's other settings pass through
  with pytest.raises(ValueError, match=r"global_filter_sizes=.*checkpoint has \(None, None, None"):
    checkpoint_filter_fn(state_dict, **models.model_info("hornet_tiny_gf").defaults)
  with pytest.raises(ValueError, match="base_dim=96, the checkpoint has 64"):
    checkpoint_filter_fn(state_dict, **models.model_info("hornet_small_7x7").defaults)


def test_converter_reports_bad_state_dicts():
  _, state_dict, _ = _golden("hornet_custom_7x7_d16")
  broken = dict(state_dict)
  del broken["stages.2.1.gnconv.pws.0.bias"]
  broken["stages.0.0.pwconv1.weight"] = np.zeros((10, 16), np.float32)
  with pytest.raises(ValueError, match=r"(?s)missing: stages.2.1.gnconv.pws.0.bias.*mis-shaped: "
                                       r"stages.0.0.pwconv1.weight expected \(64, 16\)"):
    checkpoint_filter_fn(broken)
  with pytest.raises(ValueError, match="not a HorNet classifier state_dict"):
    checkpoint_filter_fn({"backbone.norm3.weight": np.zeros(4)})


# --- API, input checks, dtypes, drop path ---------------------------------------------------------

def test_head_api_and_reset_classifier():
  _, state_dict, arrays = _golden("hornet_custom_7x7_d16")
  model, kwargs = _converted(state_dict)
  features = _nhwc(arrays["feat/stages.3"])  # what forward_features returns (see the parity test)
  pooled = model.forward_head(features, pre_logits=True)
  assert _max_diff(pooled, arrays["feat/norm"]) <= _small_config_bound(arrays["feat/norm"])
  model.reset_classifier(7, rngs=nnx.Rngs(1))
  assert model.num_classes == 7 and model.forward_head(features).shape == (2, 7)
  np.testing.assert_array_equal(model.head.bias[...], 0.0)
  assert 0.01 < np.std(np.asarray(model.head.kernel[...])) < 0.03  # the official init: std 0.02
  model.reset_classifier(0)
  assert model.head is None
  np.testing.assert_array_equal(model.forward_head(features), pooled)
  headless = _abstract(**(kwargs | {"num_classes": 0}))
  assert models.count_params(model) == models.count_params(headless)


@pytest.mark.parametrize("shape, dtype, message", [
    ((64, 64, 3), jnp.float32,
     r"HorNet expects images \[batch, height, width, 3\] \(NHWC\), got shape \(64, 64, 3\)"),
    ((1, 3, 64, 64), jnp.float32, r"got shape \(1, 3, 64, 64\)"),
    ((1, 64, 64, 3), jnp.int32, "HorNet expects floating-point images, got dtype int32"),
    ((1, 64, 80, 3), jnp.float32, r"multiples of 32 \(the total stride\), got 64x80"),
])
def test_rejects_bad_images(shape, dtype, message):
  model = _abstract(base_dim=16, depths=(1, 1, 1, 1), num_classes=10)
  with pytest.raises(ValueError, match=message):
    model(jnp.zeros(shape, dtype))


def test_rejects_bad_settings():
  with pytest.raises(ValueError, match="forward_head expects features"):
    _abstract(base_dim=16, depths=(1, 1, 1, 1)).forward_head(jnp.zeros((2, 64)))
  with pytest.raises(ValueError, match="divisible by 2\\^\\(order - 1\\).*dim=24, order=5"):
    GnConv(24, 5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="one entry per stage"):
    HorNet(depths=(1, 1, 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_classes must be >= 0"):
    _abstract(base_dim=16, depths=(1, 1, 1, 1)).reset_classifier(-1)


def test_bfloat16_compute_stays_close_to_float32():
  _, state_dict, arrays = _golden("hornet_custom_gf_d16")
  params, model_class, kwargs = checkpoint_filter_fn(state_dict)
  model = _abstract(**kwargs, dtype=jnp.bfloat16)
  assign_params(model, params)
  assert model.stages[3][0].gnconv.dwconv.complex_weight.dtype == jnp.float32  # param_dtype stays
  logits = _logits(model, _nhwc(arrays["input"]))
  assert logits.dtype == jnp.bfloat16
  ref = arrays["logits"]
  assert _max_diff(logits, ref) <= 0.05 * np.abs(ref).max()  # measured: 1.3% (bfloat16 rounding)


def test_drop_path_drops_whole_branches_per_sample_only_in_training():
  block = nnx.jit(lambda: HorNetBlock(16, 2, drop_path=0.5, layer_scale_init_value=1.0,
                                      rngs=nnx.Rngs(0)))()
  run = nnx.jit(lambda block, x, train: block(x, train=train), static_argnums=2)
  x = jax.random.normal(jax.random.key(1), (64, 4, 4, 16))

  def unchanged(y):
    return np.all(np.asarray(y) == np.asarray(x), axis=(1, 2, 3))

  np.testing.assert_array_equal(run(block, x, False), run(block, x, False))
  assert not unchanged(run(block, x, False)).any()
  dropped = unchanged(run(block, x, True))
  assert 4 <= dropped.sum() <= 32  # both branches dropped: P = 1/4 per sample
  assert (dropped != unchanged(run(block, x, True))).any()  # new masks on every call
