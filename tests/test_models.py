"""The registry's contract, for every registered variant (as timm's tests/test_models.py).

Every name builds abstractly (`nnx.eval_shape`, no weights) with the official parameter count the
registry holds (`ModelInfo.num_params`); the names without one are listed here, with the reason, so
that a variant registered without its count fails. The zoo's CPU-size variants also run for real:
a forward and a backward on tiny inputs, finite, and timm's `forward_intermediates` where the family
has it. One small table says how each builder is called.
"""
import contextlib
import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import eval_shape
import models

NAMES = models.list_models()

# The variants without an official count, and why.
WITHOUT_OFFICIAL_COUNT = {
    "itransformer_cls_digits": "the zoo's own classifier (TSLib's head on scikit-learn's digits)",
    "matlm_tiny": "the zoo's CPU size",
    "matvit_nano_patch4_28": "the zoo's CPU size",
    "transformer_lm_tiny": "the zoo's CPU size",
    "transformer_lm_385m": "sized by the zoo to TransNormerLLM-385M: the TNL paper publishes "
                           "neither the config nor the count of its Transformer baselines",
    "transformer_lm_1b": "as transformer_lm_385m, for TransNormerLLM-1B",
    "transnormer_llm_tiny": "the zoo's CPU size",
    "transnormer_llm_1b": "config.json not retrieved: dims fitted to the README's rounded 1.0 B",
    "transnormer_llm_7b": "config.json not retrieved: dims fitted to the README's rounded 6.8 B",
    "transnormer_llm_15b": "glu_dim and vocabulary not public (assumed); the model card's 14.83 B "
                           "is not this config's count",
    "transnormer_t1": "the paper gives about 156 M; the exact count needs fairseq's WikiText-103 "
                      "dictionary and the fairseq-evo code, not run",
    "transnormer_t2": "as transnormer_t1 (no count published)",
    "transnormer_t1_mlm": "no count published (RoBERTa-base sized); fairseq-evo code not run",
    "transnormer_t2_mlm": "no count published (RoBERTa-base sized); fairseq-evo code not run",
}

# Under 1 M parameters, cheap to compile and run on 2 cores: the zoo's CPU sizes (one per builder)
# and the forecasting setting of the golden fixture (ETTh1, 96 steps ahead).
SMALL = ("itransformer_cls_digits", "itransformer_etth1_96", "matlm_tiny", "matvit_nano_patch4_28",
         "transnormer_llm_tiny")

# Generous limits (the cases take seconds): they catch a regression that makes building or
# compiling a variant pathologically slow, not noise.
ABSTRACT_LIMIT_S, RUN_LIMIT_S = 60, 120


# --- how each builder is called -------------------------------------------------------------------
# Positional inputs of batch 2 from a variant's config (the builder's defaults with the registered
# ones): images [B, H, W, C] at the model's img_size (224 for HorNet and BiFormer), tokens [B, T]
# int32, iTransformer's series x [B, seq_len, N] with time marks x_mark [B, seq_len, 4] (the 4
# timeF features of hourly data), the digits classifier's [B, seq_len, num_variates].

def _images(c, key):
  side = c.get("img_size", 224)
  return (jax.random.normal(key, (2, side, side, c.get("in_chans", 3))),)


def _tokens(c, key):
  return (jax.random.randint(key, (2, 16), 0, c["vocab_size"], jnp.int32),)


def _forecast(c, key):
  x_key, mark_key = jax.random.split(key)
  return (jax.random.normal(x_key, (2, c["seq_len"], 7)),
          jax.random.normal(mark_key, (2, c["seq_len"], 4)))


def _classify(c, key):
  return (jax.random.normal(key, (2, c["seq_len"], c["num_variates"])),)


# builder: (its inputs from a variant's config, its smallest variant, whose call is checked)
INPUTS = {
    "HorNet": (_images, "hornet_tiny_7x7"),
    "MaxViT": (_images, "maxvit_tiny_tf_224"),
    "BiFormer": (_images, "biformer_tiny"),
    "MatViT": (_images, "matvit_nano_patch4_28"),
    "iTransformer": (_forecast, "itransformer_etth2_96"),
    "iTransformerClassifier": (_classify, "itransformer_cls_digits"),
    "MatLM": (_tokens, "matlm_tiny"),
    "TransNormerLM": (_tokens, "transnormer_t1"),
    "TransNormerMLM": (_tokens, "transnormer_t1_mlm"),
    "TransNormerLLM": (_tokens, "transnormer_llm_tiny"),
}


