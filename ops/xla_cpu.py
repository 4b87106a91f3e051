"""What the zoo does because of XLA:CPU: each function equals the plain jax computation and runs
faster on a CPU; GPU and TPU take the plain one (or never call these). Measured in
benchmarks/RESULTS.md and benchmarks/notes/2026-11-cpu-train-step.md.

- `random_bits`: jax.random.bits for threefry keys, unrolled (dropout masks).
- `on_rows`: a dense layer of an n-d input as a [rows, features] matmul.
- `depthwise_conv2d_shifted`: a depthwise conv as kh * kw shifted products, with its own VJP
  (`ops.depthwise_conv2d`'s CPU implementation).
- `keep_freed_memory_mapped`, `kept_memory_tunables`: glibc's malloc settings that keep XLA:CPU's
  per-call buffers mapped (train.py and eval.py apply them).
"""
from __future__ import annotations

import ctypes
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ops import dispatch

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Equals `jax.random.bits(key, shape, jnp.uint32)`, computed as one fused kernel.

  For threefry keys (the default) this is threefry2x32 over the flat element index, unrolled: XLA:CPU lowers
  jax's own version as a rolled loop that runs 3-9x slower, and dropout masks are a tenth of an iTransformer
  training step on CPU. Other key implementations go through jax.random.bits.
  """
  if str(jax.random.key_impl(key)) != "threefry2x32" or math.prod(shape) >= 2**32:
    return jax.random.bits(key, shape, jnp.uint32)
  k1, k2 = jax.random.key_data(key)
  keys = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x0 = jnp.zeros(shape, jnp.uint32) + keys[0]
  x1 = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) + keys[1]
  for i in range(5):
    for rotation in _THREEFRY_ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = ((x1 << np.uint32(rotation)) | (x1 >> np.uint32(32 - rotation))) ^ x0
    x0 = x0 + keys[(i + 1) % 3]
    x1 = x1 + keys[(i + 2) % 3] + np.uint32(i + 1)
  return x0 ^ x1


def on_rows(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """`fn(x)` for an `fn` that maps the last axis; on CPU applied to x as [rows, features].

  Same result. Why: the kernel gradient of an n-d input contracts every leading axis at once,
  and XLA:CPU lays that dot out by transposing the incoming gradient to [features, rows] inside
  the fusion that produces it (e.g. a BatchNorm backward), a strided write of the whole
  activation map. On a 2-D input the contraction is over one axis and needs no transpose: a 1x1
  conv + BatchNorm + tanh took 540 -> 270 ms fwd+bwd at 8x112x112, 64 -> 256. GPU and TPU keep
  the n-d dot (there a reshape can cost a relayout).
  """
  if x.ndim <= 2 or dispatch.platform() != "cpu":
    return fn(x)
  y = fn(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], y.shape[-1])


def depthwise_conv2d_shifted(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """`ops.depthwise_conv2d` as the sum of the kh * kw shifted (strided) products in one fused
  loop. XLA:CPU runs grouped convs through a generic loop (a 5x5 depthwise conv on a 56x56x64
  map is 15-25x slower than the same multiply-adds written out; benchmarks/ops.py --suite
  depthwise_cpu). Products accumulate in float32. At stride 1 a custom VJP computes dx as the
  same sum over the flipped kernel and dkernel as the products summed per channel; at a larger
  stride autodiff's transpose of the strided slices is already one fused loop."""
  if stride == 1:
    return _shifted_depthwise(x, kernel)
  out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  out = _shift_sum(_pad_same(x, kernel.shape, stride), kernel.astype(jnp.float32), out_h, out_w,
                   stride)
  return out.astype(x.dtype)


def _pad_same(x: jax.Array, kernel_shape: tuple[int, ...], stride: int = 1) -> jax.Array:
  pads = jax.lax.padtype_to_pads(x.shape[1:3], kernel_shape[:2], (stride, stride), "SAME")
  return jnp.pad(x, ((0, 0), *pads, (0, 0)))


