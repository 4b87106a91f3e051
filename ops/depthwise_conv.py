"""Depthwise 2-D convolution (HorNet's 7x7 and GF layer, MaxViT's MBConv, BiFormer's LCE).

`depthwise_conv2d(x, kernel, stride, implementation=None)`: "xla" is lax's grouped convolution
(cuDNN on GPU, the convolution unit on TPU); "shifted" (`ops.xla_cpu.depthwise_conv2d_shifted`)
the same sum written out as shifted products, which XLA:CPU runs 15-25x faster.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ops import dispatch, xla_cpu


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, *,
                     implementation: str | None = None) -> jax.Array:
  """Depthwise conv of NHWC `x` with an odd-sized `[kh, kw, C]` kernel and 'SAME' zero padding:
  `k // 2` on each side at stride 1; TF's and lax's split at a larger stride (e.g. (0, 1) for a
  3x3 kernel, stride 2, on an even side). Equals `lax.conv_general_dilated(...,
  feature_group_count=C)`; products accumulate in float32."""
  kh, kw = kernel.shape[:2]
  if x.ndim != 4 or kernel.ndim != 3 or kernel.shape[2] != x.shape[3] or kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f"depthwise_conv2d: expected x [B, H, W, C] and an odd-sized kernel [kh, kw, C], "
                     f"got x {tuple(x.shape)} and kernel {tuple(kernel.shape)}")
  if not isinstance(stride, int) or stride < 1:
    raise ValueError(f"depthwise_conv2d: expected a positive integer stride, got {stride!r}")
  serves = {"shifted": lambda: None, "xla": lambda: None}
  if dispatch.choose("depthwise_conv", implementation, serves) == "shifted":
    return xla_cpu.depthwise_conv2d_shifted(x, kernel, stride)
  return jax.lax.conv_general_dilated(
      x, kernel[:, :, None], (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[3],
      preferred_element_type=jnp.float32).astype(x.dtype)
