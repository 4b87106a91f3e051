"""Logical axis names, the one table that maps them to mesh axes, and their uses.

As in MaxText, every parameter names what each of its dimensions is (`"embed"`, `"mlp"`,
`"heads"`, ...) and one table, `RULES`, says which mesh axes (`"data"`, `"fsdp"`, `"tensor"`)
each name is split over. The same names place activations (`constrain`) and split the inputs of
Pallas kernels across devices (`shard_map`). Everything here acts only under a mesh of more than
one device (`jax.set_mesh`); on one device the functions return their input.

A dimension is split over the mesh axes its name maps to, leaving out axes of size 1, axes an
earlier dimension of the same array already uses, and axes whose size does not divide it (those
stay replicated: a 3-channel stem, a bias of 10 classes). It lives here, beside the kernels that
need it, because ops is the layer everything else builds on.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec as P

# Logical name -> mesh axes it is split over (together, in this order); () = replicated.
RULES: dict[str, tuple[str, ...]] = {
    # Activations.
    "batch": ("data", "fsdp"),   # examples (and windows or regions stacked with them)
    "length": (),                # tokens, time steps, image rows and columns
    # Weights.
    "embed": ("fsdp",),          # the model width: the residual stream's features (FSDP)
    "mlp": ("tensor",),          # hidden units of a feed-forward block (Megatron's column/row)
    "heads": ("tensor",),        # attention heads: q/k/v outputs, the output projection's inputs
    "kv": (),                    # features within one head
    "vocab": ("tensor",),        # token embedding and output rows
    "conv_in": (),               # input channels of a convolution
    "conv_out": ("fsdp",),       # output channels of a convolution (and depthwise channels)
    "norm": (),                  # scales, biases and other per-channel vectors
    "table": (),                 # small lookup tables: position biases, routing, decay rates
}

METADATA_KEY = "logical_axes"  # the nnx.Variable metadata holding a parameter's names

Axes = Sequence[str | None]  # one logical name (None: never split) per dimension

_active_rules: list[Mapping[str, tuple[str, ...]]] = [RULES]


def axes(*names: str | None) -> dict[str, tuple[str | None, ...]]:
  """Variable metadata naming each dimension: `nnx.Param(value, **axes("embed", "mlp"))`, or
  `kernel_metadata=axes(...)` for flax layers."""
  for name in names:
    if name is not None and name not in RULES:
      raise ValueError(f"unknown logical axis {name!r}; expected one of {sorted(RULES)}")
  return {METADATA_KEY: tuple(names)}


def rules() -> Mapping[str, tuple[str, ...]]:
  """The table in effect (`RULES` with the overrides of the innermost `use_rules`)."""
  return _active_rules[-1]


@contextlib.contextmanager
def use_rules(overrides: Mapping[str, Sequence[str]] | None = None):
  """Makes `RULES` updated with `overrides` (e.g. `{"mlp": ("fsdp",)}`) the table inside."""
  overrides = dict(overrides or {})
  unknown = sorted(set(overrides) - set(RULES))
  if unknown:
    raise ValueError(f"unknown logical axes {unknown} in the sharding rules; expected names "
                     f"from {sorted(RULES)}")
  _active_rules.append({**RULES, **{k: tuple(v) for k, v in overrides.items()}})
  try:
    yield
  finally:
    _active_rules.pop()


def _active_mesh():
  """The mesh set by `jax.set_mesh`, or None when there is none or it has one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def _mesh_axes(name: str | None, size: int, mesh, used: set[str]) -> tuple[str, ...]:
  """The mesh axes that split a dimension of `size` named `name` (greedy, in the rule's order)."""
  if name is None:
    return ()
  if name not in rules():
    raise ValueError(f"unknown logical axis {name!r}; expected one of {sorted(rules())}")
  chosen = []
  for axis in rules()[name]:
    if axis not in mesh.shape:
      raise ValueError(f"sharding rule {name!r} -> {rules()[name]} names mesh axis {axis!r}, "
                       f"not one of {tuple(mesh.shape)}")
    n = mesh.shape[axis]
    if n > 1 and axis not in used and size % (math.prod(mesh.shape[a] for a in chosen) * n) == 0:
      chosen.append(axis)
  used.update(chosen)
  return tuple(chosen)


