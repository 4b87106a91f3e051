"""ops.routing_attention: routing and reference vs dense attention; Pallas kernel (interpret) vs
reference (f32 and bf16), gradients, padding, determinism and memory layout."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import (attention_reference, region_routes, routing_attention, routing_attention_pallas,
                 routing_attention_reference)
from ops.routing import _check_pallas_supported, _from_regions, _to_regions

HIGHEST = jax.lax.Precision.HIGHEST


def _maps(b, h, w, qk_dim, dim, seed=0, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, h, w, qk_dim), jnp.float32).astype(dtype),
          jax.random.normal(kk, (b, h, w, qk_dim), jnp.float32).astype(dtype),
          jax.random.normal(kv, (b, h, w, dim), jnp.float32).astype(dtype))


def _close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def _region_of_tokens(h, w, n_win):
  """Row-major region id of every row-major token of an h x w map."""
  rows, cols = np.meshgrid(np.arange(h) // (h // n_win), np.arange(w) // (w // n_win),
                           indexing="ij")
  return (rows * n_win + cols).reshape(-1)


# --- routing and reference ------------------------------------------------------------------------


def test_routes_are_the_top_regions_of_the_region_mean_affinity():
  q, k, _ = _maps(2, 12, 8, 24, 24, seed=1)
  routes = np.asarray(region_routes(q, k, n_win=4, topk=3))
  assert routes.shape == (2, 16, 3) and routes.dtype == np.int32
  region = _region_of_tokens(12, 8, 4)
  qn = np.asarray(q, np.float64).reshape(2, -1, 24)
  kn = np.asarray(k, np.float64).reshape(2, -1, 24)
  q_r = np.stack([qn[:, region == p].mean(1) for p in range(16)], 1)
  k_r = np.stack([kn[:, region == p].mean(1) for p in range(16)], 1)
  affinity = q_r @ k_r.transpose(0, 2, 1) / np.sqrt(24)              # full qk width scale
  np.testing.assert_array_equal(routes, np.argsort(-affinity, axis=-1)[..., :3])


@pytest.mark.parametrize("topk", [1, 2, 9])
def test_reference_is_dense_attention_masked_to_the_routed_regions(topk):
  """Cross-check of the gather-based reference: each query token sees exactly the tokens of its
  region's routed regions (qk_dim 32 != dim 48, 2 heads, scale qk_dim ** -0.5)."""
  b, h, w, n_win, heads = 2, 9, 12, 3, 2
  q, k, v = _maps(b, h, w, 32, 48, seed=2)
  routes = region_routes(q, k, n_win=n_win, topk=topk)
  region = _region_of_tokens(h, w, n_win)
  allowed = np.zeros((b, h * w, h * w), bool)
  for bi in range(b):
    routed = np.asarray(routes[bi])[region]                          # [tokens, topk]
    allowed[bi] = (routed[:, :, None] == region[None, None, :]).any(1)
  bias = jnp.where(jnp.asarray(allowed)[:, None], 0.0, -1e30)
  tokens = lambda x: x.reshape(b, h * w, heads, -1)
  dense = attention_reference(tokens(q), tokens(k), tokens(v), bias=bias, scale=32 ** -0.5)
  out = routing_attention_reference(q, k, v, num_heads=heads, n_win=n_win, topk=topk)
  _close(out, dense.reshape(b, h, w, 48), 1e-5)
  _close(routing_attention(q, k, v, num_heads=heads, n_win=n_win, topk=topk), out, 0)  # None: ref


def test_region_layout_round_trip():
  x = jax.random.normal(jax.random.key(3), (2, 6, 9, 8))
  regions = _to_regions(x, 3, 2)
  assert regions.shape == (2, 2, 9, 6, 4)
  np.testing.assert_array_equal(regions[1, 1, 4, 0], x[1, 2, 3, 4:])   # region (1, 1), token (0, 0)
  np.testing.assert_array_equal(_from_regions(regions, 3, 6, 9), x)


# --- Pallas kernel (interpret mode on CPU) --------------------------------------------------------


