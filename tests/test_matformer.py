"""MatFormer: NestedMlp slicing, MatLM (KV-cache decoding equals the full forward, granularities
equal dense models built from the sliced weights, RoPE/ALiBi), extraction and Mix'n'Match, joint
training (tasks.nested) through train.py and the elastic evaluation of eval.py, MatViT (scenic
checkpoint layout against a numpy port of scenic's masked forward), parameter counts, inputs."""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import eval_shape
import eval as eval_lib
import models
import ops
import tasks
import train
from configs import common
from configs import matformer as matformer_config
from models import layers, matformer
from models.layers import alibi_slopes
from models.matformer import MatLM, apply_rope
from models.pretrained import assign_params
from tasks.nested import AtGranularity

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


@pytest.mark.parametrize("kv_heads, alibi", [(4, False), (1, True), (2, True)])
@pytest.mark.parametrize("offset, length", [(0, 5), (9, 1), (11, 4), (14, 2)])
def test_blocked_cache_attention_equals_masked_attention(kv_heads, alibi, offset, length):
  """Blocks of 3 over a 16-position cache: several blocks, a clamped last one (starting at 13,
  its first keys already counted), positions past the queries masked, grouped heads, ALiBi."""
  heads, dim, max_len = 4, 8, 16
  q, keys, values = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate(
      [(2, length, heads, dim), (2, kv_heads, max_len, dim), (2, kv_heads, max_len, dim)]))
  q_positions = offset + jnp.arange(length)
  slopes = jnp.asarray(alibi_slopes(heads, interleave=False), jnp.float32) if alibi else None
  got = matformer._cached_attention(q, keys, values, q_positions, slopes=slopes, block=3)
  k_positions = jnp.arange(max_len)
  bias = jnp.where(k_positions[None, :] <= q_positions[:, None], 0.0, -1e30)
  if alibi:
    bias = bias + slopes[:, None, None] * (k_positions[None, :] - q_positions[:, None])
  group = heads // kv_heads
  k_full, v_full = (jnp.repeat(t.transpose(0, 2, 1, 3), group, axis=2) for t in (keys, values))
  want = ops.attention_reference(q, k_full, v_full, bias=bias)
  _close(got, want)


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
  np.testing.assert_allclose(alibi_slopes(16, interleave=False), 2.0 ** -(np.arange(1, 17) / 2))
  np.testing.assert_allclose(alibi_slopes(8, interleave=False)[[0, -1]], [0.5, 2.0 ** -8])
  # OLMo's formula at any head count (ALiBi's reference code interleaves two ladders instead)
  model = nnx.eval_shape(lambda: MatLM(64, 48, 1, 6, 96, positions="alibi", alibi_max=4.0,
                                       rngs=nnx.Rngs(0)))
  np.testing.assert_array_equal(model.blocks[0].attn.slopes, 2.0 ** -(np.arange(1, 7) * 4 / 6))


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
  return models.count_params(eval_shape(lambda: models.create_model(name)))


def _formula(vocab, dim, depth, heads, mlp, kv_heads=None):
  """Embedding (tied) + per layer 2 LayerNorms, qkv, out, fc1, fc2 (all with bias) + final norm."""
  kv = dim // heads * (kv_heads or heads)
  layer = 4 * dim + (dim + 1) * (dim + 2 * kv) + (dim + 1) * dim + (dim + 1) * mlp + (mlp + 1) * dim
  return vocab * dim + depth * layer + 2 * dim


# The zoo's own sizes; the official counts (matlm_olmo_*) are the registry's, which
# tests/test_models.py checks against the models.
OWN_SIZES = {"matlm_tiny": 900_128, "transformer_lm_385m": 398_926_656,
             "transformer_lm_1b": 1_020_190_592}


@pytest.mark.parametrize("name", ["matlm_tiny", "matlm_olmo_180m", "matlm_olmo_460m",
                                  "matlm_olmo_1300m", "transformer_lm_385m", "transformer_lm_1b"])
