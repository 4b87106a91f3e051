"""MatFormer: NestedMlp slicing, MatLM (KV-cache decoding equals the full forward, granularities
equal dense models built from the sliced weights, RoPE/ALiBi), parameter counts, inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import layers
from models.matformer import MatLM, alibi_slopes, apply_rope

SMALL = dict(vocab_size=64, dim=32, depth=2, num_heads=4, mlp_dim=64)
VARIANTS = {"rope_mha": {}, "alibi_mqa": dict(num_kv_heads=1, positions="alibi"),
            "gated_gqa": dict(num_kv_heads=2, gated=True, act="silu", use_bias=False)}


def _tokens(batch=2, length=12, vocab=64, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


def _close(actual, expected, rtol=1e-5):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  err = np.abs(actual - expected).max()
  assert err <= rtol * max(1.0, np.abs(expected).max()), err


# --- NestedMlp ------------------------------------------------------------------------------------


def _params(module):
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


@pytest.mark.parametrize("width", [8, 16, 37, 64])
def test_nested_mlp_width_equals_a_dense_mlp_of_the_sliced_weights(width):
  nested = layers.NestedMlp(16, 64, rngs=nnx.Rngs(0))
  p = _params(nested)
  dense = layers.Mlp(16, width, rngs=nnx.Rngs(1))
  sliced = {"fc1": {"kernel": p["fc1"]["kernel"][:, :width], "bias": p["fc1"]["bias"][:width]},
            "fc2": {"kernel": p["fc2"]["kernel"][:width], "bias": p["fc2"]["bias"]}}  # bias shared
  state = nnx.state(dense, nnx.Param)
  nnx.replace_by_pure_dict(state, sliced)
  nnx.update(dense, state)
  x = jax.random.normal(jax.random.key(2), (3, 5, 16))
  _close(nested(x, width=width), dense(x), rtol=1e-6)


def test_gated_nested_mlp_width_equals_numpy_on_the_sliced_weights():
  nested = layers.NestedMlp(16, 64, gated=True, act=jax.nn.silu, rngs=nnx.Rngs(0))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), _params(nested))
  x = np.asarray(jax.random.normal(jax.random.key(2), (4, 16)), np.float64)
  m = 16

  def silu(z):
    return z / (1 + np.exp(-z))

  gate = silu(x @ p["fc1_g"]["kernel"][:, :m] + p["fc1_g"]["bias"][:m])
  up = x @ p["fc1_x"]["kernel"][:, :m] + p["fc1_x"]["bias"][:m]
  expected = (gate * up) @ p["fc2"]["kernel"][:m] + p["fc2"]["bias"]
  _close(nested(jnp.asarray(x, jnp.float32), width=m), expected, rtol=1e-5)


def test_nested_mlp_full_width_and_static_slices():
  nested = layers.NestedMlp(16, 64, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (3, 16))
  np.testing.assert_array_equal(nested(x), nested(x, width=64))
  # The slice is static: the matmuls themselves are [.., 16] x [16, 8] and [.., 8] x [8, 16].
  jaxpr = str(jax.make_jaxpr(lambda x: nested(x, width=8))(x))
  assert "f32[16,8]" in jaxpr and "f32[8,16]" in jaxpr and "f32[16,64]" not in jaxpr.split(
      "dot_general")[-1]
  for bad in (0, 65, 8.0, True):
    with pytest.raises(ValueError, match="width must be an int in 1..64"):
      nested(x, width=bad)


# --- MatLM ----------------------------------------------------------------------------------------


_forward = nnx.jit(lambda m, t, g: m(t, granularity=g), static_argnums=2)
_step = nnx.jit(lambda m, t, c, g: m.decode_step(t, c, granularity=g), static_argnums=3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("granularity", [None, 16])
def test_kv_cache_decoding_equals_the_full_forward(variant, granularity):
  model = MatLM(**SMALL, **VARIANTS[variant], rngs=nnx.Rngs(0))
  tokens = _tokens()
  full = _forward(model, tokens, granularity)
  cache = model.init_cache(2, 16)   # room to spare: positions past the offset must stay masked
  logits, cache = _step(model, tokens[:, :5], cache, granularity)   # prefill
  outputs = [logits]
  for t in range(5, tokens.shape[1]):
    logits, cache = _step(model, tokens[:, t:t + 1], cache, granularity)
    outputs.append(logits)
  _close(jnp.concatenate(outputs, axis=1), full)
  assert int(cache["offset"]) == tokens.shape[1]


@pytest.mark.parametrize("variant", ["rope_mha", "gated_gqa"])
def test_granularity_equals_a_dense_model_of_the_sliced_weights(variant):
  model = MatLM(**SMALL, **VARIANTS[variant], rngs=nnx.Rngs(0))
  assert model.granularities == (8, 16, 32, 64)
  width = 16
  small = MatLM(**{**SMALL, "mlp_dim": width}, **VARIANTS[variant], rngs=nnx.Rngs(5))
  params = _params(model)
  for block in params["blocks"].values():
    mlp = block["mlp"]
    for name in [n for n in mlp if n != "fc2"]:
      mlp[name] = {k: v[..., :width] for k, v in mlp[name].items()}   # kernel columns, bias
    mlp["fc2"]["kernel"] = mlp["fc2"]["kernel"][:width]
  state = nnx.state(small, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(small, state)
  tokens = _tokens()
  _close(_forward(model, tokens, width), _forward(small, tokens, None))
  # every width is a different model
  outputs = [_forward(model, tokens, g) for g in model.granularities]
  assert all(np.abs(np.asarray(a - b)).max() > 1e-4 for a, b in zip(outputs, outputs[1:]))


def test_per_layer_widths():
  model = MatLM(**SMALL, rngs=nnx.Rngs(0))
  tokens = _tokens()
  np.testing.assert_array_equal(_forward(model, tokens, (16, 16)), _forward(model, tokens, 16))
  mixed = _forward(model, tokens, (8, 64))
  assert np.abs(np.asarray(mixed - _forward(model, tokens, 8))).max() > 1e-4
  assert model.layer_widths((8, 64)) == (8, 64) and model.layer_widths(None) == (64, 64)
  with pytest.raises(ValueError, match="needs 2 widths, got 3"):
    model(tokens, granularity=(8, 8, 8))
  with pytest.raises(ValueError, match="width must be an int in 1..64"):
    model(tokens, granularity=128)


def test_rope_scores_depend_on_the_position_difference_only():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 3, 1, 8))
  positions = jnp.arange(3)

  def scores(shift):
    qr = apply_rope(q, positions + shift, 10000.0)
    kr = apply_rope(k, positions + shift, 10000.0)
    return jnp.einsum("bqhd,bkhd->bqk", qr, kr)

  _close(scores(0), scores(17), rtol=1e-5)
  assert np.abs(np.asarray(scores(0) - jnp.einsum("bqhd,bkhd->bqk", q, k))).max() > 1e-3


def test_alibi_slopes_are_olmos():
  np.testing.assert_allclose(alibi_slopes(16), 2.0 ** -(np.arange(1, 17) / 2))
  np.testing.assert_allclose(alibi_slopes(8)[[0, -1]], [0.5, 2.0 ** -8])


def test_bfloat16_compute_stays_close_to_float32():
  model = MatLM(**SMALL, rngs=nnx.Rngs(0))
  low = MatLM(**SMALL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  tokens = _tokens()
  reference, logits = _forward(model, tokens, None), _forward(low, tokens, None)
  assert logits.dtype == jnp.float32
  err = np.abs(np.asarray(logits - reference)).max()
  assert err < 0.05 * np.abs(np.asarray(reference)).max(), err


# --- parameter counts -----------------------------------------------------------------------------


def _count(name):
  return models.count_params(nnx.eval_shape(lambda: models.create_model(name)))


def _formula(vocab, dim, depth, heads, mlp, kv_heads=None):
  """Embedding (tied) + per layer 2 LayerNorms, qkv, out, fc1, fc2 (all with bias) + final norm."""
  kv = dim // heads * (kv_heads or heads)
  layer = 4 * dim + (dim + 1) * (dim + 2 * kv) + (dim + 1) * dim + (dim + 1) * mlp + (mlp + 1) * dim
  return vocab * dim + depth * layer + 2 * dim


@pytest.mark.parametrize("name, expected", [
    ("matlm_tiny", 900_128), ("matlm_olmo_180m", 63_829_504), ("matlm_olmo_460m", 203_680_768),
    ("matlm_olmo_1300m", 711_448_576), ("transformer_lm_385m", 398_926_656),
    ("transformer_lm_1b", 1_020_190_592)])
def test_param_counts(name, expected):
  info = models.model_info(name)
  d = info.defaults
  assert _formula(d["vocab_size"], d["dim"], d["depth"], d["num_heads"], d["mlp_dim"],
                  d.get("num_kv_heads")) == expected
  assert _count(name) == expected


@pytest.mark.parametrize("size", ["tiny", "385m", "1b"])
def test_baselines_match_transnormer_llm_sizes(size):
  baseline, tnl = _count(f"transformer_lm_{size}"), _count(f"transnormer_llm_{size}")
  assert abs(baseline - tnl) <= 0.002 * tnl, (baseline, tnl)   # tiny: 900,128 vs 901,248


def test_matlm_tiny_width_param_counts():
  model = models.create_model("matlm_tiny")
  # the FFN parameters a width-m sub-model uses: per layer 2 * 128 * m + m + 128
  per_width = {m: 4 * (257 * m + 128) for m in model.granularities}
  assert model.granularities == (73, 146, 292, 584)
  assert models.count_params(model) - per_width[584] + per_width[73] == 374_820


# --- inputs ---------------------------------------------------------------------------------------


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="multiple of 8"):
    MatLM(**{**SMALL, "mlp_dim": 60}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="positions must be one of"):
    MatLM(**SMALL, positions="learned", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible"):
    MatLM(**SMALL, num_kv_heads=3, rngs=nnx.Rngs(0))
  model = MatLM(**SMALL, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"integer array \[batch, length\]"):
    model(jnp.zeros((2, 3, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"integer array \[batch, length\]"):
    model(jnp.zeros((2, 3), jnp.float32))
  cache = model.init_cache(2, 4)
  with pytest.raises(ValueError, match="holds 4 positions; 5 tokens after offset 0 need 5"):
    model.decode_step(_tokens(length=5), cache)
  with pytest.raises(ValueError, match="cache does not fit this model and batch 3"):
    model.decode_step(_tokens(batch=3, length=1), cache)
