"""Official checkpoints -> zoo params.

Each family file ends with its converter, `checkpoint_filter_fn(state_dict, **known_kwargs)`, which returns
`(params, model_class, constructor_kwargs)`; `params` has the layout of `nnx.to_pure_dict(nnx.state(m, nnx.Param))`.
This package finds the converter of a family, reads checkpoint files into numpy state_dicts, and checks keys.
CLI: `python -m models.convert FAMILY SRC DST [--model NAME]`.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from typing import Callable, Mapping

import numpy as np

_WRAPPER_KEYS = ("state_dict", "model")  # training scripts often save {"model": state_dict, "epoch": ...}
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")  # .bin: transformers' pytorch_model*.bin
_OFFICIAL_SUFFIXES = _TORCH_SUFFIXES + (".safetensors", ".index.json")  # .index.json: HF shards
# flax.serialization msgpack: flax.training.checkpoints' (scenic's) `checkpoint_<step>` files
_FLAX_CHECKPOINT = re.compile(r"checkpoint_\d+|.*\.msgpack")


def get_converter(family: str) -> Callable:
  """The `checkpoint_filter_fn` of `models/<family>.py`, imported on use (reading a file never
  builds every family)."""
  try:
    module = importlib.import_module(f"models.{family}")
  except ModuleNotFoundError as e:
    if e.name != f"models.{family}":
      raise
    module = None
  if module is None or not hasattr(module, "checkpoint_filter_fn"):
    raise ValueError(f"no converter for family {family!r}; known: {known_families()}")
  return module.checkpoint_filter_fn


def known_families() -> list[str]:
  """Families (= module names under models/) whose file defines a converter."""
  from models import registry
  families = {registry.model_info(name).family for name in registry.list_models()}
  return sorted(f for f in families
                if hasattr(importlib.import_module(f"models.{f}"), "checkpoint_filter_fn"))


def is_official_checkpoint(path) -> bool:
  return os.path.isfile(path) and (str(path).endswith(_OFFICIAL_SUFFIXES)
                                   or _is_flax_checkpoint(path))


def _is_flax_checkpoint(path) -> bool:
  return bool(_FLAX_CHECKPOINT.fullmatch(os.path.basename(os.fspath(path))))


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A `.pth`/`.pt`/`.bin` (read without torch, see torch_pickle), `.safetensors` or flax msgpack
  (`checkpoint_<step>`, `.msgpack`) file, or a sharded checkpoint's `*.index.json` -> {key: numpy
  array}.

  Unwraps {"state_dict": ...} / {"model": ...} and strips DataParallel's `module.` prefix. A flax
  file's params (a train state's 'params') are flattened into '/'-joined names.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"no such checkpoint file: {path}")
  if path.endswith(".index.json"):  # a sharded checkpoint (HF): its shards, beside it, merged
    shards = sorted(set(json.loads(open(path).read())["weight_map"].values()))
    return {k: v for shard in shards
            for k, v in read_state_dict(os.path.join(os.path.dirname(path), shard)).items()}
  if path.endswith(".safetensors"):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      state = load_file(path)
    except SafetensorError as e:
      raise ValueError(f"{path} is not a readable .safetensors file ({e}); a download cut short "
                       f"or another format: fetch it again") from None
  elif path.endswith(_TORCH_SUFFIXES):
    from models.convert import torch_pickle
    state = torch_pickle.load(path)
  elif _is_flax_checkpoint(path):
    state = _read_flax_params(path)
  else:
    raise ValueError(f"expected a .pth, .pt, .bin, .safetensors or flax msgpack "
                     f"(checkpoint_<step>, .msgpack) file, got {path}")
  while isinstance(state, Mapping) and not _is_state_dict(state):
    wrapped = [k for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)]
    if not wrapped:
      raise ValueError(f"{path} holds no state_dict: top-level keys {sorted(map(str, state))[:10]}")
    state = state[wrapped[0]]
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict")
  return {k.removeprefix("module."): v for k, v in state.items()}


def _read_flax_params(path: str) -> dict[str, np.ndarray]:
  """The params of a flax msgpack file as {'a/b/kernel': array}: a train state's (or a flax
  variables dict's) 'params' entry, else the whole tree."""
  from flax import serialization, traverse_util
  with open(path, "rb") as f:
    try:
      tree = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several types for a file that is not msgpack
      raise ValueError(f"{path} is not a flax msgpack checkpoint: {e}") from e
  while isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping):
    tree = tree["params"]
  if not isinstance(tree, Mapping):
    raise ValueError(f"{path} holds a {type(tree).__name__}, not a tree of params")
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _is_state_dict(state: Mapping) -> bool:
  return bool(state) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())


def check_state_dict(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
  """Raises one ValueError listing every missing, unexpected and mis-shaped key (official names and layouts)."""
  problems = [f"missing: {k} {expected[k]}" for k in expected if k not in state_dict]
  problems += [f"unexpected: {k} {tuple(state_dict[k].shape)}" for k in state_dict if k not in expected]
  problems += [f"mis-shaped: {k} expected {expected[k]}, got {tuple(state_dict[k].shape)}"
               for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
  if problems:
    raise ValueError(f"the state_dict does not fit the model ({len(problems)} problems):\n  "
                     + "\n  ".join(problems))
