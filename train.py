r"""Trains any zoo model on any task. Rerunning the same command resumes where it stopped.

  python train.py --config configs/itransformer.py:digits --workdir runs/digits
  python train.py --config configs/itransformer.py:etth1_96 --workdir runs/etth1_96 \
      --config.data.manual_dir=~/data/ETT-small --config.optimizer.lr=2e-4

Several processes (hosts) run the same command with --multihost (the cluster detected: SLURM,
Open MPI, Cloud TPU) or with the cluster named:

  python train.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0   # and =1

Phases: mesh (checked against the processes) -> data -> model and optimizer (created sharded) ->
restore -> jitted step -> periodic eval / checkpoint / log -> final evaluation of the best
checkpoint. The workdir holds config.json (and config.resume_<step>.json of each resume),
checkpoints/, metrics.jsonl, TensorBoard events and final_metrics.json, written by process 0.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import math
import os
import signal
import socket
import sys
import textwrap
import threading
import time
from typing import Sequence

from absl import app, flags, logging
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx

from configs import common
import data
import models
import ops
import tasks


class NonFiniteLossError(RuntimeError):
  """The loss or the parameters stopped being finite; nothing non-finite was saved."""


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read, or that is not what was saved."""


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir."""


class StoppedBySignal(RuntimeError):
  """SIGTERM or SIGINT stopped the run after saving its last step."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


# ----------------------------------------------------------------------------- processes

_CLUSTER_FLAGS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")


def define_multihost_flags(flag_values=flags.FLAGS) -> None:
  """--multihost and the flags naming the cluster explicitly (train.py and eval.py)."""
  flags.DEFINE_bool("multihost", False, "Join a multi-process run (jax.distributed.initialize); "
                    "without the flags below the cluster is detected (SLURM, Open MPI, Cloud TPU).",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT where process 0 serves the "
                      "coordinator (implies --multihost).", flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Processes in the run (implies --multihost).",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1 "
                       "(implies --multihost).", lower_bound=0, flag_values=flag_values)
  flags.DEFINE_list("local_device_ids", None, "This process's devices, e.g. 0,1 (default: all "
                    "it sees; implies --multihost).", flag_values=flag_values)


def initialize_multihost(flag_values=flags.FLAGS) -> None:
  """Joins the run's other processes when --multihost or an explicit cluster flag asks for it.

  Call it before anything touches a device. Failures are raised as one-line ValueErrors.
  """
  explicit = {name: flag_values[name].value for name in _CLUSTER_FLAGS
              if flag_values[name].value is not None}
  if not (flag_values["multihost"].value or explicit):
    return
  given = ", ".join(f"{name}={value}" for name, value in explicit.items()) or "the detected cluster"
  num_processes, process_id = explicit.get("num_processes"), explicit.get("process_id")
  if None not in (num_processes, process_id) and process_id >= num_processes:
    raise ValueError(f"--process_id={process_id} must be below --num_processes={num_processes}")
  if "local_device_ids" in explicit:
    try:
      explicit["local_device_ids"] = [int(i) for i in explicit["local_device_ids"]]
    except ValueError:
      raise ValueError(f"--local_device_ids={','.join(explicit['local_device_ids'])}: expected "
                       "device numbers, e.g. 0,1") from None
  try:
    jax.distributed.initialize(**explicit)
  except (ValueError, RuntimeError) as e:
    first_line = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    raise ValueError(f"could not join the multi-process run ({given}): {first_line}") from e


# ----------------------------------------------------------------------------- mesh

def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); data=-1 takes what the other axes
  leave."""
  n = len(devices) if devices is not None else jax.device_count()
  model_axes = mesh_config.fsdp * mesh_config.tensor
  data_axis = n // model_axes if mesh_config.data == -1 else mesh_config.data
  if data_axis * model_axes != n:
    raise ValueError(f"mesh data={mesh_config.data} x fsdp={mesh_config.fsdp} x tensor={mesh_config.tensor}"
                     f" does not cover the {n} devices")
  return jax.make_mesh((data_axis, mesh_config.fsdp, mesh_config.tensor), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def on_mesh(config):
  """The config's mesh, set (jax.set_mesh) with its sharding rules (ops.sharding) inside: what
  models, kernels and steps traced there split over."""
  mesh = make_mesh(config.mesh)
  with jax.set_mesh(mesh), ops.sharding.use_rules(config.mesh.rules):
    yield mesh


def batch_sharding(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))


def put_batch(batch: dict, mesh) -> dict:
  """This process's slice of the global batch -> one global array per key, split over devices."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def batch_divisor(mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_mesh_over_processes(mesh) -> None:
  """Refuses a mesh on which the processes cannot each feed their own rows of every batch.

  A batch is split over data x fsdp (`batch_sharding`); the devices along `tensor` hold the same
  rows. So each process's devices must be whole data x fsdp slices, one contiguous block of them:
  data x fsdp a multiple of the process count and `tensor` inside a process. Otherwise processes
  would feed different rows to devices that must hold the same ones, and train silently wrong.
  """
  processes, local = jax.process_count(), jax.local_device_count()
  data_parallel, tensor = batch_divisor(mesh), mesh.shape["tensor"]
  shape = " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
  if local % tensor or data_parallel % processes:
    raise ValueError(
        f"mesh {shape} does not fit {processes} processes of {local} devices: data x fsdp "
        f"({data_parallel}) must be a multiple of the process count and tensor ({tensor}) must "
        f"divide a process's {local} devices (tensor parallelism stays inside a process); e.g. "
        f"--config.mesh.data=-1 --config.mesh.tensor={math.gcd(tensor, local)}")
  block = data_parallel // processes
  for process, positions in sorted(_data_positions_by_process(mesh).items()):
    if positions != list(range(positions[0], positions[0] + block)):
      raise ValueError(f"mesh {shape} gives process {process} the data x fsdp positions {positions}, "
                       f"not one contiguous block of {block}; lay the devices out by process")


