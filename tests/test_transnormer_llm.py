"""TransNormerLLM: parity with the released HF code (golden fixtures: masked-path logits, hidden
states, chunked prefill, token-by-token decoding), the decay ladder, sizes, converter, inputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import eval_shape, load_golden
import models
from models.pretrained import assign_params
from models.transnormer_llm import (TransNormerLLM, alibi_slopes, checkpoint_filter_fn,
                                    decay_rates, srms_norm)

TINY = dict(vocab_size=64, dim=32, depth=2, num_heads=4, glu_dim=48)


_golden = functools.partial(load_golden, "transnormer_llm")  # (spec, state_dict, arrays) of a fixture


def _assert_close(actual, reference):
  err = np.abs(np.asarray(actual, np.float64) - reference).max()
  assert err <= 1e-4 * max(1.0, np.abs(reference).max()), err


@functools.cache
def _golden_model(name):
  _, state_dict, arrays = _golden(name)
  params, model_class, kwargs = checkpoint_filter_fn(state_dict)
  assert model_class is TransNormerLLM
  model = TransNormerLLM(**kwargs, rngs=nnx.Rngs(0))
  assign_params(model, params)
  return model, jnp.asarray(arrays["input_ids"]), arrays


_forward = nnx.jit(lambda m, tokens: m(tokens))
_step = nnx.jit(lambda m, tokens, cache: m.decode_step(tokens, cache))
_layer = nnx.jit(lambda layer, x: layer(x))


# --- parity with the released code ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["tnl_custom_d64_l3", "tnl_custom_d64_l3_t300"])
def test_golden_logits_and_hidden_states(name):
  """T = 300 spans more than one block of every path (HF prefill 256, ours 128 and 64)."""
  model, tokens, arrays = _golden_model(name)
  logits = _forward(model, tokens)
  _assert_close(logits, arrays["logits"])                          # HF masked quadratic path
  _assert_close(logits, arrays["logits_prefill"])                  # HF chunked inference path
  h = model.embed(tokens)
  _assert_close(h, arrays["hidden/0"])
  for i, layer in enumerate(model.layers[:-1]):
    h = _layer(layer, h)
    _assert_close(h, arrays[f"hidden/{i + 1}"])
  _assert_close(srms_norm(_layer(model.layers[-1], h)), arrays["hidden/3"])


@pytest.mark.parametrize("name", ["tnl_custom_d64_l3", "tnl_custom_d64_l3_t300"])
def test_golden_step_by_step_decoding(name):
  model, tokens, arrays = _golden_model(name)
  cache = model.init_cache(tokens.shape[0], tokens.shape[1])
  steps = []
  for t in range(tokens.shape[1]):
    logits, cache = _step(model, tokens[:, t:t + 1], cache)
    steps.append(logits)
  _assert_close(jnp.concatenate(steps, axis=1), arrays["logits_decode"])
  assert int(cache["offset"]) == tokens.shape[1]
  assert all(s.dtype == jnp.float32 for s in cache["states"])


def test_golden_prefill_then_decoding():
  model, tokens, arrays = _golden_model("tnl_custom_d64_l3")
  logits, cache = _step(model, tokens[:, :16], model.init_cache(tokens.shape[0]))
  outputs = [logits]
  for t in range(16, tokens.shape[1]):
    logits, cache = _step(model, tokens[:, t:t + 1], cache)
    outputs.append(logits)
  _assert_close(jnp.concatenate(outputs, axis=1), arrays["logits_prefill16_decode"])


def test_cache_size_does_not_grow():
  model = TransNormerLLM(**TINY, rngs=nnx.Rngs(0))
  cache = model.init_cache(2, 1000)
  sizes = [s.shape for s in cache["states"]]
  assert sizes == [(2, 4, 16, 8), (2, 4, 8, 8)]                   # LRPE doubles layer 0's keys
  _, cache = _step(model, jnp.ones((2, 7), jnp.int32), cache)
  assert [s.shape for s in cache["states"]] == sizes


# --- decay ladder (the released code, not the paper's formula) ------------------------------------


def test_decay_ladder_follows_the_released_code():
  _, _, arrays = _golden("tnl_custom_d64_l3")
  np.testing.assert_allclose(alibi_slopes(4), [0.25, 0.0625, 0.015625, 0.00390625])
  np.testing.assert_allclose(alibi_slopes(8), 0.5 ** np.arange(1, 9))
  slopes40 = alibi_slopes(40)
  np.testing.assert_allclose(slopes40[:32], alibi_slopes(32))
  np.testing.assert_allclose(slopes40[32:], alibi_slopes(64)[0::2][:8])
  np.testing.assert_allclose(slopes40[32], 2 ** -0.125, rtol=1e-12)   # 0.917...
  np.testing.assert_allclose(alibi_slopes(32)[:2], [2 ** -0.25, 2 ** -0.5], rtol=1e-12)
  factors = decay_rates(8, 24)[:, 0] / 0.5
  np.testing.assert_allclose(factors[[0, 1, 12, 23]], [1.00001, 0.95653, 0.47827, 1e-5],
                             rtol=2e-5)


# --- sizes ----------------------------------------------------------------------------------------


# The sizes without an official count; the 385M's (README "0.39 B", tied embedding) is the
# registry's, which tests/test_models.py checks against the model.
OWN_SIZES = {
    "transnormer_llm_1b": 1_020_266_496,      # README "1.0 B"
    "transnormer_llm_7b": 6_836_719_616,      # "6.8 B"
    "transnormer_llm_15b": 14_936_970_240,    # card: 14.83 B; glu_dim and vocab assumed
    "transnormer_llm_tiny": 901_248,
}


@pytest.mark.parametrize("name", ["transnormer_llm_385m", *OWN_SIZES])
def test_parameter_counts(name):
  info = models.model_info(name)
  expected = info.num_params or OWN_SIZES[name]
  d, depth, glu = info.defaults["dim"], info.defaults["depth"], info.defaults["glu_dim"]
  # per layer 5 d hidden (qkvu + out) + 3 d glu; the embedding (tied); LRPE theta in layer 0
  assert expected == depth * (5 * d * d + 3 * d * glu) + info.defaults["vocab_size"] * d + d
  model = eval_shape(lambda: models.create_model(name))
  assert models.count_params(model) == expected


# --- implementations and dtypes -------------------------------------------------------------------


def test_pallas_kernel_gives_the_same_logits_and_gradients():
  tokens = jax.random.randint(jax.random.key(0), (2, 70), 0, 64)
  xla = TransNormerLLM(**TINY, rngs=nnx.Rngs(0))
  pallas = TransNormerLLM(**TINY, attn_implementation="pallas", rngs=nnx.Rngs(0))

  def loss(model):
    logits = model(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  value_and_grad = nnx.jit(nnx.value_and_grad(loss))
  (l_xla, g_xla), (l_pallas, g_pallas) = value_and_grad(xla), value_and_grad(pallas)
  np.testing.assert_allclose(l_pallas, l_xla, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_pallas), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 64)
  f32 = TransNormerLLM(**TINY, rngs=nnx.Rngs(0))
  bf16 = TransNormerLLM(**TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y32, y16 = _forward(f32, tokens), _forward(bf16, tokens)
  assert y16.dtype == jnp.float32
  assert np.abs(np.asarray(y16) - np.asarray(y32)).max() < 0.05 * np.abs(np.asarray(y32)).max()


def test_padding_row_starts_at_zero():
  model = TransNormerLLM(**TINY, rngs=nnx.Rngs(0))
  table = np.asarray(model.embed_tokens.embedding[...])
  np.testing.assert_array_equal(table[0], 0.0)
  assert 0.015 < table[1:].std() < 0.025


# --- converter ------------------------------------------------------------------------------------


def _hf_state_dict(model_kwargs, tie=True, seed=0):
  """A random HF-layout state_dict (lm_head omitted when tied, as safetensors saves it)."""
  rng = np.random.default_rng(seed)
  v, d, h, glu = (model_kwargs[k] for k in ("vocab_size", "dim", "num_heads", "glu_dim"))
  sd = {"model.embed_tokens.weight": rng.normal(size=(v, d)).astype(np.float32)}
  for i in range(model_kwargs["depth"]):
    p = f"model.layers.{i}."
    sd |= {p + "token_mixer.qkvu_proj.weight": rng.normal(size=(4 * d, d)).astype(np.float32),
           p + "token_mixer.out_proj.weight": rng.normal(size=(d, d)).astype(np.float32),
           p + "channel_mixer.l1.weight": rng.normal(size=(glu, d)).astype(np.float32),
           p + "channel_mixer.l2.weight": rng.normal(size=(glu, d)).astype(np.float32),
           p + "channel_mixer.l3.weight": rng.normal(size=(d, glu)).astype(np.float32)}
    if i == 0:
      sd[p + "token_mixer.lrpe.theta"] = rng.normal(size=(h, 1, d // h)).astype(np.float32)
  if not tie:
    sd["lm_head.weight"] = rng.normal(size=(v, d)).astype(np.float32)
  return sd


def test_converter_reads_untied_heads_and_drops_metaseq_version():
  sd = _hf_state_dict(TINY, tie=False)
  sd["decoder.version"] = np.array([3.0], np.float32)
  params, model_class, kwargs = checkpoint_filter_fn(sd)
  assert kwargs["tie_embeddings"] is False and kwargs["num_heads"] == 4
  model = model_class(**kwargs, rngs=nnx.Rngs(1))
  assign_params(model, params)
  h = jax.random.normal(jax.random.key(2), (1, 3, 32))
  np.testing.assert_allclose(model.head(h), srms_norm(h) @ sd["lm_head.weight"].T, rtol=1e-5,
                             atol=1e-5)


def test_converter_errors():
  sd = _hf_state_dict(TINY)
  del sd["model.layers.0.token_mixer.lrpe.theta"]
  with pytest.raises(ValueError, match=r"cannot read \['num_heads'\]"):
    checkpoint_filter_fn(sd)
  sd = _hf_state_dict(TINY)
  sd["model.layers.1.channel_mixer.l3.weight"] = np.zeros((32, 40), np.float32)
  del sd["model.layers.1.token_mixer.out_proj.weight"]
  with pytest.raises(ValueError, match=r"(?s)2 problems.*missing: model\.layers\.1\.token_mixer\."
                                       r"out_proj\.weight.*mis-shaped: model\.layers\.1\."
                                       r"channel_mixer\.l3\.weight"):
    checkpoint_filter_fn(sd)


# --- input validation -----------------------------------------------------------------------------


def test_rejects_bad_inputs():
  model = TransNormerLLM(**TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"integer array \[batch, length\], got shape \(2, 5\) "
                                       r"and dtype float32"):
    model(jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match=r"got shape \(5,\)"):
    model(jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match="cache does not fit this model and batch 3"):
    model.decode_step(jnp.zeros((3, 1), jnp.int32), model.init_cache(2))
  with pytest.raises(ValueError, match="hidden_dim must be divisible by num_heads"):
    TransNormerLLM(**{**TINY, "num_heads": 5}, rngs=nnx.Rngs(0))
