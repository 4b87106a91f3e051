"""ops.linear_attention: Lightning attention (Pallas kernels in interpret mode, chunked jnp path,
quadratic reference, recurrence), its backward, prefill/decode, TransNormer Norm/Diag attention;
the kernels' GPU and TPU lowerings, exported on this CPU."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from ops import dispatch
from ops import linear_attention as linear_attention_module
from ops import (diag_attention, lightning_attention, lightning_attention_reference,
                 lightning_decode_step, lightning_prefill, norm_attention, simple_rms_norm)
from ops.testing import GRADIENT_FACTOR, assert_error_ratio, lightning_lowp, triton_modules

HIGHEST = jax.lax.Precision.HIGHEST
IMPLS = ("xla", "pallas")
# jitted once per shape: eager dispatch of the scan and einsums costs more than the compiles
_lightning = jax.jit(lightning_attention, static_argnames="implementation")
_reference = jax.jit(lightning_attention_reference)


def _qkv(b, length, h, d, e=None, seed=0, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  e = d if e is None else e
  # silu-like positive-ish features of moderate size, as the models feed in
  q = jax.random.normal(kq, (b, length, h, d)) * d ** -0.5
  k = jax.random.normal(kk, (b, length, h, d)) * d ** -0.5
  v = jax.random.normal(kv, (b, length, h, e))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _max_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _close(a, b, rel):
  """max |a - b| <= rel * max(1, max |b|)."""
  scale = max(1.0, float(np.abs(np.asarray(b, np.float64)).max()))
  assert _max_err(a, b) <= rel * scale, (_max_err(a, b), scale)


def _recurrence(q, k, v, decay):
  """Token-by-token S = lambda S + k v^T, o = q S, in float64 NumPy (independent of the ops)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, length, h, d = q.shape
  lam = np.ones(h) if decay is None else np.exp(-np.asarray(decay, np.float64))
  state = np.zeros((b, h, d, v.shape[-1]))
  out = np.zeros((b, length, h, v.shape[-1]))
  for t in range(length):
    state = lam[None, :, None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
    out[:, t] = np.einsum("bhd,bhde->bhe", q[:, t], state)
  return out, state


DECAY3 = np.array([0.0, 0.05, 0.7], np.float32)


# --- forward: every path against the float64 recurrence -------------------------------------------


@pytest.mark.parametrize("length,decay", [(1, DECAY3), (64, None), (150, DECAY3), (150, None)])
def test_paths_match_the_recurrence(length, decay):
  """150: three blocks of 64 tokens (both paths), the last one ragged."""
  q, k, v = _qkv(2, length, 3, 16, 24, seed=length)
  want, _ = _recurrence(q, k, v, decay)
  _close(_reference(q, k, v, decay=decay), want, 1e-5)
  for impl in IMPLS:
    _close(_lightning(q, k, v, decay=decay, implementation=impl), want, 1e-5)
  _close(_lightning(q, k, v, decay=decay), want, 1e-5)               # None -> chunked jnp


@pytest.mark.parametrize("d,e", [(32, 32), (64, 96), (128, 128), (192, 64), (256, 256)])
def test_kernel_head_dims(d, e):
  q, k, v = _qkv(1, 70, 2, d, e, seed=d + e)
  decay = np.array([0.02, 0.3], np.float32)
  want = _reference(q, k, v, decay=decay)
  _close(_lightning(q, k, v, decay=decay, implementation="pallas"), want, 1e-5)


def test_zero_decay_is_plain_causal_linear_attention():
  q, k, v = _qkv(2, 90, 2, 16, seed=3)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) * jnp.tril(jnp.ones((90, 90)))
  plain = jnp.einsum("bhqk,bkhe->bqhe", scores, v, precision=HIGHEST)
  for impl in IMPLS:
    _close(_lightning(q, k, v, decay=jnp.zeros(2), implementation=impl), plain, 1e-5)
  _close(_lightning(q, k, v, decay=0.0), plain, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_decay_underflows_to_the_diagonal_term(impl):
  """lambda = exp(-1e4) is 0: only the s = t term (weight 1) survives, and nothing is inf/nan."""
  q, k, v = _qkv(1, 100, 2, 16, seed=4)
  diagonal = jnp.einsum("blhd,blhd->blh", q, k)[..., None] * v
  f = lambda q_, k_, v_: lightning_attention(q_, k_, v_, decay=jnp.array([1e4, 80.0]),
                                              implementation=impl)
  value_and_grads = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * v), (0, 1, 2)))
  _close(jax.jit(f)(q, k, v), diagonal, 1e-5)
  loss, grads = value_and_grads(q, k, v)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