def process_batch_slice(mesh) -> tuple[int, int]:
  """(i, n): this process feeds slice i of n equal, contiguous slices of every global batch, the
  rows its devices hold (check_mesh_over_processes must accept the mesh)."""
  positions = _data_positions_by_process(mesh)[jax.process_index()]
  return positions[0] // len(positions), jax.process_count()


def _data_positions_by_process(mesh) -> dict[int, list[int]]:
  """The data x fsdp positions (row blocks of a batch) each process's devices hold, sorted."""
  fsdp = mesh.shape["fsdp"]
  positions = {}
  for (data_index, fsdp_index, _), device in np.ndenumerate(mesh.devices):
    positions.setdefault(device.process_index, set()).add(data_index * fsdp + fsdp_index)
  return {process: sorted(held) for process, held in positions.items()}


def check_batch_sizes(config, mesh) -> None:
  """Refuses batch sizes that the data-parallel devices cannot split evenly, before training (an
  evaluation batch would otherwise fail at the first evaluation)."""
  accum, divisor = config.optimizer.accum_steps, batch_divisor(mesh)
  _check_positive("optimizer.accum_steps", accum)
  _check_positive("input.batch_size", config.input.batch_size)
  if config.input.batch_size % (accum * divisor):
    raise ValueError(f"input.batch_size={config.input.batch_size} must be divisible by optimizer.accum_steps={accum}"
                     f" x the {divisor} data-parallel devices")
  check_eval_batch_size(config.input, mesh)


def check_eval_batch_size(input_config, mesh) -> None:
  """The evaluation batch splits over the data x fsdp devices (so over the processes too)."""
  size, divisor = input_config.eval_batch_size, batch_divisor(mesh)
  _check_positive("input.eval_batch_size", size)
  if size % divisor:
    raise ValueError(f"input.eval_batch_size={size} must be divisible by the {divisor} data-parallel "
                     f"devices (data x fsdp); e.g. --config.input.eval_batch_size="
                     f"{-(-size // divisor) * divisor}")


def _check_positive(key: str, value: int) -> None:
  if value < 1:
    raise ValueError(f"{key} must be a positive integer, got {value}")


# ----------------------------------------------------------------------------- model + optimizer

def make_schedule(config, updates_per_epoch: float, total_updates: int) -> optax.Schedule:
  lr, s = config.optimizer.lr, config.schedule
  if s.name == "constant":
    schedule = optax.constant_schedule(lr)
  elif s.name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, s.warmup_steps, max(total_updates, s.warmup_steps + 1),
                                              end_value=lr * s.end_lr_factor)
  elif s.name == "step_decay":  # x decay_rate after decay_begin_epochs, then every decay_every_epochs
    epochs = range(s.decay_begin_epochs, math.ceil(total_updates / updates_per_epoch) + 1, s.decay_every_epochs)
    schedule = optax.piecewise_constant_schedule(lr, {round(e * updates_per_epoch): s.decay_rate for e in epochs})
  elif s.name == "inverse_sqrt":  # fairseq: lr * sqrt(warmup / update) after the warm-up
    # join_schedules (below) counts from the end of the warm-up, hence count + warmup; it also
    # evaluates this branch during the warm-up (count < 0), where the max keeps it finite.
    warmup = max(s.warmup_steps, 1)
    schedule = lambda count: lr * jnp.sqrt(warmup / jnp.maximum(count + warmup, warmup))
  else:
    raise ValueError(f"unknown schedule {s.name!r}; expected constant, warmup_cosine, step_decay "
                     "or inverse_sqrt")
  if s.warmup_steps:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, s.warmup_steps), schedule], [s.warmup_steps])
  return schedule


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  o = config.optimizer
  optimizers = {
      "adam": lambda: optax.adam(schedule, b1=o.b1, b2=o.b2),
      "adamw": lambda: optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
      "sgd": lambda: optax.sgd(schedule, momentum=o.momentum),
  }
  if o.name not in optimizers:
    raise ValueError(f"unknown optimizer {o.name!r}; expected one of {sorted(optimizers)}")
  tx = optimizers[o.name]()
  if o.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  if o.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.accum_steps)
  return tx


def model_kwargs(config, task, meta: dict) -> dict:
  """create_model's keywords: those config.model sets (None keeps the variant's value), then what
  the data decides (the classes, the vocabulary), which a config may not contradict."""
  kwargs = common.model_overrides(config)
  from_data = task.model_overrides(meta)
  for key in sorted(kwargs.keys() & from_data.keys()):
    if kwargs[key] != from_data[key]:
      raise ValueError(f"model.{key}={kwargs[key]!r}, but the data {config.data.name} has "
                       f"{key}={from_data[key]!r}; leave model.{key} unset")
  return kwargs | from_data


def create_model_and_optimizer(config, meta: dict, task, mesh, tx=None):
  """Builds model (and optimizer) inside jit so every array is born with its sharding."""
  kwargs = model_kwargs(config, task, meta)

  def build():
    model = models.create_model(config.model.name, rngs=nnx.Rngs(config.seed), **kwargs)
    return (model, nnx.Optimizer(model, tx, wrt=nnx.Param)) if tx is not None else (model,)

  with jax.set_mesh(mesh):
    abstract = nnx.eval_shape(build)
    shardings = state_shardings(nnx.state(abstract), mesh)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
  return nnx.merge(nnx.graphdef(abstract), state)


def state_shardings(state, mesh):
  """NamedShardings of a model's (or optimizer's) state: each parameter by its logical axes
  through the active rules (ops.sharding), optimizer state as its parameter, the rest replicated."""
  return jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p),
                      ops.sharding.tree_specs(state, mesh))


def rng_streams(model) -> list[str]:
  """Tags of the RNG streams the model holds (e.g. 'dropout'), reseeded every step."""
  return sorted({node.key.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)})


# ----------------------------------------------------------------------------- steps