# (map, n_win, topk, heads, qk_dim, dim, block_k)
CASES = {
    "stage1_8x8_regions_top1": ((16, 16), 2, 1, 2, 32, 32, 64),
    "stage2_4x4_regions_top4": ((16, 16), 4, 4, 2, 32, 32, 64),
    "stage3_2x2_regions_top16_4_steps": ((14, 14), 7, 16, 2, 64, 64, 16),
    "3x2_regions_padded_to_8_top5": ((21, 14), 7, 5, 2, 32, 48, 16),
}


@functools.cache
def _value_and_grads(name, implementation):
  """Jitted (out, dq, dk, dv) for a random cotangent, compiled once per case."""
  (h, w), n_win, topk, heads, qk_dim, dim, block_k = CASES[name]
  if implementation == "pallas":
    f = functools.partial(routing_attention_pallas, block_k=block_k)
  else:
    f = routing_attention_reference
  f = functools.partial(f, num_heads=heads, n_win=n_win, topk=topk)

  def run(q, k, v, do):
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(do))
  return jax.jit(run)


def _inputs(name, seed, dtype=jnp.float32):
  (h, w), _, _, _, qk_dim, dim, _ = CASES[name]
  q, k, v = _maps(1, h, w, qk_dim, dim, seed=seed, dtype=dtype)
  do = jax.random.normal(jax.random.key(seed + 100), v.shape).astype(dtype)
  return q, k, v, do


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_outputs_and_gradients(name):
  args = _inputs(name, seed=len(name))
  out_k, *grads_k = _value_and_grads(name, "pallas")(*args)
  out_r, *grads_r = _value_and_grads(name, "xla")(*args)
  _close(out_k, out_r, 1e-5)
  for a, b in zip(grads_k, grads_r):
    assert a.shape == b.shape
    _close(a, b, 1e-4)


def test_kernel_backward_is_bitwise_deterministic():
  name = "stage3_2x2_regions_top16_4_steps"
  args = _inputs(name, seed=5)
  first, second = _value_and_grads(name, "pallas")(*args), _value_and_grads(name, "pallas")(*args)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kernel_never_materialises_the_gathered_kv_and_scatters_nothing():
  name = "stage3_2x2_regions_top16_4_steps"
  q, k, v, do = _inputs(name, seed=6)
  gathered = "[1,2,49,16,4,32]"                                     # [B, heads, P, topk, w^2, d]
  jaxpr_r = str(jax.make_jaxpr(_value_and_grads(name, "xla"))(q, k, v, do))
  jaxpr_k = str(jax.make_jaxpr(_value_and_grads(name, "pallas"))(q, k, v, do))
  assert gathered in jaxpr_r                                        # the reference does
  assert gathered not in jaxpr_k and "[1,2,49,64,32]" not in jaxpr_k
  assert "scatter-add" in jaxpr_r and "scatter-add" not in jaxpr_k
  assert "routing_attention_bwd_dkdv" in jaxpr_k


def test_all_regions_routed_is_dense_attention():
  q, k, v = _maps(1, 8, 8, 32, 32, seed=7)
  tokens = lambda x: x.reshape(1, 64, 2, 16)
  dense = attention_reference(tokens(q), tokens(k), tokens(v), scale=32 ** -0.5).reshape(v.shape)
  kw = dict(num_heads=2, n_win=4, topk=16)
  _close(routing_attention_reference(q, k, v, **kw), dense, 1e-5)
  _close(routing_attention(q, k, v, implementation="pallas", **kw), dense, 1e-5)


def _lowp_reference(q, k, v, routes, *, num_heads, n_win, scale):
  """The gather reference in the inputs' dtype with f32 accumulation and an f32 softmax."""
  qr, kr, vr = (_to_regions(x, n_win, num_heads) for x in (q, k, v))
  gather = jax.vmap(lambda x, r: x[:, r])
  kg, vg = gather(kr, routes), gather(vr, routes)
  kg = kg.reshape(*kg.shape[:3], -1, kg.shape[-1])
  vg = vg.reshape(*vg.shape[:3], -1, vg.shape[-1])
  s = jnp.einsum("bmpqd,bmpkd->bmpqk", qr, kg, preferred_element_type=jnp.float32) * scale
  p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
  out = jnp.einsum("bmpqk,bmpkd->bmpqd", p, vg, preferred_element_type=jnp.float32)
  return _from_regions(out.astype(q.dtype), n_win, *q.shape[1:3])


