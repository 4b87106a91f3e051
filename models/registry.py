"""Model registry: timm-style names -> NNX model constructors, and the pretrained weights of each.

A family file reads as timm's do: the classes, the named variant configs (`_CFGS`, keyword dicts),
the converter (`checkpoint_filter_fn`), then one call per variant with its full name written out,
so that `grep -r itransformer_etth1_96 models/` finds it (tests/test_registry.py checks this)::

    register_model("itransformer_etth1_96", iTransformer, family="itransformer",
                   paper_metric="0.386/0.405", num_params=841_568,
                   **_CFGS["itransformer_etth1_96"])

then one call per set of weights published for them, named `<model>.<tag>` as in timm::

    register_pretrained("maxvit_tiny_tf_224.in1k", PretrainedCfg(hf_hub_id=..., ...))

`create_model(name, **overrides)` builds a variant; overrides replace its defaults.
`create_model("maxvit_tiny_tf_224.in1k", pretrained=True)` also loads the weights (models.hub
fetches them through the Hugging Face cache and keeps a converted copy).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import fnmatch
import importlib
import inspect
import json
import pkgutil
import types
import typing
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Every other module of `models/` is a family file that registers its variants on import. They are
# imported lazily (on the first lookup), so `import models` stays cheap.
_NOT_FAMILIES = frozenset({"registry", "layers", "pretrained", "hub", "features", "convert",
                           "generation"})
# Overrides that name a dtype; a config gives them as strings ("bfloat16").
_DTYPE_KEYS = frozenset({"dtype", "param_dtype"})


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  name: str
  family: str
  builder: Callable[..., nnx.Module]
  defaults: dict[str, Any]
  paper_metric: str = ""  # what the paper reports for this variant, for the README table
  # The official parameter count (trainable parameters, the published head): published by the
  # authors or measured on the official code, never the zoo's count of itself; None where there is
  # none (tests/test_models.py checks the zoo against it and lists the variants without one).
  num_params: int | None = None


# The ImageNet normalisation most weights expect (timm's IMAGENET_DEFAULT_MEAN / _STD).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
  """One published weight file and what a user needs to use it (timm's `pretrained_cfg`).

  The file is `filename` in the Hugging Face hub repo `hf_hub_id`, or at `url` for a release
  outside the hub. Vision entries give the evaluation preprocessing as timm does: `input_size` is
  (channels, height, width), the crop keeps `crop_pct` of the resized image (`crop_mode`
  "center", or "squash" to resize without cropping). `classifier` is the param path of the head
  that `num_classes` different from the weights' re-initialises.
  """
  license: str
  metric: str                          # the official number these weights reach, and its source
  hf_hub_id: str | None = None
  filename: str = "model.safetensors"
  url: str | None = None
  sha256: str | None = None            # where the source publishes one
  num_classes: int | None = None
  label_set: str = ""                  # "imagenet-1k", "imagenet-21k", a tokenizer's vocabulary
  input_size: tuple[int, int, int] | None = None
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  crop_pct: float | None = None
  crop_mode: str = "center"
  interpolation: str = "bicubic"
  classifier: str | None = None
  tokenizer: str | None = None         # LMs: the tokenizer's hub repo (and file)
  notes: str = ""

  @property
  def source(self) -> str:
    return f"hf-hub:{self.hf_hub_id}/{self.filename}" if self.hf_hub_id else str(self.url)


_REGISTRY: dict[str, ModelInfo] = {}
_PRETRAINED: dict[str, PretrainedCfg] = {}  # "<model>.<tag>" -> its weights, in registration order
_loaded = False


def register_model(name: str, builder: Callable[..., nnx.Module], *, family: str,
                   paper_metric: str = "", num_params: int | None = None, **defaults) -> None:
  if name in _REGISTRY:
    raise ValueError(f"model {name!r} is registered twice")
  _REGISTRY[name] = ModelInfo(name, family, builder, dict(defaults), paper_metric, num_params)


def register_pretrained(name: str, cfg: PretrainedCfg) -> None:
  """Registers the weights `<model>.<tag>` of a registered model; a model's first tag is its
  default (what `pretrained=True` loads)."""
  model, _, tag = name.partition(".")
  if model not in _REGISTRY or not tag:
    raise ValueError(f"register_pretrained: expected '<registered model>.<tag>', got {name!r}")
  if name in _PRETRAINED:
    raise ValueError(f"pretrained weights {name!r} are registered twice")
  if cfg.hf_hub_id is None and cfg.url is None:
    raise ValueError(f"pretrained weights {name!r}: expected an hf_hub_id or a url")
  _PRETRAINED[name] = cfg


def list_pretrained(pattern: str = "*") -> list[str]:
  """Registered weights `<model>.<tag>` matching a shell pattern, e.g. `list_pretrained("maxvit*")`."""
  _load_families()
  return [n for n in _PRETRAINED if fnmatch.fnmatch(n, pattern)]


def pretrained_cfg(name: str) -> PretrainedCfg:
  """The weights `<model>.<tag>`, or a model's default weights (its first tag)."""
  model, tag = split_pretrained_name(name)
  return _PRETRAINED[f"{model}.{tag}"]


def split_pretrained_name(name: str, tag: str | None = None) -> tuple[str, str]:
  """`"<model>.<tag>"` (or a model and a tag) -> (model, tag); no tag: the model's default. Raises
  a ValueError naming the registered tags when there are none or the tag is not one."""
  model, _, name_tag = name.partition(".")
  model_info(model)
  tags = [n.partition(".")[2] for n in list_pretrained(f"{model}.*")]
  tag = tag or name_tag or (tags[0] if tags else "")
  if tag not in tags:
    known = f"its weights: {', '.join(f'{model}.{t}' for t in tags)}" if tags else \
        "no weights are registered for it (models.list_pretrained() lists those that are)"
    raise ValueError(f"no pretrained weights {model}.{tag or '<tag>'}; {known}")
  return model, tag


def _load_families() -> None:
  global _loaded
  if not _loaded:
    _loaded = True
    package = importlib.import_module("models")
    for module in pkgutil.iter_modules(package.__path__):
      if module.name not in _NOT_FAMILIES:
        importlib.import_module(f"models.{module.name}")


def list_models(pattern: str = "*") -> list[str]:
  """Registered names matching a shell pattern, e.g. `list_models("itransformer_ett*")`."""
  _load_families()
  return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> ModelInfo:
  _load_families()
  if name not in _REGISTRY:
    hint = difflib.get_close_matches(name, _REGISTRY, n=3)
    raise ValueError(f"unknown model {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else
                     f"; see models.list_models() for the {len(_REGISTRY)} registered names"))
  return _REGISTRY[name]