def make_train_step(task, graphdef, streams, seed: int):
  """Pure jitted step on the flat state; dropout keys depend only on (seed, step) for exact resume."""
  base_key = jax.random.key(seed)

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, batch, step):
    model, optimizer = nnx.merge(graphdef, state)
    key = jax.random.fold_in(base_key, step)
    nnx.reseed(model, **{name: jax.random.fold_in(key, i) for i, name in enumerate(streams)})
    (loss, aux), grads = nnx.value_and_grad(task.loss, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return ops.sharding.constrain_state(nnx.state((model, optimizer))), {"loss": loss, **aux}

  return train_step


def make_eval_step(task, graphdef):
  @jax.jit
  def eval_step(state, batch):
    return task.eval_sums(nnx.merge(graphdef, state), batch)
  return eval_step


def evaluate(task, eval_step, model_state, split, input_config, mesh) -> dict[str, float]:
  """Metrics over every example of a split (the last batch padded and masked)."""
  sums = None
  index, count = process_batch_slice(mesh)
  for batch in data.eval_batches(split, input_config.eval_batch_size, input_config=input_config,
                                 process_index=index, process_count=count):
    out = eval_step(model_state, put_batch(batch, mesh))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return tasks.finalize(jax.device_get(sums), task)


# ----------------------------------------------------------------------------- checkpoints

def make_checkpoint_manager(workdir: str, config, read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the latest N checkpoints and the best one by the early-stopping metric."""
  policies, best = [ocp.checkpoint_managers.LatestN(config.checkpoint.keep)], {}
  if config.early_stopping.metric:
    # best_fn is what makes orbax read the saved metrics back when a resumed run reopens the
    # directory; without it they are None there and BestN deletes the best checkpoint.
    improved = lambda metrics: metrics["improved"]
    best = dict(best_fn=improved, best_mode="max")
    # EarlyStopping decides what is best (ties are not improvements); orbax keeps the latest checkpoint it
    # marked as an improvement (a stable sort keeps step order among the 1.0s).
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=improved, n=1, keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies), **best,
      enable_async_checkpointing=config.checkpoint.async_save, read_only=read_only, create=not read_only)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def drop_unkept_steps(mngr, keep: int) -> None:
  """Deletes the steps the keep policy no longer holds. Orbax removes them after each save, so a run
  killed between committing a step and that removal leaves one behind, which a resumed run that
  saves nothing more would never clean up."""
  steps = sorted(mngr.all_steps())
  kept = {*steps[max(len(steps) - keep, 0):], mngr.best_step()}
  for step in steps:
    if step not in kept:
      mngr.delete(step)


def checksums_and_finite(items: dict) -> tuple[dict[str, str], dict[str, bool]]:
  """A checksum of every array of `items` ({"params/w": "89abcdef:01234567"}), and whether each
  item's arrays are all finite. Computed where the arrays are (one read of each, no host copy)
  and exact: the same on any device, sharding or host. One small program per shape and dtype
  (a model has a few dozen): one program over every array took seconds to compile."""
  leaves = jax.tree_util.tree_leaves_with_path(items)
  results = jax.device_get([_checksum_and_finite(x) for _, x in leaves])
  checksums, finite = {}, {name: True for name in items}
  for (path, _), (plain, weighted, is_finite) in zip(leaves, results):
    checksums[_path_name(path)] = f"{int(plain):08x}:{int(weighted):08x}"
    finite[path[0].key] &= bool(is_finite)
  return checksums, finite


@jax.jit
def _checksum_and_finite(x):
  """(sum of x's bits as uint32 words, the sum weighted by odd factors of each word's position,
  whether x is finite). The plain sum catches changed bits, the weighted one also moved ones;
  uint32 sums wrap around exactly, so the order of summation does not matter."""
  words = _uint32_words(x)
  weights = 2 * _row_major_index(words.shape) + 1
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32),
                    finite.astype(jnp.uint32)])


def _uint32_words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 values: narrower types widened, 64-bit ones split in two."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _row_major_index(shape) -> jax.Array:
  """Each element's flat index mod 2**32, built axis by axis: a reshape would gather a sharded
  array onto one device."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index += jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _way_out(mngr, step: int) -> str:
  """What to do about a bad checkpoint `step`: which step deleting it would resume from."""
  earlier = [s for s in mngr.all_steps() if s < step]
  then = f"resume from step {earlier[-1]}" if earlier else "start again from scratch"
  return f"Delete {os.path.join(mngr.directory, str(step))} to {then}."


def _first_line(error: BaseException) -> str:
  return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0][:300]


def restore_checked(mngr, step: int, items: dict) -> dict:
  """Restores `items` ({name: target tree}) and the meta of `step`, each array checked against
  the checksum saved with it and the params for finiteness. A checkpoint that cannot be read or
  does not match is refused with its step, the item's directory and the way out."""
  def read(name, arg):
    try:
      return mngr.restore(step, args=ocp.args.Composite(**{name: arg}))[name]
    except Exception as e:  # noqa: BLE001 -- orbax, tensorstore and json each raise their own
      where = os.path.join(mngr.directory, str(step), name)
      raise CheckpointError(f"checkpoint step {step} cannot be read: {where} "
                            f"({_first_line(e)}). {_way_out(mngr, step)}") from e

  meta = read("meta", ocp.args.JsonRestore())
  restored = {name: read(name, ocp.args.StandardRestore(tree)) for name, tree in items.items()}
  got, finite = checksums_and_finite(restored)
  saved = meta.get("checksums")
  if saved is not None:  # checkpoints written before checksums were saved have none
    damaged = [p for p, value in got.items() if saved.get(p, value) != value]
    if damaged:
      raise CheckpointError(
          f"checkpoint step {step} is damaged: {len(damaged)} array(s) differ from the checksums "
          f"saved with them, in {os.path.join(mngr.directory, str(step), damaged[0].split('/')[0])} "
          f"({', '.join(damaged[:3])}). {_way_out(mngr, step)}")
  if not finite.get("params", True):
    raise CheckpointError(f"checkpoint step {step} holds non-finite params. {_way_out(mngr, step)}")
  return {"meta": meta, **restored}


def model_items(model) -> dict:
  """What a checkpoint stores of a model: params (read by models.load_pretrained) and other state."""
  items = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
  rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState))))
  if jax.tree.leaves(rest):  # e.g. batch statistics
    items["model_state"] = rest
  return items


