"""Saving zoo weights and loading pretrained weights into a model.

Two formats hold the zoo's own weights:

* A weights directory (`save_pretrained`, timm and transformers' layout): `DIR/model.safetensors` holds every
  weight (params, BatchNorm statistics, fixed buffers) under its '/'-joined param path, and `DIR/config.json`
  the model's name, constructor overrides and the weights' `pretrained_cfg`. It can be pushed to the
  Hugging Face hub as it is and read back as `hf-hub:org/repo`.
* A params directory (what `save_params` and the converter CLI write) looks like one step of a training
  run: `DIR/params` is an orbax StandardCheckpointer item holding `nnx.to_pure_dict(nnx.state(model,
  nnx.Param))`, `DIR/model_state` (models with BatchNorm statistics or fixed `Buffer`s only) holds those, as
  train.py writes them, and `DIR/model.json` says which model it belongs to. So `load_pretrained` reads,
  with one code path, a params directory, a training step directory (`workdir/checkpoints/<step>`) and a
  training workdir (latest step).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from models import hub, registry
from models.hub import flatten
from models.layers import Buffer

PARAMS_ITEM = "params"  # the item name train.py's CheckpointManager saves the params under
STATS_ITEM = "model_state"  # ... and the batch statistics under
# What pretrained weights are: the params and, where a model has them, BatchNorm's running statistics and
# fixed buffers.
WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat, Buffer)
_NOT_TRAINED = nnx.Any(nnx.BatchStat, Buffer)
MODEL_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"  # a weights directory's, and a hub repo's, weights
CONFIG_JSON = "config.json"         # ... and its description
_log = logging.getLogger(__name__)


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


def save_pretrained(model: nnx.Module, path, *, name: str | None = None,
                    kwargs: Mapping[str, Any] | None = None, metric: str = "") -> Path:
  """Writes a weights directory: `path/model.safetensors` (every weight, in the zoo's layout) and
  `path/config.json` (`architecture`, `model_kwargs`, `pretrained_cfg`, and `metric`: what these
  weights reach, e.g. eval.py's result). A model from `create_model` knows its name and
  overrides; pass them for one built otherwise. Read it back with `create_model(name,
  pretrained=path)`, `create_model("local-dir:" + path)` or `load_pretrained(model, path)`. One
  process: the weights are gathered to it."""
  spec = getattr(model, "build_spec", None)
  name = name or (spec.name if spec else None)
  if name is None:
    raise ValueError("save_pretrained: expected name= (the registered model) for a model that "
                     "create_model did not build")
  kwargs = dict(kwargs) if kwargs is not None else (json.loads(spec.overrides) if spec else {})
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  weights = {k: np.asarray(jax.device_get(v))
             for k, v in flatten(nnx.to_pure_dict(nnx.state(model, WEIGHTS))).items()}
  hub.write_weights(path / WEIGHTS_FILE, weights, {"family": family_of(model), "architecture": name})
  cfg = getattr(model, "pretrained_cfg", None)
  config = {"architecture": name, "model_kwargs": kwargs,
            "pretrained_cfg": dataclasses.asdict(cfg) if cfg else None, "metric": metric}
  (path / CONFIG_JSON).write_text(json.dumps(config, indent=2, default=str) + "\n")
  return path


def resolve_data_config(model: nnx.Module | str) -> dict:
  """The evaluation preprocessing of pretrained weights, timm's keys: `input_size` (C, H, W),
  `interpolation`, `mean`, `std`, `crop_pct`, `crop_mode`. `model`: a model loaded with registered
  weights, or their name `<model>.<tag>`. `data.augment.eval_transform` applies it."""
  cfg = registry.pretrained_cfg(model) if isinstance(model, str) else getattr(
      model, "pretrained_cfg", None)
  if cfg is None or cfg.input_size is None:
    raise ValueError(f"resolve_data_config: expected vision weights from the pretrained registry "
                     f"(create_model(..., pretrained=True) or a '<model>.<tag>' name), got "
                     f"{model if isinstance(model, str) else type(model).__name__}")
  return {"input_size": cfg.input_size, "interpolation": cfg.interpolation, "mean": cfg.mean,
          "std": cfg.std, "crop_pct": cfg.crop_pct, "crop_mode": cfg.crop_mode}


def read_config(source: str) -> dict:
  """The config.json of a weights directory (`local-dir:DIR` or a path) or hub repo (`hf-hub:org/repo`)."""
  if source.startswith("hf-hub:"):
    file = hub.fetch_hub_file(source.removeprefix("hf-hub:"), CONFIG_JSON)
  else:
    file = Path(source.removeprefix("local-dir:")) / CONFIG_JSON
    if not file.is_file():
      raise ValueError(f"{source}: no {CONFIG_JSON}; expected a directory save_pretrained wrote")
  config = json.loads(Path(file).read_text())
  if "architecture" not in config:
    raise ValueError(f"{file}: expected an 'architecture' (a registered model name)")
  return config


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What a load did: the weights it loaded, those that kept the model's initialisation
  (`dont_load`, a classifier of another size) and the checkpoint's entries it left out."""
  source: str
  loaded: tuple[str, ...]
  fresh: tuple[str, ...]
  unused: tuple[str, ...]

  def __str__(self) -> str:
    lines = [f"Initialised from {self.source}: {len(self.loaded):,} weights loaded"]
    for what, names in (("kept their fresh initialisation", self.fresh),
                        ("in the checkpoint, not loaded", self.unused)):
      if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        lines.append(f"  {len(names):,} {what}: {shown}")
    return "\n".join(lines)


def load_pretrained(model: nnx.Module, path, dont_load: Iterable[str] = ()) -> nnx.Module:
  """Loads weights into `model` in place and returns it (`load_weights` also says what it did).

  `path`, any of:
    * registered weights `<model>.<tag>` (`models.list_pretrained()`): fetched through the Hugging Face
      cache and converted once (models.hub); the model gets their `pretrained_cfg`, and a classifier of
      another size than theirs keeps its initialisation, with a warning;
    * `hf-hub:org/repo` (its model.safetensors) or `hf-hub:org/repo/file`: the zoo's layout or an
      official file of the model's family;
    * a weights directory (`save_pretrained`; also as `local-dir:DIR`), a params directory
      (`save_params`, `python -m models.convert`), a training workdir (latest step of its
      `checkpoints/`) or one step directory;
    * an official `.pth`/`.pt`/`.safetensors` file (or a sharded `*.index.json`), converted on the fly by
      the model family's converter.
  `dont_load`: regexes over '/'-joined param paths (e.g. `projector/.*`); matching params keep the model's
  values. Params missing from the checkpoint, mis-shaped or left over in it (and not excluded) raise one
  ValueError. Each param keeps its dtype and sharding.
  """
  load_weights(model, path, dont_load)
  return model


def load_weights(model: nnx.Module, path, dont_load: Iterable[str] = ()) -> LoadReport:
  """`load_pretrained`, returning what it loaded and what it left (train.py prints it)."""
  from models import convert

  source = os.fspath(path).removeprefix("local-dir:")
  dont_load = tuple(dont_load)
  if is_registered_weights(source):
    cfg = registry.pretrained_cfg(source)
    params = _read_weights_file(hub.fetch(source), family_of(model))
    dont_load += _new_classifier(model, params, cfg, source)
    model.pretrained_cfg = cfg
  elif source.startswith("hf-hub:"):
    parts = source.removeprefix("hf-hub:").split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or WEIGHTS_FILE
    params = _read_weights_file(hub.fetch_hub_file(repo, filename), family_of(model))
  elif (Path(source) / WEIGHTS_FILE).is_file():
    params = hub.read_weights(Path(source) / WEIGHTS_FILE)
  elif convert.is_official_checkpoint(source):
    params = _read_weights_file(Path(source), family_of(model))
  else:  # orbax needs an absolute path
    item_dir = _params_item_dir(Path(source).expanduser().absolute())
    params = _restore_weights(item_dir, _restore_targets(model, dont_load))
  return dataclasses.replace(assign_params(model, params, dont_load), source=os.fspath(path))


def is_registered_weights(source: str) -> bool:
  """Whether `source` names registered weights `<model>.<tag>` (not a path)."""
  return "." in source and not os.path.exists(source) and source in registry.list_pretrained(
      source.partition(".")[0] + ".*")


def _read_weights_file(path: Path, family: str) -> dict:
  """A file in the zoo's layout as it is; an official one converted (and kept converted)."""
  if str(path).endswith(".safetensors") and hub.is_zoo_weights(path):
    return hub.read_weights(path)
  return hub.converted_weights(path, family)


def _new_classifier(model, params, cfg, name) -> tuple[str, ...]:
  """The `dont_load` pattern that keeps the model's classifier when its size is not the weights'
  (and a warning saying so), else none."""
  if not cfg.classifier:
    return ()
  current = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  head = [k for k in params if k.startswith(cfg.classifier + "/")]
  if all(k in current and tuple(current[k].shape) == tuple(params[k].shape) for k in head):
    return ()
  classes = next((current[k].shape[-1] for k in head if k in current), "?")
  _log.warning("%s: the weights' classifier has %s classes and the model %s: %s keeps its fresh "
               "initialisation", name, cfg.num_classes, classes, cfg.classifier)
  return (re.escape(cfg.classifier) + "/.*",)


def assign_params(model: nnx.Module, params: Mapping, dont_load: Iterable[str] = ()) -> LoadReport:
  """Copies a nested dict of arrays (keys as in `nnx.to_pure_dict`) into the model's params and batch statistics
  (`WEIGHTS`); see load_pretrained."""
  excluded = [re.compile(p) for p in dont_load]
  state = nnx.state(model, WEIGHTS)
  current = flatten(nnx.to_pure_dict(state))
  incoming = flatten(params)
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
  return LoadReport(source="", loaded=tuple(k for k in current if not skip(k)),
                    fresh=tuple(k for k in current if skip(k)),
                    unused=tuple(k for k in incoming if k not in current or skip(k)))


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
  current = flatten(nnx.to_pure_dict(nnx.state(model, WEIGHTS)))
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
  # The item's own handler: a Checkpointer would look for the step's metadata file in the item
  # directory of a train.py checkpoint and warn that it is missing.
  checkpointer = ocp.PyTreeCheckpointHandler()
  saved = traverse_util.flatten_dict(checkpointer.metadata(item_dir).tree)
  wanted = {keys: targets[name] for keys, entry in saved.items()
            if (name := "/".join(map(str, keys))) in targets and _shape(entry) == targets[name].shape}
  restored = {}
  if wanted:
    tree = traverse_util.unflatten_dict(wanted)
    restored = traverse_util.flatten_dict(checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree), partial_restore=True)))
  return traverse_util.unflatten_dict({**saved, **restored})
