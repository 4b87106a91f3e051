"""Causal linear attention with a per-head exponential decay (Lightning Attention), TransNormer's
NormAttention and block-diagonal DiagAttention, and the recurrent decode step.

Layout ``[B, L, H, D]`` for q and k, ``[B, L, H, E]`` for v (E may differ from D). Semantics of
``lightning_attention``, with ``lambda_h = exp(-decay_h)`` and ``decay_h >= 0``::

    o_t = sum_{s <= t} lambda_h^(t - s) (q_t . k_s) v_s

No feature map, no scale and no normalisation: callers apply those (TransNormerLLM: silu on q, k;
TransNormer: elu or 1 + elu). ``decay=None`` is plain causal linear attention (lambda = 1).

Paths:

* ``lightning_attention_reference``: the masked quadratic form ``((Q K^T) * M) V``,
  ``M_ts = lambda^(t-s)`` for ``t >= s``, in f32 with ``precision=HIGHEST``: O(L^2), the spec.
* ``"xla"``: the chunked form of Lightning Attention-2 in jnp: within a block of C tokens the left
  product with the decay mask, across blocks the right product with a running f32 state
  ``S = lambda^C S + (K * lambda^(C-1-c))^T V`` carried by ``lax.fori_loop``, one block per
  step, sliced in place: linear in L (time per token flat from 1K to 32K tokens on CPU).
* ``"pallas"``: the same sweep as a Pallas kernel, one program per (batch, head, value-column
  block) looping over the sequence blocks with the state in registers/VMEM (Lightning
  Attention-2's forward); in the interpreter on CPU.

Both paths share one ``jax.custom_vjp`` whose backward is the paper's: the intra-block left products
and inter-block state recurrences of dQ, dK, dV, each of which is itself a sweep of the same kind::

    dQ = sweep(dO, V, K)                       (causal; state sum lambda v k^T)
    dK = reverse_sweep(V, dO, Q)               (anti-causal; state sum lambda dO q^T)
    dV = reverse_sweep(K, Q, dO)               (anti-causal; state sum lambda q dO^T)

so the residuals are only (q, k, v) and no per-block state is stored (the scan's autodiff would
keep one [D, E] state per block). No gradient flows to ``decay`` (it is fixed in TransNormerLLM, as
in the official kernels). Every exponent is ``<= 0``, so a large decay underflows to 0, never to
inf (the naive ``q lambda^t``, ``k lambda^-t`` factorisation overflows).

Also here: ``lightning_prefill`` (a chunk of tokens continuing from a state, returning the new
state) and ``lightning_decode_step`` (the O(1)-per-token recurrence ``S = lambda S + k v^T``,
``o = q S`` in f32), ``norm_attention`` and ``diag_attention`` (TransNormer v1; see their
docstrings) and ``simple_rms_norm`` (TransNormer's parameter-free norm).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ops import dispatch, sharding
from ops.attention import _backend_params, _block_size, _default_target, _round_up, attention

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST

# Sequence block of the chunked sweep, both paths: Lightning Attention-2's 64-token tiles. XLA:CPU,
# fwd+bwd: 64 takes ~25 % (D = E = 64) or ~10 % (128) less time than 128, whose [C, C] products
# cost twice the flops per token; 32 is up to 10 % faster still on CPU, but too narrow a tile for
# the XLA path on GPU and TPU matrix units.
_BLOCK = 64
# Widest value-column slice per Pallas program (Lightning Attention-2 splits the value dim so that
# one program's f32 state stays small).
_PALLAS_BLOCK_VALUE = 128


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _validate(q, k, v, decay, name="lightning_attention"):
  """Checks shapes; returns the decay as f32 ``[H]`` (or None)."""
  for arg, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(
          f"{name}: expected {arg} of rank 4 [batch, length, heads, head_dim], got shape "
          f"{tuple(x.shape)}")
  if q.shape != k.shape:
    raise ValueError(
        f"{name}: expected q and k of the same shape, got q {tuple(q.shape)}, k {tuple(k.shape)}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(
        f"{name}: expected v [batch, length, heads, v_head_dim] = {tuple(q.shape[:3])} + "
        f"(E,), got v {tuple(v.shape)}")
  return _decay_vector(decay, q.shape[2], name)


def _decay_vector(decay, heads, name):
  if decay is None:
    return None
  decay = jnp.asarray(decay, _F32)
  if decay.ndim > 1 or decay.size not in (1, heads):
    raise ValueError(
        f"{name}: expected decay of shape [heads] = ({heads},) or a scalar, got shape "
        f"{tuple(decay.shape)}")
  try:  # concrete rates can be checked; traced ones are the caller's responsibility
    negative = bool((np.asarray(decay) < 0).any())
  except jax.errors.TracerArrayConversionError:
    negative = False
  if negative:
    raise ValueError(f"{name}: expected decay rates >= 0 (lambda = exp(-rate) <= 1), got {decay}")
  return jnp.broadcast_to(decay.reshape(-1), (heads,))


# --------------------------------------------------------------------------------------------------
# Quadratic reference
# --------------------------------------------------------------------------------------------------


def _decay_mask(decay, rows, cols, causal_offset=0):
  """``[H, rows, cols]`` (or ``[1, rows, cols]`` without decay) with ``lambda^(i - j)`` where
  ``i - j >= 0`` (``i`` shifted by ``causal_offset``) and 0 elsewhere; exponents stay ``<= 0``."""
  diff = (lax.broadcasted_iota(jnp.int32, (rows, cols), 0) + causal_offset
          - lax.broadcasted_iota(jnp.int32, (rows, cols), 1))
  lower = diff >= 0
  if decay is None:
    return lower.astype(_F32)[None]
  dist = jnp.maximum(diff, 0).astype(_F32)
  return jnp.where(lower[None], jnp.exp(-decay[:, None, None] * dist[None]), 0.0)


def lightning_attention_reference(q, k, v, *, decay=None):
  """The masked quadratic form ``((Q K^T) * M) V``, ``M_ts = lambda^(t-s)`` (t >= s), in f32 with
  ``precision=HIGHEST``; O(L^2) memory. The spec for the faster paths, and what the official
  TransNormer/TransNormerLLM code computes in training. Returns ``[B, L, H, E]`` in ``q.dtype``."""
  decay = _validate(q, k, v, decay, "lightning_attention_reference")
  length = q.shape[1]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(_F32), k.astype(_F32), precision=_HIGHEST)
  scores = scores * _decay_mask(decay, length, length)[None]
  out = jnp.einsum("bhqk,bkhe->bqhe", scores, v.astype(_F32), precision=_HIGHEST)
  return out.astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# Chunked sweep in jnp (the "xla" path)
# --------------------------------------------------------------------------------------------------


def _block_decays(decay, block):
  """Per-head factors of a block of ``block`` tokens at local index a (broadcast shapes [H, C]):
  queries ``lambda^(a+1)`` (distance to the state left by the previous block), keys
  ``lambda^(C-1-a)`` (distance to the block's end) and the whole block ``lambda^C`` [H]."""
  a = jnp.arange(block, dtype=_F32)
  rate = decay[:, None]
  return jnp.exp(-rate * (a + 1)), jnp.exp(-rate * (block - 1 - a)), jnp.exp(-decay * block)


def _sweep_xla(q, k, v, decay, block, reverse=False):
  """Causal (or, with ``reverse``, anti-causal: ``o_t = sum_{s >= t} lambda^(s-t) ...``) chunked
  linear attention on validated inputs, ``[B, L, H, E]`` in ``q.dtype``.

  One ``lax.fori_loop`` step per block does all of that block's work (intra-block left product,
  inter-block right product, state update) on a ``dynamic_slice`` of the ``[B, L, H, *]`` inputs
  and writes its rows of the output in place, so that nothing of size L is copied or transposed
  (and bf16 inputs are cast per block): materialising the intra-block products of every block at
  once, or a blocked ``[n, B, H, C, *]`` copy of the inputs, streams the whole sequence through
  memory again, which made the time per token grow once L left the cache (CPU: ~3x, then ~1.5x
  more per token at 32K than at 1K). The anti-causal sweep visits the blocks last to first with the
  transposed mask and the mirrored decays (no reversed copies of the inputs)."""
  b, length, h, d = q.shape
  e = v.shape[-1]
  c = _block_size(length, block)
  n = -(-length // c)
  # Zero padding at the end: padded keys and values add nothing, padded query rows are cut.
  if n * c != length:
    pad = ((0, 0), (0, n * c - length), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))

  mask = _decay_mask(decay, c, c)                                     # [H or 1, C, C]
  if decay is None:
    q_decay = k_decay = jnp.ones((1, c), _F32)
    block_decay = jnp.ones((1,), _F32)
  else:
    q_decay, k_decay, block_decay = _block_decays(decay, c)
  if reverse:  # key s of a later block is s - t + ... away: the causal factors mirrored
    mask = jnp.swapaxes(mask, -1, -2)
    q_decay, k_decay = q_decay[:, ::-1], k_decay[:, ::-1]
  q_decay, k_decay = q_decay.T[:, :, None], k_decay.T[:, :, None]     # [C, H or 1, 1]
  block_decay = block_decay[:, None, None]

  def step(i, carry):                                                 # state [B, H, D, E] f32
    state, out = carry
    start = (n - 1 - i if reverse else i) * c
    q_t, k_t, v_t = (lax.dynamic_slice_in_dim(x, start, c, axis=1).astype(_F32)
                     for x in (q, k, v))                              # [B, C, H, *]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q_t, k_t, precision=_HIGHEST) * mask
    out_t = jnp.einsum("bhqk,bkhe->bqhe", scores, v_t, precision=_HIGHEST)
    out_t = out_t + jnp.einsum("bqhd,bhde->bqhe", q_t * q_decay, state, precision=_HIGHEST)
    update = jnp.einsum("bkhd,bkhe->bhde", k_t * k_decay, v_t, precision=_HIGHEST)
    out = lax.dynamic_update_slice_in_dim(out, out_t.astype(out.dtype), start, axis=1)
    return block_decay * state + update, out

  carry = (jnp.zeros((b, h, d, e), _F32), jnp.zeros((b, n * c, h, e), q.dtype))
  _, out = lax.fori_loop(0, n, step, carry)
  return out[:, :length]


# --------------------------------------------------------------------------------------------------
# Pallas sweep kernel (Lightning Attention-2 forward)
# --------------------------------------------------------------------------------------------------


def _mm(a, b, contract: tuple[int, int]):
  """f32 tile matmul contracting axis contract[0] of a with contract[1] of b."""
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=_HIGHEST,
                         preferred_element_type=_F32)


