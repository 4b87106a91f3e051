r"""Compiles a config's train and eval steps for a Cloud TPU slice, on a machine without a TPU.

  pip install -e ".[tpu]"        # libtpu: XLA:TPU and Mosaic, the compilers
  python aot.py --config configs/itransformer.py:etth1_96 --topology v5e:2x2 --config.mesh.data=4
  python aot.py --config configs/transnormer.py:tnl_7b --topology v5p-16 \
      --config.mesh.data=1 --config.mesh.fsdp=8 --config.optimizer.accum_steps=256

As MaxText's train_compile.py: libtpu describes the slice's chips without having them
(jax.experimental.topologies), the config's mesh is laid over them, the steps are traced on
abstract state and batches (nothing is allocated: a 7B model compiles on a laptop) and XLA:TPU
compiles them, the Pallas kernels through Mosaic. Prints, per chip: model and optimizer state, the
batch, XLA's temporaries, the total against the chip's HBM, XLA's FLOPs and bytes accessed per step
(Pallas kernels count none), and the Mosaic kernels in the program. Exits 1 with one line when a
step does not compile or does not fit.

--topology: jax's names (v5e:2x4, v5p:2x2x2, v4:2x2x1, v6e:2x2) or Cloud TPU slice names (v5e-8
and v6e-8 count chips; v5p-16 and v4-8 count TensorCores, two per chip). The batch is the config's:
input.batch_size / optimizer.accum_steps examples per step (the loop steps over micro-batches), or
--batch_size. Neither the dataset nor a tokenizer file is needed (data.abstract_meta).
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import time

from absl import app, flags
import jax
import numpy as np
from flax import nnx
from ml_collections import config_flags

import data
import models
import ops
import tasks
import train

GIB = 2**30
# HBM per chip (GiB, Cloud TPU's figures) by jax's device_kind. XLA:TPU's out-of-memory errors
# name what it may use ("Used 20G of 15.75G hbm").
CHIP_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
# Cloud TPU slice-name prefix -> (jax generation, topology rank, TensorCores the name counts per chip).
_SLICES = {"v4": ("v4", 3, 2), "v5p": ("v5p", 3, 2), "v5e": ("v5e", 2, 1),
           "v5litepod": ("v5e", 2, 1), "v6e": ("v6e", 2, 1)}


class AotError(Exception):
  """A reason to stop, printed as one line."""


# ----------------------------------------------------------------------------- the slice

def topology_name(name: str) -> str:
  """jax's topology name for `name`: itself when it is one ('v5e:2x4'), else a Cloud TPU slice name
  ('v5e-8' -> 'v5e:2x4', 'v5p-16' -> 'v5p:2x2x2'), the shape Cloud TPU gives that many chips."""
  if ":" in name:
    return name
  prefix, _, count = name.partition("-")
  if prefix not in _SLICES or not count.isdigit():
    raise AotError(f"--topology={name!r}: expected a jax topology (v5e:2x4, v5p:2x2x2) or a Cloud "
                   f"TPU slice name ({', '.join(f'{p}-8' for p in _SLICES)})")
  generation, rank, cores_per_chip = _SLICES[prefix]
  chips = int(count) // cores_per_chip
  if chips != 1 and (chips < 4 or chips & (chips - 1)):
    raise AotError(f"--topology={name!r}: expected a slice of 1 or 4, 8, 16, ... chips, got {chips}")
  dims = [1] * rank if chips == 1 else [2, 2] + [1] * (rank - 2)
  while np.prod(dims) < chips:  # 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...: the last smallest side doubles
    dims[max(i for i, d in enumerate(dims) if d == min(dims))] *= 2
  return f"{generation}:{'x'.join(map(str, dims))}"


def accelerator_type(topology: str) -> str:
  """Cloud TPU's accelerator type of a jax topology name ('v5e:2x4' -> 'v5litepod-8')."""
  generation, _, dims = topology.partition(":")
  chips = int(np.prod([int(d) for d in dims.split("x")]))
  prefix, _, cores_per_chip = next((p, g, c) for p, (g, _, c) in _SLICES.items() if g == generation)
  return f"{'v5litepod' if generation == 'v5e' else prefix}-{chips * cores_per_chip}"