def model_keywords(name: str) -> dict[str, type]:
  """Every keyword `create_model(name, ...)` takes, with the type a config holds it as: tuples for
  sequences, names for dtypes, the annotated type for a keyword whose default is None."""
  info = model_info(name)
  init = info.builder.__init__
  try:
    hints = typing.get_type_hints(init)
  except NameError:  # an annotation only a type checker can resolve
    hints = {}
  return {p.name: _config_type(p.name, hints.get(p.name), info.defaults.get(p.name, p.default))
          for p in inspect.signature(init).parameters.values()
          if p.name not in ("self", "rngs") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _config_type(name: str, hint: Any, default: Any) -> type:
  if name in _DTYPE_KEYS:
    return str
  is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)  # int | None
  options = [a for a in typing.get_args(hint) if a is not type(None)] if is_union else [hint]
  for candidate in [*options, type(default)]:
    candidate = typing.get_origin(candidate) or candidate
    if candidate in (collections.abc.Sequence, list, tuple):
      return tuple
    if candidate in (int, float, str, bool):
      return candidate
  return object  # read as a Python literal


def create_model(name: str, *, pretrained: bool | str = False, features_only: bool = False,
                 out_indices=None, rngs: nnx.Rngs | None = None, **overrides) -> nnx.Module:
  """Builds a registered variant; keyword overrides replace its defaults (e.g. `dropout=0.0`).

  `name` may carry a weight tag, `"maxvit_tiny_tf_224.in1k"`. `pretrained`: False; True (the
  tagged weights, or the model's default ones); a tag (`"in21k"`); or anything
  `models.load_pretrained` reads (a path, `"hf-hub:org/repo"`). The weights' preprocessing is
  then `model.pretrained_cfg` (see `resolve_data_config`). `num_classes` defaults to the
  weights'; another keeps a freshly initialised head, and a warning says so (timm's semantics).
  `features_only=True` returns the vision backbone as a `models.features.FeatureExtractor` of the
  stages at `out_indices` (timm's; `feature_info` gives their channels and reductions).

  `dtype` (compute) and `param_dtype` (storage) may be given by name, as configs do
  (`model.dtype = "bfloat16"`): the model gets the dtype itself, and a misspelt name fails here.
  """
  if name.startswith(("hf-hub:", "local-dir:")):  # a weights directory save_pretrained wrote
    from models import pretrained as weights
    config = weights.read_config(name)
    return create_model(config["architecture"], pretrained=pretrained or name,
                        features_only=features_only, out_indices=out_indices, rngs=rngs,
                        **{**config["model_kwargs"], **overrides})
  model_name, _, tag = name.partition(".")
  info = model_info(model_name)
  if tag and not pretrained:
    pretrained = True
  source = _pretrained_source(model_name, tag, pretrained) if pretrained is not False else None
  if source in _PRETRAINED and _PRETRAINED[source].num_classes and "num_classes" in info.defaults:
    overrides.setdefault("num_classes", _PRETRAINED[source].num_classes)  # the weights' head
  kwargs = {**info.defaults, **overrides}
  for key in _DTYPE_KEYS & kwargs.keys():
    if isinstance(kwargs[key], str):
      kwargs[key] = jnp.dtype(kwargs[key])
  model = info.builder(**kwargs, rngs=rngs if rngs is not None else nnx.Rngs(0))
  model.build_spec = BuildSpec(model_name, _overrides_json(overrides))
  if source is not None:
    from models import pretrained as weights
    weights.load_pretrained(model, source)
  if features_only:
    from models import features
    return features.features_only(model, out_indices)
  return model