# --- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("decay", [None, DECAY3], ids=["no_decay", "decay"])
def test_gradients_match_autodiff_of_the_quadratic_reference(impl, decay):
  q, k, v = _qkv(2, 150, 3, 16, 24, seed=5)
  do = jax.random.normal(jax.random.key(6), v.shape)               # random cotangent, not ones
  loss = lambda fn: (lambda *a: jnp.sum(fn(*a) * do))
  ref = jax.grad(loss(lambda *a: lightning_attention_reference(*a, decay=decay)), (0, 1, 2))
  ours = jax.jit(jax.grad(loss(lambda *a: lightning_attention(*a, decay=decay,
                                                               implementation=impl)), (0, 1, 2)))
  for got, want in zip(ours(q, k, v), ref(q, k, v)):
    _close(got, want, 1e-4)


def test_backward_is_deterministic():
  q, k, v = _qkv(1, 80, 2, 16, seed=7)
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(lightning_attention(*a, decay=DECAY3[:2],
                                                                  implementation="pallas") ** 2),
                          (0, 1, 2)))
  for a, b in zip(grad(q, k, v), grad(q, k, v)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _scratch_bytes(fn, *shapes):
  analysis = jax.jit(fn).lower(*shapes).compile().memory_analysis()
  assert analysis is not None, "XLA:CPU reports the compiled memory"
  return analysis.temp_size_in_bytes


def test_xla_path_copies_nothing_of_the_sequence_length():
  """The chunked path slices its blocks out of [B, L, H, *] and writes the output rows in place:
  the forward's scratch memory is the same at 2K and 16K tokens, and the backward's grows by less
  than one [B, L, H, E] buffer (XLA zero-fills one and copies it into the three gradients). A
  blocked or transposed copy of the inputs (8 MiB each at 16K here) made the time per token grow
  with L once the sequence no longer fitted in the cache."""
  forward = lambda q, k, v: lightning_attention(q, k, v, decay=DECAY3[:2], implementation="xla")
  backward = lambda q, k, v, do: jax.vjp(forward, q, k, v)[1](do)
  short, long = (jax.ShapeDtypeStruct((1, n, 2, 64), jnp.float32) for n in (2048, 16384))
  assert _scratch_bytes(forward, *[long] * 3) == _scratch_bytes(forward, *[short] * 3)
  growth = _scratch_bytes(backward, *[long] * 4) - _scratch_bytes(backward, *[short] * 4)
  assert growth < 16384 * 2 * 64 * 4, growth


# --- bf16: error-ratio rule (FlashAttention tests) ------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_error_ratio(impl):
  q, k, v = _qkv(2, 130, 2, 32, seed=8, dtype=jnp.bfloat16)
  decay = np.array([0.01, 0.2], np.float32)
  do = jax.random.normal(jax.random.key(9), v.shape).astype(jnp.bfloat16)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grads(fn, args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(do.astype(out.dtype))

  ref, ref_g = value_and_grads(lambda *a: lightning_attention_reference(*a, decay=decay), f32)
  low, low_g = value_and_grads(lambda *a: lightning_lowp(*a, decay), (q, k, v))
  out, out_g = value_and_grads(lambda *a: lightning_attention(*a, decay=decay,
                                                              implementation=impl), (q, k, v))
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in out_g)
  assert_error_ratio(out, ref, low)
  for name, got, lowp, want in zip("qkv", out_g, low_g, ref_g):
    assert_error_ratio(got, want, lowp, factor=GRADIENT_FACTOR, name=f"d{name}")


# --- the compiled kernels: TPU layout, GPU and TPU lowerings ---------------------------------------


def test_tpu_kernels_in_the_tpu_interpreter():
  """The TPU variant ([B, H, L, D] blocks, the state pass on a sequential grid axis with VMEM
  scratch) in Pallas's TPU interpreter, small tiles so that every axis has several blocks: 3
  chunks (the last ragged), 2 x 1 state blocks, 2 output column blocks."""
  impl = linear_attention_module._Chunked("tpu", linear_attention_module.BlockSizes(16, 16, 16),
                                          tpu_interpret=True)
  q, k, v = _qkv(2, 40, 3, 16, 32, seed=13)
  do = jax.random.normal(jax.random.key(14), v.shape)
  decay = jnp.asarray(DECAY3)
  out, vjp = jax.vjp(lambda *a: linear_attention_module._lightning(*a, decay, impl), q, k, v)
  want, want_vjp = jax.vjp(lambda *a: lightning_attention_reference(*a, decay=decay), q, k, v)
  _close(out, want, 1e-5)
  for got, expected in zip(vjp(do), want_vjp(do)):
    _close(got, expected, 1e-4)


def _lightning_grad(q, k, v):
  decay = jnp.linspace(0.01, 0.5, q.shape[2])
  loss = lambda *a: jnp.sum(lightning_attention(*a, decay=decay).astype(jnp.float32))
  return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)