def _config(name):
  info = models.model_info(name)
  parameters = inspect.signature(info.builder.__init__).parameters.values()
  return {**{p.name: p.default for p in parameters if p.default is not p.empty}, **info.defaults}


def _inputs(name):
  inputs, _ = INPUTS[models.model_info(name).builder.__name__]
  return inputs(_config(name), jax.random.key(0))


# --- helpers --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _within(seconds):
  start = time.perf_counter()
  yield
  elapsed = time.perf_counter() - start
  assert elapsed < seconds, f"took {elapsed:.0f} s, the limit is {seconds} s"


_ABSTRACT = {}  # (builder, registered config) -> the abstract model


def _abstract(name):
  """The variant built abstractly (shapes, no weights); variants registered with the same config
  (ETTm1 and ETTm2 at one horizon, ...) build once."""
  info = models.model_info(name)
  key = (info.builder, repr(sorted(info.defaults.items())))
  if key not in _ABSTRACT:
    _ABSTRACT[key] = eval_shape(lambda: models.create_model(name))
  return _ABSTRACT[key]


def _finite(tree):
  return all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(tree))


# --- every variant, abstractly --------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_builds_abstractly_with_the_official_parameter_count(name):
  with _within(ABSTRACT_LIMIT_S):
    count = models.count_params(_abstract(name))
  official = models.model_info(name).num_params
  assert count > 0
  if official is not None:
    assert count == official, f"{name}: {count:,} parameters, the official count is {official:,}"


def test_the_variants_without_an_official_count_are_the_known_ones():
  without = {name for name in NAMES if models.model_info(name).num_params is None}
  assert without == set(WITHOUT_OFFICIAL_COUNT), (
      f"without an official count and not listed: {sorted(without - set(WITHOUT_OFFICIAL_COUNT))};"
      f" listed but with one or not registered: {sorted(set(WITHOUT_OFFICIAL_COUNT) - without)}")


def test_every_builder_has_inputs_and_every_small_variant_is_registered():
  assert {models.model_info(name).builder.__name__ for name in NAMES} == set(INPUTS)
  assert {builder: models.model_info(name).builder.__name__
          for builder, (_, name) in INPUTS.items()} == {builder: builder for builder in INPUTS}
  assert set(SMALL) <= set(NAMES)


@pytest.mark.parametrize("name", [name for _, name in INPUTS.values()])
def test_the_inputs_fit_the_smallest_variant_of_each_builder(name):
  """The table's inputs, abstractly: batch-2 outputs in float32."""
  with _within(ABSTRACT_LIMIT_S):
    out = nnx.eval_shape(lambda model, *inputs: model(*inputs), _abstract(name), *_inputs(name))
  assert out.shape[0] == 2 and out.dtype == jnp.float32


# --- the small variants, for real -----------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_forward_and_backward_are_finite(name):
  model, inputs = models.create_model(name), _inputs(name)

  def loss(model, *inputs):
    out = model(*inputs)
    return jnp.mean(jnp.square(out)), out

  with _within(RUN_LIMIT_S):
    (value, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model, *inputs)
  assert out.shape[0] == 2 and out.dtype == jnp.float32
  assert _finite(out) and np.isfinite(value), f"{name}: non-finite outputs"
  params = nnx.state(model, nnx.Param)
  assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)
  assert _finite(grads), f"{name}: non-finite gradients"


@pytest.mark.parametrize("name", [name for name in SMALL if hasattr(models.model_info(name).builder,
                                                                    "forward_intermediates")])
def test_forward_intermediates_follow_feature_info(name):
  model, (images,) = models.create_model(name), _inputs(name)
  with _within(RUN_LIMIT_S):
    (final, maps), features = nnx.jit(
        lambda m, x: (m.forward_intermediates(x), m.forward_features(x)))(model, images)
  np.testing.assert_allclose(final, features, rtol=1e-6, atol=1e-6)
  side = images.shape[1]
  assert [m.shape for m in maps] == [(2, side // info["reduction"], side // info["reduction"],
                                      info["num_chs"]) for info in model.feature_info]
  assert _finite(maps), f"{name}: non-finite intermediates"