def test_kernel_bf16_error_ratio_rule():
  """kernels.md 4.4: max|kernel - ref_f32| <= 2 max|ref_bf16 - ref_f32| + atol0 (outputs) and 3x
  (gradients), atol0 = 2x the bf16 round-off of ref_f32; all on the same (bf16) inputs."""
  name = "stage2_4x4_regions_top4"
  (h, w), n_win, topk, heads, qk_dim, dim, _ = CASES[name]
  q, k, v, do = _inputs(name, seed=8, dtype=jnp.bfloat16)
  routes = region_routes(q, k, n_win=n_win, topk=topk)
  lowp = functools.partial(_lowp_reference, routes=routes, num_heads=heads, n_win=n_win,
                           scale=qk_dim ** -0.5)
  out_l, vjp_l = jax.vjp(lowp, q, k, v)
  result_l = (out_l, *vjp_l(do))
  f32 = lambda x: x.astype(jnp.float32)
  result_r = _value_and_grads(name, "xla")(f32(q), f32(k), f32(v), f32(do))
  result_k = _value_and_grads(name, "pallas")(q, k, v, do)
  for i, (ker, low, ref) in enumerate(zip(result_k, result_l, result_r)):
    assert ker.dtype == jnp.bfloat16
    ker, low, ref = (np.asarray(x, np.float32) for x in (ker, low, ref))
    atol0 = 2 * np.abs(np.asarray(jnp.asarray(ref).astype(jnp.bfloat16), np.float32) - ref).max()
    factor = 2 if i == 0 else 3
    assert np.abs(ker - ref).max() <= factor * np.abs(low - ref).max() + atol0, i


# --- errors ---------------------------------------------------------------------------------------


def test_errors_say_expected_and_given():
  q, k, v = _maps(1, 8, 8, 16, 16)
  kw = dict(num_heads=2, n_win=4, topk=2)
  with pytest.raises(ValueError, match=r"expected q of rank 4 .*got shape \(8, 8, 16\)"):
    routing_attention(q[0], k, v, **kw)
  with pytest.raises(ValueError, match=r"expected k of the shape of q \(1, 8, 8, 16\), got"):
    routing_attention(q, k[..., :8], v, **kw)
  with pytest.raises(ValueError, match=r"divisible by n_win=3, got 8x8; pad the map"):
    routing_attention(q, k, v, num_heads=2, n_win=3, topk=2)
  with pytest.raises(ValueError, match=r"topk an int in \[1, n_win\*\*2 = 16\], got 17"):
    routing_attention(q, k, v, num_heads=2, n_win=4, topk=17)
  with pytest.raises(ValueError, match=r"v channels divisible by num_heads=3, got 16"):
    routing_attention(q[..., :12], k[..., :12], v, num_heads=3, n_win=4, topk=2)
  with pytest.raises(ValueError, match=r"expected implementation in .*got 'cudnn'"):
    routing_attention(q, k, v, implementation="cudnn", **kw)
  with pytest.raises(ValueError, match=r"block_k a power of two, got 48"):
    routing_attention_pallas(q, k, v, block_k=48, **kw)


def test_pallas_refuses_what_it_cannot_lower():
  _check_pallas_supported("gpu", False, 64, 32, 32)
  _check_pallas_supported("cpu", True, 4, 24, 24)
  with pytest.raises(ValueError, match=r"power-of-two qk head_dim >= 16.*got 24"):
    _check_pallas_supported("gpu", False, 64, 24, 32)
  with pytest.raises(ValueError, match=r"regions of >= 16 tokens .*got 4; use implementation="):
    _check_pallas_supported("gpu", False, 4, 32, 32)