def test_gpu_kernels_are_chunk_parallel_on_tensor_cores():
  """What ops.lightning_attention lowers to on a GPU by default (bf16, TNL's head dim 128): the
  Triton kernels of the forward (one state pass, one chunk pass) and the backward (two state
  passes, three chunk passes), every dot on bf16 operands with f32 accumulation (tensor-core
  MMA), and one chunk-pass program per (batch, head, 64-token chunk, 64 output columns)."""
  b, length, h, d = 2, 256, 2, 128
  q = jnp.zeros((b, length, h, d), jnp.bfloat16)
  modules = triton_modules(_lightning_grad, q, q, q)
  names = [name for name, _ in modules]
  assert sorted(names) == ["lightning_chunks"] * 4 + ["lightning_states"] * 3, names
  for name, ir in modules:
    dots = re.findall(r"tt\.dot .*: (tensor<\S+>) \* (tensor<\S+>) -> (tensor<\S+>)", ir)
    assert dots and all(a.endswith("xbf16>") and b_.endswith("xbf16>") and out.endswith("xf32>")
                        for a, b_, out in dots), (name, dots)
  exported = export.export(jax.jit(_lightning_grad), platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
  dispatch_platform = dispatch.platform
  try:
    dispatch.platform = lambda: "gpu"
    text = exported(q, q, q).mlir_module()
  finally:
    dispatch.platform = dispatch_platform
  grids = [math.prod(int(n) for n in re.findall(r"grid_[xyz] = (\d+)", call))
           for call in re.findall(r"xla\.gpu\.triton.*lightning_chunks.*", text)]
  assert grids and set(grids) == {b * h * (length // 64) * (d // 64)}, grids


def test_tpu_kernels_lower_with_mosaic(monkeypatch):
  """The dispatched op on a TPU: Mosaic kernels for the forward and backward (the TPU (8, 128)
  block rules and SMEM rates are checked by the lowering)."""
  monkeypatch.setattr(dispatch, "platform", lambda: "tpu")
  q = jnp.zeros((2, 512, 2, 128), jnp.bfloat16)
  text = export.export(jax.jit(_lightning_grad), platforms=["tpu"])(q, q, q).mlir_module()
  assert text.count("tpu_custom_call") == 7   # forward 2, backward 2 state + 3 chunk passes


# --- state: prefill and decode --------------------------------------------------------------------


@pytest.mark.parametrize("decay", [None, DECAY3], ids=["no_decay", "decay"])
def test_prefill_then_decode_equals_the_full_forward(decay):
  q, k, v = _qkv(2, 150, 3, 16, 24, seed=10)
  full = lightning_attention(q, k, v, decay=decay)
  _, want_state = _recurrence(q, k, v, decay)
  state = jnp.zeros((2, 3, 16, 24))
  outs = []
  prefill = jax.jit(lightning_prefill)
  for start, stop in ((0, 70), (70, 139)):                         # two chunks, then tokens
    out, state = prefill(q[:, start:stop], k[:, start:stop], v[:, start:stop], state,
                                   decay=decay)
    outs.append(out)
  step = jax.jit(lightning_decode_step)
  for t in range(139, 150):
    out, state = step(q[:, t], k[:, t], v[:, t], state, decay)
    outs.append(out[:, None])
  assert state.dtype == jnp.float32
  _close(jnp.concatenate(outs, axis=1), full, 1e-5)
  _close(state, want_state, 1e-5)


def test_prefill_gradient_flows_through_the_state():
  q, k, v = _qkv(1, 20, 2, 8, seed=11)
  state = jax.random.normal(jax.random.key(12), (1, 2, 8, 8))
  decay = np.array([0.1, 0.5], np.float32)

  def full(q_, k_, v_, s_):
    out, new_state = lightning_prefill(q_, k_, v_, s_, decay=decay)
    return jnp.sum(out ** 2) + jnp.sum(new_state ** 2)

  def reference(q_, k_, v_, s_):                                   # the docstring's formulas
    lam = np.exp(-decay)
    steps = jnp.arange(20.0)
    out = lightning_attention_reference(q_, k_, v_, decay=decay)
    out = out + jnp.einsum("blhd,bhde->blhe", q_ * lam[None, None, :, None]
                           ** (steps[None, :, None, None] + 1), s_, precision=HIGHEST)
    new_state = lam[None, :, None, None] ** 20 * s_ + jnp.einsum(
        "blhd,blhe->bhde", k_ * lam[None, None, :, None] ** (19 - steps[None, :, None, None]),
        v_, precision=HIGHEST)
    return jnp.sum(out ** 2) + jnp.sum(new_state ** 2)

  for got, want in zip(jax.jit(jax.grad(full, (0, 1, 2, 3)))(q, k, v, state),
                       jax.jit(jax.grad(reference, (0, 1, 2, 3)))(q, k, v, state)):
    _close(got, want, 1e-4)


# --- TransNormer v1 -------------------------------------------------------------------------------


def test_simple_rms_norm_puts_eps_outside_the_root():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  rms = 5.0 / np.sqrt(2.0)
  np.testing.assert_allclose(simple_rms_norm(x, eps=0.5), [[3 / (rms + 0.5), 4 / (rms + 0.5)],
                                                           [0.0, 0.0]], rtol=1e-6)


def test_simple_rms_norm_gradient_at_a_zero_row_is_torchs():
  """torch's x.norm() backward is 0 at a zero vector, so there d out / d x = 1 / eps; sqrt's
  infinite derivative made it NaN (and every gradient of a TransNormer-T1 step with it)."""
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  weights = jnp.array([[0.5, -1.0], [2.0, 3.0]])
  grad = jax.grad(lambda x: jnp.sum(simple_rms_norm(x, eps=0.5) * weights))(x)
  np.testing.assert_allclose(grad[1], weights[1] / 0.5, rtol=1e-6)
  rms_grad = jax.grad(lambda x: jnp.sum(x / (jnp.linalg.norm(x) / np.sqrt(2.0) + 0.5) * weights[0]))
  np.testing.assert_allclose(grad[0], rms_grad(x[0]), rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_norm_attention(causal):
  q, k, v = _qkv(2, 100, 2, 8, 12, seed=13)
  mask = jnp.tril(jnp.ones((100, 100))) if causal else jnp.ones((100, 100))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) * mask
  out = jnp.einsum("bhqk,bkhe->bqhe", scores, v, precision=HIGHEST).reshape(2, 100, 24)
  want = out / (jnp.linalg.norm(out, axis=-1, keepdims=True) / np.sqrt(24) + 1e-8)
  for impl in (IMPLS if causal else ("xla",)):
    got = jax.jit(norm_attention, static_argnames=("causal", "implementation"))(
        q, k, v, causal=causal, implementation=impl)
    _close(got.reshape(2, 100, 24), want, 1e-5)


def _block_diag_naive(q, k, v, block, causal, softmax):
  """Official DiagAttention: zero-pad to whole blocks, attend inside each block, cut."""
  length = q.shape[1]
  padded = -(-length // block) * block
  q, k, v = (jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))) for x in (q, k, v))
  ids = np.arange(padded) // block
  mask = ids[:, None] == ids[None, :]
  if causal:
    mask &= np.tril(np.ones((padded, padded), bool))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST)
  if softmax:
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e8), axis=-1)
  else:
    probs = jnp.where(mask, jax.nn.relu(logits), 0.0)
  out = jnp.einsum("bhqk,bkhe->bqhe", probs, v, precision=HIGHEST)[:, :length]
  if softmax:
    return out
  b, _, h, e = out.shape
  flat = out.reshape(b, length, h * e)
  return (flat / (jnp.linalg.norm(flat, axis=-1, keepdims=True) / np.sqrt(h * e) + 1e-8)
          ).reshape(out.shape)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("softmax", [True, False], ids=["softmax_t2", "relu_t1"])