def _sweep_kernel(*refs, block, num_blocks, has_decay):
  """One (batch, head, value-column block): loops over the sequence blocks carrying the f32 state
  [D, Eb]; every exponent is <= 0."""
  if has_decay:
    decay_ref, q_ref, k_ref, v_ref, o_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref = refs
  row = lax.broadcasted_iota(jnp.int32, (block, block), 0)
  col = lax.broadcasted_iota(jnp.int32, (block, block), 1)
  local = lax.broadcasted_iota(jnp.int32, (block, 1), 0).astype(_F32)
  if has_decay:
    rate = decay_ref[0]
    dist = jnp.maximum(row - col, 0).astype(_F32)
    mask = jnp.where(row >= col, jnp.exp(-rate * dist), 0.0)
    q_decay = jnp.exp(-rate * (local + 1.0))
    k_decay = jnp.exp(-rate * (block - 1.0 - local))
    block_decay = jnp.exp(-rate * block)
  else:
    mask = (row >= col).astype(_F32)

  def body(t, state):
    start = pl.multiple_of(t * block, block)
    q = q_ref[pl.ds(start, block), :].astype(_F32)                 # [C, D]
    k = k_ref[pl.ds(start, block), :].astype(_F32)                 # [C, D]
    v = v_ref[pl.ds(start, block), :].astype(_F32)                 # [C, Eb]
    scores = _mm(q, k, (1, 1)) * mask                              # [C, C]
    if has_decay:
      out = _mm(scores, v, (1, 0)) + _mm(q * q_decay, state, (1, 0))
      state = block_decay * state + _mm(k * k_decay, v, (0, 0))
    else:
      out = _mm(scores, v, (1, 0)) + _mm(q, state, (1, 0))
      state = state + _mm(k, v, (0, 0))
    o_ref[pl.ds(start, block), :] = out.astype(o_ref.dtype)
    return state

  lax.fori_loop(0, num_blocks, body, jnp.zeros((q_ref.shape[-1], o_ref.shape[-1]), _F32))