def tpu_devices(name: str) -> list:
  """The compile-only devices of a TPU topology, from libtpu (no TPU needed)."""
  from jax.experimental import topologies
  topology = topology_name(name)
  # Quiets libtpu's start-up warnings about the TPU VM it is not on (no effect on the compile).
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topology))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # libtpu locks /tmp/libtpu_lockfile for the life of the process, TPU or not: without this a
  # second compile on the machine (or one beside a TPU job) fails. Compiling touches no TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # One device per chip, as jax runs them (a v4 chip's two TensorCores as one, "megacore").
  chip = "megacore" if topology.startswith("v4:") else "default"
  try:
    return topologies.get_topology_desc(topology, platform="tpu", chip_config_name=chip).devices
  except Exception as e:  # libtpu missing, a bad name, or a slice smaller than a host's 2x2 chips
    if "not divisible" in str(e):  # e.g. v5e:1x1: one host holding the whole slice
      bounds = tuple(int(d) for d in topology.split(":")[1].split("x"))
      return topologies.get_topology_desc(topology, platform="tpu", chip_config_name=chip,
                                          chips_per_host_bounds=(bounds + (1, 1))[:3]).devices
    raise AotError(f"cannot describe TPU topology {topology!r}: {first_line(e)} (is libtpu "
                   "installed? pip install -e '.[tpu]')") from e


def hbm_per_device(devices) -> float | None:
  """Bytes of HBM of each device (a chip); None for a chip not in CHIP_HBM_GIB."""
  gib = CHIP_HBM_GIB.get(devices[0].device_kind)
  return None if gib is None else gib * GIB


# ----------------------------------------------------------------------------- abstract inputs

def abstract_state(config, task, meta: dict, mesh):
  """(model, graphdef of (model, optimizer), their state): the model built by nnx.eval_shape, the
  state as ShapeDtypeStructs with the shardings train.create_model_and_optimizer gives the arrays.
  Nothing is allocated."""
  tx = train.make_optimizer(config, train.make_schedule(config, 1.0, 1))  # lr values: inputs only

  def build():
    model = models.create_model(config.model.name, rngs=nnx.Rngs(config.seed), **kwargs)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  try:
    kwargs = train.model_kwargs(config, task, meta)
    abstract = nnx.eval_shape(build)
  except (TypeError, ValueError) as e:  # e.g. a config.model key the model does not take
    raise AotError(f"cannot build {config.model.name}: {first_line(e)}") from e
  shardings = train.state_shardings(nnx.state(abstract), mesh)
  state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings).eval_shape()
  return abstract[0], nnx.graphdef(abstract), state


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def step_batch_size(config, mesh, batch_size: int) -> int:
  """Examples per compiled train step: --batch_size, else the config's micro-batch."""
  accum, divisor = config.optimizer.accum_steps, train.batch_divisor(mesh)
  if not batch_size:
    if config.input.batch_size % accum:
      raise AotError(f"input.batch_size={config.input.batch_size} must be divisible by "
                     f"optimizer.accum_steps={accum}")
    batch_size = config.input.batch_size // accum
  if batch_size % divisor:
    raise AotError(f"a step's batch of {batch_size} must be divisible by the {divisor} "
                   "data-parallel devices (data x fsdp)")
  return batch_size


# ----------------------------------------------------------------------------- compile and report

def compile_step(name: str, jitted, *args):
  try:
    return jitted.trace(*args).lower().compile()
  except Exception as e:  # XLA:TPU, Mosaic or tracing: each says why in its first line
    raise AotError(f"the {name} step does not compile for TPU: {first_line(e)}") from e