def restore_model_items(mngr, step: int, model) -> None:
  """Loads params (and other model state) of `step` into `model`, onto its current shardings."""
  restored = restore_checked(mngr, step, model_items(model))
  _update_model(model, restored)


def _update_model(model, restored: dict) -> None:
  for name, filt in (("params", nnx.Param), ("model_state", nnx.Not(nnx.Any(nnx.Param, nnx.RngState)))):
    if name in restored:
      state = nnx.state(model, filt)
      nnx.replace_by_pure_dict(state, restored[name])
      nnx.update(model, state)


def restore_training(mngr, step: int, model, optimizer) -> dict:
  """Loads everything a run needs to continue exactly from `step`; returns the loop's saved meta.

  The data position is the step itself (batch e of the pipeline is step e), so nothing of the
  data iterator is read: a run resumes on any number of processes. Checkpoints that also hold
  grain's per-process `data_iter` files (written before) resume the same way.
  """
  restored = restore_checked(mngr, step, {**model_items(model),
                                          "opt_state": nnx.to_pure_dict(nnx.state(optimizer))})
  _update_model(model, restored)
  opt_state = nnx.state(optimizer)
  nnx.replace_by_pure_dict(opt_state, restored["opt_state"])
  nnx.update(optimizer, opt_state)
  return restored["meta"]


# ----------------------------------------------------------------------------- the run's config

# What makes a checkpoint what it is: a resume that changes one of these is refused. Where the
# data lives may change; the schedule, steps, evaluation and mesh may too (logged).
_RUN_DEFINING = ("task", "model.", "data.", "input.image_size", "input.channels")
_LOCATIONS = ("data.data_dir", "data.manual_dir")


def _flat(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat |= _flat(value, f"{prefix}{key}.")
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_history(workdir: str) -> list[str]:
  """The workdir's config files, oldest first: config.json of the first run, then
  config.resume_<step>.json of each resume."""
  if not os.path.isdir(workdir):
    return []
  names = [n for n in os.listdir(workdir) if n.startswith("config.resume_") and n.endswith(".json")]
  names.sort(key=lambda n: int(n[len("config.resume_"):-len(".json")]))
  first = ["config.json"] if os.path.exists(os.path.join(workdir, "config.json")) else []
  return [os.path.join(workdir, n) for n in first + names]


def check_resumed_config(config, workdir: str) -> dict[str, tuple]:
  """{key: (saved, now)} for what differs from the config that made the workdir's checkpoints;
  raises ValueError, listing them, when the model, task or data differ."""
  history = config_history(workdir)
  if not history:  # checkpoints from before the config was recorded
    return {}
  with open(history[-1]) as f:
    saved = _flat(json.load(f))
  now = _flat(json.loads(config.to_json_best_effort()))
  # A key the zoo's base config gained since the run was saved held its default then.
  saved = {**{k: v for k, v in _base_config().items() if k not in saved}, **saved}
  changed = {k: (saved.get(k), now.get(k)) for k in saved.keys() | now.keys()
             if saved.get(k) != now.get(k)}
  defining = sorted(k for k in changed if k.startswith(_RUN_DEFINING) and k not in _LOCATIONS)
  if defining:
    listed = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in defining)
    raise ValueError(f"{workdir} holds checkpoints of another run ({os.path.basename(history[-1])})"
                     f": {listed}. Use another --workdir, or the run's own settings.")
  return dict(sorted(changed.items()))


@functools.cache
def _base_config() -> dict:
  return _flat(json.loads(common.base_config().to_json_best_effort()))


def record_config(config, workdir: str, start_step: int) -> None:
  """config.json on a fresh run; a resume adds config.resume_<step>.json (nothing overwritten).
  Written once every process has read the history (check_resumed_config), whole or not at all."""
  if jax.process_count() > 1:
    _tell_all_processes(True)  # a barrier: process 1 must not read a file process 0 is writing
  if not is_main_process():
    return
  name = f"config.resume_{start_step}.json" if start_step and config_history(workdir) else "config.json"
  path = os.path.join(workdir, name)
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- logging

def is_main_process() -> bool:
  """Process 0 writes the run's files and prints its lines; the others compute the same values."""
  return jax.process_index() == 0


def make_metric_writer(workdir: str, start_step: int, config):
  """A MetricWriter on process 0, one that writes nothing on the others (one copy of each record)."""
  if config.wandb.project:
    import_wandb()  # on every process: a missing package stops them all, with one line
  return MetricWriter(workdir, start_step, config) if is_main_process() else NoMetricWriter()


def import_wandb():
  try:
    import wandb
  except ImportError:
    raise ValueError("config.wandb.project is set but wandb is not installed: "
                     "pip install 'jax-paper-zoo[wandb]'") from None
  return wandb


class NoMetricWriter:
  def write(self, step: int, metrics: dict[str, float]) -> None:
    pass

  def write_texts(self, step: int, texts: dict[str, str]) -> None:
    pass

  def write_hparams(self, config, metrics: dict[str, float]) -> None:
    pass

  def close(self) -> None:
    pass