def _value_block(e, widest):
  """The value-column slice: all of E when it fits, else the largest power of two <= ``widest``
  dividing E (so no column padding is needed), else all of E."""
  if e <= widest:
    return e
  width = widest
  while width >= 16:
    if e % width == 0:
      return width
    width //= 2
  return e


def _sweep_pallas(q, k, v, decay, block, target):
  b, length, h, d = q.shape
  e = v.shape[-1]
  c = _block_size(length, block)
  padded = _round_up(length, c)
  pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  be = _value_block(e, _PALLAS_BLOCK_VALUE)
  # Blocks index [B, L, H, D] directly (the head axis squeezed): no transposes around the kernel.
  seq = lambda width, col: pl.BlockSpec((None, padded, None, width),
                                        lambda bi, hi, j: (bi, 0, hi, col(j)))
  in_specs = [seq(d, lambda j: 0), seq(d, lambda j: 0), seq(be, lambda j: j)]
  args = [q, k, v]
  if decay is not None:
    in_specs.insert(0, pl.BlockSpec((None, 1), lambda bi, hi, j: (hi, 0)))
    args.insert(0, decay.reshape(h, 1))
  out = pl.pallas_call(
      functools.partial(_sweep_kernel, block=c, num_blocks=padded // c,
                        has_decay=decay is not None),
      grid=(b, h, e // be),
      in_specs=in_specs,
      out_specs=seq(be, lambda j: j),
      out_shape=jax.ShapeDtypeStruct((b, padded, h, e), q.dtype),
      name="lightning_attention_sweep",
      **_backend_params(target, 3),
  )(*args)
  return out[:, :length]


def _pallas_reason(head_dim, v_head_dim) -> str | None:
  """Why the kernel cannot be compiled for this platform's target (None: it can, or it runs in
  the interpreter)."""
  target = _default_target()
  if target == "tpu":
    return ("its blocks index [B, L, H, D] with the head axis squeezed, which Mosaic TPU cannot "
            "tile")
  if target == "gpu":
    for name, dim in (("head_dim", head_dim), ("v head_dim", v_head_dim)):
      if dim < 16 or dim & (dim - 1):
        return f"Triton tiles need a power-of-two {name} >= 16, got {dim}"
  return None


# --------------------------------------------------------------------------------------------------
# custom_vjp shared by both paths
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Sweep:
  """Static choice of the sweep implementation (hashable: a nondiff argument of the custom_vjp)."""
  implementation: str
  block: int
  target: str = ""  # the Pallas target ("interpret", "gpu"); unused by "xla"

  def __call__(self, q, k, v, decay, *, reverse=False):
    """Causal sweep, or anti-causal (``o_t = sum_{s >= t} ...``) with ``reverse``: the XLA sweep
    runs backwards; the kernel sweeps the time-reversed sequence."""
    if self.implementation != "pallas":
      return _sweep_xla(q, k, v, decay, self.block, reverse=reverse)
    if reverse:
      q, k, v = (x[:, ::-1] for x in (q, k, v))
    out = _sweep_pallas(q, k, v, decay, self.block, self.target)
    return out[:, ::-1] if reverse else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lightning(q, k, v, decay, sweep):
  return sweep(q, k, v, decay)


def _lightning_fwd(q, k, v, decay, sweep):
  return sweep(q, k, v, decay), (q, k, v, decay)


def _lightning_bwd(sweep, residuals, do):
  q, k, v, decay = residuals
  dq = sweep(do, v, k, decay)
  dk = sweep(v, do, q, decay, reverse=True)
  dv = sweep(k, q, do, decay, reverse=True)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def _make_sweep(implementation, head_dim, v_head_dim, name):
  reasons = {"xla": lambda: None, "pallas": lambda: _pallas_reason(head_dim, v_head_dim)}
  if dispatch.choose(name, implementation, reasons) == "pallas":
    return _Sweep("pallas", _BLOCK, _default_target())
  return _Sweep("xla", _BLOCK)


def lightning_attention(q, k, v, *, decay=None, implementation=None):
  """Causal linear attention with per-head decay, ``[B, L, H, D] x2, [B, L, H, E] -> [B, L, H, E]``.

  ``o_t = sum_{s <= t} exp(-decay_h)^(t-s) (q_t . k_s) v_s``. ``decay``: per-head rates ``>= 0``
  (shape ``[H]`` or a scalar), or None for no decay. Any L (the last block is zero-padded).

  ``implementation`` (``ops.dispatch``): ``None`` picks the chunked jnp path ("xla"), on CPU always
  (never interpret mode silently) and on devices until the Pallas kernel has been validated there;
  ``"pallas"`` runs the kernel (in the interpreter on CPU, Triton on GPU), raising ValueError where
  it cannot be compiled. Both differentiate with the paper's backward (module
  docstring); no gradient reaches ``decay``. Output in ``q.dtype``; math and state in f32.
  """
  decay = _validate(q, k, v, decay)
  sweep = _make_sweep(implementation, q.shape[-1], v.shape[-1], "lightning_attention")
  if sweep.implementation != "pallas":
    return _lightning(q, k, v, decay, sweep)
  # Under a mesh the kernel runs per shard of the batch and the heads (XLA cannot partition a
  # Pallas kernel).
  qkv = ("batch", None, "heads", None)
  return sharding.shard_map(lambda q, k, v, decay: _lightning(q, k, v, decay, sweep),
                            (qkv, qkv, qkv, ("heads",)), qkv)(q, k, v, decay)


# --------------------------------------------------------------------------------------------------
# Recurrent state: prefill from a state, decode step
# --------------------------------------------------------------------------------------------------


def _check_state(state, q, v, name):
  expected = (q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1])
  if state.shape != expected:
    raise ValueError(
        f"{name}: expected state [batch, heads, head_dim, v_head_dim] = {expected}, got "
        f"{tuple(state.shape)}")