def first_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  for line in lines:  # XLA:TPU's out-of-memory line says how much it needed and had
    if "Ran out of memory" in line or "Used " in line and " hbm" in line:
      return line
  return lines[0] if lines else type(error).__name__


def mosaic_kernels(hlo: str) -> collections.Counter:
  """Mosaic (Pallas TPU) kernels in a compiled program's HLO text: kernel name -> calls."""
  names = collections.Counter()
  for line in hlo.splitlines():
    if 'custom_call_target="tpu_custom_call"' in line:
      op = re.search(r'op_name="([^"]*)"', line)
      names[op.group(1).split("/pallas_call")[0].rsplit("/", 1)[-1] if op else "?"] += 1
  return names


def step_report(compiled, state_bytes: dict[str, int]) -> dict[str, float]:
  """Per-device bytes (state parts, temporaries, total), FLOPs and bytes accessed of a compiled
  step. The total is what the TPU holds while it runs, from XLA's buffer assignment: arguments +
  outputs - the outputs that reuse donated arguments + temporaries + the program's code."""
  memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes
           + memory.generated_code_size_in_bytes)
  return {**state_bytes, "temporaries": memory.temp_size_in_bytes, "total": total,
          "flops": cost.get("flops", 0.0), "bytes accessed": cost.get("bytes accessed", 0.0)}


def format_bytes(n: float) -> str:
  unit, size = next((u, s) for u, s in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
                    if n >= s or s == 1)
  return f"{n / size:.4g} {unit}"


def print_report(header: list[str], reports: dict[str, dict], hbm: float | None) -> None:
  names = list(reports)
  rows = [("", *(f"{n} step" for n in names))]
  for key in ("model", "optimizer", "batch", "temporaries", "total"):
    rows.append((key, *(format_bytes(r[key]) if key in r else "-" for r in reports.values())))
  if hbm:
    rows.append(("of HBM", *(f"{r['total'] / hbm:.0%} of {format_bytes(hbm)}"
                             for r in reports.values())))
  rows.append(("TFLOP (XLA ops)", *(f"{r['flops'] / 1e12:.4g}" for r in reports.values())))
  rows.append(("GB accessed", *(f"{r['bytes accessed'] / 1e9:.4g}" for r in reports.values())))
  rows.append(("XLA while loops", *(str(r["loops"]) for r in reports.values())))
  rows.append(("Mosaic kernels", *(str(sum(r["kernels"].values())) for r in reports.values())))
  rows.append(("compile seconds", *(f"{r['seconds']:.0f}" for r in reports.values())))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  print("\n".join(header))
  for row in rows:
    print("  " + row[0].ljust(widths[0]) + "".join(f"  {c:>{w}}" for c, w in zip(row[1:], widths[1:])))
  print("  FLOPs and bytes: XLA's cost analysis, in which a Pallas kernel counts its cost estimate\n"
        "  (the lightning kernels give one, the others none) and a while loop's body counts once\n"
        "  (scans, and the matmuls fsdp splits into loops, read low).")
  for name, report in reports.items():
    if report["kernels"]:
      kernels = ", ".join(f"{k} x{n}" for k, n in sorted(report["kernels"].items()))
      print(f"  {name} kernels: {kernels}")


@contextlib.contextmanager
def on_mesh(mesh, config):
  """Inside: the TPU mesh and the config's sharding rules, what the models and kernels trace for."""
  with jax.set_mesh(mesh), ops.sharding.use_rules(config.mesh.rules):
    yield


