"""iTransformer: shapes, parity with the official PyTorch code (golden fixture), input checks, dropout, gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_golden
import models
from models.itransformer import checkpoint_filter_fn, iTransformer, instance_norm
from models.layers import Attention, Block, Dropout, DropPath
from ops import random_bits
from models.pretrained import assign_params

SMALL = dict(seq_len=16, pred_len=8, d_model=32, n_heads=4, e_layers=2, d_ff=64)


def _small(**overrides):
  return iTransformer(**{**SMALL, **overrides}, rngs=nnx.Rngs(0))


def _series(batch=3, length=16, variates=5, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch, length, variates)) * 3 + 7, jnp.float32)


_golden = functools.partial(load_golden, "itransformer", "itransformer_etth1_96")


def _assert_close(actual, reference):
  err = np.abs(np.asarray(actual, np.float64) - reference).max()
  assert err <= 1e-4 * max(1.0, np.abs(reference).max()), err


# --- shapes ---------------------------------------------------------------------------------------------------

def test_forecast_shapes_with_and_without_marks():
  m = _small()
  x = _series()
  assert m(x).shape == (3, 8, 5)
  marks = jnp.zeros((3, 16, 4))
  assert m(x, marks).shape == (3, 8, 5)
  # marks are extra tokens, so they change the forecast of the variates
  assert not np.allclose(m(x), m(x, marks + 0.3))


def test_classifier_shape_and_image_rows_as_steps():
  m = models.create_model("itransformer_cls_digits")
  x = jax.random.normal(jax.random.key(0), (5, 8, 8))
  logits = m(x)
  assert logits.shape == (5, 10)
  np.testing.assert_array_equal(m(x[..., None]), logits)  # [B, H, W, 1] images: H steps of W variates


# --- parity with the official code ----------------------------------------------------------------------------

def test_golden_parity_output_and_features():
  _, state_dict, arrays = _golden()
  params, model_class, kwargs = checkpoint_filter_fn(state_dict)
  assert model_class is iTransformer
  m = models.create_model("itransformer_etth1_96")
  assign_params(m, params)
  x, marks = jnp.asarray(arrays["x_enc"]), jnp.asarray(arrays["x_mark_enc"])
  _assert_close(m(x, marks), arrays["output"])

  x_norm, _, _ = instance_norm(x)
  tokens = m.embed_tokens(jnp.concatenate([x_norm, marks], axis=-1))
  _assert_close(tokens, arrays["feat/enc_embedding"])
  for i, block in enumerate(m.blocks):
    tokens = block(tokens)
    _assert_close(tokens, arrays[f"feat/encoder.attn_layers.{i}"])
  tokens = m.norm(tokens)
  _assert_close(tokens, arrays["feat/encoder.norm"])
  _assert_close(m.projector(tokens), arrays["feat/projector"])


def test_bfloat16_compute_stays_close_to_float32():
  m32 = _small(dropout=0.0)
  m16 = _small(dropout=0.0, dtype=jnp.bfloat16)
  x = _series()
  y32, y16 = m32(x), m16(x)
  assert y16.dtype == jnp.float32  # de-normalisation runs in float32
  assert np.abs(np.asarray(y16) - np.asarray(y32)).max() < 0.05 * np.abs(np.asarray(y32)).max()


# --- input validation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape, mark_shape, message", [
    ((16, 5), None, r"x must have shape \[batch, seq_len=16, variates\], got shape \(16, 5\)"),
    ((3, 12, 5), None, r"seq_len=16 steps on axis 1, got shape \(3, 12, 5\)"),
    ((3, 16, 5), (3, 16), r"x_mark must have shape \[batch, seq_len=16, marks\], got shape \(3, 16\)"),
    ((3, 16, 5), (2, 16, 4), r"x_mark must match x in batch and length \(3, 16\), got shape \(2, 16, 4\)"),
    ((3, 16, 5), (3, 15, 4), r"got shape \(3, 15, 4\)"),
])
def test_forecaster_rejects_bad_shapes(x_shape, mark_shape, message):
  m = _small()
  with pytest.raises(ValueError, match=message):
    m(jnp.zeros(x_shape), None if mark_shape is None else jnp.zeros(mark_shape))


def test_rejects_integer_input_and_wrong_variate_count_for_the_classifier():
  with pytest.raises(ValueError, match="floating-point array, got dtype int32"):
    _small()(jnp.zeros((3, 16, 5), jnp.int32))
  with pytest.raises(ValueError, match=r"num_variates=8 on axis 2, got shape \(2, 8, 7\)"):
    models.create_model("itransformer_cls_digits")(jnp.zeros((2, 8, 7)))
  with pytest.raises(ValueError, match="divisible by num_heads"):
    _small(n_heads=5)


# --- dropout and gradients ------------------------------------------------------------------------------------

def test_dropout_only_when_training():
  m = _small(dropout=0.1)
  x = _series()
  eval1, eval2 = m(x), m(x)
  np.testing.assert_array_equal(eval1, eval2)
  train1, train2 = m(x, train=True), m(x, train=True)
  assert np.abs(np.asarray(train1 - eval1)).max() > 1e-3
  assert np.abs(np.asarray(train1 - train2)).max() > 1e-3  # the streams advance
  no_dropout = _small(dropout=0.0)
  np.testing.assert_allclose(no_dropout(x, train=True), no_dropout(x), rtol=0, atol=0)


def test_attention_dropout_path_matches_fused_path():
  # A rate so small that no probability is dropped still takes the explicit-softmax training path.
  attn = Attention(32, 4, attn_drop=1e-9, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 7, 32))
  np.testing.assert_allclose(attn(x, train=True), attn(x), rtol=0, atol=1e-5)


def test_mean_is_detached_but_std_is_not():
  """The gradient equals the official graph's: mean through stop_gradient, std differentiated."""
  m = _small(dropout=0.0)
  core = _small(dropout=0.0, use_norm=False)
  nnx.update(core, nnx.state(m, nnx.Param))
  x = _series()
  weights = jax.random.normal(jax.random.key(2), (3, 8, 5))

  def reference(x, detach_mean=True, detach_std=False):
    mean = x.mean(axis=1, keepdims=True)
    mean = jax.lax.stop_gradient(mean) if detach_mean else mean
    std = jnp.sqrt(jnp.var(x - mean, axis=1, keepdims=True) + 1e-5)
    std = jax.lax.stop_gradient(std) if detach_std else std
    return core((x - mean) / std) * std + mean

  def grad_of(f):
    return np.asarray(jax.grad(lambda x: jnp.sum(f(x) * weights))(x))

  expected = grad_of(reference)
  np.testing.assert_allclose(grad_of(m), expected, rtol=1e-4, atol=1e-5)
  # the check can tell the alternatives apart
  for wrong in (functools.partial(reference, detach_mean=False), functools.partial(reference, detach_std=True)):
    assert np.abs(grad_of(wrong) - expected).max() > 1e-3