def lightning_prefill(q, k, v, state, *, decay=None, implementation=None):
  """``lightning_attention`` over a chunk of tokens that continues from ``state``.

  ``state`` [B, H, D, E] f32 is the recurrence ``S_t = lambda S_{t-1} + k_t v_t^T`` after the
  tokens before the chunk (zeros for none). Returns ``(out [B, L, H, E] in q.dtype, new state)``:
  ``out_t = lightning_t + lambda^(t+1) q_t S`` and
  ``S' = lambda^L S + sum_s lambda^(L-1-s) k_s v_s^T`` (f32, exponents <= 0).
  """
  decay_h = _validate(q, k, v, decay, "lightning_prefill")
  _check_state(state, q, v, "lightning_prefill")
  length = q.shape[1]
  out = lightning_attention(q, k, v, decay=decay_h, implementation=implementation).astype(_F32)
  state = state.astype(_F32)
  steps = jnp.arange(length, dtype=_F32)
  if decay_h is None:
    q_decay = k_decay = jnp.ones((1, length, 1, 1), _F32)
    state_decay = jnp.ones((1, 1, 1, 1), _F32)
  else:
    q_decay = jnp.exp(-decay_h[None, None, :, None] * (steps[None, :, None, None] + 1))
    k_decay = jnp.exp(-decay_h[None, None, :, None] * (length - 1 - steps[None, :, None, None]))
    state_decay = jnp.exp(-decay_h * length)[None, :, None, None]
  out = out + jnp.einsum("blhd,bhde->blhe", q.astype(_F32) * q_decay, state, precision=_HIGHEST)
  new_state = state_decay * state + jnp.einsum(
      "blhd,blhe->bhde", k.astype(_F32) * k_decay, v.astype(_F32), precision=_HIGHEST)
  return out.astype(q.dtype), new_state