def steps_to_compile(config, mesh, batch_size: int, with_eval: bool):
  """(abstract model, {step name: (jitted step, abstract args, {report row: its args})})."""
  task = tasks.from_config(config)
  meta = data.abstract_meta(config.data)
  sharding = train.batch_sharding(mesh)
  with on_mesh(mesh, config):
    model, graphdef, state = abstract_state(config, task, meta, mesh)
    batch = tasks.abstract_batch(task, config, meta, batch_size, sharding=sharding)
    eval_batch = tasks.abstract_batch(task, config, meta, config.input.eval_batch_size,
                                      train=False, sharding=sharding)
  # The steps are made outside the mesh: make_train_step draws its base key eagerly, which a mesh
  # of compile-only devices cannot run.
  step = jax.ShapeDtypeStruct((), np.int32, weak_type=True)  # a Python int in train.py
  model_state, optimizer_state = state[0], state[1]  # the state of the (model, optimizer) pair
  steps = {"train": (train.make_train_step(task, graphdef, train.rng_streams(model), config.seed),
                     (state, batch, step),
                     {"model": model_state, "optimizer": optimizer_state, "batch": batch})}
  if with_eval:
    steps["eval"] = (train.make_eval_step(task, nnx.graphdef(model)), (model_state, eval_batch),
                     {"model": model_state, "batch": eval_batch})
  return model, steps


def compile_for_tpu(config, topology: str, batch_size: int = 0, with_eval: bool = True):
  """Compiles the config's steps for `topology`: (header lines, {step: report}, HBM per device)."""
  devices = tpu_devices(topology)
  mesh = train.make_mesh(config.mesh, devices=devices)
  batch_size = step_batch_size(config, mesh, batch_size)
  divisor, eval_size = train.batch_divisor(mesh), config.input.eval_batch_size
  if with_eval and eval_size % divisor:
    raise AotError(f"input.eval_batch_size={eval_size} must be divisible by the {divisor} "
                   "data-parallel devices (data x fsdp)")
  model, steps = steps_to_compile(config, mesh, batch_size, with_eval)
  reports = {}
  for name, (jitted, args, parts) in steps.items():
    start = time.perf_counter()
    with on_mesh(mesh, config):
      compiled = compile_step(name, jitted, *args)
    reports[name] = step_report(compiled, {k: per_device_bytes(v) for k, v in parts.items()})
    hlo = compiled.as_text()
    reports[name] |= {"kernels": mosaic_kernels(hlo), "loops": len(re.findall(r"\bwhile\(", hlo)),
                      "seconds": time.perf_counter() - start}
  hbm = hbm_per_device(devices)
  shape = " ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  evaluation = f", eval step of {eval_size}" if with_eval else ""
  header = [
      f"{topology_name(topology)}: {len(devices)} x {devices[0].device_kind}, "
      f"{format_bytes(hbm) if hbm else 'unknown'} HBM per device; mesh {shape}",
      f"{config.model.name}: {params:,} params; train step of {batch_size} examples "
      f"({batch_size // divisor} per device){evaluation}. Per device:"]
  return header, reports, hbm


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  FLAGS = flags.FLAGS
  try:
    header, reports, hbm = compile_for_tpu(FLAGS.config, FLAGS.topology, FLAGS.batch_size,
                                           FLAGS.eval)
  except (AotError, ValueError, data.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print_report(header, reports, hbm)
  too_big = [name for name, r in reports.items() if hbm and r["total"] > hbm]
  if too_big:
    worst = max(reports[name]["total"] for name in too_big)
    print(f"error: the {' and '.join(too_big)} step needs {format_bytes(worst)} per device, more "
          f"than the {format_bytes(hbm)} of HBM", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  # A CPU traces and compiles: jax must not take (or look for) a TPU of this machine.
  jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
  config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<arg>", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice: v5e:2x4, v5p:2x2x2, ... or v5e-8, v5p-16, ...")
  flags.DEFINE_integer("batch_size", 0, "Examples per train step (global); 0: the config's "
                       "input.batch_size / optimizer.accum_steps.", lower_bound=0)
  flags.DEFINE_bool("eval", True, "Also compile the eval step (input.eval_batch_size).")
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
