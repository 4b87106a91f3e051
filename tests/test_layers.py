"""Shared layers: the depthwise conv's CPU path equals XLA's grouped conv, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers import DepthwiseConv, depthwise_conv2d


def _xla_depthwise(x, kernel):
  kh, kw, channels = kernel.shape
  return jax.lax.conv_general_dilated(
      x, kernel[:, :, None], (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
      precision=jax.lax.Precision.HIGHEST)


# Batches of 1, 3 and 16 (8 batch slices summed in the kernel gradient's fused loop, twice).
@pytest.mark.parametrize("shape, kernel_size", [((16, 7, 9, 5), (3, 3)), ((3, 8, 8, 4), (5, 5)),
                                                ((1, 4, 6, 3), (7, 3))])
def test_depthwise_conv2d_matches_grouped_conv(shape, kernel_size):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (*kernel_size, shape[-1]))
  cotangent = jax.random.normal(kg, shape)
  out, vjp = jax.vjp(depthwise_conv2d, x, kernel)
  want, want_vjp = jax.vjp(_xla_depthwise, x, kernel)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
  for got, ref in zip(vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-5)


def test_depthwise_conv2d_bfloat16_accumulates_in_float32():
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
  kernel = jax.random.normal(jax.random.key(2), (5, 5, 8))
  out = depthwise_conv2d(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  want = _xla_depthwise(x.astype(jnp.bfloat16).astype(jnp.float32),
                        kernel.astype(jnp.bfloat16).astype(jnp.float32))
  assert out.dtype == jnp.bfloat16
  # One rounding of the float32 sum to bfloat16 (8 bits): within 2^-8 of each output's size.
  np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2 ** -8, atol=1e-2)


def test_depthwise_module_has_the_grouped_conv_layout():
  conv = DepthwiseConv(6, 5, rngs=nnx.Rngs(0))
  reference = nnx.Conv(6, 6, (5, 5), feature_group_count=6, padding="SAME", rngs=nnx.Rngs(0))
  assert conv.kernel.shape == reference.kernel.shape == (5, 5, 1, 6)
  np.testing.assert_array_equal(conv.kernel[...], reference.kernel[...])  # same init draws
  x = jax.random.normal(jax.random.key(3), (2, 10, 10, 6))
  np.testing.assert_allclose(conv(x), reference(x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("x_shape, kernel_shape", [
    ((4, 4, 3), (3, 3, 3)), ((1, 4, 4, 3), (3, 3, 2)), ((1, 4, 4, 3), (2, 2, 3))])
def test_depthwise_conv2d_refuses_bad_shapes(x_shape, kernel_shape):
  with pytest.raises(ValueError, match="odd-sized kernel"):
    depthwise_conv2d(jnp.zeros(x_shape), jnp.zeros(kernel_shape))