def lightning_decode_step(q, k, v, state, decay=None):
  """One token of the recurrence in f32: ``S = lambda S + k v^T``, ``o = q S``.

  ``q, k`` [B, H, D], ``v`` [B, H, E], ``state`` [B, H, D, E]; ``decay`` as in
  ``lightning_attention``. Returns ``(o [B, H, E] in q.dtype, new state f32)``. This is
  TransNormerLLM's "robust inference" form: no ``lambda^(+-t)`` factors, stable for any length.
  """
  for name, x, rank in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("state", state, 4)):
    if x.ndim != rank:
      raise ValueError(
          f"lightning_decode_step: expected {name} of rank {rank}, got shape {tuple(x.shape)}")
  if k.shape != q.shape or v.shape[:2] != q.shape[:2]:
    raise ValueError(
        f"lightning_decode_step: expected q, k [batch, heads, head_dim] and v [batch, heads, "
        f"v_head_dim] alike, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
  _check_state(state, q, v, "lightning_decode_step")
  decay = _decay_vector(decay, q.shape[1], "lightning_decode_step")
  state = state.astype(_F32)
  if decay is not None:
    state = jnp.exp(-decay)[None, :, None, None] * state
  state = state + k.astype(_F32)[..., :, None] * v.astype(_F32)[..., None, :]
  out = jnp.einsum("bhd,bhde->bhe", q.astype(_F32), state, precision=_HIGHEST)
  return out.astype(q.dtype), state


# --------------------------------------------------------------------------------------------------
# TransNormer (v1): NormAttention and DiagAttention
# --------------------------------------------------------------------------------------------------


def _xla_only(implementation, name, why):
  """For the cases with no kernel: "pallas" cannot serve them (and says why)."""
  reasons = {"xla": lambda: None, "pallas": lambda: f"{why}, no Pallas kernel"}
  dispatch.choose(name, implementation, reasons)


def simple_rms_norm(x, eps=1e-8):
  """TransNormer's SimpleRMSNorm over the last axis: ``x / (||x||_2 / sqrt(d) + eps)``, eps outside
  the root, no parameters; statistics in f32, result in ``x.dtype``.

  A row of zeros (T1's ReLU block attention gives one when every score of a query is <= 0) has
  the norm's gradient 0 there, as torch's ``x.norm()`` backward: ``sqrt``'s is infinite at 0 and
  made every gradient NaN."""
  xf = x.astype(_F32)
  squares = jnp.sum(xf * xf, axis=-1, keepdims=True)
  nonzero = squares > 0
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0)
  return (xf / (norm * x.shape[-1] ** -0.5 + eps)).astype(x.dtype)