def test_instance_norm_statistics():
  x = _series()
  x_norm, mean, std = instance_norm(x)
  np.testing.assert_allclose(mean, np.mean(np.asarray(x), axis=1, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(std, np.sqrt(np.var(np.asarray(x), axis=1, keepdims=True) + 1e-5), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(x_norm).std(axis=1), 1.0, atol=1e-3)


# --- shared layers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, impl", [((32, 11, 256), "threefry2x32"), ((4, 8, 11, 11), "threefry2x32"),
                                         ((7,), "threefry2x32"), ((4, 5), "rbg")])
def test_random_bits_equal_jax_random_bits(shape, impl):
  key = jax.random.key(42, impl=impl)
  np.testing.assert_array_equal(random_bits(key, shape), jax.random.bits(key, shape, jnp.uint32))


def test_dropout_keeps_the_expected_fraction_and_rescales():
  drop = Dropout(0.1, rngs=nnx.Rngs(0))
  x = jnp.ones((64, 11, 256))
  y = np.asarray(drop(x, train=True))
  assert set(np.unique(y)) == {0.0, np.float32(1 / 0.9)}
  assert abs((y == 0).mean() - 0.1) < 0.005  # 180k draws: 7 standard deviations
  np.testing.assert_array_equal(drop(x), x)


def test_drop_path_drops_whole_samples():
  drop = DropPath(0.5, rngs=nnx.Rngs(0))
  x = jnp.ones((64, 4, 3))
  y = np.asarray(drop(x, train=True))
  per_sample = y.reshape(64, -1)
  assert set(np.unique(per_sample)) <= {0.0, 2.0}
  assert (per_sample.min(axis=1) == per_sample.max(axis=1)).all()
  assert 10 < (per_sample[:, 0] == 0).sum() < 54
  np.testing.assert_array_equal(drop(x), x)


def test_pre_norm_block_is_residual_around_normalised_branches():
  block = Block(16, 2, 32, post_norm=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  h = x + block.attn(block.norm1(x))
  np.testing.assert_allclose(block(x), h + block.mlp(block.norm2(h)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("post_norm", [False, True])
def test_block_with_fewer_queries_equals_the_first_outputs(post_norm):
  block = Block(16, 2, 32, post_norm=post_norm, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 7, 16))
  np.testing.assert_allclose(block(x, num_queries=3), block(x)[:, :3], rtol=0, atol=1e-5)
