"""Registry: names, lookup errors, overrides, count_params; every registration greppable. The
official parameter counts of every variant: tests/test_models.py."""
import pathlib
import re

import jax.numpy as jnp
import pytest
from flax import nnx

import models

MODELS_DIR = pathlib.Path(models.__file__).parent


def _abstract(name, **overrides):
  """Structure and shapes only: counting parameters needs no initialisation."""
  return nnx.eval_shape(lambda: models.create_model(name, **overrides))


def test_list_models_patterns():
  assert models.list_models("itransformer_etth1_*") == [
      "itransformer_etth1_192", "itransformer_etth1_336", "itransformer_etth1_720", "itransformer_etth1_96"]
  assert len(models.list_models("itransformer_pems0?_*")) == 16
  assert len(models.list_models("itransformer_*")) == 9 * 4 + 4 * 4 + 1  # forecasting settings + digits
  assert models.list_models("no_such_family*") == []


def test_unknown_name_suggests_close_match():
  with pytest.raises(ValueError, match=r"unknown model 'itransformer_eth1_96'.*did you mean.*itransformer_etth1_96"):
    models.create_model("itransformer_eth1_96")


def test_model_info_carries_script_settings_and_paper_metric():
  info = models.model_info("itransformer_pems04_48")
  assert info.family == "itransformer"
  assert (info.defaults["d_model"], info.defaults["d_ff"], info.defaults["e_layers"],
          info.defaults["use_norm"]) == (1024, 1024, 4, False)
  assert info.paper_metric == "0.120/0.233"
  assert models.model_info("itransformer_ecl_720").paper_metric == "0.225/0.317"
  assert models.model_info("itransformer_pems07_48").defaults["e_layers"] == 4
  assert models.model_info("itransformer_pems07_24").defaults["e_layers"] == 2


def test_create_model_overrides_replace_defaults():
  m = models.create_model("itransformer_etth1_96", pred_len=24, dropout=0.0, rngs=nnx.Rngs(3))
  assert m.pred_len == 24
  y = m(jnp.ones((2, 96, 5)))
  assert y.shape == (2, 24, 5)
  assert _abstract("itransformer_etth1_96", param_dtype=jnp.bfloat16).projector.kernel.dtype == jnp.bfloat16


def test_count_params_of_the_digits_classifier_counts_params_only():
  embed, norm, head = 8 * 64 + 64, 2 * 64, 8 * 64 * 10 + 10
  block = 4 * (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64) + 2 * norm  # attention, mlp, two norms
  assert models.count_params(models.create_model("itransformer_cls_digits")) == embed + 2 * block + norm + head


def test_every_registered_name_is_written_out_in_a_registration_call():
  """`grep -r '"maxvit_tiny_tf_224"' models/` finds where a variant or its weights are registered:
  each name stands literally as the first argument of register_model / register_pretrained (no
  names built in loops or f-strings), once."""
  source = "\n".join(path.read_text() for path in sorted(MODELS_DIR.glob("*.py"))
                     if path.name != "registry.py")  # its docstring shows the calls
  for call, names in (("register_model", models.list_models()),
                      ("register_pretrained", models.list_pretrained())):
    written = re.findall(rf'\b{call}\(\s*"([^"]+)"', source)
    assert sorted(written) == sorted(names), (
        f"{call} names not written out literally: {sorted(set(names) - set(written))}; "
        f"written more than once or not registered: "
        f"{sorted(n for n in set(written) if written.count(n) > 1 or n not in names)}")
