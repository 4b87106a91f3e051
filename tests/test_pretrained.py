"""Pretrained weights: the registry, fetching through a Hugging Face cache laid out as
huggingface_hub lays it out (offline), the converted copy, the head reset, save_pretrained.

The official files are the golden fixtures' state dicts saved as the releases are (timm's
model.safetensors, the official .pth), so a pretrained model must reproduce the official logits.
"""
import hashlib
import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import models
from conftest import load_golden
from models import hub, registry
from models.hub import flatten
from models.pretrained import WEIGHTS

VISION_FAMILIES = ("maxvit", "hornet", "biformer", "matformer")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
  """An empty Hugging Face cache, offline (HF_HUB_OFFLINE=1)."""
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return tmp_path / "hub"


def put_on_hub(cache, repo_id: str, filename: str):
  """The path of `filename` in repo `repo_id` at its main revision, as huggingface_hub lays a
  download out (refs/main naming a snapshot); the caller writes the file."""
  repo = cache / f"models--{repo_id.replace('/', '--')}"
  commit = hashlib.sha1(repo_id.encode()).hexdigest()
  (repo / "refs").mkdir(parents=True, exist_ok=True)
  (repo / "refs" / "main").write_text(commit)
  path = repo / "snapshots" / commit / filename
  path.parent.mkdir(parents=True, exist_ok=True)
  return path


def put_release(cache, name: str, state_dict):
  """An official file of registered weights, where `fetch` finds it: in the hub repo, or the
  download of a URL (a .pth with the weights under "model", as HorNet and BiFormer save them)."""
  cfg = models.pretrained_cfg(name)
  if cfg.hf_hub_id:
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
              str(put_on_hub(cache, cfg.hf_hub_id, cfg.filename)))
    return
  torch = pytest.importorskip("torch")
  path = hub.url_download_path(cfg)
  path.parent.mkdir(parents=True, exist_ok=True)
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}}, path)


def _nhwc(x):
  return jnp.asarray(x if x.shape[-1] == 3 else x.transpose(0, 2, 3, 1))


_logits = nnx.jit(lambda model, x: model(x))


def _weights(model):
  return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model, WEIGHTS))).items()}


# --- the registry ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", models.list_pretrained())
def test_every_entry_is_complete(name):
  """Every pretrained entry names a registered model, a source, a license and the official
  metric; vision weights give their preprocessing and classifier, language models a tokenizer."""
  cfg = models.pretrained_cfg(name)
  info = models.model_info(name.partition(".")[0])
  assert cfg.license and cfg.metric and (cfg.hf_hub_id or cfg.url) and cfg.filename
  if info.family in VISION_FAMILIES:
    assert cfg.label_set and cfg.classifier and cfg.input_size[0] == 3
    assert len(cfg.mean) == len(cfg.std) == 3
    assert 0 < cfg.crop_pct <= 1 and cfg.crop_mode in ("center", "squash")
    assert cfg.input_size[1] == info.defaults.get("img_size", cfg.input_size[1])
  else:
    assert cfg.tokenizer


_FAMILIES_WITH_WEIGHTS = {models.model_info(n.partition(".")[0]).family
                          for n in models.list_pretrained()}


@pytest.mark.parametrize("family", sorted(_FAMILIES_WITH_WEIGHTS & set(VISION_FAMILIES)))
def test_classifier_paths_name_the_head(family):
  """A family's weights name its classifier: the kernel and bias of a head of num_classes (checked
  on the family's smallest variant with weights: the head is the same layer in every size)."""
  names = [n for n in models.list_pretrained() if models.model_info(n.partition(".")[0]).family
           == family]
  name = min(names, key=lambda n: models.model_info(n.partition(".")[0]).defaults.get("depths", 0))
  cfg = models.pretrained_cfg(name)
  model = nnx.eval_shape(lambda: models.create_model(name.partition(".")[0], num_classes=11))
  params = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  head = {k: v.shape for k, v in params.items() if k.startswith(cfg.classifier + "/")}
  assert head.keys() == {f"{cfg.classifier}/kernel", f"{cfg.classifier}/bias"}
  assert head[f"{cfg.classifier}/bias"] == (11,)
  assert {models.pretrained_cfg(n).classifier for n in names} == {cfg.classifier}