def test_diag_attention_matches_the_official_blocking(causal, softmax):
  q, k, v = _qkv(2, 150, 2, 16, seed=14)                           # 3 blocks of 64, last ragged
  want = _block_diag_naive(q, k, v, 64, causal, softmax)
  diag = jax.jit(diag_attention, static_argnames=("causal", "softmax", "implementation"))
  got = diag(q, k, v, causal=causal, softmax=softmax)
  _close(got, want, 1e-5)
  if softmax:
    _close(diag(q, k, v, causal=causal, softmax=True, implementation="pallas"), want, 1e-5)
  # the explicit path that attention dropout takes (here an identity) computes the same
  explicit = jax.jit(lambda *a: diag_attention(*a, causal=causal, softmax=softmax,
                                               dropout=lambda p: p))
  _close(explicit(q, k, v), want, 1e-5)
  # a token at position 64 sees no earlier token: changing tokens 0..63 leaves it unchanged
  other = diag(q.at[:, :64].set(0.5), k.at[:, :64].set(-0.3), v, causal=causal, softmax=softmax)
  np.testing.assert_allclose(other[:, 64:], got[:, 64:], atol=1e-6)


def test_diag_softmax_attention_works_within_its_blocks():
  # T2's block-diagonal attention at L = 1024 in blocks of 64: the two matmuls of each block, not
  # the masked L x L ones (16x the work).
  b, length, h, d, block = 1, 1024, 2, 32, 64
  q = jax.ShapeDtypeStruct((b, length, h, d), jnp.float32)
  compiled = jax.jit(lambda q, k, v: diag_attention(q, k, v, causal=True, softmax=True)).lower(
      q, q, q).compile()
  blocked_matmul_flops = 2 * 2 * b * length * block * h * d
  assert compiled.cost_analysis()["flops"] < 1.5 * blocked_matmul_flops