def test_param_counts(name):
  info = models.model_info(name)
  expected = info.num_params or OWN_SIZES[name]
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
  with pytest.raises(ValueError, match=r"mlp_dim must be an int >= 1 or 2 of them"):
    MatLM(**{**SMALL, "mlp_dim": (8, 16, 32)}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"mlp_dim must be an int >= 1"):
    MatLM(**{**SMALL, "mlp_dim": 0}, rngs=nnx.Rngs(0))
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


# --- extraction and Mix'n'Match -------------------------------------------------------------------


def test_nested_mlp_counts_what_a_width_uses():
  for gated in (False, True):
    nested = layers.NestedMlp(16, 64, gated=gated, rngs=nnx.Rngs(0))
    assert nested.num_params() == models.count_params(nested)
    dense = layers.NestedMlp(16, 24, gated=gated, rngs=nnx.Rngs(0))
    assert nested.num_params(24) == models.count_params(dense)     # fc2's bias counted once
    assert nested.flops_per_token(24) == 2 * (3 if gated else 2) * 16 * 24


@pytest.mark.parametrize("variant, granularity", [
    ("rope_mha", (8, 32)), ("alibi_mqa", 8), ("gated_gqa", (64, 16))])
def test_extract_is_a_smaller_model_with_the_same_outputs(variant, granularity):
  model = MatLM(**SMALL, **VARIANTS[variant], rngs=nnx.Rngs(0))
  small = matformer.extract(model, granularity)
  widths = model.layer_widths(granularity)
  assert tuple(b.mlp.hidden_dim for b in small.blocks) == widths
  assert models.count_params(small) == model.num_params(granularity) < models.count_params(model)
  ffn_per_width = 2 * 32 + 1 if VARIANTS[variant].get("use_bias", True) else 2 * 32
  if VARIANTS[variant].get("gated"):
    ffn_per_width += 32
  assert models.count_params(model) - models.count_params(small) == sum(
      (64 - w) * ffn_per_width for w in widths)
  tokens = _tokens()
  _close(_forward(small, tokens, None), _forward(model, tokens, granularity), rtol=1e-6)
  # the sub-model is nested in turn: its S equals the original at the same widths
  inner = tuple(max(1, w // 8) for w in widths)
  _close(_forward(small, tokens, inner), _forward(model, tokens, inner), rtol=1e-6)
  if variant == "rope_mha":   # and it generates (a KV cache of its own)
    out = models.generate(small, tokens[:, :4], 5)
    np.testing.assert_array_equal(out, models.generate(model, tokens[:, :4], 5,
                                                       granularity=widths))


def test_balanced_configs_and_mix_n_match():
  model = MatLM(**{**SMALL, "depth": 3}, rngs=nnx.Rngs(0))
  configs = matformer.balanced_configs(model)
  assert configs[0] == (8, 8, 8) and configs[-1] == (64, 64, 64) and len(configs) == 3 * 3 + 1
  assert configs[1:4] == [(8, 8, 16), (8, 16, 16), (16, 16, 16)]   # later layers grow first
  for widths in configs:   # at most two neighbouring granularities, non-decreasing with depth
    assert list(widths) == sorted(widths) and widths[-1] <= 2 * widths[0]
  params = [model.num_params(c) for c in configs]
  flops = [model.flops(c, seq_len=32) for c in configs]
  assert all(a < b for a, b in zip(params, params[1:]))
  assert all(a < b for a, b in zip(flops, flops[1:]))
  assert matformer.mix_n_match(model, params[4]) == configs[4]
  assert matformer.mix_n_match(model, params[4] + 1) == configs[4]
  assert matformer.mix_n_match(model, params[5] - 1) == configs[4]
  assert matformer.mix_n_match(model, 1e12) == (64, 64, 64)
  assert matformer.mix_n_match(model, flops[7], cost="flops", seq_len=32) == configs[7]
  with pytest.raises(ValueError, match=r"no sub-model fits a budget of 100 params"):
    matformer.mix_n_match(model, 100)
  with pytest.raises(ValueError, match="cost must be one of"):
    matformer.mix_n_match(model, 1e9, cost="latency")


def test_flops_count_the_weight_and_attention_matmuls():
  model = MatLM(**SMALL, rngs=nnx.Rngs(0))
  t, d, v = 10, 32, 64
  layer = lambda w: 2 * t * d * (3 * d + d) + 2 * 2 * (t * (t + 1) // 2) * d + 2 * 2 * t * d * w
  assert model.flops(seq_len=t) == 2 * t * d * v + 2 * layer(64)
  assert model.flops((8, 64), seq_len=t) == 2 * t * d * v + layer(8) + layer(64)


# --- joint training (tasks.nested) ----------------------------------------------------------------


def _lm_batch(batch=2, length=9, vocab=64):
  tokens = _tokens(batch, length, vocab)
  return {"tokens": tokens, "weights": jnp.ones((batch, length - 1)), "mask": jnp.ones(batch),
          "num_bytes": jnp.full((batch,), float(length - 1))}


@nnx.jit(static_argnums=0)
def _grads(loss_fn, model, batch):
  (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
  return loss, aux, nnx.to_pure_dict(grads)


@functools.cache
def _at(task, width):
  """task.loss at one granularity (one function per pair: the jitted helpers key on it)."""
  return functools.partial(_loss_at, task, width)


def _loss_at(task, width, model, batch):
  return task.loss(AtGranularity(model, width), batch)


def test_summed_objective_is_the_sum_of_the_granularities_losses_and_gradients():
  model = MatLM(**SMALL, rngs=nnx.Rngs(0))
  batch, base = _lm_batch(), tasks.get_task("language_modeling")
  joint = tasks.Nested(base, "sum", weights=(1.0, 0.5, 2.0, 1.0))
  loss, aux, grads = _grads(joint.loss, model, batch)
  expected_loss, expected_grads = 0.0, None
  for name, width, weight in zip(("S", "M", "L", "XL"), model.granularities, joint.weights):
    part, part_aux, part_grads = _grads(_at(base, width), model, batch)
    np.testing.assert_allclose(aux[f"{name}/loss"], part, rtol=1e-6)
    np.testing.assert_allclose(aux[f"{name}/accuracy"], part_aux["accuracy"], rtol=1e-6)
    expected_loss += weight * part
    scaled = jax.tree.map(lambda g: weight * g, part_grads)
    expected_grads = scaled if expected_grads is None else jax.tree.map(jnp.add, expected_grads,
                                                                         scaled)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    _close(got, want, rtol=1e-5)
  # only S's loss: the rest of every FFN gets no gradient
  _, _, only_s = _grads(tasks.Nested(base, "sum", weights=(1.0, 0, 0, 0)).loss, model, batch)
  fc1 = np.asarray(only_s["blocks"][0]["mlp"]["fc1"]["kernel"])
  assert np.abs(fc1[:, :8]).max() > 0 and np.abs(fc1[:, 8:]).max() == 0


_loss = nnx.jit(lambda loss_fn, model, batch: loss_fn(model, batch), static_argnums=0)


def test_summed_objective_uses_the_same_dropout_masks_for_every_granularity():
  model = MatLM(**SMALL, dropout=0.3, rngs=nnx.Rngs(0))
  batch, base = _lm_batch(), tasks.get_task("language_modeling")
  rng_state = nnx.clone(nnx.state(model, nnx.RngState))
  _, aux = _loss(tasks.Nested(base, "sum").loss, model, batch)
  losses = []
  for width in model.granularities:
    nnx.update(model, rng_state)
    losses.append(_loss(_at(base, width), model, batch)[0])
  np.testing.assert_allclose([aux[f"{n}/loss"] for n in ("S", "M", "L", "XL")], losses,
                             rtol=1e-6)
  # other masks give another loss: the dropout is on
  assert abs(float(_loss(_at(base, 64), model, batch)[0]) - float(losses[-1])) > 1e-4


def test_sampled_objective_draws_one_granularity_from_the_model_rng():
  model = MatLM(**SMALL, dropout=0.1, rngs=nnx.Rngs(0))
  batch, base = _lm_batch(), tasks.get_task("language_modeling")
  sampled = tasks.Nested(base, "sample", weights=(1.0, 1.0, 0.0, 2.0))
  drawn = []
  for seed in range(16):
    nnx.reseed(model, default=seed)          # what the loop does every step
    rng_state = nnx.clone(nnx.state(model, nnx.RngState))
    loss, aux = _loss(sampled.loss, model, batch)
    index = int(aux["granularity"])
    drawn.append(index)
    nnx.update(model, rng_state)             # the same dropout masks, at the drawn width
    expected = _loss(_at(base, model.granularities[index]), model, batch)[0]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    nnx.update(model, rng_state)
    assert int(_loss(sampled.loss, model, batch)[1]["granularity"]) == index  # seed fixes it
  assert set(drawn) == {0, 1, 3}                                     # weight 0: never L
  grads = _grads(sampled.loss, model, batch)[2]
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_nested_evaluation_reports_every_granularity_and_their_mean():
  model = MatLM(**SMALL, rngs=nnx.Rngs(0))
  batch, base = _lm_batch(), tasks.get_task("language_modeling")
  joint = tasks.Nested(base, "sample")
  metrics = tasks.finalize(jax.device_get(joint.eval_sums(model, batch)), joint)
  singles = [tasks.finalize(jax.device_get(base.eval_sums(AtGranularity(model, w), batch)), base)
             for w in model.granularities]
  for name, single in zip(("S", "M", "L", "XL"), singles):
    for key in ("loss", "accuracy", "bits_per_byte", "perplexity"):
      np.testing.assert_allclose(metrics[f"{name}/{key}"], single[key], rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], np.mean([m["loss"] for m in singles]), rtol=1e-6)
  np.testing.assert_allclose(metrics["perplexity"], math.exp(metrics["loss"]), rtol=1e-9)


def test_nested_objectives_refuse_bad_settings():
  base = tasks.get_task("language_modeling")
  with pytest.raises(ValueError, match="nested objective must be one of"):
    tasks.Nested(base, "mean")
  with pytest.raises(ValueError, match="must be >= 0 and not all 0"):
    tasks.Nested(base, "sample", weights=(0.0, 0.0, 0.0, 0.0))
  with pytest.raises(ValueError, match=r"one value per granularity \(4\), got \(1.0, 1.0\)"):
    tasks.Nested(base, "sum", weights=(1.0, 1.0)).loss(MatLM(**SMALL, rngs=nnx.Rngs(0)),
                                                       _lm_batch())
  with pytest.raises(ValueError, match="needs a nested model"):
    tasks.Nested(tasks.get_task("classification")).loss(layers.Mlp(4, 8, rngs=nnx.Rngs(0)), {})
  config = matformer_config.get_config("matlm_tiny_shakespeare,objective=sample")
  task = tasks.from_config(config)
  assert isinstance(task, tasks.Nested) and task.objective == "sample"
  assert not isinstance(tasks.from_config(matformer_config.get_config("lm_tiny_shakespeare")),
                        tasks.Nested)
  with pytest.raises(ValueError, match="objective must be one of"):
    matformer_config.get_config("matlm_tiny_shakespeare,objective=mean")


def _digits_config(objective: str):
  """MatViT on scikit-learn's 8 x 8 digits (no files needed), trained jointly for a few epochs."""
  config = matformer_config.get_config(f"matvit_fashion_mnist,objective={objective}")
  config.unlock()
  config.model.update(img_size=8, patch_size=4, in_chans=1, dim=32, depth=2, num_heads=2,
                      mlp_dim=64)
  config.data.name = "digits"
  config.input.update(image_size=0, mean=(0.0,), std=(1.0,), hflip=0.0, label_smoothing=0.0,
                      batch_size=64, eval_batch_size=512)
  config.num_epochs, config.total_steps, config.eval_every_steps = 0, 150, 150
  config.optimizer.lr = 5e-3
  config.schedule.warmup_steps = 10
  config.eval_splits = ("validation",)
  config.final_eval_splits = ("test",)
  config.checkpoint.async_save = False
  config.lock()
  return config


def test_joint_training_and_elastic_evaluation_end_to_end(tmp_path):
  config = _digits_config("sum")
  final = train.train_and_evaluate(config, str(tmp_path))
  for name in ("S", "M", "L", "XL"):
    assert final[f"test/{name}/accuracy"] > 0.85, final      # chance: 0.1
  np.testing.assert_allclose(final["test/accuracy"], np.mean(
      [final[f"test/{n}/accuracy"] for n in ("S", "M", "L", "XL")]), rtol=1e-6)
  logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_logs = [m for m in logged if "train/S/loss" in m]
  assert train_logs and all(abs(m["train/loss"] - sum(m[f"train/{n}/loss"] for n in (
      "S", "M", "L", "XL"))) < 1e-4 for m in train_logs)

  elastic = config.copy_and_resolve_references()
  elastic.evaluator = "elastic"
  result = eval_lib.evaluate_checkpoint(elastic, str(tmp_path), "latest", "test")
  rows = result["rows"]
  assert [r["name"] for r in rows] == ["S", "mix'n'match", "M", "mix'n'match", "L",
                                       "mix'n'match", "XL"]
  assert [r["widths"] for r in rows[:2]] == [[8, 8], [8, 16]]
  assert all(a["params"] < b["params"] for a, b in zip(rows, rows[1:]))
  for row in rows:   # each extracted sub-model scores what the nested model did at its widths
    if row["name"] != "mix'n'match":
      np.testing.assert_allclose(row["accuracy"], final[f"test/{row['name']}/accuracy"],
                                 rtol=1e-6)
      np.testing.assert_allclose(row["loss"], final[f"test/{row['name']}/loss"], rtol=1e-5)
  assert result["metric"] == "accuracy"   # no early-stopping metric: a classifier's curve
  assert tasks.elastic.write(result, str(tmp_path / "elastic")) == [
      str(tmp_path / "elastic.md"), str(tmp_path / "elastic.png")]
  table = (tmp_path / "elastic.md").read_text()
  assert table.count("\n| ") == 1 + len(rows) and "| **XL** | 64, 64 |" in table
  assert (tmp_path / "elastic.png").stat().st_size > 10_000
  with pytest.raises(ValueError, match="config.evaluator='elastic' needs a nested"):
    tasks.elastic.evaluate(models.create_model("transnormer_llm_tiny"), None, elastic)
  with pytest.raises(ValueError, match="unknown config.evaluator 'elastik'"):
    tasks.get_evaluator("elastik")


def test_sampled_joint_training_runs_in_the_loop(tmp_path):
  config = _digits_config("sample")
  config.unlock()
  config.total_steps = config.eval_every_steps = 12
  config.log_every_steps = 1
  config.lock()
  final = train.train_and_evaluate(config, str(tmp_path))
  drawn = [m["train/granularity"] for m in map(json.loads, open(tmp_path / "metrics.jsonl"))
           if "train/granularity" in m]
  assert len(drawn) == 12 and len(set(drawn)) >= 3 and set(drawn) <= {0.0, 1.0, 2.0, 3.0}
  assert {f"test/{n}/accuracy" for n in ("S", "M", "L", "XL")} <= final.keys()


# --- MatViT ---------------------------------------------------------------------------------------


VIT = dict(img_size=8, patch_size=4, in_chans=3, num_classes=5, dim=16, depth=2, num_heads=2,
           mlp_dim=32)


def _scenic_state_dict(seed=0, **kw):
  """Random weights in the scenic MatViT layout (flattened '/' names)."""
  kw = {**VIT, "class_token": True, **kw}
  shapes = matformer._scenic_shapes(kw)
  rng = np.random.default_rng(seed)
  return {k: rng.normal(0, 0.5 if k.endswith("kernel") else 0.2, s).astype(np.float32)
          for k, s in shapes.items()}


def _scenic_forward(sd, images, dims, depth, heads):
  """numpy port of scenic's MatViT forward: full MLPs with the hidden units past dims[i] masked
  (``gelu(x * mask)``, flax's tanh gelu), LayerNorm eps 1e-6, class-token classifier."""
  def ln(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * sd[f"{name}/scale"] + sd[f"{name}/bias"]

  def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  kernel = sd["embedding/kernel"]
  p, batch, side = kernel.shape[0], images.shape[0], images.shape[1]
  patches = images.reshape(batch, side // p, p, side // p, p, -1).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(batch, (side // p) ** 2, -1) @ kernel.reshape(-1, kernel.shape[-1])
  x = x + sd["embedding/bias"]
  x = np.concatenate([np.broadcast_to(sd["cls"], (batch, 1, x.shape[-1])), x], axis=1)
  x = x + sd["Transformer/posembed_input/pos_embedding"]
  for i in range(depth):
    pre, att = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/" \
                                                 "MultiHeadDotProductAttention_0/"
    y = ln(x, pre + "LayerNorm_0")
    q, k, v = (np.einsum("btd,dhk->bthk", y, sd[f"{att}{n}/kernel"]) + sd[f"{att}{n}/bias"]
               for n in ("query", "key", "value"))
    logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqt,bthk->bqhk", probs, v)
    x = x + np.einsum("bqhk,hkd->bqd", out, sd[f"{att}out/kernel"]) + sd[f"{att}out/bias"]
    y = ln(x, pre + "LayerNorm_1")
    hidden = y @ sd[f"{pre}MlpBlock_0/Dense_0/kernel"] + sd[f"{pre}MlpBlock_0/Dense_0/bias"]
    mask = np.arange(hidden.shape[-1]) < dims[i]
    hidden = gelu(hidden * mask)
    x = x + hidden @ sd[f"{pre}MlpBlock_0/Dense_1/kernel"] + sd[f"{pre}MlpBlock_0/Dense_1/bias"]
  x = ln(x, "Transformer/encoder_norm")[:, 0]
  return x @ sd["output_projection/kernel"] + sd["output_projection/bias"]


def _scenic_model(sd):
  params, model_class, kwargs = matformer.checkpoint_filter_fn(sd)
  assert model_class is matformer.MatViT
  model = model_class(**kwargs, rngs=nnx.Rngs(0))
  assign_params(model, params)
  return model, kwargs


_vit_forward = nnx.jit(lambda m, x, g: m(x, granularity=g), static_argnums=2)


def test_scenic_checkpoint_matches_scenics_masked_forward():
  sd = _scenic_state_dict()
  model, kwargs = _scenic_model(sd)
  assert kwargs == {**VIT, "class_token": True}
  images = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
  for dims in ((32, 32), (4, 8), (16, 32)):
    expected = _scenic_forward(sd, images.astype(np.float64), dims, depth=2, heads=2)
    _close(_vit_forward(model, jnp.asarray(images), dims), expected, rtol=1e-5)
  _close(_vit_forward(matformer.extract(model, dims), jnp.asarray(images), None), expected,
         rtol=1e-5)


def test_scenic_train_state_file_loads_and_converts(tmp_path):
  from flax import serialization, traverse_util
  from models.convert.__main__ import convert_file
  sd = _scenic_state_dict(seed=3)
  params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in sd.items()})
  train_state = {"global_step": np.asarray(7), "params": params, "model_state": {},
                 "opt_state": {"0": {"mu": params}}, "rng": np.zeros(2, np.uint32)}
  path = tmp_path / "checkpoint_7"
  path.write_bytes(serialization.msgpack_serialize(train_state))
  model = matformer.MatViT(**VIT, rngs=nnx.Rngs(0))
  models.load_pretrained(model, path)
  images = np.random.default_rng(1).normal(size=(2, 8, 8, 3))
  _close(_vit_forward(model, jnp.asarray(images, jnp.float32), (8, 16)),
         _scenic_forward(sd, images, (8, 16), depth=2, heads=2), rtol=1e-5)
  kwargs = convert_file("matformer", path, tmp_path / "converted")
  assert kwargs["mlp_dim"] == 32 and kwargs["num_classes"] == 5
  again = matformer.MatViT(**VIT, rngs=nnx.Rngs(1))
  models.load_pretrained(again, tmp_path / "converted")
  np.testing.assert_array_equal(nnx.to_pure_dict(nnx.state(again, nnx.Param))["head"]["kernel"],
                                sd["output_projection/kernel"])
  with pytest.raises(ValueError, match=r"mis-shaped: .*Dense_0/kernel expected \(16, 64\)"):
    matformer.checkpoint_filter_fn(sd, mlp_dim=64)     # e.g. the wrong --model
  bad = tmp_path / "checkpoint_8"
  bad.write_bytes(b"not msgpack")
  with pytest.raises(ValueError, match="not a flax msgpack checkpoint"):
    models.load_pretrained(model, bad)


def test_scenic_layout_mean_pooling_and_no_head():
  sd = _scenic_state_dict(class_token=False)
  sd = {k: v for k, v in sd.items() if not k.startswith("output_projection")}
  model, kwargs = _scenic_model(sd)
  assert not kwargs["class_token"] and kwargs["num_classes"] == 0
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  features = _vit_forward(model, x, None)
  assert features.shape == (2, 16)
  _close(features, jnp.mean(model.forward_features(x), axis=1), rtol=1e-6)


@pytest.mark.parametrize("name, dims", [
    ("matvit_tiny_patch16_224", (96, 192, 384, 768)),
    ("matvit_small_patch16_224", (192, 384, 768, 1536)),
    ("matvit_base_patch16_224", (384, 768, 1536, 3072)),
    ("matvit_large_patch16_224", (512, 1024, 2048, 4096)),
    ("matvit_huge_patch14_224", (640, 1280, 2560, 5120)),
    ("matvit_nano_patch4_28", (32, 64, 128, 256))])
def test_matvit_param_counts_and_scenic_matvit_dims(name, dims):
  # the official counts (timm's ViTs) are the registry's; nano is the zoo's own size
  expected = models.model_info(name).num_params or 205_066
  model = eval_shape(lambda: models.create_model(name))
  assert models.count_params(model) == expected
  assert model.granularities == dims      # scenic's config.matvit_dims
  d = models.model_info(name).defaults
  ffn_per_unit = 2 * d["dim"] + 1         # a column of fc1 with its bias, a row of fc2
  assert model.num_params(dims[0]) == expected - d["depth"] * (dims[3] - dims[0]) * ffn_per_unit


def test_matvit_api_and_inputs():
  model = matformer.MatViT(**VIT, dropout=0.1, drop_path=0.1, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  logits = model(x)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, np.broadcast_to(np.zeros(5), (2, 5)))   # zero-init head
  features = model.forward_features(x, granularity=8)
  assert features.shape == (2, 5, 16)
  assert model.forward_head(features, pre_logits=True).shape == (2, 16)
  noisy = [model.forward_features(x, train=True) for _ in range(2)]   # dropout and drop path
  assert np.abs(np.asarray(noisy[0] - noisy[1])).max() > 1e-3
  model.reset_classifier(3)
  assert model(x).shape == (2, 3) and model.init_kwargs["num_classes"] == 3
  assert models.count_params(matformer.extract(model, 8)) == model.num_params(8)
  with pytest.raises(ValueError, match=r"MatViT expects images \[batch, 8, 8, 3\] \(NHWC\), got "
                                       r"shape \(2, 8, 8, 1\)"):
    model(jnp.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match=r"images \[batch, 8, 8, 3\] \(NHWC\), got shape \(2, 4, 8, 3\)"):
    model(jnp.zeros((2, 4, 8, 3)))
  with pytest.raises(ValueError, match="MatViT expects floating-point images, got dtype int32"):
    model(jnp.zeros((2, 8, 8, 3), jnp.int32))
  with pytest.raises(ValueError, match="multiple of patch_size"):
    matformer.MatViT(**{**VIT, "img_size": 10}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"tokens \[batch, tokens, 16\]"):
    model.forward_head(jnp.zeros((2, 16)))


@pytest.mark.parametrize("arg", ["lm_tiny_shakespeare", "matlm_tiny_shakespeare",
                                 "matlm_tiny_shakespeare,objective=none,mlp_dim=73",
                                 "matvit_fashion_mnist,objective=sample,runlocal"])
def test_every_matformer_setting_builds_its_model(arg):
  config = matformer_config.get_config(arg)
  overrides = common.model_overrides(config)
  meta = {"vocab_size": 256} if config.task == "language_modeling" else {"num_classes": 10}
  task = tasks.from_config(config)
  model = nnx.eval_shape(lambda: models.create_model(config.model.name, **overrides,
                                                     **task.model_overrides(meta)))
  assert isinstance(task, tasks.Nested) == ("objective=none" not in arg and "lm_" != arg[:3])
  if "mlp_dim=73" in arg:
    assert models.count_params(model) == 374_820 and model.granularities == (9, 18, 36, 73)