def test_listing_tags_and_defaults():
  assert "maxvit_tiny_tf_224.in1k" in models.list_pretrained("maxvit_tiny*")
  assert models.list_pretrained("maxvit_base_tf_384.*") == [
      "maxvit_base_tf_384.in1k", "maxvit_base_tf_384.in21k_ft_in1k"]
  assert models.pretrained_cfg("maxvit_base_tf_384") == models.pretrained_cfg(
      "maxvit_base_tf_384.in1k")   # the first tag is the default
  assert models.pretrained_cfg("maxvit_base_tf_224.in21k").num_classes == 21843
  assert models.resolve_data_config("maxvit_tiny_tf_512.in1k") == dict(
      input_size=(3, 512, 512), interpolation="bicubic", mean=(0.5, 0.5, 0.5),
      std=(0.5, 0.5, 0.5), crop_pct=1.0, crop_mode="squash")
  with pytest.raises(ValueError, match=r"no pretrained weights maxvit_tiny_tf_224\.in22k; its "
                                       r"weights: maxvit_tiny_tf_224\.in1k"):
    models.create_model("maxvit_tiny_tf_224.in22k")
  with pytest.raises(ValueError, match=r"itransformer_etth1_96.*no weights are registered"):
    models.create_model("itransformer_etth1_96", pretrained=True)


# --- official logits through the cache ------------------------------------------------------------

@pytest.mark.parametrize("name,fixture", [
    ("maxvit_tiny_tf_224.in1k", ("maxvit", "maxvit_tiny_tf_224")),   # hub, timm's safetensors
    ("hornet_tiny_7x7.in1k", ("hornet", "hornet_tiny_7x7_224")),      # URL, official .pth
])
def test_pretrained_reproduces_the_official_logits(hf_cache, name, fixture):
  _, state_dict, arrays = load_golden(*fixture)
  put_release(hf_cache, name, state_dict)
  model = models.create_model(name, pretrained=True)
  assert model.pretrained_cfg == models.pretrained_cfg(name)
  ref = arrays["logits"]
  assert np.abs(np.asarray(_logits(model, _nhwc(arrays["input"]))) - ref).max() <= \
      1e-3 * np.abs(ref).max()


def test_second_load_reads_the_converted_copy_and_never_converts(hf_cache, monkeypatch):
  """BiFormer's release format (a .pth from a URL) with the small fixture's weights and
  architecture: the official logits, then a second load that reads the converted copy."""
  _, state_dict, arrays = load_golden("biformer", "biformer_custom_d32")
  name = "biformer_tiny.in1k"
  put_release(hf_cache, name, state_dict)
  converter = models.convert.get_converter("biformer")
  kwargs = converter(state_dict)[2]
  first = models.create_model("biformer_tiny", pretrained=True, **kwargs)
  ref = arrays["logits"]
  assert np.abs(np.asarray(_logits(first, _nhwc(arrays["input"]))) - ref).max() <= \
      1e-4 * max(1.0, np.abs(ref).max())
  assert len(list((hf_cache / "zoo-converted").glob("biformer-*.safetensors"))) == 1

  # A damaged converted copy is converted again; a damaged zoo weights file is refused by name.
  (copy,) = (hf_cache / "zoo-converted").glob("biformer-*.safetensors")
  good = copy.read_bytes()
  copy.write_bytes(good[:1000])
  again = models.create_model("biformer_tiny", pretrained=True, **kwargs)
  assert hub.read_weights(copy).keys() == flatten(converter(state_dict)[0]).keys()  # rewritten
  assert all(np.array_equal(v, _weights(first)[k]) for k, v in _weights(again).items())
  cut = hf_cache / "cut.safetensors"
  cut.write_bytes(good[:1000])
  with pytest.raises(ValueError, match=r"cut\.safetensors is not a readable \.safetensors file"):
    hub.read_weights(cut)

  def refuse(*args, **kw):
    raise AssertionError("converted again")
  monkeypatch.setattr(models.biformer, "checkpoint_filter_fn", refuse)
  second = models.create_model("biformer_tiny", pretrained=True, **kwargs,
                               rngs=nnx.Rngs(1))
  a, b = _weights(first), _weights(second)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_other_head_size_keeps_a_fresh_head_and_says_so(hf_cache, caplog):
  _, state_dict, _ = load_golden("biformer", "biformer_custom_d32")
  put_release(hf_cache, "biformer_tiny.in1k", state_dict)
  kwargs = {**models.convert.get_converter("biformer")(state_dict)[2], "num_classes": 7}
  with caplog.at_level(logging.WARNING):
    model = models.create_model("biformer_tiny.in1k", **kwargs)
  assert "the weights' classifier has 1000 classes and the model 7: head keeps its fresh" in \
      caplog.text
  fresh = _weights(models.create_model("biformer_tiny", **kwargs))
  loaded = _weights(model)
  official = flatten(models.convert.get_converter("biformer")(state_dict)[0])
  assert np.array_equal(loaded["head/kernel"], fresh["head/kernel"])
  body = next(k for k in official if k.startswith("stages/"))
  assert np.array_equal(loaded[body], official[body]) and not np.array_equal(fresh[body],
                                                                             official[body])


