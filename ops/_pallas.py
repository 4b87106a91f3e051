"""What the Pallas kernels of ``ops`` share: the targets they compile for and the ``pallas_call``
keywords of each, tile matmuls and tile arithmetic, optional kernel refs, and the conventions of
softmax attention (mask value, default scale) that the kernels and their references agree on.

Private to ``ops``: the op modules import from here, their users import the ops.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops import dispatch

# Where a kernel runs: Pallas's interpreter (the only way a CPU runs Pallas), Triton on GPU, Mosaic
# on TPU.
TARGETS = ("interpret", "gpu", "tpu")

# Finite mask value, as in jax's Pallas attention kernels: fully masked rows never produce NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def default_target() -> str:
  """The platform's compiled kernel; on CPU the interpreter (the only way a CPU runs Pallas). The
  platform is the active mesh's (ops.dispatch), not the default backend: a CPU compiling for a TPU
  mesh (aot.py) must get Mosaic kernels, not the interpreter's loops compiled for the TPU."""
  platform = dispatch.platform()
  return "interpret" if platform == "cpu" else platform


def backend_params(target: str, grid_rank: int, *, sequential_last_axis: bool = False,
                   tpu_interpret: bool = False) -> dict:
  """pallas_call keywords for a target. Triton is named explicitly: jax 0.10 lowers a plain
  pallas_call on GPU with Mosaic GPU, which has no dot_general in this (lane-level) kernel style.

  On TPU every grid axis is parallel, except the last one with ``sequential_last_axis`` (a kernel
  that carries state from one step of it to the next); ``tpu_interpret`` runs the TPU kernel in
  Pallas's TPU interpreter (tests on a CPU)."""
  if target == "interpret":
    return dict(interpret=True)
  if target == "gpu":
    from jax.experimental.pallas import triton as pltriton
    return dict(compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))
  from jax.experimental.pallas import tpu as pltpu
  if tpu_interpret:
    return dict(interpret=pltpu.InterpretParams())
  semantics = ("parallel",) * grid_rank
  if sequential_last_axis:
    semantics = semantics[:-1] + ("arbitrary",)
  return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def cost_estimate(flops, *arrays):
  """What a kernel computes and moves, for XLA's cost analysis and scheduler: each array read or
  written once (a kernel that reads a block again costs more than this says)."""
  moved = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)
  return pl.CostEstimate(flops=int(flops), transcendentals=0, bytes_accessed=moved)


def tile_dot(a, b, contract: tuple[int, int]):
  """2-D tile matmul contracting axis contract[0] of a with contract[1] of b, accumulating in f32.
  f32 operands run at full precision (the f32 tests are tight); bf16/f16 operands stay in their
  dtype so they run on tensor cores / the MXU, as in FlashAttention (P and dS are cast down)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def default_scale(scale, head_dim: int) -> float:
  """The logits scale: ``1 / sqrt(head_dim)`` unless given."""
  return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


# --------------------------------------------------------------------------------------------------
# Tile arithmetic
# --------------------------------------------------------------------------------------------------


def next_power_of_two(n: int) -> int:
  return 1 << (n - 1).bit_length()


def block_for(length: int, largest: int) -> int:
  """The block of a sequence of ``length``: a power of two (Triton loads need power-of-two tiles),
  at least 16, at most ``largest``."""
  return min(largest, max(16, next_power_of_two(length)))


def is_triton_tile(dim: int) -> bool:
  """Whether a tile dimension lowers with Triton: a power of two of at least 16."""
  return dim >= 16 and not dim & (dim - 1)


def round_up(x: int, multiple: int) -> int:
  return (x + multiple - 1) // multiple * multiple


def largest_divisor(count: int, at_most: int) -> int:
  """The largest divisor of ``count`` up to ``at_most`` (1 at least)."""
  return max(n for n in range(1, max(1, min(count, at_most)) + 1) if count % n == 0)


# --------------------------------------------------------------------------------------------------
# Optional inputs
# --------------------------------------------------------------------------------------------------


def present(items) -> list:
  """The items that are not None: the inputs (or their BlockSpecs) a pallas_call is given."""
  return [x for x in items if x is not None]


def with_absent_inputs(kernel, inputs):
  """``kernel``, whose signature names a ref for each of ``inputs`` and then the outputs' refs, as
  a pallas_call of the present inputs calls it: None takes the place of each absent input's ref
  (an optional bias, segment ids), so the kernel tests ``bias_ref is None``."""
  is_present = [x is not None for x in inputs]
  if all(is_present):
    return kernel

  def call(*refs):
    refs = iter(refs)
    input_refs = [next(refs) if here else None for here in is_present]
    return kernel(*input_refs, *refs)
  return call
