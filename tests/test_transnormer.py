"""TransNormer v1: official layers (golden fixtures), converter, causal LM decoding, masked LM,
URPE, fairseq positions, sizes, inputs."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_golden
import models
from models.layers import Buffer
from models.pretrained import assign_params, load_pretrained, save_params
from models.transnormer import (TransNormerLayer, TransNormerLM, TransNormerMLM, Urpe,
                                checkpoint_filter_fn, fairseq_positions, layer_params,
                                sinusoidal_embedding)
from ops import simple_rms_norm

# name: (diag layer, NormAttention kernel, softmax DiagAttention)
FIXTURES = {"tn1_t1_diag_layer": (True, "elu", False), "tn1_t1_norm_layer": (False, "elu", False),
            "tn1_t2_diag_layer": (True, "1+elu", True), "tn1_t2_norm_layer": (False, "1+elu", True)}
SMALL_LM = dict(vocab_size=50, dim=32, depth=4, num_heads=4)


_golden = functools.partial(load_golden, "transnormer_v1")  # (spec, state_dict, arrays) of a fixture


def _batch_first(arrays, key):
  return jnp.asarray(arrays[key]).transpose(1, 0, 2)               # fairseq is time-first


def _assert_close(actual, reference):
  reference = np.asarray(reference, np.float64)
  err = np.abs(np.asarray(actual, np.float64) - reference).max()
  assert err <= 1e-4 * max(1.0, np.abs(reference).max()), err


_call = nnx.jit(lambda module, x: module(x))


# --- parity with the official layers --------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_golden_layer(name):
  """T = 150: three 64-token blocks, the last ragged; T1/T2 Diag and Norm layers."""
  diag, kernel, softmax = FIXTURES[name]
  _, state_dict, arrays = _golden(name)
  layer = TransNormerLayer(64, 4, diag=diag, kernel=kernel, diag_softmax=softmax, causal=True,
                           post_norm=False, rngs=nnx.Rngs(0))
  assign_params(layer, layer_params(state_dict, ""))
  x = _batch_first(arrays, "x")
  attn = _call(layer.attn, simple_rms_norm(x))
  _assert_close(attn, _batch_first(arrays, "feat/self_attn"))
  _assert_close(_call(layer.glu, simple_rms_norm(x + attn)), _batch_first(arrays, "feat/glu"))
  _assert_close(_call(layer, x), _batch_first(arrays, "output"))


@pytest.mark.parametrize("t", ["t1", "t2"])
def test_converter_maps_an_official_lm_checkpoint(t):
  """A fairseq LM checkpoint whose layers 0 (Diag) and 1 (Norm) are the golden layers."""
  names = (f"tn1_{t}_diag_layer", f"tn1_{t}_norm_layer")
  embed = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
  sd = {"decoder.embed_tokens.weight": embed, "decoder.output_projection.weight": embed,
        "decoder.embed_positions._float_tensor": np.zeros(1, np.float32),
        "decoder.version": np.array([3.0], np.float32)}
  for i, name in enumerate(names):
    sd |= {f"decoder.layers.{i}.{k}": v for k, v in _golden(name)[1].items()}
  variant = models.model_info(f"transnormer_{t}").defaults
  params, model_class, kwargs = checkpoint_filter_fn(sd, **variant)
  assert model_class is TransNormerLM
  assert {k: kwargs[k] for k in ("vocab_size", "dim", "depth", "num_heads")} == dict(
      vocab_size=40, dim=64, depth=2, num_heads=4)
  model = model_class(**kwargs, rngs=nnx.Rngs(0))
  assign_params(model, params)
  for i, name in enumerate(names):
    arrays = _golden(name)[2]
    _assert_close(_call(model.layers[i], _batch_first(arrays, "x")), _batch_first(arrays, "output"))
  np.testing.assert_array_equal(model.embed_tokens.embedding[...], embed)


def _mlm_state_dict(dim=32, depth=2, heads=4, vocab=30, max_positions=16, seed=0):
  rng = np.random.default_rng(seed)
  p = "encoder.sentence_encoder."
  hidden, head_dim = int(8 / 3 * dim), dim // heads
  shapes = {f"{p}embed_tokens.weight": (vocab, dim),
            f"{p}embed_positions.weight": (max_positions + 2, dim),
            f"{p}layernorm_embedding.weight": (dim,), f"{p}layernorm_embedding.bias": (dim,),
            "encoder.lm_head.dense.weight": (dim, dim), "encoder.lm_head.dense.bias": (dim,),
            "encoder.lm_head.layer_norm.weight": (dim,), "encoder.lm_head.layer_norm.bias": (dim,),
            "encoder.lm_head.bias": (vocab,)}
  for i in range(depth):
    layer = f"{p}layers.{i}."
    shapes |= {f"{layer}self_attn.urpe.theta": (1, 1, head_dim // 2),
               f"{layer}self_attn.urpe.v": (head_dim,)}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      shapes |= {f"{layer}self_attn.{proj}.weight": (dim, dim),
                 f"{layer}self_attn.{proj}.bias": (dim,)}
    for n, shape in (("l1", (hidden, dim)), ("l2", (hidden, dim)), ("l3", (dim, hidden))):
      shapes |= {f"{layer}glu.{n}.weight": shape, f"{layer}glu.{n}.bias": shape[:1]}
  sd = {k: (rng.normal(size=s) * 0.2).astype(np.float32) for k, s in shapes.items()}
  sd["encoder.lm_head.weight"] = sd[f"{p}embed_tokens.weight"]      # tied copy
  return sd


def test_converter_maps_an_official_roberta_checkpoint():
  sd = _mlm_state_dict()
  params, model_class, kwargs = checkpoint_filter_fn(sd, kernel="1+elu", diag_softmax=True)
  assert model_class is TransNormerMLM and kwargs["max_positions"] == 16
  model = model_class(**kwargs, rngs=nnx.Rngs(0))
  assign_params(model, params)
  np.testing.assert_array_equal(model.lm_head_bias[...], sd["encoder.lm_head.bias"])
  np.testing.assert_array_equal(model.layers[1].attn.urpe.v[...],
                                sd["encoder.sentence_encoder.layers.1.self_attn.urpe.v"])
  tokens = jnp.array([[0, 5, 7, 9, 2, 1, 1]])                       # two trailing pads
  logits = _call(model, tokens)
  # the pads sit at position 1, the padding row of the learned positions
  positions = fairseq_positions(tokens, 1)
  np.testing.assert_array_equal(positions, [[2, 3, 4, 5, 6, 1, 1]])
  assert logits.shape == (1, 7, 30) and np.isfinite(np.asarray(logits)).all()


def test_converter_errors():
  sd = _mlm_state_dict()
  del sd["encoder.sentence_encoder.layers.1.glu.l2.bias"]
  sd["encoder.sentence_encoder.layers.0.self_attn.q_proj.bias"] = np.zeros(31, np.float32)
  with pytest.raises(ValueError, match=r"(?s)2 problems.*missing: encoder\.sentence_encoder\.layers"
                                       r"\.1\.glu\.l2\.bias.*mis-shaped"):
    checkpoint_filter_fn(sd)
  with pytest.raises(ValueError, match="expected a fairseq TransNormer checkpoint"):
    checkpoint_filter_fn({"model.embed_tokens.weight": np.zeros((3, 4))})


# --- the causal LM: decoding ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["transnormer_t1", "transnormer_t2"])
def test_decoding_equals_the_full_forward(variant):
  """A prefill of 70 tokens (past the first 64-token block) then single tokens, with a pad token
  inside (fairseq positions skip it)."""
  model = models.create_model(variant, **SMALL_LM)
  tokens = jax.random.randint(jax.random.key(0), (2, 150), 2, 50).at[0, 10].set(1)
  full = _call(model, tokens)
  step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  logits, cache = step(model, tokens[:, :70], model.init_cache(2, 150))
  outputs = [logits]
  for t in range(70, 150):
    logits, cache = step(model, tokens[:, t:t + 1], cache)
    outputs.append(logits)
  _assert_close(jnp.concatenate(outputs, axis=1), full)
  assert int(cache["position"]) == 150
  np.testing.assert_array_equal(cache["seen"], [149, 150])


def test_pallas_kernels_give_the_same_logits():
  tokens = jax.random.randint(jax.random.key(1), (1, 80), 2, 50)
  xla = models.create_model("transnormer_t2", **SMALL_LM)
  pallas = models.create_model("transnormer_t2", **SMALL_LM, attn_implementation="pallas")
  _assert_close(_call(pallas, tokens), _call(xla, tokens))


def test_dropout_only_when_training():
  model = models.create_model("transnormer_t1_mlm", vocab_size=30, dim=32, depth=2, num_heads=4,
                              max_positions=16)
  tokens = jnp.array([[0, 5, 7, 9, 2]])
  eval1 = _call(model, tokens)
  np.testing.assert_array_equal(eval1, _call(model, tokens))
  train = nnx.jit(lambda m, t: m(t, train=True))
  assert np.abs(np.asarray(train(model, tokens) - eval1)).max() > 1e-3
  # attention dropout that drops nothing (rate 1e-9) takes the explicit path: same numbers
  quiet = models.create_model("transnormer_t2_mlm", vocab_size=30, dim=32, depth=2, num_heads=4,
                              max_positions=16, dropout=0.0, attn_drop=1e-9)
  _assert_close(train(quiet, tokens), _call(quiet, tokens))


# --- URPE, positions ------------------------------------------------------------------------------


def test_urpe_is_relative_and_its_householder_vector_is_a_saved_buffer(tmp_path):
  urpe = Urpe(8, rngs=nnx.Rngs(0))
  urpe.theta[...] = jax.random.normal(jax.random.key(1), (4,))
  q, k = jax.random.normal(jax.random.key(2), (2, 1, 5, 1, 8))

  def dots(shift):
    return jnp.sum(urpe(q, jnp.arange(5) + shift) * urpe(k, jnp.arange(5)[::-1] + shift), axis=-1)

  np.testing.assert_allclose(dots(0), dots(37), rtol=1e-4, atol=1e-5)  # depends on p - s only
  np.testing.assert_allclose(jnp.linalg.norm(urpe(q, jnp.arange(5)), axis=-1),
                             jnp.linalg.norm(q, axis=-1), rtol=1e-5)  # orthogonal
  assert isinstance(urpe.v, Buffer)
  model = models.create_model("transnormer_t1", **SMALL_LM)
  leaf_names = lambda state: {path[-1] for path, _ in nnx.to_flat_state(state)}
  assert "v" not in leaf_names(nnx.state(model, nnx.Param))         # not trained, not counted
  assert leaf_names(nnx.state(model, Buffer)) == {"v"}
  save_params(model, tmp_path / "tn")
  other = models.create_model("transnormer_t1", **SMALL_LM, rngs=nnx.Rngs(5))
  assert not np.allclose(other.layers[0].attn.urpe.v[...], model.layers[0].attn.urpe.v[...])
  load_pretrained(other, tmp_path / "tn")
  np.testing.assert_array_equal(other.layers[0].attn.urpe.v[...], model.layers[0].attn.urpe.v[...])


def test_sinusoidal_positions_match_fairseq():
  dim, pad = 10, 1
  half = dim // 2
  freqs = np.exp(np.arange(half) * -(math.log(10000) / (half - 1)))
  table = np.arange(20)[:, None] * freqs[None]
  table = np.concatenate([np.sin(table), np.cos(table)], axis=1)
  table[pad] = 0
  tokens = jnp.array([[5, 1, 6, 7], [1, 1, 8, 9]])
  positions = fairseq_positions(tokens, pad)
  np.testing.assert_array_equal(positions, [[2, 1, 3, 4], [1, 1, 2, 3]])
  np.testing.assert_allclose(sinusoidal_embedding(positions, dim, pad),
                             table[np.asarray(positions)], atol=1e-6)


# --- sizes, inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [("transnormer_t1", 155_988_156),
                                           ("transnormer_t2_mlm", 124_672_473)])
def test_parameter_counts(name, expected):
  info = models.model_info(name)
  model = nnx.eval_shape(lambda: models.create_model(name))
  assert models.count_params(model) == expected
  d, heads = (512, 8) if name == "transnormer_t1" else (768, 12)
  glu = int(8 / 3 * d)
  layer = 4 * (d * d + d) + 2 * (d * glu + glu) + glu * d + d + d // heads // 2  # + URPE theta
  if name == "transnormer_t1":  # WikiText-103 vocabulary, tied head: ~156 M as in the paper
    assert expected == 6 * layer + 267_744 * d
  else:  # + learned positions, embedding LayerNorm, RoBERTa LM head
    assert expected == 12 * layer + 50_265 * d + 514 * d + 2 * d + d * d + d + 2 * d + 50_265
  assert info.family == "transnormer"


def test_rejects_bad_inputs():
  model = models.create_model("transnormer_t1", **SMALL_LM)
  with pytest.raises(ValueError, match=r"integer array \[batch, length\], got shape \(2, 3\)"):
    model(jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="cache is for batch 2, got tokens for batch 3"):
    model.decode_step(jnp.zeros((3, 1), jnp.int32), model.init_cache(2))
  with pytest.raises(ValueError, match="depth must be even"):
    models.create_model("transnormer_t1", **{**SMALL_LM, "depth": 3})
  with pytest.raises(ValueError, match="kernel must be one of"):
    models.create_model("transnormer_t1", **SMALL_LM, kernel="relu")
  mlm = models.create_model("transnormer_t1_mlm", vocab_size=30, dim=32, depth=2, num_heads=4,
                            max_positions=16)
  with pytest.raises(ValueError, match="at most max_positions=16 tokens, got 17"):
    mlm(jnp.zeros((1, 17), jnp.int32))
