"""ops.attention: jnp reference vs jax.nn / naive einsum; Pallas kernel (interpret) vs reference."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import attention, attention_pallas, attention_reference
from ops import testing as ops_testing
from jax.experimental.pallas import tpu as pltpu
from ops.attention import attention_pallas_with_lse, attention_tpu_flash

attention_module = importlib.import_module("ops.attention")  # `ops.attention` is the function
HIGHEST = jax.lax.Precision.HIGHEST


def _qkv(b, l, h, d, seed=0, lk=None):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  lk = l if lk is None else lk
  return (jax.random.normal(kq, (b, l, h, d), jnp.float32),
          jax.random.normal(kk, (b, lk, h, d), jnp.float32),
          jax.random.normal(kv, (b, lk, h, d), jnp.float32))


def _naive(q, k, v, bias, scale, mask=None):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) * scale + bias
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v, precision=HIGHEST)


def _close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


# --- reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_jax_nn(causal):
  q, k, v = _qkv(2, 40, 3, 16)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  _close(attention_reference(q, k, v, causal=causal), want, 1e-5)
  _close(attention(q, k, v, causal=causal), want, 1e-5)            # None -> reference on CPU
  _close(attention(q, k, v, causal=causal, implementation="xla"), want, 1e-5)


def test_reference_bias_is_added_after_the_scale():
  q, k, v = _qkv(2, 24, 2, 8, lk=30)
  bias = jax.random.normal(jax.random.key(1), (2, 1, 24, 30)) * 3
  _close(attention_reference(q, k, v, bias=bias, scale=0.3), _naive(q, k, v, bias, 0.3), 1e-5)
  bias_h = jax.random.normal(jax.random.key(2), (2, 24, 30))       # [H, Lq, Lk], shared over B
  _close(attention_reference(q, k, v, bias=bias_h), _naive(q, k, v, bias_h[None], 8 ** -0.5),
         1e-5)


def test_reference_segment_ids():
  q, k, v = _qkv(2, 16, 2, 8)
  seg = jnp.array([[0] * 6 + [1] * 10, [2] * 16])
  mask = seg[:, None, :, None] == seg[:, None, None, :]
  _close(attention_reference(q, k, v, segment_ids=seg), _naive(q, k, v, 0.0, 8 ** -0.5, mask),
         1e-5)


def test_reference_fully_masked_rows_are_zero_and_grads_finite():
  q, k, v = _qkv(2, 16, 2, 8)
  q_seg = jnp.array([[0] * 8 + [9] * 8, [1] * 16])                 # id 9 has no keys
  kv_seg = jnp.array([[0] * 16, [1] * 16])
  f = lambda q_, k_, v_: attention_reference(q_, k_, v_, segment_ids=(q_seg, kv_seg), causal=True)
  out = f(q, k, v)
  np.testing.assert_array_equal(np.asarray(out[0, 8:]), 0.0)
  mask = (q_seg[:, None, :, None] == kv_seg[:, None, None, :]) & jnp.tril(jnp.ones((16, 16), bool))
  _close(out[:, :8], _naive(q, k, v, 0.0, 8 ** -0.5, mask)[:, :8], 1e-5)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


# --- Pallas kernel (interpret mode on CPU) --------------------------------------------------------


def _loss(fn, do):
  return lambda q, k, v, bias: jnp.sum(fn(q, k, v, bias) * do)


def _compare(q, k, v, bias=None, kernel=attention_pallas, **kw):
  do = jax.random.normal(jax.random.key(7), q.shape[:3] + v.shape[3:])
  ref = lambda q_, k_, v_, b_: attention_reference(q_, k_, v_, bias=b_, **kw)
  ker = lambda q_, k_, v_, b_: kernel(q_, k_, v_, bias=b_, **kw)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  out_r, g_r = jax.jit(jax.value_and_grad(_loss(ref, do), argnums))(q, k, v, bias)
  out_k, g_k = jax.jit(jax.value_and_grad(_loss(ker, do), argnums))(q, k, v, bias)
  _close(jax.jit(ker)(q, k, v, bias), jax.jit(ref)(q, k, v, bias), 1e-5)
  for a, b in zip(g_k, g_r):
    assert a.shape == b.shape
    _close(a, b, 1e-4)


# Every length of the kernel sweep, causal on and off, each head dim at four lengths.
SWEEP = [(49, 32, False), (49, 128, True), (64, 64, False), (64, 32, True), (144, 128, False),
         (144, 64, True), (197, 32, False), (197, 128, True), (256, 64, False), (256, 32, True),
         (1000, 128, False), (1000, 64, True)]


@pytest.mark.parametrize("l,d,causal", SWEEP)
def test_kernel_matches_reference(l, d, causal):
  q, k, v = _qkv(1, l, 2 if l < 1000 else 1, d, seed=l + d)
  _compare(q, k, v, causal=causal)


@pytest.mark.parametrize("shape", [(2, 49, 49), (2, 2, 49, 49), (1, 2, 49, 49)],
                         ids=["bias_HLL", "bias_per_batch", "bias_shared_over_batch"])
def test_kernel_bias_and_dbias(shape):
  q, k, v = _qkv(2, 49, 2, 32, seed=3)
  bias = jax.random.normal(jax.random.key(4), shape) * 2
  _compare(q, k, v, bias, scale=0.2)


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_segment_ids_with_fully_masked_row(causal):
  q, k, v = _qkv(2, 197, 2, 32, seed=5)
  q_seg = jnp.concatenate([jnp.zeros((2, 100), jnp.int32), jnp.ones((2, 97), jnp.int32)], 1)
  q_seg = q_seg.at[0, 7].set(5)                                     # row (0, 7) sees no key
  kv_seg = jnp.concatenate([jnp.zeros((2, 120), jnp.int32), jnp.ones((2, 77), jnp.int32)], 1)
  out = attention(q, k, v, segment_ids=(q_seg, kv_seg), causal=causal, implementation="pallas")
  np.testing.assert_array_equal(np.asarray(out[0, 7]), 0.0)
  _compare(q, k, v, segment_ids=(q_seg, kv_seg), causal=causal)
  bias = jax.random.normal(jax.random.key(6), (1, 2, 197, 197))
  _compare(q, k, v, bias, segment_ids=q_seg, causal=causal)


# jax's TPU flash attention, interpreted: the zoo's semantics on its [B, H, L, D] kernels.
@pytest.mark.parametrize("case", [
    dict(causal=True, d=128),
    dict(bias=(1, 2, 256, 256), scale=0.2, batch=2),  # shared over the batch: broadcast
    dict(bias=(2, 2, 256, 256), causal=True, batch=2),
    dict(segments=True, causal=True),               # with a query row that sees no key
], ids=["causal_hd128", "bias_shared", "bias_per_batch_causal", "segments_causal"])
def test_tpu_flash_matches_reference(case):
  q, k, v = _qkv(case.get("batch", 1), 256, 2, case.get("d", 64), seed=21)
  bias = jax.random.normal(jax.random.key(22), case["bias"]) if "bias" in case else None
  kw = {key: case[key] for key in ("causal", "scale") if key in case}
  if case.get("segments"):
    segments = jnp.concatenate([jnp.zeros((1, 128), jnp.int32), jnp.ones((1, 128), jnp.int32)], 1)
    kw["segment_ids"] = (segments.at[0, 7].set(5), segments)
  with pltpu.force_tpu_interpret_mode():
    if case.get("segments"):
      out = attention_tpu_flash(q, k, v, **kw)
      np.testing.assert_array_equal(np.asarray(out[0, 7]), 0.0)
    _compare(q, k, v, bias, kernel=attention_tpu_flash, **kw)


def test_tpu_flash_refuses_lengths_off_its_blocks():
  q, k, v = _qkv(1, 200, 2, 32)
  with pytest.raises(ValueError, match="multiples of 128, got q_len 200, kv_len 200"):
    attention_tpu_flash(q, k, v)


def test_kernel_cross_attention_and_length_broadcast_bias():
  q, k, v = _qkv(2, 30, 2, 32, seed=11, lk=49)
  key_bias = jnp.where(jnp.arange(49) < 40, 0.0, -1e9)[None, None, None, :]  # [1, 1, 1, Lk]
  _compare(q, k, v, key_bias)
  _compare(q, k, v, jax.random.normal(jax.random.key(12), (2, 1, 30, 1)), causal=True)


def test_kernel_backward_is_deterministic():
  q, k, v = _qkv(1, 49, 2, 32, seed=13)
  bias = jax.random.normal(jax.random.key(14), (2, 49, 49))
  g = jax.jit(jax.grad(lambda *a: jnp.sum(attention_pallas(*a[:3], bias=a[3]) ** 2), (0, 1, 2, 3)))
  for a, b in zip(g(q, k, v, bias), g(q, k, v, bias)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shared_bias_gradient_is_reduced_in_kernel():
  q, k, v = _qkv(4, 49, 2, 32, seed=15)
  bias = jnp.zeros((2, 49, 49))
  f = lambda b_: jnp.sum(attention_pallas(q, k, v, bias=b_))
  jaxpr = str(jax.make_jaxpr(jax.grad(f))(bias))
  assert "attention_bwd_dbias" in jaxpr and "f32[4,2,64,64]" not in jaxpr  # one group of 4


@pytest.mark.parametrize("l,causal,kernel", [(49, False, attention_pallas),
                                             (197, True, attention_pallas),
                                             (256, True, attention_tpu_flash)])
def test_kernel_bf16_error_ratio_rule(l, causal, kernel):
  """specs/kernels.md §4.4: max|kernel - ref_f32| <= 2x (outputs) / 3x (grads) the error of the
  plain bf16 implementation, + 2x the bf16 round-off of ref_f32."""
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(2, l, 2, 32, seed=16 + l))
  bias = (jax.random.normal(jax.random.key(17), (2, l, l)) * 2).astype(jnp.bfloat16)
  do = jax.random.normal(jax.random.key(18), q.shape).astype(jnp.bfloat16)
  def run(fn, args):
    out, vjp = jax.vjp(fn, *args)
    return (out, *vjp(do.astype(out.dtype)))
  f32 = lambda x: x.astype(jnp.float32)
  ref_f32 = run(lambda *a: attention_reference(*a[:3], bias=a[3], causal=causal),
                [f32(x) for x in (q, k, v, bias)])
  ref_lowp = run(lambda *a: ops_testing.attention_lowp(*a, causal=causal), (q, k, v, bias))
  with pltpu.force_tpu_interpret_mode():
    got = run(lambda *a: kernel(*a[:3], bias=a[3], causal=causal), (q, k, v, bias))
  for name, a, r, lp in zip(("out", "dq", "dk", "dv", "dbias"), got, ref_f32, ref_lowp):
    assert a.dtype == jnp.bfloat16, name
    factor = ops_testing.OUTPUT_FACTOR if name == "out" else ops_testing.GRADIENT_FACTOR
    ops_testing.assert_error_ratio(a, r, lp, factor=factor, name=name)


def test_kernel_lse():
  q, k, v = _qkv(1, 49, 2, 32, seed=8)
  bias = jax.random.normal(jax.random.key(9), (2, 49, 49))
  _, lse = attention_pallas_with_lse(q, k, v, bias=bias, causal=True)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) / np.sqrt(32) + bias
  s = jnp.where(jnp.tril(jnp.ones((49, 49), bool)), s, -jnp.inf)
  _close(lse, jax.nn.logsumexp(s, -1), 1e-5)


def test_kernel_block_sizes_do_not_change_the_result():
  q, k, v = _qkv(1, 100, 2, 32, seed=10)
  a = attention_pallas(q, k, v, causal=True, block_q=16, block_k=32)
  b = attention_pallas(q, k, v, causal=True, block_q=64, block_k=16)
  _close(a, attention_reference(q, k, v, causal=True), 1e-5)
  _close(b, attention_reference(q, k, v, causal=True), 1e-5)


@pytest.mark.parametrize("bias_heads", [1, 2], ids=["shared_bias", "bias_per_head"])
def test_backward_tiles_apart_from_the_forward_give_the_same_gradients(bias_heads):
  # Each pass its own tiles (the backward pads to whole blocks of both of its passes' tiles): the
  # values and gradients of the default tiles, through the dQ kernel's dbias or the shared one's.
  q, k, v = _qkv(2, 40, 2, 32, seed=11)
  bias = jax.random.normal(jax.random.key(12), (1, bias_heads, 40, 40))
  segment_ids = (jnp.arange(40)[None] >= jnp.array([[13], [27]])).astype(jnp.int32)
  tiles = attention_module.BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=64,
                                      block_q_dq=32, block_k_dq=16)

  def value_and_grads(**block_sizes):
    loss = lambda *a: jnp.sum(attention_pallas(*a[:3], bias=a[3], segment_ids=segment_ids,
                                               causal=True, **block_sizes) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

  (want, want_grads), (got, got_grads) = value_and_grads(), value_and_grads(block_sizes=tiles)
  _close(got, want, 1e-5)
  for name, g, w in zip(("dq", "dk", "dv", "dbias"), got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match=r"expected block_sizes or block_q/block_k, got both"):
    attention_pallas(q, k, v, block_sizes=tiles, block_q=16)


# --- errors ---------------------------------------------------------------------------------------


def test_errors_say_expected_and_given():
  q, k, v = _qkv(1, 8, 2, 8)
  with pytest.raises(ValueError, match=r"expected q of rank 4.*got rank 3"):
    attention(q[0], k, v)
  with pytest.raises(ValueError, match=r"expected k head dim 8.*got 4"):
    attention(q, k[..., :4], v)
  with pytest.raises(ValueError, match=r"expected 2 heads"):
    attention(q, k[:, :, :1], v)
  with pytest.raises(ValueError, match=r"expected bias broadcastable to .*\(1, 2, 8, 8\).*got shape \(3, 8, 8\)"):
    attention(q, k, v, bias=jnp.zeros((3, 8, 8)))
  with pytest.raises(ValueError, match=r"expected q segment_ids of shape .*\(1, 8\).*got \(1, 7\)"):
    attention(q, k, v, segment_ids=jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match=r"single segment_ids array needs q_len == kv_len"):
    attention(q, k[:, :4], v[:, :4], segment_ids=jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(ValueError, match=r"expected implementation in .*got 'triton'"):
    attention(q, k, v, implementation="triton")
  with pytest.raises(ValueError, match=r"implementation='cudnn' cannot serve.*NVIDIA GPU"):
    attention(q, k, v, implementation="cudnn")


def test_pallas_refuses_what_it_cannot_lower():
  attention_module._check_pallas_supported("gpu", 64, 64)
  attention_module._check_pallas_supported("interpret", 48, 48)
  with pytest.raises(ValueError, match=r"power-of-two head_dim >= 16.*got 48"):
    attention_module._check_pallas_supported("gpu", 48, 48)
