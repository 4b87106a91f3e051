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
* ``"pallas"``: Lightning Attention-2 as Pallas kernels, parallel over chunks as well as batch
  and heads: a state pass writes the [D, E] state each chunk starts from, then one program per
  (batch, head, chunk, column block) computes the chunk's output; bf16 operands enter the dots
  as bf16 (tensor cores, the MXU) with f32 accumulation. Triton on GPU, Mosaic on TPU, the
  interpreter on CPU.

Both paths share one ``jax.custom_vjp`` whose backward is the paper's: dQ is causal and dK, dV
anti-causal linear attention with other operands::

    dQ = causal(dO, V, K)         (state sum lambda v k^T: the forward's, recomputed)
    dK = anticausal(V, dO, Q)     (state sum lambda dO q^T)
    dV = anticausal(K, Q, dO)     (state sum lambda q dO^T: the same state, transposed)

The jnp path runs each as a sweep; the kernels run two state passes (the forward's and one
anti-causal one shared by dK and dV) and three chunk passes. The residuals are only (q, k, v): no
per-chunk state is kept between forward and backward. No gradient flows to ``decay`` (it is fixed
in TransNormerLLM, as in the official kernels). Every exponent is ``<= 0``, so a large decay
underflows to 0, never to inf (the naive ``q lambda^t``, ``k lambda^-t`` factorisation overflows).

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
from ops._pallas import (backend_params, block_for, cost_estimate, default_target, is_triton_tile,
                         round_up, tile_dot)
from ops.attention import attention

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST

# Sequence block of the chunked sweep, both paths: Lightning Attention-2's 64-token tiles. XLA:CPU,
# fwd+bwd: 64 takes ~25 % (D = E = 64) or ~10 % (128) less time than 128, whose [C, C] products
# cost twice the flops per token; 32 is up to 10 % faster still on CPU, but too narrow a tile for
# the XLA path on GPU and TPU matrix units.
_BLOCK = 64


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
  c = block_for(length, block)
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
# Pallas kernels: Lightning Attention-2 in chunks, parallel over chunks
# --------------------------------------------------------------------------------------------------
#
# The sequence is cut into chunks of C tokens. A state pass (sequential over chunks, one small
# matmul per chunk) writes the state each chunk starts from; a chunk pass (one program per batch,
# head, chunk and column block, all in parallel) then computes every chunk's output:
#
#     O_c = ((P_c R_c^T) * mask) V_c + row_decay * (P_c S_c)        (S_c or S_c^T)
#
# The forward is (P, R, V, S) = (Q, K, V, states of K, V). The backward recomputes those states and
# adds one anti-causal state pass of (Q, dO), so it is two sweeps, then three chunk passes:
#
#     dQ = chunks(dO, V, K; states(K, V)^T),  causal
#     dK = chunks(V, dO, Q; states(Q, dO)^T), anti-causal
#     dV = chunks(K, Q, dO; states(Q, dO)),   anti-causal
#
# Operands enter the dots in their dtype (bf16 on tensor cores / the MXU) with f32 accumulation;
# the running state is f32 and is stored in the inputs' dtype, which is what the chunk pass's dot
# casts it to anyway. The anti-causal state of chunk c sums the tokens after it:
# ``R_c = sum_{t >= (c+1)C} lambda^(t - (c+1)C) q_t do_t^T``.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the lightning kernels."""
  chunk: int    # tokens per chunk: the intra-chunk products are [chunk, chunk]
  state: int    # widest block of the [D, E] state per program of the state pass
  columns: int  # widest block of output columns per program of the chunk pass

  @classmethod
  def default(cls, target: str) -> BlockSizes:
    """The target's tiles. GPU: 64-token chunks and 64-wide f32 tiles keep every program within
    4 warps' registers (a 128x128 f32 tile alone is 128 registers a thread); TPU: the MXU's
    128x128."""
    return cls(128, 128, 128) if target == "tpu" else cls(64, 64, 64)


def _local_rows(chunk):
  return lax.broadcasted_iota(jnp.int32, (chunk, 1), 0).astype(_F32)


def _head_rate(rate_ref):
  """The decay rate of this program's head (grid axis 1 in every lightning kernel)."""
  return rate_ref[pl.program_id(1)]


def _state_decays(rate, chunk, reverse):
  """Each row's factor to the chunk's end (causal: ``lambda^(C-1-a)``; anti-causal, to its start:
  ``lambda^a``) and the whole chunk's ``lambda^C``."""
  local = _local_rows(chunk)
  return jnp.exp(-rate * (local if reverse else chunk - 1.0 - local)), jnp.exp(-rate * chunk)


def _state_update(state, x, y, x_decay, chunk_decay):
  """``lambda^C state + (x * x_decay)^T y``: the state f32, the operands in their dtype."""
  scaled = (x.astype(_F32) * x_decay).astype(x.dtype)
  return chunk_decay * state + tile_dot(scaled, y, (0, 0))


def _states_kernel(rate_ref, x_ref, y_ref, states_ref, *, chunk, num_chunks, reverse):
  """One (batch, head, state block): a loop over the chunks (last to first with ``reverse``) that
  writes the state each chunk starts from, then adds the chunk's ``x^T y``."""
  x_decay, chunk_decay = _state_decays(_head_rate(rate_ref), chunk, reverse)

  def body(i, state):
    c = num_chunks - 1 - i if reverse else i
    states_ref[c] = state.astype(states_ref.dtype)
    rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    return _state_update(state, x_ref[rows, :], y_ref[rows, :], x_decay, chunk_decay)

  lax.fori_loop(0, num_chunks, body, jnp.zeros(states_ref.shape[1:], _F32))


def _states_kernel_tpu(rate_ref, x_ref, y_ref, states_ref, state_ref, *, chunk, reverse):
  """The same pass on TPU: one chunk per step of a sequential grid axis, the state in VMEM
  scratch, so that only a chunk of x and y is resident whatever L."""
  @pl.when(pl.program_id(4) == 0)
  def _():
    state_ref[...] = jnp.zeros_like(state_ref)

  x_decay, chunk_decay = _state_decays(_head_rate(rate_ref), chunk, reverse)
  states_ref[...] = state_ref[...].astype(states_ref.dtype)
  state_ref[...] = _state_update(state_ref[...], x_ref[...], y_ref[...], x_decay, chunk_decay)


def _chunk_kernel(rate_ref, p_ref, r_ref, v_ref, state_ref, o_ref, *, anticausal,
                  state_transposed):
  """One (batch, head, chunk, column block): the intra-chunk product and the state's term."""
  p, r, v = p_ref[...], r_ref[...], v_ref[...]
  chunk = p.shape[0]
  rate = _head_rate(rate_ref)
  row = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  col = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  dist = col - row if anticausal else row - col
  mask = jnp.where(dist >= 0, jnp.exp(-rate * jnp.maximum(dist, 0).astype(_F32)), 0.0)
  # each row's distance to the state: lambda^(a+1) back to the previous chunk's last token, or
  # lambda^(C-a) on to the next chunk's first
  local = _local_rows(chunk)
  row_decay = jnp.exp(-rate * ((chunk - local) if anticausal else (local + 1.0)))
  scores = (tile_dot(p, r, (1, 1)) * mask).astype(v.dtype)
  inter = tile_dot(p, state_ref[...].astype(p.dtype), (1, 1 if state_transposed else 0))
  o_ref[...] = (tile_dot(scores, v, (1, 0)) + row_decay * inter).astype(o_ref.dtype)


def _tile(dim, widest):
  """The block of a dimension: all of it when it fits, else the largest power of two <= ``widest``
  dividing it (no padding needed), else all of it."""
  if dim <= widest:
    return dim
  width = widest
  while width >= 16:
    if dim % width == 0:
      return width
    width //= 2
  return dim


@dataclasses.dataclass(frozen=True)
class _Chunked:
  """The Pallas implementation (hashable: a nondiff argument of the custom_vjp). On GPU and in
  the interpreter the kernels index ``[B, L, H, D]`` directly, the head axis squeezed; Mosaic TPU
  tiles the two minor dims, so there the inputs are laid out ``[B, H, L, D]`` first.
  ``tpu_interpret`` runs the TPU kernels in Pallas's TPU interpreter (tests on a CPU)."""
  target: str
  sizes: BlockSizes
  tpu_interpret: bool = False

  @property
  def heads_first(self):
    return self.target == "tpu"

  def forward(self, q, k, v, rate):
    length = q.shape[1]
    q, k, v = self._layout(q, k, v)
    out = self._chunks(q, k, v, self._states(k, v, rate, False), rate, False, False)
    return self._restore(out, length)

  def backward(self, q, k, v, rate, do):
    length = q.shape[1]
    q, k, v, do = self._layout(q, k, v, do)
    states, later = self._states(k, v, rate, False), self._states(q, do, rate, True)
    grads = (self._chunks(do, v, k, states, rate, False, True),
             self._chunks(v, do, q, later, rate, True, True),
             self._chunks(k, q, do, later, rate, True, False))
    return tuple(self._restore(g, length) for g in grads)

  def _chunk(self, length):
    return block_for(length, self.sizes.chunk)

  def _layout(self, *xs):
    """Zero-pads L to whole chunks (padded keys add nothing, padded rows are cut)."""
    length = xs[0].shape[1]
    pad = ((0, 0), (0, round_up(length, self._chunk(length)) - length), (0, 0), (0, 0))
    xs = [jnp.pad(x, pad) for x in xs]
    return [jnp.swapaxes(x, 1, 2) for x in xs] if self.heads_first else xs

  def _restore(self, x, length):
    return (jnp.swapaxes(x, 1, 2) if self.heads_first else x)[:, :length]

  def _dims(self, x):
    """(batch, length, heads, features) of a laid-out input."""
    b, a1, a2, f = x.shape
    return (b, a2, a1, f) if self.heads_first else (b, a1, a2, f)

  def _seq_spec(self, rows, cols, index):
    """Blocks of ``rows`` tokens by ``cols`` features at ``index(*grid) = (b, h, t, j)``."""
    if self.heads_first:
      return pl.BlockSpec((None, None, rows, cols), index)

    def bthj(*grid):
      b, h, t, j = index(*grid)
      return b, t, h, j
    return pl.BlockSpec((None, rows, None, cols), bthj)

  def _rate_spec(self):
    """Every head's rate, whole (in SMEM on TPU); a program reads its head's, at grid axis 1."""
    if self.heads_first:
      from jax.experimental.pallas import tpu as pltpu
      return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec(memory_space=None)

  def _states(self, x, y, rate, reverse):
    """``[B, H, n, D, E]`` in x's dtype: the state each chunk starts from (causal: the chunks
    before it; ``reverse``: the chunks after it)."""
    b, length, h, d = self._dims(x)
    e = y.shape[-1]
    chunk = self._chunk(length)
    n = length // chunk
    bd, be = _tile(d, self.sizes.state), _tile(e, self.sizes.state)
    out_shape = jax.ShapeDtypeStruct((b, h, n, d, e), x.dtype)
    cost = cost_estimate(2 * b * h * length * d * e, x, y, out_shape)
    if self.heads_first:
      from jax.experimental.pallas import tpu as pltpu
      at = (lambda t: n - 1 - t) if reverse else (lambda t: t)
      return pl.pallas_call(
          functools.partial(_states_kernel_tpu, chunk=chunk, reverse=reverse),
          grid=(b, h, d // bd, e // be, n),
          in_specs=[self._rate_spec(),
                    self._seq_spec(chunk, bd, lambda b, h, i, j, t: (b, h, at(t), i)),
                    self._seq_spec(chunk, be, lambda b, h, i, j, t: (b, h, at(t), j))],
          out_specs=pl.BlockSpec((None, None, None, bd, be),
                                 lambda b, h, i, j, t: (b, h, at(t), i, j)),
          out_shape=out_shape,
          scratch_shapes=[pltpu.VMEM((bd, be), _F32)],
          name="lightning_states",
          cost_estimate=cost,
          # the chunks are the last grid axis: the state carries from one to the next
          **backend_params(self.target, 5, sequential_last_axis=True,
                           tpu_interpret=self.tpu_interpret),
      )(rate, x, y)
    return pl.pallas_call(
        functools.partial(_states_kernel, chunk=chunk, num_chunks=n, reverse=reverse),
        grid=(b, h, d // bd, e // be),
        in_specs=[self._rate_spec(),
                  self._seq_spec(length, bd, lambda b, h, i, j: (b, h, 0, i)),
                  self._seq_spec(length, be, lambda b, h, i, j: (b, h, 0, j))],
        out_specs=pl.BlockSpec((None, None, n, bd, be), lambda b, h, i, j: (b, h, 0, i, j)),
        out_shape=out_shape,
        name="lightning_states",
        cost_estimate=cost,
        **backend_params(self.target, 4),
    )(rate, x, y)

  def _chunks(self, p, r, v, states, rate, anticausal, state_transposed):
    """The chunk pass: ``[B, L, H, v's features]`` (laid out) in p's dtype."""
    b, length, h, d = self._dims(p)
    e = v.shape[-1]
    chunk = self._chunk(length)
    be = _tile(e, self.sizes.columns)
    if state_transposed:  # states [.., E_out, D]: a block of rows
      state_spec = pl.BlockSpec((None, None, None, be, d), lambda b, h, t, j: (b, h, t, j, 0))
    else:                 # states [.., D, E_out]: a block of columns
      state_spec = pl.BlockSpec((None, None, None, d, be), lambda b, h, t, j: (b, h, t, 0, j))
    out_shape = jax.ShapeDtypeStruct(
        (b, h, length, e) if self.heads_first else (b, length, h, e), p.dtype)
    # per token: scores and the score-value product over a chunk, the state's term
    flops = 2 * b * h * length * (chunk * d + chunk * e + d * e)
    return pl.pallas_call(
        functools.partial(_chunk_kernel, anticausal=anticausal,
                          state_transposed=state_transposed),
        grid=(b, h, length // chunk, e // be),
        in_specs=[self._rate_spec(),
                  self._seq_spec(chunk, d, lambda b, h, t, j: (b, h, t, 0)),
                  self._seq_spec(chunk, d, lambda b, h, t, j: (b, h, t, 0)),
                  self._seq_spec(chunk, be, lambda b, h, t, j: (b, h, t, j)),
                  state_spec],
        out_specs=self._seq_spec(chunk, be, lambda b, h, t, j: (b, h, t, j)),
        out_shape=out_shape,
        name="lightning_chunks",
        cost_estimate=cost_estimate(flops, p, r, v, states, out_shape),
        **backend_params(self.target, 4, tpu_interpret=self.tpu_interpret),
    )(rate, p, r, v, states)


def _pallas_reason(head_dim, v_head_dim) -> str | None:
  """Why the kernels cannot be compiled for this platform's target (None: they can, or they run
  in the interpreter)."""
  if default_target() == "gpu":
    for name, dim in (("head_dim", head_dim), ("v head_dim", v_head_dim)):
      if not is_triton_tile(dim):
        return f"Triton tiles need a power-of-two {name} >= 16, got {dim}"
  return None


# --------------------------------------------------------------------------------------------------
# custom_vjp shared by both paths
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Sweeps:
  """The jnp implementation: the forward is one chunked sweep, the backward three (dQ causal, dK
  and dV anti-causal), each the same ``fori_loop`` with other operands."""
  block: int

  def forward(self, q, k, v, decay):
    return _sweep_xla(q, k, v, decay, self.block)

  def backward(self, q, k, v, decay, do):
    return (_sweep_xla(do, v, k, decay, self.block),
            _sweep_xla(v, do, q, decay, self.block, reverse=True),
            _sweep_xla(k, q, do, decay, self.block, reverse=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lightning(q, k, v, decay, impl):
  return impl.forward(q, k, v, decay)


def _lightning_fwd(q, k, v, decay, impl):
  return impl.forward(q, k, v, decay), (q, k, v, decay)


def _lightning_bwd(impl, residuals, do):
  q, k, v, decay = residuals
  dq, dk, dv = impl.backward(q, k, v, decay, do)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning_attention(q, k, v, *, decay=None, implementation=None):
  """Causal linear attention with per-head decay, ``[B, L, H, D] x2, [B, L, H, E] -> [B, L, H, E]``.

  ``o_t = sum_{s <= t} exp(-decay_h)^(t-s) (q_t . k_s) v_s``. ``decay``: per-head rates ``>= 0``
  (shape ``[H]`` or a scalar), or None for no decay. Any L (the last chunk is zero-padded).

  ``implementation`` (``ops.dispatch``): ``None`` takes the platform's order: the Pallas kernels
  on GPU (Triton) and TPU (Mosaic), the chunked jnp sweep ("xla") on CPU, where ``"pallas"`` runs
  the kernels in the interpreter (never picked silently). Naming one that cannot serve the call
  raises ValueError. Both differentiate with Lightning Attention-2's backward (module docstring);
  no gradient reaches ``decay``. Output in ``q.dtype``; the state in f32.
  """
  decay = _validate(q, k, v, decay)
  reasons = {"xla": lambda: None,
             "pallas": lambda: _pallas_reason(q.shape[-1], v.shape[-1])}
  if dispatch.choose("lightning_attention", implementation, reasons) == "xla":
    return _lightning(q, k, v, decay, _Sweeps(_BLOCK))
  target = default_target()
  impl = _Chunked(target, BlockSizes.default(target))
  rate = jnp.zeros((q.shape[2],), _F32) if decay is None else decay
  # Under a mesh the kernels run per shard of the batch and the heads (XLA cannot partition a
  # Pallas kernel).
  qkv = ("batch", None, "heads", None)
  return sharding.shard_map(lambda q, k, v, rate: _lightning(q, k, v, rate, impl),
                            (qkv, qkv, qkv, ("heads",)), qkv)(q, k, v, rate)


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
  padded = round_up(length, block_size)
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