def _shift_sum(padded: jax.Array, kernel: jax.Array, height: int, width: int,
               stride: int = 1) -> jax.Array:
  out = jnp.zeros((padded.shape[0], height, width, padded.shape[3]), jnp.float32)
  rows, cols = stride * (height - 1) + 1, stride * (width - 1) + 1
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      shifted = padded[:, i:i + rows:stride, j:j + cols:stride]
      out = out + shifted.astype(jnp.float32) * kernel[i, j]
  return out


@jax.custom_vjp
def _shifted_depthwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  out = _shift_sum(_pad_same(x, kernel.shape), kernel.astype(jnp.float32), *x.shape[1:3])
  return out.astype(x.dtype)


def _shifted_depthwise_fwd(x, kernel):
  return _shifted_depthwise(x, kernel), (x, kernel)


def _shifted_depthwise_bwd(residuals, grad):
  x, kernel = residuals
  (batch, height, width, channels), (kh, kw) = x.shape, kernel.shape[:2]
  flipped = kernel[::-1, ::-1].astype(jnp.float32)
  dx = _shift_sum(_pad_same(grad, kernel.shape), flipped, height, width).astype(x.dtype)
  # dkernel[i, j] sums x shifted by (i, j) times grad over batch and positions. Separate
  # reductions of the kh * kw products stream each product through memory (slower than XLA's
  # grouped conv on large maps); instead one fused loop per shift adds up `fold` batch slices,
  # leaving a kh * kw times smaller array to reduce.
  fold = max(d for d in range(1, min(batch, 8) + 1) if batch % d == 0)
  padded = _pad_same(x, kernel.shape).reshape(fold, batch // fold, height + kh - 1,
                                               width + kw - 1, channels).astype(jnp.float32)
  grad = grad.reshape(fold, batch // fold, height, width, channels).astype(jnp.float32)
  partial_sums = jnp.stack([
      sum(padded[n, :, i:i + height, j:j + width] * grad[n] for n in range(fold))
      for i in range(kh) for j in range(kw)])
  dkernel = partial_sums.reshape(kh * kw, -1, channels).sum(1).reshape(kernel.shape)
  return dx, dkernel.astype(kernel.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


# ----------------------------------------------------------------------------- host memory

# malloc.h's mallopt option, the same setting as a GLIBC_TUNABLES entry, its value. A trim
# threshold of -1 (as size_t: the largest) disables trimming (mallopt(3)).
_KEPT_MEMORY_SETTINGS = ((-8, "glibc.malloc.arena_max", 1), (-4, "glibc.malloc.mmap_max", 0),
                         (-1, "glibc.malloc.trim_threshold", -1))


def keep_freed_memory_mapped() -> bool:
  """Makes glibc's malloc keep freed memory mapped (one arena, no mmap, no trimming).

  XLA:CPU allocates an executable's temporary buffer at every call and frees it after: for
  MaxViT-T's train step at batch 8, 3.8 GB. glibc serves a block that size with a fresh mmap,
  so every step page-faults all of it again: 1M faults and 2 s of kernel time per step on a
  2-core CPU (benchmarks/notes/2026-11-cpu-train-step.md). With these settings the pages stay
  mapped and the step takes none. Run it before jax (or anything else) starts threads that
  allocate: threads that already have an arena of their own keep it. The process then keeps its
  peak memory. Returns whether it applied (False off glibc).
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  return all(libc.mallopt(option, value) == 1 for option, _, value in _KEPT_MEMORY_SETTINGS)


def kept_memory_tunables() -> str:
  """`keep_freed_memory_mapped`'s settings as GLIBC_TUNABLES, for a process started from here."""
  return ":".join(f"{name}={value % 2**64}" for _, name, value in _KEPT_MEMORY_SETTINGS)
