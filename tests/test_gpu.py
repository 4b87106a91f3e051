"""The compiled kernels on a GPU at the models' shapes, against the f32 references: f32 close, bf16
by the error-ratio rule (ops.testing), gradients included. Marked ``gpu`` and skipped without one;
``benchmarks/gpu_check.sh`` runs them on a GPU machine."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ops
from ops import testing

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]


def _normal(seed, shape, dtype, scale=1.0):
  return (jax.random.normal(jax.random.key(seed), shape) * scale).astype(dtype)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(fn, args, cotangent):
  out, vjp = jax.vjp(fn, *args)
  return (out, *vjp(cotangent.astype(out.dtype)))


def _check(fn, reference, lowp, args, names):
  """fn on bf16 args against reference on their f32 copies, within the error-ratio rule of lowp
  (the plain bf16 code) on the bf16 args; then fn on the f32 copies, close to the reference."""
  f32 = [x.astype(jnp.float32) for x in args]
  cotangent = _normal(99, jax.eval_shape(reference, *f32).shape, jnp.float32)
  want = _value_and_grads(reference, f32, cotangent)
  got = _value_and_grads(fn, args, cotangent)
  low = _value_and_grads(lowp, args, cotangent)
  for name, a, w, lp in zip(names, got, want, low):
    factor = testing.OUTPUT_FACTOR if name == "out" else testing.GRADIENT_FACTOR
    testing.assert_error_ratio(a, w, lp, factor=factor, name=name)
  for name, a, w in zip(names, _value_and_grads(fn, f32, cotangent), want):
    scale = max(1.0, float(jnp.max(jnp.abs(w))))
    assert float(jnp.max(jnp.abs(a - w))) <= 2e-5 * scale, name


# (name, q/k/v shape [B, L, H, D], bias shape or None, causal, implementation)
ATTENTION = [
    ("maxvit_t s1 windows", (2048, 49, 2, 32), (1, 2, 49, 49), False, None),
    ("maxvit_t s3 windows", (512, 49, 8, 32), (1, 8, 49, 49), False, None),
    ("biformer_t s4", (64, 49, 16, 32), None, False, None),
    ("dense 4K hd128 causal", (1, 4096, 4, 128), None, True, "pallas"),
    ("dense 4K hd64 bias", (1, 4096, 4, 64), (1, 4, 4096, 4096), False, "pallas"),
]


@pytest.mark.parametrize("name, shape, bias_shape, causal, implementation", ATTENTION,
                         ids=[case[0] for case in ATTENTION])
def test_attention(name, shape, bias_shape, causal, implementation):
  q, k, v = (_normal(i, shape, jnp.bfloat16) for i in range(3))
  args = [q, k, v] + ([_normal(3, bias_shape, jnp.bfloat16, 2.0)] if bias_shape else [])

  def split(fn):
    return lambda q, k, v, *bias: fn(q, k, v, *(bias or (None,)))
  kernel = split(lambda q, k, v, bias: ops.attention(q, k, v, bias=bias, causal=causal,
                                                     implementation=implementation))
  reference = split(lambda q, k, v, bias: ops.attention_reference(q, k, v, bias=bias,
                                                                  causal=causal))
  lowp = split(lambda q, k, v, bias: testing.attention_lowp(q, k, v, bias, causal=causal))
  _check(kernel, reference, lowp, args, ["out", "dq", "dk", "dv", "dbias"])


# BiFormer-T at 224: (map side, channels, heads, top-k regions), n_win 7
ROUTING = [(56, 64, 2, 1), (28, 128, 4, 4)]


@pytest.mark.parametrize("side, channels, heads, topk", ROUTING, ids=["s1", "s2"])
def test_routing_attention(side, channels, heads, topk):
  args = [_normal(i, (8, side, side, channels), jnp.bfloat16) for i in range(3)]
  kw = dict(num_heads=heads, n_win=7, topk=topk)
  routes = ops.region_routes(args[0], args[1], n_win=7, topk=topk)   # as the kernel routes
  _check(lambda *a: ops.routing_attention(*a, **kw),
         lambda *a: ops.routing_attention_reference(*a, **kw),
         lambda *a: testing.routing_lowp(*a, routes, num_heads=heads, n_win=7,
                                        scale=channels ** -0.5),
         args, ["out", "dq", "dk", "dv"])


@pytest.mark.parametrize("length", [2048, 8192])
def test_lightning_attention(length):
  # TransNormerLLM-385M's heads: 8 of 128, the first layer's decay rates
  args = [_normal(i, (1, length, 8, 128), jnp.bfloat16, 128 ** -0.5 if i < 2 else 1.0)
          for i in range(3)]
  decay = jnp.asarray(np.linspace(0.01, 0.5, 8), jnp.float32)
  _check(lambda *a: ops.lightning_attention(*a, decay=decay),
         lambda *a: ops.lightning_attention_reference(*a, decay=decay),
         lambda *a: testing.lightning_lowp(*a, decay), args, ["out", "dq", "dk", "dv"])
