"""BiFormer: BatchNorm statistics, parity with the official code (golden fixtures: logits, stage
features, routed regions), converter and CLI round trip, auto_pad, input checks, training mode.
The official parameter counts are the registry's (tests/test_models.py checks them)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import eval_shape, load_golden
import models
from models.biformer import BiFormer, BiLevelRoutingAttention, checkpoint_filter_fn
from models.convert.__main__ import main as convert_main
from models.pretrained import assign_params

SMALL = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), num_classes=10)


_golden = functools.partial(load_golden, "biformer")  # (spec, state_dict, arrays) of a fixture


def _converted(name, **overrides):
  _, state_dict, arrays = _golden(name)
  params, model_class, kwargs = checkpoint_filter_fn(state_dict)
  model = model_class(**{**kwargs, **overrides}, rngs=nnx.Rngs(0))
  assign_params(model, params)
  return model, kwargs, arrays


def _small(**overrides):
  # Eager init compiles one program per parameter shape: the first model of the process pays it.
  return BiFormer(**{**SMALL, **overrides}, rngs=nnx.Rngs(0))


@nnx.jit
def _trace(model, x):
  features, routes = model.forward_with_routes(x)
  return model.forward_head(model.norm(features[-1], use_running_average=True)), features, routes


def _nhwc(images):
  return jnp.asarray(images.transpose(0, 2, 3, 1))


def _assert_golden(model, arrays, rel):
  logits, feats, routes = _trace(model, _nhwc(arrays["input"]))
  for key, value in routes.items():           # outputs are only comparable on the same routes
    np.testing.assert_array_equal(np.asarray(value), arrays[f"route_idx/{key}.attn.router"],
                                  err_msg=key)
  for s, feat in enumerate(feats):
    ref = arrays[f"feat/stages.{s}"]
    err = np.abs(np.asarray(feat).transpose(0, 3, 1, 2) - ref).max()
    assert err <= rel * max(1.0, np.abs(ref).max()), (s, err)
  ref = arrays["logits"]
  err = np.abs(np.asarray(logits) - ref).max()
  assert err <= rel * max(1.0, np.abs(ref).max()), err
  return len(routes)


# --- variants -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["biformer_tiny", "biformer_small", "biformer_base"])
def test_batchnorm_statistics_equal_the_official(name):
  model = eval_shape(lambda: models.create_model(name))
  stats = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
  assert stats == {"biformer_base": 4_512}.get(name, 3_008)       # BN means and variances


# --- parity with the official code ----------------------------------------------------------------

def test_golden_small_fixture_logits_features_and_routes():
  model, kwargs, arrays = _converted("biformer_custom_d32")
  assert {k: kwargs[k] for k in SMALL} == SMALL
  assert kwargs["qk_dims"] == SMALL["embed_dims"] and kwargs["topks"] == (1, 4, 16, -2)
  assert _assert_golden(model, arrays, 1e-4) == 4


def test_golden_small_fixture_with_the_pallas_kernel():
  model, _, arrays = _converted("biformer_custom_d32", attn_implementation="pallas")
  assert _assert_golden(model, arrays, 1e-4) == 4


@pytest.mark.slow
def test_golden_biformer_tiny_224():
  model, kwargs, arrays = _converted("biformer_tiny_224")
  assert {k: kwargs[k] for k in SMALL} == dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512),
                                               num_classes=1000)
  assert _assert_golden(model, arrays, 1e-3) == 12


def test_pth_round_trip_through_the_convert_cli(tmp_path):
  """`python -m models.convert biformer official.pth DST` (its main), then load_pretrained."""
  torch = pytest.importorskip("torch")
  _, state_dict, arrays = _golden("biformer_custom_d32")
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
              "epoch": 300}, tmp_path / "official.pth")
  assert convert_main(["biformer", str(tmp_path / "official.pth"), str(tmp_path / "zoo")]) == 0
  assert (tmp_path / "zoo" / "model_state").is_dir()                # BatchNorm statistics
  model = models.load_pretrained(_small(), tmp_path / "zoo")
  logits = nnx.jit(lambda m, x: m(x))(model, _nhwc(arrays["input"]))
  ref = arrays["logits"]
  assert np.abs(np.asarray(logits) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_converter_lists_problems_and_reads_variants():
  _, state_dict, _ = _golden("biformer_custom_d32")
  broken = {k: v for k, v in state_dict.items() if k != "stages.1.0.attn.wo.bias"}
  broken["norm.running_var"] = np.ones(7, np.float32)
  with pytest.raises(ValueError, match=r"(?s)2 problems.*missing: stages.1.0.attn.wo.bias.*"
                                       r"mis-shaped: norm.running_var"):
    checkpoint_filter_fn(broken)
  with pytest.raises(ValueError, match=r"(?s)missing: stages.3.0.attn.qkv.qkv.weight"):
    checkpoint_filter_fn(state_dict, topks=(1, 4, 16, 16))       # stage 4 is not routed
  params, _, kwargs = checkpoint_filter_fn(state_dict, n_win=7)
  assert kwargs["qk_dims"] == (32, 64, 128, 256) and kwargs["mlp_ratios"] == (3, 3, 3, 3)
  np.testing.assert_array_equal(params["stages"][0][0]["attn"]["qkv"]["kernel"],
                                state_dict["stages.0.0.attn.qkv.qkv.weight"].T)
  np.testing.assert_array_equal(params["stages"][0][0]["attn"]["lepe"]["kernel"][:, :, 0, 3],
                                state_dict["stages.0.0.attn.lepe.weight"][3, 0])


# --- padding and inputs ---------------------------------------------------------------------------

def test_auto_pad_pads_the_normed_input_before_qkv_and_crops():
  """The legacy `auto_pad` (matched the official module to 2.4e-7 on a 10x11 map, n_win 4):
  zeros at the bottom and right of the block input, unmasked, output cropped."""
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  padded = BiLevelRoutingAttention(32, 32, 2, 4, 3, auto_pad=True, **kw)
  plain = BiLevelRoutingAttention(32, 32, 2, 4, 3, **kw)
  nnx.update(plain, nnx.state(padded, nnx.Param))
  x = jax.random.normal(jax.random.key(0), (2, 10, 11, 32))
  want = plain(jnp.pad(x, ((0, 0), (0, 2), (0, 1), (0, 0))))[:, :10, :11]
  np.testing.assert_allclose(padded(x), want, atol=1e-6, rtol=0)
  assert padded.routes(x).shape == (2, 16, 3)
  with pytest.raises(ValueError, match=r"divisible by n_win=4, got 10x11"):
    plain(x)


def test_model_input_checks_and_auto_pad_sizes():
  model = _small()
  with pytest.raises(ValueError, match=r"images of 96x96 give stage 1 a 24x24 map, not divisible "
                                       r"by n_win=7 \(use sides that are multiples of 224"):
    model(jnp.zeros((1, 96, 96, 3)))
  with pytest.raises(ValueError, match=r"BiFormer expects images \[batch, height, width, 3\] "
                                       r"\(NHWC\), got shape \(1, 3, 112, 112\)"):
    model(jnp.zeros((1, 3, 112, 112)))
  with pytest.raises(ValueError, match="floating-point images, got dtype int32"):
    model(jnp.zeros((1, 112, 112, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"topks must have one entry per stage \(4\), got \(1, 4\)"):
    BiFormer(topks=(1, 4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"attn_implementation must be one of"):
    BiFormer(attn_implementation="cuda", rngs=nnx.Rngs(0))
  padded = _small(auto_pad=True)
  assert nnx.jit(lambda m, x: m(x))(padded, jnp.ones((1, 96, 80, 3))).shape == (1, 10)


# --- API and training mode ------------------------------------------------------------------------

@nnx.jit
def _api(model, x):
  features = model.forward_features(x)
  return features, model.forward_head(features, pre_logits=True), model(x)


def test_head_api_and_bfloat16_compute():
  model = _small()
  x = jax.random.normal(jax.random.key(1), (2, 112, 112, 3))
  features, pooled, logits = _api(model, x)
  assert features.shape == (2, 4, 4, 256) and pooled.shape == (2, 256) and logits.shape == (2, 10)
  np.testing.assert_allclose(pooled, features.mean(axis=(1, 2)), atol=1e-6, rtol=0)
  low = _small(dtype=jnp.bfloat16)
  nnx.update(low, nnx.state(model))
  low_logits = nnx.jit(lambda m, x: m(x))(low, x)
  assert low_logits.dtype == jnp.bfloat16
  err = np.abs(np.asarray(low_logits, np.float32) - np.asarray(logits)).max()
  assert 0 < err < 0.05 * max(1.0, np.abs(np.asarray(logits)).max())
  model.reset_classifier(5)
  assert model.head.kernel.shape == (256, 5)


def test_train_mode_updates_batch_statistics_and_drops_paths():
  model = _small()
  model.stages[3][0].drop_path.rate = 0.5
  x = jax.random.normal(jax.random.key(2), (2, 112, 112, 3))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  forward = nnx.jit(lambda m, x, train: m(x, train=train), static_argnames="train")
  eval_logits = forward(model, x, False)
  np.testing.assert_array_equal(forward(model, x, False), eval_logits)
  train1, train2 = forward(model, x, True), forward(model, x, True)
  assert np.abs(np.asarray(train1 - train2)).max() > 1e-3           # drop path: fresh masks
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                       nnx.state(model, nnx.BatchStat))
  assert all(jax.tree.leaves(moved))


def test_gradients_reach_every_param():
  """Eval-mode loss with a random cotangent: every param gets a non-zero gradient (through the
  routing attention's q, k, v; the routing indices themselves carry none)."""
  model = _small()
  x = jax.random.normal(jax.random.key(3), (2, 112, 112, 3))
  weights = jax.random.normal(jax.random.key(4), (2, 10))
  grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) * weights)))(model, x)
  norms = {"/".join(map(str, path)): float(jnp.abs(g[...]).max())
           for path, g in nnx.to_flat_state(grads)}
  assert all(np.isfinite(list(norms.values())))
  assert min(norms.values()) > 0, min(norms, key=norms.get)