def _norm_heads(out, eps):
  """SimpleRMSNorm over the concatenated heads (the official norm is over all of H*E)."""
  b, length, h, e = out.shape
  return simple_rms_norm(out.reshape(b, length, h * e), eps).reshape(b, length, h, e)


def norm_attention(q, k, v, *, causal, eps=1e-8, implementation=None):
  """TransNormer's NormAttention: linear attention on feature-mapped q, k, then SimpleRMSNorm
  over the concatenated heads (no row-sum denominator, no scale).

  causal: ``lightning_attention`` without decay (the official code's masked quadratic form, in
  linear time); ``implementation`` as there. Bidirectional: ``q (k^T v)`` (two einsums in f32; only
  the "xla" form exists). Returns ``[B, L, H, E]`` in ``q.dtype``.
  """
  _validate(q, k, v, None, "norm_attention")
  if causal:
    out = lightning_attention(q, k, v, implementation=implementation)
  else:
    _xla_only(implementation, "norm_attention", "the bidirectional form is two einsums")
    kv = jnp.einsum("bkhd,bkhe->bhde", k.astype(_F32), v.astype(_F32), precision=_HIGHEST)
    out = jnp.einsum("bqhd,bhde->bqhe", q.astype(_F32), kv, precision=_HIGHEST).astype(q.dtype)
  return _norm_heads(out, eps)