def test_missing_offline_and_damaged_files_say_which_and_what_to_do(hf_cache, monkeypatch):
  with pytest.raises(ValueError, match=r"^maxvit_tiny_tf_224\.in1k: timm/maxvit_tiny_tf_224\.in1k/"
                                       r"model\.safetensors is not in the Hugging Face cache .*"
                                       r"HF_HUB_OFFLINE=1.*`hf download timm/maxvit_tiny_tf_224"):
    models.create_model("maxvit_tiny_tf_224", pretrained=True)
  with pytest.raises(ValueError, match=r"^biformer_tiny\.in1k: biformer_tiny_in1k\.pth is not in "
                                       r".*zoo-downloads.*HF_HUB_OFFLINE=1; download https://api"):
    models.create_model("biformer_tiny.in1k")
  # A release with a published checksum, and a file that is not it.
  cfg = registry.PretrainedCfg(license="MIT", metric="top-1 0", hf_hub_id="org/weights",
                               sha256="0" * 64, tokenizer="none")
  monkeypatch.setitem(registry._PRETRAINED, "transnormer_llm_tiny.test", cfg)
  put_on_hub(hf_cache, "org/weights", "model.safetensors").write_bytes(b"not the release")
  with pytest.raises(ValueError, match=r"model\.safetensors: sha256 [0-9a-f]{64}, expected the "
                                       r"published 0{64}; the file is damaged"):
    models.create_model("transnormer_llm_tiny.test")


def test_sharded_transnormer_llm_release_reproduces_the_official_logits(hf_cache):
  """TransNormerLLM-7B's release layout: pytorch_model.bin.index.json naming .bin shards (torch
  pickles, read without torch), fetched and merged; the small golden fixture's weights and
  architecture stand in for the 7B's."""
  torch = pytest.importorskip("torch")
  _, state_dict, arrays = load_golden("transnormer_llm", "tnl_custom_d64_l3")
  cfg = models.pretrained_cfg("transnormer_llm_7b.base")
  shard = {k: f"pytorch_model-0000{i % 3 + 1}-of-00003.bin"
           for i, k in enumerate(sorted(state_dict))}
  put_on_hub(hf_cache, cfg.hf_hub_id, cfg.filename).write_text(json.dumps({"weight_map": shard}))
  for name in set(shard.values()):
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()
                if shard[k] == name}, put_on_hub(hf_cache, cfg.hf_hub_id, name))
  kwargs = models.convert.get_converter("transnormer_llm")(state_dict)[2]
  model = models.create_model("transnormer_llm_7b.base", **kwargs)
  ref = arrays["logits"]
  assert np.abs(np.asarray(_logits(model, jnp.asarray(arrays["input_ids"]))) - ref).max() <= \
      1e-4 * max(1.0, np.abs(ref).max())


