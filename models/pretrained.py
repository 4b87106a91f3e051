"""Saving zoo params and loading pretrained weights into a model.

A params directory (what `save_params` and the converter CLI write) looks like one step of a training run:
`DIR/params` is an orbax StandardCheckpointer item holding `nnx.to_pure_dict(nnx.state(model, nnx.Param))`,
`DIR/model_state` (models with BatchNorm statistics or fixed `Buffer`s only) holds those, as train.py writes them, and
`DIR/model.json` says which model it belongs to. So `load_pretrained` reads, with one code path, a params
directory, a training step directory (`workdir/checkpoints/<step>`) and a training workdir (latest step).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from models.layers import Buffer

PARAMS_ITEM = "params"  # the item name train.py's CheckpointManager saves the params under
STATS_ITEM = "model_state"  # ... and the batch statistics under
# What pretrained weights are: the params and, where a model has them, BatchNorm's running statistics and
# fixed buffers.
WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat, Buffer)
_NOT_TRAINED = nnx.Any(nnx.BatchStat, Buffer)
MODEL_JSON = "model.json"


def family_of(model: nnx.Module) -> str:
  """The family is the name of the module that defines the model's class (models/<family>.py)."""
  return type(model).__module__.rsplit(".", 1)[-1]


def save_params(model: nnx.Module, path, *, name: str | None = None,
                kwargs: Mapping[str, Any] | None = None) -> None:
  """Writes the model's params to `path/params` (orbax), its batch statistics (if any) to `path/model_state`
  and `path/model.json` (name, family, class, kwargs)."""
  path = Path(path).absolute()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / PARAMS_ITEM, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  stats = nnx.to_pure_dict(nnx.state(model, _NOT_TRAINED))
  if jax.tree.leaves(stats):
    checkpointer.save(path / STATS_ITEM, stats)
  checkpointer.wait_until_finished()
  info = {"name": name, "family": family_of(model), "class": type(model).__name__,
          "kwargs": dict(kwargs) if kwargs is not None else None}
  (path / MODEL_JSON).write_text(json.dumps(info, indent=2) + "\n")


def load_pretrained(model: nnx.Module, path, dont_load: Iterable[str] = ()) -> nnx.Module:
  """Loads params into `model` in place and returns it.

  `path`: a params directory (from `save_params` or `python -m models.convert`), a training workdir (latest
  step of its `checkpoints/`), one step directory, or an official `.pth`/`.pt`/`.safetensors` file, converted
  on the fly by the model family's converter. `dont_load`: regexes over '/'-joined param paths (e.g.
  `projector/.*`); matching params keep the model's values. Params missing from the checkpoint, mis-shaped or
  left over in it (and not excluded) raise one ValueError. Each param keeps its dtype and sharding.
  """
  from models import convert

  if convert.is_official_checkpoint(path):
    params, _, _ = convert.get_converter(family_of(model))(convert.read_state_dict(path))
  else:  # orbax needs an absolute path
    item_dir = _params_item_dir(Path(path).expanduser().absolute())
    params = _restore_weights(item_dir, _restore_targets(model, dont_load))
  assign_params(model, params, dont_load)
  return model


def assign_params(model: nnx.Module, params: Mapping, dont_load: Iterable[str] = ()) -> None:
  """Copies a nested dict of arrays (keys as in `nnx.to_pure_dict`) into the model's params and batch statistics
  (`WEIGHTS`); see load_pretrained."""
  excluded = [re.compile(p) for p in dont_load]
  state = nnx.state(model, WEIGHTS)
  current = _flatten(nnx.to_pure_dict(state))
  incoming = _flatten(params)
  unused = [p.pattern for p in excluded if not any(p.fullmatch(k) for k in current.keys() | incoming.keys())]
  if unused:
    raise ValueError(f"dont_load patterns {unused} match no param path (paths look like {next(iter(current))!r})")

  def skip(key):
    return any(p.fullmatch(key) for p in excluded)

  problems = [f"missing from the checkpoint: {k} {tuple(v.shape)}" for k, v in current.items()
              if not skip(k) and k not in incoming]
  problems += [f"not in the model: {k} {_shape(v)}" for k, v in incoming.items()
               if not skip(k) and k not in current]
  problems += [f"mis-shaped: {k} model {tuple(v.shape)}, checkpoint {_shape(incoming[k])}"
               for k, v in current.items() if not skip(k) and k in incoming and tuple(v.shape) != _shape(incoming[k])]
  if problems:
    raise ValueError(f"cannot load the checkpoint into {type(model).__name__} ({len(problems)} problems):\n  "
                     + "\n  ".join(problems))
  updated = {k: _like(incoming[k], v) if not skip(k) else v for k, v in current.items()}
  nnx.replace_by_pure_dict(state, _unflatten_like(state, updated))
  nnx.update(model, state)