def _entry(mesh_axes: tuple[str, ...]):
  return None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def spec(names: Axes, shape: Sequence[int], mesh=None) -> P:
  """The PartitionSpec of an array of `shape` whose dimensions are `names` (trailing Nones
  dropped), under `mesh` (default: the active one; P() without a mesh)."""
  if len(names) != len(shape):
    raise ValueError(f"logical axes {tuple(names)} do not match an array of shape {tuple(shape)}")
  mesh = mesh if mesh is not None else _active_mesh()
  if mesh is None:
    return P()
  used: set[str] = set()
  entries = [_entry(_mesh_axes(name, size, mesh, used)) for name, size in zip(names, shape)]
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def logical_axes(variable) -> tuple[str | None, ...] | None:
  """The logical names an nnx.Variable (or optimizer state built from it) carries, or None."""
  return variable.get_metadata().get(METADATA_KEY)


def constrain(x: jax.Array, names: Axes) -> jax.Array:
  """`x` laid out by its logical axes when a multi-device mesh is active (a hint XLA keeps)."""
  mesh = _active_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec(names, x.shape, mesh))


def constrain_state(state):
  """A tree of nnx Variables (a model's or optimizer's state) laid out by their logical axes, as
  `tree_specs`. A jitted step returns its state so: left to itself XLA may hand back some arrays
  laid out otherwise (a norm's scale split over `tensor`), and the next call compiles again."""
  mesh = _active_mesh()
  if mesh is None:
    return state
  return jax.lax.with_sharding_constraint(state, tree_specs(state, mesh))


def shard_map(fn: Callable, in_axes: Sequence[Axes | None], out_axes: Axes | Sequence[Axes]):
  """`fn` run on each device's shard of its arguments, for code XLA cannot partition itself
  (Pallas kernels: "Mosaic kernels cannot be automatically partitioned").

  `in_axes[i]` names argument i's dimensions (None: a non-array argument, passed as it is);
  `out_axes` the output's (a tuple of them for several outputs). Only names that `fn` is
  independent along may be split (batch, heads): each name is resolved once, from the first
  argument where that dimension is larger than 1, and every argument and output with that name
  is split the same way (a dimension of size 1, such as a bias shared by the batch, stays whole).
  Without a multi-device mesh `fn` is called directly.
  """
  def wrapped(*args):
    mesh = _active_mesh()
    if mesh is None:
      return fn(*args)
    if len(args) != len(in_axes):
      raise ValueError(f"shard_map: {len(args)} arguments for {len(in_axes)} in_axes")
    resolved: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()  # a mesh axis splits one logical name only
    for names, x in zip(in_axes, args):
      if names is None or x is None:
        continue
      for name, size in zip(names, x.shape):
        if name is not None and name not in resolved and size > 1:
          resolved[name] = _mesh_axes(name, size, mesh, used)

    def spec_of(names, shape):
      entries = []
      for name, size in zip(names, shape):
        split = resolved.get(name, ()) if size > 1 else ()
        if split and size % math.prod(mesh.shape[a] for a in split):
          raise ValueError(f"shard_map: dimension {name!r} of size {size} cannot be split like "
                           f"the other arguments' over {split}")
        entries.append(_entry(split))
      return P(*entries)

    array_args = [i for i, (names, x) in enumerate(zip(in_axes, args))
                  if names is not None and x is not None]

    def per_shard(*arrays):
      full = list(args)
      for i, a in zip(array_args, arrays):
        full[i] = a
      return fn(*full)

    arrays = [args[i] for i in array_args]
    out_shapes = jax.eval_shape(per_shard, *arrays)
    multiple = isinstance(out_shapes, (tuple, list))
    outs = tuple(out_axes) if multiple else (out_axes,)
    out_specs = tuple(spec_of(n, o.shape) for n, o in zip(outs, out_shapes if multiple
                                                          else (out_shapes,)))
    return jax.shard_map(
        per_shard, mesh=mesh, check_vma=False,
        in_specs=tuple(spec_of(in_axes[i], args[i].shape) for i in array_args),
        out_specs=out_specs if multiple else out_specs[0])(*arrays)

  return wrapped


def tree_specs(tree, mesh=None):
  """PartitionSpecs for a tree of nnx Variables (a model's or optimizer's state): each by its
  logical axes (`logical_axes`), P() for those that name none (e.g. a step count)."""
  def spec_of(x):
    names = logical_axes(x) if hasattr(x, "get_metadata") else None
    return P() if names is None else spec(names, x.shape, mesh)
  return jax.tree.map(spec_of, tree, is_leaf=lambda x: hasattr(x, "get_metadata"))