class MetricWriter:
  """metrics.jsonl (one JSON object per line, big_vision style), TensorBoard events (scalars, the
  config as text, hparams, text samples) and, when config.wandb.project is set, a Weights & Biases
  run (resumed with the workdir)."""

  def __init__(self, workdir: str, start_step: int, config):
    import tensorboardX  # here, not at the top: only process 0 needs it, and it imports torch

    path = os.path.join(workdir, "metrics.jsonl")
    _drop_records_after(path, start_step)  # a resumed run writes those steps again
    self._file = open(path, "a")
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._tb.add_text("config", f"```\n{config.to_json_best_effort(indent=2)}\n```", start_step)
    self._wandb = wandb_run(config, workdir) if config.wandb.project else None

  def write(self, step: int, metrics: dict[str, float]) -> None:
    self._file.write(json.dumps({"step": step, **metrics}) + "\n")
    self._file.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(name, value, step)
    if self._wandb:
      self._wandb.log(metrics, step=step)

  def write_texts(self, step: int, texts: dict[str, str]) -> None:
    for name, text in texts.items():
      self._tb.add_text(name, f"```\n{text}\n```", step)  # verbatim: samples are not markdown
    if self._wandb:
      self._wandb.log(texts, step=step)

  def write_hparams(self, config, metrics: dict[str, float]) -> None:
    """The flattened config as TensorBoard hparams, against the run's final metrics (the scalars
    of the same names), so the HParams dashboard compares runs."""
    from tensorboardX.summary import hparams

    for summary in hparams(hparam_values(config), dict.fromkeys(metrics, 0.0)):
      self._tb.file_writer.add_summary(summary)

  def close(self) -> None:
    self._file.close()
    self._tb.close()
    if self._wandb:
      self._wandb.finish()


def hparam_values(config) -> dict:
  """The config's leaves as the scalars and strings hparams takes (a tuple as its text)."""
  flat = _flat(json.loads(config.to_json_best_effort()))
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


def wandb_run(config, workdir: str):
  """A Weights & Biases run for this workdir: the id is kept in the workdir, so a resumed run
  continues the same W&B run."""
  wandb = import_wandb()
  id_file = os.path.join(workdir, "wandb_run_id")
  if not os.path.exists(id_file):
    with open(id_file, "w") as f:
      f.write(wandb.util.generate_id())
  with open(id_file) as f:
    run_id = f.read().strip()
  return wandb.init(project=config.wandb.project, entity=config.wandb.entity or None,
                    name=config.wandb.name or os.path.basename(os.path.abspath(workdir)),
                    config=config.to_dict(), dir=workdir, id=run_id, resume="allow",
                    mode=config.wandb.mode or None)