def test_matvit_release_in_scenic_s_layout_matches_scenic_s_forward(hf_cache):
  """scenic's MatViT release (a flax train state, msgpack) through the registry: the outputs of
  scenic's masked forward (a numpy port, tests/test_matformer.py) at every granularity; a small
  architecture stands in for B/16's."""
  from flax import serialization, traverse_util
  from test_matformer import VIT, _scenic_forward, _scenic_state_dict
  sd = _scenic_state_dict(seed=5)
  params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in sd.items()})
  path = hub.url_download_path(models.pretrained_cfg("matvit_base_patch16_224.in1k"))
  path.parent.mkdir(parents=True)
  path.write_bytes(serialization.msgpack_serialize({"params": params,
                                                     "global_step": np.asarray(1)}))
  model = models.create_model("matvit_base_patch16_224.in1k", **VIT)
  images = np.random.default_rng(2).normal(size=(2, 8, 8, 3))
  for dims in ((32, 32), (8, 16)):
    got = nnx.jit(lambda m, x: m(x, granularity=dims))(model, jnp.asarray(images, jnp.float32))
    want = _scenic_forward(sd, images, dims, depth=2, heads=2)
    assert np.abs(np.asarray(got) - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


# --- the zoo's own weights ------------------------------------------------------------------------

def test_save_pretrained_round_trips_through_a_directory_and_the_hub(hf_cache, tmp_path):
  model = models.create_model("itransformer_etth1_96", dtype="bfloat16", rngs=nnx.Rngs(4))
  out = models.save_pretrained(model, tmp_path / "etth1")
  config = json.loads((out / "config.json").read_text())
  assert config["architecture"] == "itransformer_etth1_96"
  assert config["model_kwargs"] == {"dtype": "bfloat16"}
  want = _weights(model)
  for source in (f"local-dir:{out}", "hf-hub:me/etth1"):
    if source.startswith("hf-hub:"):
      for file in ("config.json", "model.safetensors"):
        put_on_hub(hf_cache, "me/etth1", file).write_bytes((out / file).read_bytes())
    loaded = models.create_model(source)
    assert loaded.build_spec == model.build_spec
    got = _weights(loaded)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
  again = models.create_model("itransformer_etth1_96", pretrained=str(out), dtype="bfloat16")
  assert all(np.array_equal(v, want[k]) for k, v in _weights(again).items())


def test_eval_takes_the_preprocessing_of_registered_weights():
  """eval.py --checkpoint=<model>.<tag>: the weights' preprocessing replaces the config's."""
  import eval as eval_lib
  from configs import maxvit as maxvit_config
  config = maxvit_config.get_config("in1k,variant=tiny,res=384")
  assert (config.input.crop_mode, config.input.crop_pct) == ("center", 384 / 416)  # TF's eval
  weights = eval_lib.with_weights_preprocessing(config, "maxvit_tiny_tf_384.in1k")
  assert (weights.input.image_size, weights.input.crop_pct, weights.input.crop_mode) == (
      384, 1.0, "squash")
  assert tuple(weights.input.mean) == tuple(weights.input.std) == (0.5, 0.5, 0.5)
  assert config.input.crop_mode == "center"                  # the run's config is left as it is
  assert eval_lib.with_weights_preprocessing(config, "runs/maxvit") is config


def test_init_from_a_registered_name_with_dont_load(hf_cache, tmp_path, monkeypatch):
  """What train.py does with --config.init_from.path=<model>.<tag>: registered weights (here the
  zoo's own layout on the hub) load like a path, dont_load included."""
  source = models.create_model("itransformer_etth1_96", rngs=nnx.Rngs(5))
  out = models.save_pretrained(source, tmp_path / "w")
  put_on_hub(hf_cache, "me/it", "model.safetensors").write_bytes(
      (out / "model.safetensors").read_bytes())
  monkeypatch.setitem(registry._PRETRAINED, "itransformer_etth1_96.mine", registry.PretrainedCfg(
      license="MIT", metric="test mse 0.386", hf_hub_id="me/it", tokenizer="none"))
  target = models.create_model("itransformer_etth1_96", rngs=nnx.Rngs(6))
  before = _weights(target)
  models.load_pretrained(target, "itransformer_etth1_96.mine", dont_load=("projector/.*",))
  got, want = _weights(target), _weights(source)
  for key in got:
    assert np.array_equal(got[key], before[key] if key.startswith("projector/") else want[key]), key