@dataclasses.dataclass(frozen=True)
class BuildSpec:
  """How `create_model` built a model (a static attribute of it): what `save_pretrained` writes."""
  name: str
  overrides: str  # JSON


def _overrides_json(overrides: dict) -> str:
  """The overrides as JSON, dtypes by name (as configs give them)."""
  def plain(value):
    if isinstance(value, (tuple, list)):
      return [plain(v) for v in value]
    return jnp.dtype(value).name if _is_dtype(value) else value
  return json.dumps({k: plain(v) for k, v in sorted(overrides.items())}, default=str)


def _is_dtype(value) -> bool:
  try:
    return not isinstance(value, (str, int, float, bool)) and jnp.dtype(value) is not None
  except TypeError:
    return False


def _pretrained_source(model: str, tag: str, pretrained: bool | str) -> str:
  """What `create_model`'s `pretrained` names, as `load_pretrained` reads it: `<model>.<tag>` for
  registered weights, else the path or hub id as given."""
  if pretrained is True:
    return ".".join(split_pretrained_name(model, tag or None))
  if not isinstance(pretrained, str):
    raise ValueError(f"create_model: expected pretrained=True, False, a tag or a path, got "
                     f"{pretrained!r}")
  if f"{model}.{pretrained}" in list_pretrained(f"{model}.*"):
    return f"{model}.{pretrained}"
  return pretrained


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param leaves only: no RNG state, no batch statistics)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
