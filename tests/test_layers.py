"""Shared layers: the CPU paths of Linear and the depthwise conv equal the plain XLA ops, values and
gradients; the one linear factory, the shared input checks and ALiBi's slopes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers import (LINEAR_INITS, DepthwiseConv, Linear, alibi_slopes, check_images,
                           check_tokens, linear, prefix_dense)
from ops import depthwise_conv2d


def _xla_depthwise(x, kernel, stride=1):
  return jax.lax.conv_general_dilated(
      x, kernel[:, :, None], (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=kernel.shape[-1],
      precision=jax.lax.Precision.HIGHEST)


# Batches of 1, 3 and 16 (8 batch slices summed in the kernel gradient's fused loop, twice).
# Stride 2 on even and odd sides (TF's 'SAME' pads (0, 1) and (1, 1) for a 3x3 kernel there).
@pytest.mark.parametrize("shape, kernel_size, stride", [
    ((16, 7, 9, 5), (3, 3), 1), ((3, 8, 8, 4), (5, 5), 1), ((1, 4, 6, 3), (7, 3), 1),
    ((3, 8, 8, 4), (3, 3), 2), ((2, 7, 10, 3), (3, 3), 2), ((2, 9, 8, 3), (5, 3), 2),
    ((1, 9, 7, 2), (3, 5), 3)])
def test_depthwise_conv2d_matches_grouped_conv(shape, kernel_size, stride):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (*kernel_size, shape[-1]))
  out, vjp = jax.vjp(lambda x, k: depthwise_conv2d(x, k, stride), x, kernel)
  want, want_vjp = jax.vjp(lambda x, k: _xla_depthwise(x, k, stride), x, kernel)
  assert out.shape == want.shape == (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), shape[3])
  cotangent = jax.random.normal(kg, out.shape)
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


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_module_has_the_grouped_conv_layout(stride):
  conv = DepthwiseConv(6, 5, stride=stride, rngs=nnx.Rngs(0))
  reference = nnx.Conv(6, 6, (5, 5), strides=stride, feature_group_count=6, padding="SAME",
                       rngs=nnx.Rngs(0))
  assert conv.kernel.shape == reference.kernel.shape == (5, 5, 1, 6)
  np.testing.assert_array_equal(conv.kernel[...], reference.kernel[...])  # same init draws
  x = jax.random.normal(jax.random.key(3), (2, 10, 10, 6))
  np.testing.assert_allclose(conv(x), reference(x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("x_shape, kernel_shape", [
    ((4, 4, 3), (3, 3, 3)), ((1, 4, 4, 3), (3, 3, 2)), ((1, 4, 4, 3), (2, 2, 3))])
def test_depthwise_conv2d_refuses_bad_shapes(x_shape, kernel_shape):
  with pytest.raises(ValueError, match="odd-sized kernel"):
    depthwise_conv2d(jnp.zeros(x_shape), jnp.zeros(kernel_shape))


@pytest.mark.parametrize("stride", [0, -1, 1.5])
def test_depthwise_conv2d_refuses_bad_strides(stride):
  with pytest.raises(ValueError, match="positive integer stride"):
    depthwise_conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3)), stride)


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 3), (4, 7, 3)])
def test_linear_on_rows_equals_nnx_linear(shape):
  layer = Linear(3, 6, rngs=nnx.Rngs(0))
  reference = nnx.Linear(3, 6, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), shape)

  def loss(module, x):
    return jnp.sum(jnp.tanh(module(x)) ** 2)

  out, ref = layer(x), reference(x)
  assert out.shape == ref.shape == (*shape[:-1], 6)
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)
  grads, ref_grads = (nnx.grad(loss, argnums=(0, 1))(m, x) for m in (layer, reference))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # prefix_dense takes the same path: the first 4 outputs of the layer.
  np.testing.assert_allclose(prefix_dense(layer, x, outputs=4), ref[..., :4], atol=1e-6, rtol=1e-6)


def test_linear_kernel_gradient_contracts_one_axis_on_cpu():
  """What Linear is for: on a 4-D map every dot, the kernel gradient's included, is a 2-D matmul
  (an n-d one makes XLA:CPU transpose the whole incoming gradient; models/layers.py)."""
  layer = Linear(3, 6, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 5, 5, 3))
  jaxpr = jax.make_jaxpr(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(layer, x)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) >= 2  # forward and kernel gradient
  assert all(v.aval.ndim == 2 for e in dots for v in e.invars)


@pytest.mark.parametrize("init", sorted(LINEAR_INITS))
def test_linear_factory_draws_each_official_init(init):
  layer = linear(256, 512, init=init, rngs=nnx.Rngs(0))
  kernel, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
  expected_std = {"torch": 1 / 16 / np.sqrt(3), "normal": 0.02, "trunc_normal": 0.02 * 0.88,
                  "scenic_attention": 1 / 16, "scenic_mlp": np.sqrt(2 / 768)}[init]
  np.testing.assert_allclose(kernel.std(), expected_std, rtol=0.03)
  assert np.abs(bias).max() <= {"torch": 1 / 16, "scenic_mlp": 1e-5}.get(init, 0.0)
  assert linear(4, 8, init=init, use_bias=False, rngs=nnx.Rngs(0)).bias is None
  with pytest.raises(ValueError, match=r"init must be one of \['normal', 'scenic_attention'"):
    linear(4, 8, init="xavier", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape, dtype, kwargs, message", [
    ((8, 8, 3), jnp.float32, {},
     r"Toy expects images \[batch, height, width, 3\] \(NHWC\), got shape \(8, 8, 3\)"),
    ((1, 8, 8, 1), jnp.float32, {}, r"got shape \(1, 8, 8, 1\)"),
    ((1, 8, 8, 3), jnp.int32, {}, "Toy expects floating-point images, got dtype int32"),
    ((1, 8, 12, 3), jnp.float32, dict(multiple=8, why="the stride"),
     r"Toy expects height and width that are multiples of 8 \(the stride\), got 8x12"),
    ((1, 8, 12, 3), jnp.float32, dict(size=8), r"Toy expects images \[batch, 8, 8, 3\] \(NHWC\)"),
    ((1, 16, 8, 3), jnp.float32, dict(multiple=8), None),
])
def test_check_images_names_the_model_what_it_expects_and_what_it_got(shape, dtype, kwargs,
                                                                      message):
  x = jax.ShapeDtypeStruct(shape, dtype)
  if message is None:
    check_images("Toy", x, 3, **kwargs)
    return
  with pytest.raises(ValueError, match=message):
    check_images("Toy", x, 3, **kwargs)


def test_check_tokens():
  check_tokens(jnp.zeros((2, 5), jnp.int32))
  for tokens in (jnp.zeros((5,), jnp.int32), jnp.zeros((2, 5))):
    with pytest.raises(ValueError, match=r"tokens must be an integer array \[batch, length\]"):
      check_tokens(tokens)


def test_alibi_slopes_interleave_only_for_a_head_count_that_is_not_a_power_of_two():
  np.testing.assert_array_equal(alibi_slopes(8), alibi_slopes(8, interleave=False))
  np.testing.assert_allclose(alibi_slopes(8), 0.5 ** np.arange(1, 9))
  # 6 heads: the ladder of 4, then every other slope of the ladder of 8 (ALiBi's reference code)
  np.testing.assert_allclose(alibi_slopes(6), [*alibi_slopes(4), *alibi_slopes(8)[0:4:2]])
  np.testing.assert_allclose(alibi_slopes(6, interleave=False), 2.0 ** (-np.arange(1, 7) * 8 / 6))
