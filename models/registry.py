"""Model registry: timm-style names -> NNX model constructors.

Each family file ends with its variant table and registers every variant::

    register_model("itransformer_etth1_96", iTransformer, family="itransformer", seq_len=96, ...)

`create_model(name, **overrides)` then builds it; overrides replace the variant's defaults.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import fnmatch
import importlib
import inspect
import pkgutil
import types
import typing
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Every other module of `models/` is a family file that registers its variants on import. They are
# imported lazily (on the first lookup), so `import models` stays cheap.
_NOT_FAMILIES = frozenset({"registry", "layers", "pretrained", "convert", "generation"})
# Overrides that name a dtype; a config gives them as strings ("bfloat16").
_DTYPE_KEYS = frozenset({"dtype", "param_dtype"})


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  name: str
  family: str
  builder: Callable[..., nnx.Module]
  defaults: dict[str, Any]
  paper_metric: str = ""  # what the paper reports for this variant, for the README table


_REGISTRY: dict[str, ModelInfo] = {}
_loaded = False


def register_model(name: str, builder: Callable[..., nnx.Module], *, family: str,
                   paper_metric: str = "", **defaults) -> None:
  if name in _REGISTRY:
    raise ValueError(f"model {name!r} is registered twice")
  _REGISTRY[name] = ModelInfo(name, family, builder, dict(defaults), paper_metric)


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


def create_model(name: str, *, rngs: nnx.Rngs | None = None, **overrides) -> nnx.Module:
  """Builds a registered variant; keyword overrides replace its defaults (e.g. `dropout=0.0`).

  `dtype` (compute) and `param_dtype` (storage) may be given by name, as configs do
  (`model.dtype = "bfloat16"`): the model gets the dtype itself, and a misspelt name fails here.
  """
  info = model_info(name)
  kwargs = {**info.defaults, **overrides}
  for key in _DTYPE_KEYS & kwargs.keys():
    if isinstance(kwargs[key], str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return info.builder(**kwargs, rngs=rngs if rngs is not None else nnx.Rngs(0))


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param leaves only: no RNG state, no batch statistics)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