def _drop_records_after(path: str, step: int) -> None:
  """Keeps the records of `path` up to `step` (and none cut short by a kill)."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError):  # the last line of a killed run
        pass
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


class EarlyStopping:
  """Tracks the best evaluation of a metric; `should_stop` after `patience` evaluations without one."""

  def __init__(self, config, state: dict | None = None):
    self.metric, self.mode, self.patience = config.metric, config.mode, config.patience
    state = state or {}
    self.best_value = state.get("best_value")
    self.best_step = state.get("best_step")
    self.bad_evals = state.get("bad_evals", 0)

  def update(self, step: int, metrics: dict[str, float]) -> bool:
    """Records an evaluation; returns True when it is the best so far."""
    if not self.metric:
      return False
    if self.metric not in metrics:
      raise ValueError(f"early_stopping.metric {self.metric!r} is not among the evaluated {sorted(metrics)}")
    value = metrics[self.metric]
    improved = self.best_value is None or (value < self.best_value if self.mode == "min" else value > self.best_value)
    if improved:
      self.best_value, self.best_step, self.bad_evals = value, step, 0
    else:
      self.bad_evals += 1
    return improved

  @property
  def should_stop(self) -> bool:
    return bool(self.patience) and self.bad_evals >= self.patience

  def state(self) -> dict:
    return {"best_value": self.best_value, "best_step": self.best_step, "bad_evals": self.bad_evals}


def check_finite(losses: list, first_step: int, mngr) -> None:
  """Raises on the first non-finite loss; nothing after it was saved, so the last checkpoint is good."""
  values = np.asarray(jax.device_get(losses))
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    step = first_step + int(bad[0])
    raise NonFiniteLossError(f"loss became {values[bad[0]]} at step {step}; stopping. {last_good(mngr)}")


def last_good(mngr) -> str:
  """Where a run that went non-finite can be resumed from: nothing non-finite is ever saved."""
  step = mngr.latest_step()
  if step is None:
    return "No checkpoint was saved before it."
  return f"The last good checkpoint (step {step}) stays in {mngr.directory}."


# ----------------------------------------------------------------------------- signals

class StopSignals:
  """While active, SIGTERM (how schedulers and preemptible VMs stop a process) and SIGINT
  (Ctrl-C, Colab's stop button) ask the loop to stop after the current step and save it; a
  second signal exits at once. Handlers can only be set in the main thread: elsewhere the
  signals keep their usual effect."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, every_steps: int):
    self.every_steps = every_steps  # with several processes, how often they agree on stopping
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    if self.signum is not None:  # the second one: at once, as if no handler were set
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    self.signum = signum

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`: every process stops at the same step."""
    if jax.process_count() > 1 and step % self.every_steps:
      return False
    return self.agreed()

  def agreed(self) -> bool:
    """Whether any process received a signal (a collective with several processes)."""
    if jax.process_count() > 1:
      self.signum = int(multihost_utils.process_allgather(np.int32(self.signum or 0)).max()) or None
    return self.signum is not None


# ----------------------------------------------------------------------------- data

def load_splits(config_data, names: Sequence[str]) -> dict:
  """{name: data.load(config_data, name)}. With several processes, process 0 loads first, so that
  a dataset prepared on first use (config.data.manual_dir) is prepared once: the others wait for
  it, then load what it wrote (processes preparing into one data_dir race and fail)."""
  def load():
    return {name: data.load(config_data, name) for name in dict.fromkeys(names)}

  if jax.process_count() == 1:
    return load()
  if is_main_process():
    try:
      splits = load()
    except BaseException:
      _tell_all_processes(False)  # the others are waiting for process 0: let them stop too
      raise
    _tell_all_processes(True)
    return splits
  if not _tell_all_processes(False):
    raise data.DataError(f"process 0 could not load dataset {config_data.name!r}; see its error")
  return load()


def _tell_all_processes(flag: bool) -> bool:
  """Process 0's `flag`, on every process; a barrier: returns when all processes have called it."""
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


# ----------------------------------------------------------------------------- the loop

def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Runs (or resumes) the whole recipe; returns the final metrics also written to final_metrics.json."""
  with on_mesh(config) as mesh:
    check_mesh_over_processes(mesh)
    check_batch_sizes(config, mesh)
    with workdir_lock(workdir):
      return _train_and_evaluate(config, workdir, mesh)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds <workdir>/train.lock while a run writes there: a second run is refused, naming the
  first. The kernel releases the lock when its process dies: a killed run blocks nothing."""
  try:
    os.makedirs(workdir, exist_ok=True)
    lock_file = open(os.path.join(workdir, "train.lock"), "a+")
  except OSError as e:  # read-only, not ours, a file of that name
    raise ValueError(f"cannot write in the workdir {workdir}: {e.strerror}") from None
  with lock_file as f:
    holder = None
    if is_main_process():  # the processes of one run share the workdir
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
      except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
    if jax.process_count() > 1 and not _tell_all_processes(holder is None):
      holder = holder or "another run (see process 0)"
    if holder:
      raise WorkdirInUseError(f"{workdir} is in use by {holder}; wait for that run to end, or "
                              f"use another --workdir")
    yield


def _train_and_evaluate(config, workdir: str, mesh) -> dict[str, float]:
  t_start = time.time()
  mngr = make_checkpoint_manager(workdir, config)
  drop_unkept_steps(mngr, config.checkpoint.keep)
  start_step = mngr.latest_step() or 0
  changes = check_resumed_config(config, workdir) if start_step else {}
  record_config(config, workdir, start_step)
  task = tasks.from_config(config)

  # Data.
  evaluated = (*config.eval_splits, *config.final_eval_splits)
  splits = load_splits(config.data, ("train", *evaluated))
  train_split, eval_splits = splits["train"], {name: splits[name] for name in evaluated}
  accum = config.optimizer.accum_steps
  micro_batch = config.input.batch_size // accum  # the loop steps over micro batches; MultiSteps accumulates
  steps_per_epoch = data.steps_per_epoch(train_split, micro_batch)
  total_steps = config.total_steps or config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps or steps_per_epoch
  checkpoint_every = config.checkpoint.every_steps or eval_every
  index, count = process_batch_slice(mesh)
  train_data = data.train_batches(train_split, micro_batch, seed=config.seed,
                                  input_config=config.input, process_index=index, process_count=count)

  # Model and optimizer.
  schedule = make_schedule(config, steps_per_epoch / accum, total_steps // accum)
  model, optimizer = create_model_and_optimizer(config, train_split.meta, task, mesh, make_optimizer(config, schedule))
  graphdef, state = nnx.split((model, optimizer))
  train_step = make_train_step(task, graphdef, rng_streams(model), config.seed)
  eval_step = make_eval_step(task, nnx.graphdef(model))
  train_forward = nnx.jit(task.loss)  # precise BN's forward (config.recompute_bn_stats)
  # The tokenizer and the encoded prompts of config.samples, read (and checked) once, before training.
  sampling = (sample_prompts(config, train_split.meta)
              if config.samples.num_tokens and config.task == "language_modeling" else None)

  # Restore: resume this workdir if it has a checkpoint, else optionally start from pretrained weights.
  # One reader thread by default: a batch is a cheap vectorised gather, and more threads only
  # compete with XLA's; decoding and augmenting images may want more (config.input.num_threads).
  read_options = grain.ReadOptions(num_threads=config.input.num_threads,
                                   prefetch_buffer_size=max(2, config.input.num_threads))
  meta = {}
  # Batch e is step e's: the iterator starts at the step resumed from, whatever the process count.
  train_iter = iter(train_data[start_step:].to_iter_dataset(read_options))
  if start_step:
    meta = restore_training(mngr, start_step, model, optimizer)
    if is_main_process():
      print(f"Resumed from step {start_step} in {mngr.directory}", flush=True)
      for key, (saved, now) in changes.items():
        print(f"  changed since: {key} {saved!r} -> {now!r}", flush=True)
  elif config.init_from.path:
    report = models.pretrained.load_weights(model, config.init_from.path,
                                            dont_load=tuple(config.init_from.dont_load))
    if is_main_process():
      print(report, flush=True)
  state = nnx.state((model, optimizer))
  early_stopping = EarlyStopping(config.early_stopping, meta.get("early_stopping"))

  def save(step, metrics=None):
    model_, optimizer_ = nnx.merge(graphdef, state)
    items = {**model_items(model_), "opt_state": nnx.to_pure_dict(nnx.state(optimizer_))}
    # A loss is computed before its update: the update of a checkpoint step can still overflow.
    checksums, finite = checksums_and_finite(items)
    if not all(finite.values()):
      raise NonFiniteLossError(f"the parameters became non-finite at step {step}; stopping. "
                               f"{last_good(mngr)}")
    mngr.save(step, metrics=metrics, args=ocp.args.Composite(
        meta=ocp.args.JsonSave({"step": step, "stopped": stopped, "checksums": checksums,
                                "early_stopping": early_stopping.state()}),
        **{name: ocp.args.StandardSave(tree) for name, tree in items.items()}))

  if is_main_process():
    print(startup_summary(config, model, train_split, steps_per_epoch, total_steps, eval_every,
                          mesh, workdir), flush=True)

  # Train.
  writer = make_metric_writer(workdir, start_step, config)
  pending, pending_from = [], start_step  # per-step losses not yet checked (checking syncs the device)
  progress = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       disable=not is_main_process(), file=sys.stdout, mininterval=1.0)
  say = progress.write if is_main_process() else lambda line: None  # one copy of each line
  step, stopped = start_step, meta.get("stopped", False)
  t_log, steps_since_log = None, 0
  last_eval = (None, {})  # (step, metrics) of the latest evaluation, reused by the final one
  stop = StopSignals(config.log_every_steps)
  try:
    with stop:
      while step < total_steps and not stopped:
        batch = put_batch(next(train_iter), mesh)
        state, step_metrics = train_step(state, batch, step)
        pending.append(step_metrics["loss"])
        step += 1
        steps_since_log += 1
        progress.update()
        if t_log is None:  # the first step compiles; throughput is timed from after it
          say("Compiling the train step (the first step's time, and ETA, include it)...")
          jax.block_until_ready(step_metrics["loss"])
          t_log, steps_since_log = time.perf_counter(), 0

        is_eval = step % eval_every == 0 or step == total_steps
        if step % config.log_every_steps == 0 or is_eval or step % checkpoint_every == 0:
          check_finite(pending, pending_from, mngr)
          pending, pending_from = [], step
        if step % config.log_every_steps == 0:
          logged = {f"train/{k}": float(v) for k, v in jax.device_get(step_metrics).items()}
          logged["train/lr"] = float(schedule((step - 1) // accum))
          if steps_since_log:  # not right after the compiling first step
            dt = time.perf_counter() - t_log
            logged |= {"perf/steps_per_sec": steps_since_log / dt,
                       "perf/examples_per_sec": steps_since_log * micro_batch / dt}
            t_log, steps_since_log = time.perf_counter(), 0
          writer.write(step, logged)
          progress.set_postfix(loss=f"{logged['train/loss']:.4f}",
                               ex_per_s=f"{logged.get('perf/examples_per_sec', 0):.0f}")

        metrics = None
        if is_eval:
          if config.recompute_bn_stats:
            state = recompute_batch_stats(train_forward, graphdef, state, itertools.islice(
                iter(train_data.to_iter_dataset(read_options)), config.recompute_bn_stats), mesh)
          model_state = nnx.state(nnx.merge(graphdef, state)[0])
          metrics = {f"{name}/{k}": v for name in config.eval_splits
                     for k, v in evaluate(task, eval_step, model_state, eval_splits[name],
                                          config.input, mesh).items()}
          last_eval = (step, dict(metrics))
          metrics["epoch"] = step / steps_per_epoch
          improved = early_stopping.update(step, metrics)
          stopped = early_stopping.should_stop
          writer.write(step, metrics)
          say(f"step {step} (epoch {metrics['epoch']:.2f}): " +
              ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch"))
          if sampling:
            samples = generate_samples(config, nnx.merge(graphdef, state)[0], *sampling, step)
            writer.write_texts(step, samples)
            for name, text in samples.items():
              say(f"{name}: {text!r}")
          if t_log is not None:
            t_log, steps_since_log = time.perf_counter(), 0  # evaluation time is not training throughput
        interrupted = stop.requested(step)
        if interrupted:  # the losses since the last check, before saving
          check_finite(pending, pending_from, mngr)
          pending, pending_from = [], step
        if is_eval or step % checkpoint_every == 0 or stopped or interrupted:
          save(step, {**metrics, "improved": float(improved)}
               if metrics and early_stopping.metric else None)
        if interrupted:
          break
      if stopped and step < total_steps:
        say(f"Early stopping at step {step}: no better {early_stopping.metric} for "
            f"{early_stopping.patience} evaluations (best {early_stopping.best_value:.4f} at step "
            f"{early_stopping.best_step}).")
  finally:
    progress.close()
    mngr.wait_until_finished()
  if stop.agreed():
    writer.close()
    mngr.close()
    raise StoppedBySignal(stop.signum, f"stopped by {signal.Signals(stop.signum).name} after step "
                          f"{step}, saved in {mngr.directory}; rerun the same command to resume")

  # Final evaluation, on the best checkpoint when a metric selects one.
  model = nnx.merge(graphdef, state)[0]
  final_step = early_stopping.best_step or step
  if final_step != step:
    restore_model_items(mngr, final_step, model)
  model_state = nnx.state(model)
  final = {"best_step": final_step, "steps": step, "epochs": step / steps_per_epoch}
  for name in config.final_eval_splits:
    if last_eval[0] == final_step and name in config.eval_splits:  # evaluated there already
      final |= {k: v for k, v in last_eval[1].items() if k.startswith(f"{name}/")}
    else:
      final |= {f"{name}/{k}": v for k, v in evaluate(task, eval_step, model_state,
                                                        eval_splits[name], config.input,
                                                        mesh).items()}
  final["wall_time_sec"] = time.time() - t_start
  writer.write(step, {k: v for k, v in final.items() if "/" in k})
  writer.write_hparams(config, {k: v for k, v in final.items() if "/" in k})
  writer.close()
  mngr.close()
  if is_main_process():
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=2)
    print(format_table(final, title=f"Final metrics (checkpoint of step {final_step})"), flush=True)
    print(f"Outputs in {workdir}: checkpoints/, config.json, final_metrics.json, "
          f"metrics.jsonl and TensorBoard events (tensorboard --logdir {workdir})", flush=True)
  return final


def sample_prompts(config, meta: dict) -> tuple:
  """(tokenizer, [prompt tokens [1, P]]) of config.samples.prompts; a prompt that encodes to no
  tokens is refused."""
  tokenizer = data.get_tokenizer(config.data.get("tokenizer") or meta["tokenizer"])
  prompts = []
  for prompt in config.samples.prompts:
    tokens = np.asarray(tokenizer.encode(prompt), np.int32)
    if not tokens.size:
      raise ValueError(f"config.samples.prompts: {prompt!r} encodes to no tokens")
    prompts.append(tokens[None])
  return tokenizer, prompts


def generate_samples(config, model, tokenizer, prompts, step: int) -> dict[str, str]:
  """config.samples.num_tokens tokens continuing each prompt (a language model's writing, to read
  beside its loss), sampled with a key of the seed and the step."""
  texts = {}
  for index, tokens in enumerate(prompts):
    out = models.generate(model, tokens, config.samples.num_tokens,
                          temperature=config.samples.temperature,
                          top_k=config.samples.top_k or None,
                          rng=jax.random.fold_in(jax.random.key(config.seed), step))
    texts[f"samples/{index}"] = tokenizer.decode(np.asarray(out[0]))
  return texts


def recompute_batch_stats(train_forward, graphdef, state, batches, mesh):
  """The training state with every BatchNorm's running mean and variance re-estimated as their
  average over `batches` (training batches, batch statistics, the weights as they are; a training
  forward `train_forward(model, batch)`, e.g. the task's loss jitted once a run), as precise BN
  does: a short run's running averages (momentum 0.99: about the last 100 steps)
  trail weights that still move, and evaluation reads them (a 150-step MaxViT read chance).
  Only the statistics change."""
  model, optimizer = nnx.merge(graphdef, state)
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
  if not norms:
    return state
  momenta = [m.momentum for m in norms]
  for norm in norms:
    norm.momentum = 0.0  # a training forward leaves its batch's statistics
  sums, count = None, 0
  for batch in batches:
    train_forward(model, put_batch(batch, mesh))
    stats = [(norm.mean[...], norm.var[...]) for norm in norms]
    sums = stats if sums is None else jax.tree.map(jnp.add, sums, stats)
    count += 1
  for norm, momentum, (mean, var) in zip(norms, momenta, sums):
    norm.momentum = momentum
    norm.mean[...], norm.var[...] = mean / count, var / count
  return nnx.state((model, optimizer))


def young_batch_stats_note(config, model, total_steps: int) -> str | None:
  """A line for runs whose BatchNorm statistics evaluation would read before they settle."""
  momenta = [m.momentum for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
  if not momenta or config.recompute_bn_stats or total_steps >= 10 / (1 - min(momenta)):
    return None
  return (f"Note     BatchNorm's running statistics average about the last "
          f"{1 / (1 - min(momenta)):.0f} steps and this run has {total_steps}: evaluation may read "
          f"them before they settle; --config.recompute_bn_stats=N re-estimates them from N "
          f"training batches before each evaluation")


def startup_summary(config, model, train_split, steps_per_epoch: int, total_steps: int,
                    eval_every: int, mesh, workdir: str) -> str:
  """What a run is about to do, before the first step compiles: the model, the data, the steps,
  the devices and where its files go."""
  devices = mesh.devices.flatten()
  axes = ", ".join(f"{name} {size}" for name, size in mesh.shape.items() if size > 1) or "one device"
  splits = ", ".join(dict.fromkeys((*config.eval_splits, *config.final_eval_splits))) or "none"
  overrides = config_overrides()
  recipe = {k: v for k, v in recipe_settings(config).items() if k not in overrides}
  return "\n".join([
      f"Model    {config.model.name}: {models.count_params(model):,} parameters",
      f"Data     {config.data.name}: {len(train_split):,} training examples, {steps_per_epoch:,} "
      f"steps an epoch at batch {config.input.batch_size}; evaluated on {splits}",
      f"Steps    {total_steps:,} ({total_steps / steps_per_epoch:.3g} epochs), evaluation every "
      f"{eval_every:,}",
      f"Devices  {len(devices)} {devices[0].platform} ({axes}), {jax.process_count()} process(es)",
      *wrapped("Config   the recipe sets: ", _settings_text(recipe)),
      *wrapped("         the command line sets: ", _settings_text(overrides)),
      f"Workdir  {workdir}",
      *filter(None, [young_batch_stats_note(config, model, total_steps)])])


def recipe_settings(config) -> dict:
  """The run's config as a diff against the loop's defaults (configs/common.py): what the family
  recipe and the command line set. The model's keywords the recipe leaves at None are not listed."""
  base = _base_config()
  return {k: v for k, v in _flat(json.loads(config.to_json_best_effort())).items()
          if (k in base and v != base[k]) or (k not in base and v is not None)}


def _settings_text(settings: dict) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items())) or "nothing"


def wrapped(head: str, text: str, width: int = 100) -> list[str]:
  return textwrap.wrap(text, width, initial_indent=head, subsequent_indent=" " * len(head),
                       break_long_words=False, break_on_hyphens=False)


def config_overrides() -> dict:
  """The --config.<key>=<value> overrides of this command line (none outside the CLI)."""
  if "config" not in flags.FLAGS or not flags.FLAGS.is_parsed():
    return {}
  return config_flags.get_override_values(flags.FLAGS["config"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), where a config override
  that names no key, a bad value or a config file that raises ends in one line, not in the
  chained tracebacks of ml_collections."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
    sys.exit(1)


def _flag_error(error: BaseException, argv: list[str]) -> str:
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  if "Traceback (most recent call last)" in text:  # a config file's own error, as text
    text = text.strip().splitlines()[-1].split(": ", 1)[-1]
  lines = [line.strip() for line in text.strip().splitlines()]
  missing = lines[0].strip("'\"")
  overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
  flag = next((f for f in overrides if f.rsplit(".", 1)[-1] == missing), None)
  if isinstance(error, KeyError) and flag:  # a key the config does not have
    hint = " ".join(lines[1:])  # ml_collections' "Did you mean ...?"
    return f"{flag}: the config has no key {missing!r}. {hint}".strip()
  return " ".join(lines)


def format_table(metrics: dict, title: str) -> str:
  width = max(map(len, metrics))
  rows = [f"  {k:<{width}}  {v:.6g}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in metrics.items()]
  return "\n".join([title, *rows])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file they touch at INFO
  if flags.FLAGS.keep_freed_memory:
    ops.xla_cpu.keep_freed_memory_mapped()
  try:
    initialize_multihost()
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (NonFiniteLossError, CheckpointError, WorkdirInUseError, data.DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except StoppedBySignal as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)  # as a shell reports a process its signal ended


if __name__ == "__main__":
  # Flags are defined here, not at import, so that eval.py and tests can import this module.
  config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<arg>", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
  define_multihost_flags()
  flags.DEFINE_bool("keep_freed_memory", True, "Keep freed host memory mapped (glibc malloc), so "
                    "XLA:CPU's per-step buffers are not page-faulted again at every step.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
