"""models.generate: greedy equals the argmax of the full forward at every step (KV-cache MatLM and
recurrent TransNormerLLM), sampling filters (top-k, nucleus) and their frequencies, memory,
inputs; speculative decoding gives exactly the target's greedy tokens whatever the draft."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import matformer
from models.generation import Sampling, speculative_generate

SMALL_LMS = {
    "matlm_rope": ("matlm_tiny", dict(vocab_size=64, dim=32, depth=2, num_heads=4, mlp_dim=64)),
    "matlm_alibi_mqa": ("matlm_tiny", dict(vocab_size=64, dim=32, depth=2, num_heads=4, mlp_dim=64,
                                           num_kv_heads=1, positions="alibi")),
    "transnormer_llm": ("transnormer_llm_tiny", dict(vocab_size=64, dim=32, depth=2, num_heads=4,
                                                     glu_dim=48)),
}
PROMPT = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)


def _model(which):
  """A small LM whose layer weights are scaled up from the init (std 0.02 -> 0.2), so that the
  layers outweigh the embedding in the residual stream: greedy decoding then does not just
  repeat the last token (what the tied head favours at init), and the tests see varied
  continuations."""
  name, kwargs = SMALL_LMS[which]
  model = models.create_model(name, **kwargs, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map_with_path(
      lambda path, p: p if "embed" in jax.tree_util.keystr(path) else 10 * p, params))
  return model


@pytest.mark.parametrize("which", SMALL_LMS)
def test_greedy_is_the_argmax_of_the_full_forward_at_every_step(which):
  model = _model(which)
  out = models.generate(model, PROMPT, 10)
  assert out.shape == (2, 15) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :5], PROMPT)
  logits = np.asarray(model(out)[:, 4:-1])   # the logits that chose tokens 5..14
  chosen = np.take_along_axis(logits, np.asarray(out[:, 5:])[..., None], -1)[..., 0]
  margin = logits.max(-1) - chosen
  assert (margin <= 1e-5 * np.abs(logits).max()).all(), margin.max()   # an argmax up to rounding
  assert (logits.argmax(-1) == np.asarray(out[:, 5:])).mean() == 1.0


def test_matlm_generates_at_a_granularity():
  model = _model("matlm_rope")
  out = models.generate(model, PROMPT, 6, granularity=8)
  logits = np.asarray(model(out, granularity=8)[:, 4:-1])
  np.testing.assert_array_equal(logits.argmax(-1), out[:, 5:])
  assert not np.array_equal(out, models.generate(model, PROMPT, 6))   # the XL model differs


@pytest.mark.parametrize("which", ["matlm_rope", "transnormer_llm"])
def test_sampling_keeps_to_the_top_k_and_is_reproducible(which):
  model = _model(which)
  kwargs = dict(temperature=1.0, top_k=3, rng=jax.random.key(7))
  out = models.generate(model, PROMPT, 10, **kwargs)
  np.testing.assert_array_equal(out, models.generate(model, PROMPT, 10, **kwargs))
  assert not np.array_equal(out, models.generate(model, PROMPT, 10, **{
      **kwargs, "rng": jax.random.key(8)}))
  logits = np.asarray(model(out)[:, 4:-1])
  rank = (logits > np.take_along_axis(logits, np.asarray(out[:, 5:])[..., None], -1)).sum(-1)
  assert rank.max() < 3
  assert not np.array_equal(out, models.generate(model, PROMPT, 10))   # not greedy


def test_sampling_frequencies():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32))
  key = jax.random.key(3)

  def frequencies(sampling):
    return np.bincount(np.asarray(sampling(logits, key)), minlength=4) / len(logits)

  # plain: the distribution itself (4 sigma of 20,000 draws < 0.015)
  np.testing.assert_allclose(frequencies(Sampling(1.0)), probs, atol=0.015)
  # nucleus 0.7: tokens 0 and 1 (0.5 < 0.7 before token 1, 0.8 >= 0.7 before token 2), renormalised
  np.testing.assert_allclose(frequencies(Sampling(1.0, top_p=0.7)), [0.625, 0.375, 0, 0],
                             atol=0.015)
  # top-3, temperature 0.5: probabilities squared, renormalised
  squared = probs[:3] ** 2 / (probs[:3] ** 2).sum()
  np.testing.assert_allclose(frequencies(Sampling(0.5, top_k=3)), [*squared, 0], atol=0.015)
  # top_k=1, or a nucleus smaller than the top token's probability, is greedy
  assert frequencies(Sampling(1.0, top_k=1))[0] == frequencies(Sampling(1.0, top_p=0.4))[0] == 1


def _temp_bytes(model, new_tokens):
  """Scratch memory XLA allocates for generating `new_tokens` tokens (the whole compiled loop)."""
  from models.generation import _generate
  graphdef, state = nnx.split(model)
  compiled = _generate.lower(graphdef, state, PROMPT.astype(jnp.int32), jax.random.key(0),
                             max_new_tokens=new_tokens, sampling=Sampling(),
                             decode_kwargs=()).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_recurrent_state_memory_does_not_grow_with_the_generated_length():
  tnl, matlm = _model("transnormer_llm"), _model("matlm_rope")
  # TNL: a fixed-size state; only the output tokens (int32 [2, N]) grow.
  tnl_growth = _temp_bytes(tnl, 2048) - _temp_bytes(tnl, 64)
  assert tnl_growth <= 2 * 4 * 2048, tnl_growth
  # MatLM: K and V for every position: 2 layers x 2 x [2, N, 4, 8] f32 at least.
  matlm_growth = _temp_bytes(matlm, 2048) - _temp_bytes(matlm, 64)
  assert matlm_growth >= 2 * 2 * 2 * 4 * 8 * 4 * (2048 - 64), matlm_growth


def test_bad_inputs_are_refused():
  model = _model("matlm_rope")
  with pytest.raises(ValueError, match="needs rng"):
    models.generate(model, PROMPT, 3, temperature=0.7)
  with pytest.raises(ValueError, match=r"prompt_tokens must be integers \[batch, length >= 1\]"):
    models.generate(model, PROMPT[0], 3)
  with pytest.raises(ValueError, match=r"prompt_tokens must be integers"):
    models.generate(model, PROMPT.astype(jnp.float32), 3)
  with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
    models.generate(model, PROMPT, -1)
  with pytest.raises(ValueError, match="top_p must be in"):
    models.generate(model, PROMPT, 3, temperature=1.0, top_p=0.0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="has no init_cache"):
    models.generate(models.create_model("itransformer_etth1_96"), PROMPT, 3)
  np.testing.assert_array_equal(models.generate(model, PROMPT, 0), PROMPT)


# --- speculative decoding -------------------------------------------------------------------------


def _drafts(target):
  return {"itself": (target, {}), "extracted_s": (matformer.extract(target, 8), {}),
          "own_s_width": (target, {"granularity": 8}),
          "unrelated": (_model("matlm_alibi_mqa"), {})}


def test_speculative_decoding_gives_the_targets_greedy_tokens():
  target = _model("matlm_rope")
  cases = {"itself": (target, {}), "extracted_s": (matformer.extract(target, 8), {}),
           "own_s_width": (target, {"granularity": 8}),
           "unrelated": (_model("matlm_alibi_mqa"), {})}
  expected = models.generate(target, PROMPT, 12)
  rates = {}
  for name, (draft, kwargs) in cases.items():
    out, stats = speculative_generate(target, draft, PROMPT, 12, num_draft=4,
                                      draft_kwargs=kwargs)
    np.testing.assert_array_equal(out, expected, err_msg=name)
    # one token from the prompt's call, then the kept proposals + 1 per round (the last round
    # may run past the end)
    assert 12 <= 1 + stats["accepted"] + stats["rounds"] <= 12 + 4, (name, stats)
    assert stats["proposed"] == 4 * stats["rounds"]
    rates[name] = stats["acceptance_rate"]
  assert rates["itself"] == 1.0 and rates["unrelated"] < 1.0
  # the extracted sub-model is the target at width 8: the same proposals, the same rounds
  assert rates["extracted_s"] == rates["own_s_width"]
  # a one-token prompt, one proposal per round
  out, stats = speculative_generate(target, target, PROMPT[:, :1], 7, num_draft=1)
  np.testing.assert_array_equal(out, models.generate(target, PROMPT[:, :1], 7))
  assert stats == {"rounds": 3, "accepted": 3, "proposed": 3, "acceptance_rate": 1.0}


def test_speculative_decoding_refuses_models_without_a_kv_cache():
  target = _model("matlm_rope")
  with pytest.raises(ValueError, match=r"the draft TransNormerLLM has none"):
    speculative_generate(target, _model("transnormer_llm"), PROMPT, 4)
  with pytest.raises(ValueError, match="num_draft must be an int >= 1"):
    speculative_generate(target, target, PROMPT, 4, num_draft=0)
  with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
    speculative_generate(target, target, PROMPT, 0)