def _like(value, reference) -> jax.Array:
  """`value` with the dtype and sharding of the param it replaces (a restored array has them)."""
  sharding = _sharding_of(reference)
  if isinstance(value, jax.Array):  # never through the host: it may span processes
    return jax.device_put(value if value.dtype == reference.dtype else value.astype(reference.dtype), sharding)
  return jax.device_put(np.asarray(value).astype(reference.dtype), sharding)


def _sharding_of(reference) -> jax.sharding.Sharding:
  """Where a param lives; an abstract one (nnx.eval_shape) without a sharding: the default device."""
  sharding = getattr(reference, "sharding", None)
  return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _shape(value) -> tuple[int, ...]:
  """The shape of an array or of a checkpoint entry's metadata."""
  return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def _flatten(tree: Mapping) -> dict[str, Any]:
  return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def _unflatten_like(state: nnx.State, flat: Mapping[str, Any]) -> dict:
  """Rebuilds the pure dict with the state's own keys (list indices are ints there, strings in checkpoints)."""
  return traverse_util.unflatten_dict(
      {keys: flat["/".join(map(str, keys))] for keys in traverse_util.flatten_dict(nnx.to_pure_dict(state))})


def _params_item_dir(path: Path) -> Path:
  """The orbax item holding the params, for a params dir, step dir, checkpoints dir or training workdir."""
  if not path.exists():
    raise ValueError(f"no checkpoint at {path}")
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if (path / PARAMS_ITEM).is_dir():
    return path / PARAMS_ITEM
  steps = ocp.utils.checkpoint_steps(path)
  if not steps:
    raise ValueError(f"{path} is neither a params directory (no {PARAMS_ITEM}/), a training workdir "
                     f"(no checkpoints/) nor a checkpoint directory with step subdirectories")
  step_dir = path / str(max(steps))
  if not (step_dir / PARAMS_ITEM).is_dir():
    raise ValueError(f"the latest step {step_dir} has no {PARAMS_ITEM!r} item")
  return step_dir / PARAMS_ITEM


def _restore_targets(model: nnx.Module, dont_load: Iterable[str]) -> dict[str, jax.ShapeDtypeStruct]:
  """What each weight the checkpoint may fill becomes: the model's shape, dtype and sharding, by
  '/'-joined path (the `dont_load` ones are not read)."""
  excluded = [re.compile(p) for p in dont_load]
  current = _flatten(nnx.to_pure_dict(nnx.state(model, WEIGHTS)))
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_sharding_of(v)) for k, v in current.items()
          if not any(p.fullmatch(k) for p in excluded)}


def _restore_weights(item_dir: Path, targets: Mapping[str, jax.ShapeDtypeStruct]) -> dict:
  """The params item merged with the batch statistics saved beside it (models with BatchNorm)."""
  params = _restore_into(item_dir, targets)
  if not (item_dir.parent / STATS_ITEM).is_dir():
    return params
  stats = _restore_into(item_dir.parent / STATS_ITEM, targets)
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **traverse_util.flatten_dict(stats)})


def _restore_into(item_dir: Path, targets: Mapping[str, jax.ShapeDtypeStruct]) -> dict:
  """The item's entries that fit a target, restored straight into its dtype and sharding: each
  process reads only the shards its devices hold. The other entries (to be skipped, or reported
  by assign_params) stay as their metadata, never read."""
  checkpointer = ocp.PyTreeCheckpointer()
  saved = traverse_util.flatten_dict(checkpointer.metadata(item_dir).item_metadata.tree)
  wanted = {keys: targets[name] for keys, entry in saved.items()
            if (name := "/".join(map(str, keys))) in targets and _shape(entry) == targets[name].shape}
  restored = {}
  if wanted:
    tree = traverse_util.unflatten_dict(wanted)
    restored = traverse_util.flatten_dict(checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree), partial_restore=True)))
  return traverse_util.unflatten_dict({**saved, **restored})