# --- input validation -----------------------------------------------------------------------------


def test_rejects_bad_inputs():
  q, k, v = _qkv(1, 10, 2, 8)
  with pytest.raises(ValueError, match=r"expected q of rank 4 .* got shape \(10, 2, 8\)"):
    lightning_attention(q[0], k, v)
  with pytest.raises(ValueError, match="q and k of the same shape"):
    lightning_attention(q, k[:, :9], v)
  with pytest.raises(ValueError, match=r"decay of shape \[heads\] = \(2,\)"):
    lightning_attention(q, k, v, decay=jnp.ones(3))
  with pytest.raises(ValueError, match="expected decay rates >= 0"):
    lightning_attention(q, k, v, decay=jnp.array([0.1, -0.1]))
  with pytest.raises(ValueError, match="expected implementation in"):
    lightning_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match=r"state \[batch, heads, head_dim, v_head_dim\] = "
                                       r"\(1, 2, 8, 8\)"):
    lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], jnp.zeros((1, 2, 8, 4)))
  with pytest.raises(ValueError, match="cannot serve this call: the bidirectional form"):
    norm_attention(q, k, v, causal=False, implementation="pallas")
  with pytest.raises(ValueError, match="cannot serve this call: the ReLU form"):
    diag_attention(q, k, v, causal=True, softmax=False, implementation="pallas")