def diag_attention(q, k, v, *, block_size=64, causal, softmax, eps=1e-8, dropout=None,
                   implementation=None):
  """TransNormer's DiagAttention: attention inside non-overlapping blocks of ``block_size`` tokens
  aligned at absolute positions 0, block, 2 block, ... (a token sees only its own block).

  ``softmax=True`` (T2): ``softmax(q k^T) v`` per block (q already scaled), no norm.
  ``softmax=False`` (T1): ``ReLU(q k^T) v`` per block without normalisation, then SimpleRMSNorm
  over the concatenated heads. ``causal`` masks later tokens inside the block. As in the official
  code, L is zero-padded to a whole block: bidirectional softmax therefore also weighs the padded
  (zero) keys of the last block.

  ``dropout``: a function applied to the per-block probabilities (attention dropout while
  training). The softmax form without it runs ``ops.attention`` over the blocks as a batch of
  sequences (``implementation`` is passed on); the other cases are one blocked einsum (only "xla").
  """
  _validate(q, k, v, None, "diag_attention")
  b, length, h, _ = q.shape
  e = v.shape[-1]
  padded = _round_up(length, block_size)
  pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  n = padded // block_size
  if softmax and dropout is None:  # each block a sequence of its own: O(L block_size) work
    blocks = lambda x: x.reshape(b * n, block_size, h, x.shape[-1])
    out = attention(blocks(q), blocks(k), blocks(v), causal=causal, scale=1.0,
                    implementation=implementation)
    return out.reshape(b, padded, h, e)[:, :length]
  _xla_only(implementation, "diag_attention",
            "attention dropout needs the probabilities" if softmax
            else "the ReLU form is one blocked einsum")
  qb, kb, vb = (x.astype(_F32).reshape(b, n, block_size, h, x.shape[-1]) for x in (q, k, v))
  scores = jnp.einsum("bnqhd,bnkhd->bnhqk", qb, kb, precision=_HIGHEST)
  mask = _decay_mask(None, block_size, block_size) if causal else 1.0
  if softmax:  # the official -1e8 fill: a finite mask, as ops.attention's
    probs = jax.nn.softmax(jnp.where(mask > 0, scores, -1e8), axis=-1)
  else:
    probs = jax.nn.relu(scores) * mask
  if dropout is not None:
    probs = dropout(probs)
  out = jnp.einsum("bnhqk,bnkhe->bnqhe", probs, vb, precision=_HIGHEST)
  out = out.reshape(b, padded, h, e)[:, :length].astype(q.dtype)
  return out if softmax else _norm_heads(out, eps)
