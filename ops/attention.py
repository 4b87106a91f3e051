"""Softmax attention with an additive bias, causal masking and segment ids.

Layout ``[B, L, H, D]`` as in ``jax.nn.dot_product_attention``. Semantics::

    out = softmax(scale * q @ k^T + bias, masked) @ v

The bias is added *after* the scale (MaxViT / Swin relative-position bias semantics), and is
broadcastable to ``[B, H, Lq, Lk]``. A query row whose keys are all masked returns 0.

Implementations:

* ``attention_reference``: jnp, f32 math with ``precision=HIGHEST``. The spec and the CPU path.
* ``attention_pallas``: a ``pl.pallas_call`` forward kernel (online softmax over key blocks, returns
  out and the log-sum-exp) wrapped in a ``jax.custom_vjp`` whose backward is Pallas kernels too
  (dK/dV parallel over key blocks, dQ/dbias parallel over query blocks; P recomputed from the lse;
  no atomics, deterministic). A per-(batch, head) bias gets its dbias as the dS tiles of the dQ
  kernel; a bias shared over batch and/or heads (relative-position bias over windows) gets a
  separate dbias kernel in which each program sums the dS tiles of a group of (batch, head) pairs,
  so ``[B, H, Lq, Lk]`` is never materialized; the per-group partials are summed in jnp. Matmuls
  take bf16/f16 operands as they are (f32 accumulation) and f32 operands at full precision. Each
  pass has its own tiles (``BlockSizes``, as jax's TPU flash attention). The same kernel body lowers
  with Triton on GPU, with Mosaic on TPU (both checked by exporting from a CPU in the tests) and
  runs in the interpreter on CPU.
* ``attention_tpu_flash``: jax's own TPU flash attention
  (``jax.experimental.pallas.ops.tpu.flash_attention``), whose kernels stream K/V (forward, dQ) and
  Q/dO (dK/dV) through VMEM in 128-blocks: memory independent of the length, where the kernel
  above holds a whole (batch, head) sequence per block. It needs lengths that are multiples of 128.
* ``attention(..., implementation=None | "xla" | "pallas" | "cudnn" | "tpu_flash")`` dispatches
  through ``ops.dispatch``: cuDNN where it serves the case on GPU, else the Pallas kernel; on TPU
  jax's flash attention where it serves (long sequences), else the Pallas kernel (windows, ragged
  lengths); the reference on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops import dispatch, sharding
from ops._pallas import (MASK_VALUE, TARGETS, backend_params, block_for, cost_estimate,
                         default_scale, default_target, is_triton_tile, largest_divisor, present,
                         round_up, tile_dot, with_absent_inputs)

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _validate(q, k, v, bias, segment_ids):
  """Checks shapes; returns (bias reshaped to rank 4 or None, q segment ids, kv segment ids)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(
          f"attention: expected {name} of rank 4 [batch, length, heads, head_dim], "
          f"got rank {x.ndim} with shape {tuple(x.shape)}")
  b, lq, h, d = q.shape
  if k.shape[0] != b or v.shape[0] != b:
    raise ValueError(
        f"attention: expected the same batch size in q, k, v, got q {tuple(q.shape)}, "
        f"k {tuple(k.shape)}, v {tuple(v.shape)}")
  if k.shape[1] != v.shape[1]:
    raise ValueError(
        f"attention: expected k and v of the same length, got k {tuple(k.shape)}, "
        f"v {tuple(v.shape)}")
  if k.shape[2] != h or v.shape[2] != h:
    raise ValueError(
        f"attention: expected {h} heads in k and v (as in q), got k {tuple(k.shape)}, "
        f"v {tuple(v.shape)}")
  if k.shape[3] != d:
    raise ValueError(
        f"attention: expected k head dim {d} (the q head dim), got {k.shape[3]}; "
        f"q {tuple(q.shape)}, k {tuple(k.shape)}")
  lk = k.shape[1]
  full = (b, h, lq, lk)
  if bias is not None:
    bias = jnp.asarray(bias)
    ok = bias.ndim <= 4 and all(
        s in (1, t) for s, t in zip(bias.shape[::-1], full[::-1]))
    if not ok:
      raise ValueError(
          f"attention: expected bias broadcastable to [batch, heads, q_len, kv_len] = {full}, "
          f"got shape {tuple(bias.shape)}")
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  if segment_ids is None:
    return bias, None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(
          f"attention: expected segment_ids as one [batch, length] array or a pair "
          f"(q_segment_ids, kv_segment_ids), got a sequence of {len(segment_ids)}")
    q_seg, kv_seg = (jnp.asarray(x) for x in segment_ids)
  else:
    if lq != lk:
      raise ValueError(
          f"attention: a single segment_ids array needs q_len == kv_len, got q_len {lq}, "
          f"kv_len {lk}; pass a pair (q_segment_ids, kv_segment_ids)")
    q_seg = kv_seg = jnp.asarray(segment_ids)
  for name, x, l in (("q segment_ids", q_seg, lq), ("kv segment_ids", kv_seg, lk)):
    if x.shape != (b, l):
      raise ValueError(
          f"attention: expected {name} of shape [batch, length] = {(b, l)}, "
          f"got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"attention: expected integer {name}, got dtype {x.dtype}")
  return bias, q_seg, kv_seg


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def _reference(q, k, v, bias, q_seg, kv_seg, causal, scale):
  """Reference on validated inputs (bias already rank 4 or None)."""
  dtype = q.dtype
  qf, kf, vf = (x.astype(_F32) for x in (q, k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=_HIGHEST) * scale
  if bias is not None:
    s = s + bias.astype(_F32)
  lq, lk = q.shape[1], k.shape[1]
  if not causal and q_seg is None:
    # Unmasked (windows, encoders): nothing to guard, so no selects to pay for on the CPU path.
    p = jnp.exp(s - lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    p = p / jnp.sum(p, axis=-1, keepdims=True)
  else:
    mask = jnp.ones((1, 1, lq, lk), bool)
    if causal:
      mask = mask & jnp.tril(jnp.ones((lq, lk), bool))[None, None]
    if q_seg is not None:
      mask = mask & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    s = jnp.where(mask, s, MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - lax.stop_gradient(m)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0.0, 1.0, l)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=_HIGHEST)
  return out.astype(dtype)


def attention_reference(q, k, v, *, bias=None, segment_ids=None, causal=False, scale=None):
  """``softmax(scale * q k^T + bias) v`` in jnp, f32 math, ``precision=HIGHEST``.

  Args:
    q: ``[B, Lq, H, D]``.
    k: ``[B, Lk, H, D]``.
    v: ``[B, Lk, H, Dv]``.
    bias: additive logits bias broadcastable to ``[B, H, Lq, Lk]``; not scaled.
    segment_ids: int ``[B, L]`` (needs ``Lq == Lk``) or a pair ``(q_ids [B, Lq], kv_ids [B, Lk])``;
      a query attends only to keys with the same id.
    causal: query ``i`` attends to keys ``j <= i`` (top-left aligned, as ``jax.nn``).
    scale: logits scale, default ``1 / sqrt(D)``.

  Returns:
    ``[B, Lq, H, Dv]`` in ``q.dtype``; rows with every key masked are 0.
  """
  bias, q_seg, kv_seg = _validate(q, k, v, bias, segment_ids)
  return _reference(q, k, v, bias, q_seg, kv_seg, causal, default_scale(scale, q.shape[-1]))


# --------------------------------------------------------------------------------------------------
# Tile sizes
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """The largest tiles of the Pallas kernels, per pass, as in jax's TPU flash attention (hashable:
  a nondiff argument of the custom_vjp). A sequence shorter than a tile gets a tile of its next
  power of two, at least 16. Each pass runs one program per block of one axis and loops over the
  blocks of the other."""
  block_q: int      # forward: queries per program
  block_k: int      # forward: keys per loop step
  block_q_dkv: int  # dK/dV: queries per loop step
  block_k_dkv: int  # dK/dV: keys per program
  block_q_dq: int   # dQ and dbias: queries per program
  block_k_dq: int   # dQ and dbias: keys per loop step

  @classmethod
  def uniform(cls, block_q: int, block_k: int) -> BlockSizes:
    """The same query and key tiles in every pass."""
    return cls(block_q, block_k, block_q, block_k, block_q, block_k)

  @classmethod
  def default(cls, target: str) -> BlockSizes:
    """The target's tiles, the same in every pass: 128 on TPU, where Mosaic wants the minor block
    dim a multiple of 128 lanes unless it spans the whole (padded) length; 64 on GPU and in the
    interpreter."""
    block = 128 if target == "tpu" else 64
    return cls.uniform(block, block)


def _block_sizes(target, block_sizes, block_q, block_k) -> BlockSizes:
  """``block_sizes``, or the target's tiles with ``block_q``/``block_k`` (where given) in every
  pass."""
  if block_q is None and block_k is None:
    return BlockSizes.default(target) if block_sizes is None else block_sizes
  if block_sizes is not None:
    raise ValueError("attention_pallas: expected block_sizes or block_q/block_k, got both")
  default = BlockSizes.default(target)
  return BlockSizes.uniform(default.block_q if block_q is None else int(block_q),
                            default.block_k if block_k is None else int(block_k))


# --------------------------------------------------------------------------------------------------
# Pallas forward kernel
# --------------------------------------------------------------------------------------------------


def _check_pallas_supported(target, head_dim, v_head_dim):
  """Raises ValueError for cases the compiled kernel of `target` cannot lower."""
  if target not in TARGETS:
    raise ValueError(f"attention: expected a Pallas target in {TARGETS}, got {target!r}")
  if target == "gpu":
    for name, d in (("head_dim", head_dim), ("v head_dim", v_head_dim)):
      if not is_triton_tile(d):
        raise ValueError(
            f"attention: implementation='pallas' on GPU expected a power-of-two {name} >= 16 "
            f"(Triton tiles), got {d}; use implementation='xla'")


def _div(x, y: int):
  """Integer division of non-negative program indices. `lax.div` truncates, which equals floor
  here, and avoids the sign ops of `//` that Mosaic TPU lowers only with a real TPU attached."""
  return lax.div(x, jnp.int32(y))


def _causal_key_blocks(qi, block_q, block_k, num_k_blocks):
  """Number of key blocks that query block `qi` sees under the causal mask."""
  return jnp.minimum(num_k_blocks, _div((qi + 1) * block_q + block_k - 1, block_k))


def _fwd_kernel(q_ref, k_ref, v_ref, bias_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *, scale,
                causal, kv_len, block_q, block_k, num_k_blocks):
  qi = pl.program_id(2)
  q = q_ref[...]                                                    # [bq, D]
  q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  q_seg = None if q_seg_ref is None else q_seg_ref[...]             # [bq, 1]

  def body(j, carry):
    m, l, acc = carry
    start = pl.multiple_of(j * block_k, block_k)
    kb = k_ref[pl.ds(start, block_k), :]                            # [bk, D]
    vb = v_ref[pl.ds(start, block_k), :]                            # [bk, Dv]
    s = tile_dot(q, kb, (1, 1)) * scale                             # [bq, bk]
    if bias_ref is not None:
      s = s + bias_ref[:, pl.ds(start, block_k)].astype(_F32)
    k_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    mask = k_pos < kv_len
    if causal:
      mask = mask & (q_pos >= k_pos)
    if q_seg is not None:
      mask = mask & (q_seg == kv_seg_ref[:, pl.ds(start, block_k)])
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    acc = alpha * acc + tile_dot(p.astype(vb.dtype), vb, (1, 0))
    return m_new, l, acc

  m0 = jnp.full((block_q, 1), MASK_VALUE, _F32)
  l0 = jnp.zeros((block_q, 1), _F32)
  acc0 = jnp.zeros((block_q, o_ref.shape[-1]), _F32)
  if causal:  # skip key blocks entirely above the diagonal
    upper = _causal_key_blocks(qi, block_q, block_k, num_k_blocks)
  else:
    upper = num_k_blocks
  m, l, acc = lax.fori_loop(0, upper, body, (m0, l0, acc0))
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, MASK_VALUE, m + jnp.log(jnp.where(empty, 1.0, l)))


def _heads_first(x, length):
  """``[B, L, H, D]`` -> the kernels' ``[B, H, length, D]``, zero-padded to ``length`` (whole
  blocks; the padding is masked in the kernels)."""
  return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, 0)))


def _padded_bias(bias, lengths, padded):
  """The rank-4 bias broadcast over the length axes only and zero-padded to ``padded``: a bias
  shared over the batch or the heads stays so in memory (see ``_bias_spec``)."""
  if bias is None:
    return None
  (lq, lk), (lq_p, lk_p) = lengths, padded
  bias = jnp.broadcast_to(bias, (*bias.shape[:2], lq, lk))
  return jnp.pad(bias, ((0, 0), (0, 0), (0, lq_p - lq), (0, lk_p - lk)))


def _segment_columns(q_seg, kv_seg, lq_p, lk_p):
  """Padded segment ids as a [B, Lq, 1] column and a [B, 1, Lk] row: they broadcast into a
  [bq, bk] tile in the kernel, and their minor dims are full (as TPU blocks require). Nones without
  segment ids."""
  if q_seg is None:
    return [None, None]
  q_col = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, lq_p - q_seg.shape[1])))[:, :, None]
  kv_row = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, lk_p - kv_seg.shape[1])))[:, None, :]
  return [q_col, kv_row]


# BlockSpecs on a (batch, head, block) grid, where `at(i)` is the (row, column) block of program i.


def _bias_spec(bias, block, at):
  """The padded bias's ``block`` at ``at(i)``; a bias shared over the batch or the heads is read
  at index 0 of that axis by every program (None without a bias)."""
  if bias is None:
    return None
  batches, heads = bias.shape[:2]
  return pl.BlockSpec((None, None, *block),
                      lambda bi, hi, i: (bi if batches > 1 else 0, hi if heads > 1 else 0, *at(i)))


def _segment_specs(q_col, q_rows, q_at, kv_cols, kv_at):
  """The q segment column's ``q_rows`` at row block ``q_at(i)`` and the kv segment row's
  ``kv_cols`` at column block ``kv_at(i)`` (Nones without segment ids)."""
  if q_col is None:
    return [None, None]
  return [pl.BlockSpec((None, q_rows, 1), lambda bi, hi, i: (bi, q_at(i), 0)),
          pl.BlockSpec((None, 1, kv_cols), lambda bi, hi, i: (bi, 0, kv_at(i)))]


def _pallas_forward(q, k, v, bias, q_seg, kv_seg, causal, scale, block_sizes, target):
  """Runs the forward kernel on validated inputs. Returns (out [B,Lq,H,Dv], lse [B,H,Lq] f32)."""
  b, lq, h, d = q.shape
  lk, dv = k.shape[1], v.shape[3]
  bq, bk = block_for(lq, block_sizes.block_q), block_for(lk, block_sizes.block_k)
  lq_p, lk_p = round_up(lq, bq), round_up(lk, bk)
  qt, kt, vt = _heads_first(q, lq_p), _heads_first(k, lk_p), _heads_first(v, lk_p)
  bias_p = _padded_bias(bias, (lq, lk), (lq_p, lk_p))
  q_col, kv_row = _segment_columns(q_seg, kv_seg, lq_p, lk_p)
  inputs = [qt, kt, vt, bias_p, q_col, kv_row]
  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda bi, hi, qi: (bi, hi, qi, 0)),
      pl.BlockSpec((None, None, lk_p, d), lambda bi, hi, qi: (bi, hi, 0, 0)),
      pl.BlockSpec((None, None, lk_p, dv), lambda bi, hi, qi: (bi, hi, 0, 0)),
      _bias_spec(bias_p, (bq, lk_p), lambda qi: (qi, 0)),
      *_segment_specs(q_col, bq, lambda qi: qi, lk_p, lambda qi: 0),
  ]
  kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, kv_len=lk, block_q=bq,
                             block_k=bk, num_k_blocks=lk_p // bk)
  out_shape = [jax.ShapeDtypeStruct((b, h, lq_p, dv), q.dtype),
               jax.ShapeDtypeStruct((b, h, lq_p, 1), _F32)]
  out, lse = pl.pallas_call(
      with_absent_inputs(kernel, inputs),
      grid=(b, h, lq_p // bq),
      in_specs=present(in_specs),
      out_specs=[pl.BlockSpec((None, None, bq, dv), lambda bi, hi, qi: (bi, hi, qi, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda bi, hi, qi: (bi, hi, qi, 0))],
      out_shape=out_shape,
      **backend_params(target, 3),
      name="attention_fwd",
      cost_estimate=cost_estimate(2 * b * h * lq_p * lk_p * (d + dv), *present(inputs),
                                  *out_shape),
  )(*present(inputs))
  return jnp.swapaxes(out[:, :, :lq], 1, 2), lse[:, :, :lq, 0]


# --------------------------------------------------------------------------------------------------
# Pallas backward kernels: dK/dV (parallel over key blocks) and dQ/dbias (parallel over query
# blocks). Deterministic: no atomics. P is recomputed from the log-sum-exp.
# --------------------------------------------------------------------------------------------------


def _bwd_tile(q, kb, vb, do, lse, delta, bias, mask, scale):
  """Returns (p, ds) for one [bq, bk] tile, in f32 (ds is the gradient of the scaled logits)."""
  s = tile_dot(q, kb, (1, 1)) * scale
  if bias is not None:
    s = s + bias
  p = jnp.where(mask, jnp.exp(s - lse), 0.0)
  dp = tile_dot(do, vb, (1, 1))
  return p, p * (dp - delta)


def _tile_mask(q_pos, k_pos, q_len, kv_len, causal, q_seg, kv_seg):
  mask = (k_pos < kv_len) & (q_pos < q_len)
  if causal:
    mask = mask & (q_pos >= k_pos)
  if q_seg is not None:
    mask = mask & (q_seg == kv_seg)
  return mask


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref, q_seg_ref, kv_seg_ref,
                 dk_ref, dv_ref, *, scale, causal, q_len, kv_len, block_q, block_k, num_q_blocks):
  kj = pl.program_id(2)
  kb = k_ref[...]                                                    # [bk, D]
  vb = v_ref[...]                                                    # [bk, Dv]
  k_pos = kj * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]           # [1, bk]

  def body(i, carry):
    dk, dv = carry
    start = pl.multiple_of(i * block_q, block_q)
    rows = pl.ds(start, block_q)
    q, do, lse, delta = q_ref[rows, :], do_ref[rows, :], lse_ref[rows, :], delta_ref[rows, :]
    bias = None if bias_ref is None else bias_ref[rows, :].astype(_F32)
    q_pos = start + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    q_seg = None if q_seg_ref is None else q_seg_ref[rows, :]
    mask = _tile_mask(q_pos, k_pos, q_len, kv_len, causal, q_seg, kv_seg)
    p, ds = _bwd_tile(q, kb, vb, do, lse, delta, bias, mask, scale)
    dv = dv + tile_dot(p.astype(do.dtype), do, (0, 0))
    dk = dk + tile_dot(ds.astype(q.dtype), q, (0, 0))
    return dk, dv

  # Query blocks entirely above the diagonal have no work.
  lower = _div(kj * block_k, block_q) if causal else 0
  dk, dv = lax.fori_loop(lower, num_q_blocks, body,
                         (jnp.zeros(dk_ref.shape, _F32), jnp.zeros(dv_ref.shape, _F32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _zero_key_blocks(ref, block_k, num_k_blocks):
  """Zeroes a [bq, Lk] output block one key block at a time (Triton stores power-of-two tiles)."""
  def body(j, _):
    ref[:, pl.ds(pl.multiple_of(j * block_k, block_k), block_k)] = jnp.zeros(
        (ref.shape[0], block_k), ref.dtype)
    return 0
  lax.fori_loop(0, num_k_blocks, body, 0)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref, q_seg_ref, kv_seg_ref,
               dq_ref, dbias_ref=None, *, scale, causal, q_len, kv_len, block_q, block_k,
               num_k_blocks):
  """dQ of one query block; with ``dbias_ref`` (a bias per batch and head) also its dS tiles, which
  are dbias."""
  qi = pl.program_id(2)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  if dbias_ref is not None and causal:
    _zero_key_blocks(dbias_ref, block_k, num_k_blocks)  # the blocks the causal loop skips

  def body(j, dq):
    start = pl.multiple_of(j * block_k, block_k)
    keys = pl.ds(start, block_k)
    kb = k_ref[keys, :]
    vb = v_ref[keys, :]
    bias = None if bias_ref is None else bias_ref[:, keys].astype(_F32)
    k_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[:, keys]
    mask = _tile_mask(q_pos, k_pos, q_len, kv_len, causal, q_seg, kv_seg)
    _, ds = _bwd_tile(q, kb, vb, do, lse, delta, bias, mask, scale)
    if dbias_ref is not None:
      dbias_ref[:, keys] = ds.astype(dbias_ref.dtype)
    return dq + tile_dot(ds.astype(kb.dtype), kb, (1, 0))

  if causal:
    upper = _causal_key_blocks(qi, block_q, block_k, num_k_blocks)
  else:
    upper = num_k_blocks
  dq = lax.fori_loop(0, upper, body, jnp.zeros(dq_ref.shape, _F32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dbias_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref, q_seg_ref, kv_seg_ref,
                  dbias_ref, *, scale, causal, q_len, kv_len, block_q, block_k, num_k_blocks, nb,
                  nh):
  """dbias for a bias shared over batch and/or heads: one program per (bias row block), looping
  over the nb x nh (batch, head) pairs that share it, so [B, H, Lq, Lk] is never written."""
  qi = pl.program_id(3)  # grid (groups, bias batch, bias heads, query blocks)
  q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  _zero_key_blocks(dbias_ref, block_k, num_k_blocks)
  if causal:
    upper = _causal_key_blocks(qi, block_q, block_k, num_k_blocks)
  else:
    upper = num_k_blocks

  def pair(t, _):
    # Python-side special case: Triton's lowering of `t % 1` trips over the folded constant.
    bi, hi = (_div(t, nh), lax.rem(t, jnp.int32(nh))) if nh > 1 else (t, 0)
    q = q_ref[bi, hi]
    do = do_ref[bi, hi]
    lse = lse_ref[bi, hi]
    delta = delta_ref[bi, hi]
    q_seg = None if q_seg_ref is None else q_seg_ref[bi]

    def body(j, _):
      start = pl.multiple_of(j * block_k, block_k)
      keys = pl.ds(start, block_k)
      kb = k_ref[bi, hi, keys, :]
      vb = v_ref[bi, hi, keys, :]
      bias = bias_ref[:, keys].astype(_F32)
      k_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
      kv_seg = None if kv_seg_ref is None else kv_seg_ref[bi, :, keys]
      mask = _tile_mask(q_pos, k_pos, q_len, kv_len, causal, q_seg, kv_seg)
      _, ds = _bwd_tile(q, kb, vb, do, lse, delta, bias, mask, scale)
      dbias_ref[:, keys] += ds.astype(dbias_ref.dtype)
      return 0

    lax.fori_loop(0, upper, body, 0)
    return 0

  lax.fori_loop(0, nb * nh, pair, 0)


_MAX_PAIRS_PER_PROGRAM = 16  # (batch, head) pairs a dbias program sums


def _pallas_backward(q, k, v, bias, q_seg, kv_seg, out, lse, do, causal, scale, sizes, target):
  """dq, dk, dv, dbias (dbias summed over the axes the bias was broadcast along)."""
  lq, lk = q.shape[1], k.shape[1]
  bq_dkv, bk_dkv = block_for(lq, sizes.block_q_dkv), block_for(lk, sizes.block_k_dkv)
  bq_dq, bk_dq = block_for(lq, sizes.block_q_dq), block_for(lk, sizes.block_k_dq)
  # One padding for both passes: whole blocks of either pass's tiles.
  lq_p, lk_p = round_up(lq, math.lcm(bq_dkv, bq_dq)), round_up(lk, math.lcm(bk_dkv, bk_dq))
  qt, do_t = _heads_first(q, lq_p), _heads_first(do, lq_p)
  kt, vt = _heads_first(k, lk_p), _heads_first(v, lk_p)
  delta = jnp.sum(out.astype(_F32) * do.astype(_F32), axis=-1)      # [B, Lq, H]
  # Per-row statistics as [B, H, Lq, 1] columns (TPU blocks need full or (8, 128)-aligned minor
  # dims).
  delta = jnp.pad(jnp.swapaxes(delta, 1, 2), ((0, 0), (0, 0), (0, lq_p - lq)))[..., None]
  lse_p = jnp.pad(lse, ((0, 0), (0, 0), (0, lq_p - lq)))[..., None]
  inputs = [qt, kt, vt, do_t, lse_p, delta, _padded_bias(bias, (lq, lk), (lq_p, lk_p)),
            *_segment_columns(q_seg, kv_seg, lq_p, lk_p)]
  flags = dict(scale=scale, causal=causal, q_len=lq, kv_len=lk)

  dk, dv = _dkdv_call(inputs, bq_dkv, bk_dkv, flags, target)
  # A bias shared over the batch or the heads gets its dbias from a kernel of its own.
  shared = bias is not None and ((bias.shape[0] == 1 and q.shape[0] > 1)
                                 or (bias.shape[1] == 1 and q.shape[2] > 1))
  dq, ds = _dq_call(inputs, bq_dq, bk_dq, flags, target,
                    write_dbias=bias is not None and not shared)
  if shared:
    ds = _shared_dbias_call(inputs, bq_dq, bk_dq, flags, target)
  dbias = None
  if bias is not None:
    ds = ds[:, :, :lq, :lk]
    axes = tuple(i for i in range(4) if bias.shape[i] == 1 and ds.shape[i] != 1)
    dbias = jnp.sum(ds, axis=axes, keepdims=True).astype(bias.dtype)
  unpad = lambda x, n: jnp.swapaxes(x[:, :, :n], 1, 2)
  return unpad(dq, lq), unpad(dk, lk), unpad(dv, lk), dbias


def _tile_flops(inputs):
  """Flops of one pass's matmuls over every [q, k] tile: the scores and dP (or the output)."""
  qt, kt, vt = inputs[:3]
  b, h, lq_p, d = qt.shape
  return 2 * b * h * lq_p * kt.shape[2] * (d + vt.shape[3])


def _dkdv_call(inputs, block_q, block_k, flags, target):
  """dK, dV: one program per key block, looping over query blocks."""
  qt, kt, vt, _, _, _, bias, q_col, _ = inputs
  b, h, lq_p, d = qt.shape
  lk_p, dv = kt.shape[2], vt.shape[3]
  whole_q = lambda dd: pl.BlockSpec((None, None, lq_p, dd), lambda bi, hi, j: (bi, hi, 0, 0))
  key_block = lambda dd: pl.BlockSpec((None, None, block_k, dd), lambda bi, hi, j: (bi, hi, j, 0))
  row_stats = pl.BlockSpec((None, None, lq_p, 1), lambda bi, hi, j: (bi, hi, 0, 0))
  in_specs = [whole_q(d), key_block(d), key_block(dv), whole_q(dv), row_stats, row_stats,
              _bias_spec(bias, (lq_p, block_k), lambda j: (0, j)),
              *_segment_specs(q_col, lq_p, lambda j: 0, block_k, lambda j: j)]
  out_shape = [jax.ShapeDtypeStruct(kt.shape, kt.dtype), jax.ShapeDtypeStruct(vt.shape, vt.dtype)]
  kernel = functools.partial(_dkdv_kernel, num_q_blocks=lq_p // block_q, block_q=block_q,
                             block_k=block_k, **flags)
  return pl.pallas_call(
      with_absent_inputs(kernel, inputs),
      grid=(b, h, lk_p // block_k),
      in_specs=present(in_specs),
      out_specs=[key_block(d), key_block(dv)],
      out_shape=out_shape,
      **backend_params(target, 3),
      name="attention_bwd_dkdv",
      # matmuls per tile: s, dp, dv, dk
      cost_estimate=cost_estimate(2 * _tile_flops(inputs), *present(inputs), *out_shape),
  )(*present(inputs))


def _dq_call(inputs, block_q, block_k, flags, target, write_dbias):
  """dQ (and, ``write_dbias``, the dS tiles, which are dbias when the bias is per batch and head):
  one program per query block, looping over key blocks. Returns (dq, ds or None)."""
  qt, kt, vt, _, _, _, bias, q_col, _ = inputs
  b, h, lq_p, d = qt.shape
  lk_p, dv = kt.shape[2], vt.shape[3]
  query_block = lambda dd: pl.BlockSpec((None, None, block_q, dd),
                                        lambda bi, hi, i: (bi, hi, i, 0))
  whole_k = lambda dd: pl.BlockSpec((None, None, lk_p, dd), lambda bi, hi, i: (bi, hi, 0, 0))
  row_stats = pl.BlockSpec((None, None, block_q, 1), lambda bi, hi, i: (bi, hi, i, 0))
  in_specs = [query_block(d), whole_k(d), whole_k(dv), query_block(dv), row_stats, row_stats,
              _bias_spec(bias, (block_q, lk_p), lambda i: (i, 0)),
              *_segment_specs(q_col, block_q, lambda i: i, lk_p, lambda i: 0)]
  out_specs, out_shape = [query_block(d)], [jax.ShapeDtypeStruct(qt.shape, qt.dtype)]
  if write_dbias:
    out_specs.append(pl.BlockSpec((None, None, block_q, lk_p), lambda bi, hi, i: (bi, hi, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, lq_p, lk_p), _F32))
  kernel = functools.partial(_dq_kernel, num_k_blocks=lk_p // block_k, block_q=block_q,
                             block_k=block_k, **flags)
  dq, *ds = pl.pallas_call(
      with_absent_inputs(kernel, inputs),
      grid=(b, h, lq_p // block_q),
      in_specs=present(in_specs),
      out_specs=out_specs,
      out_shape=out_shape,
      **backend_params(target, 3),
      name="attention_bwd_dq",
      # matmuls per tile: s, dp, dq
      cost_estimate=cost_estimate(1.5 * _tile_flops(inputs), *present(inputs), *out_shape),
  )(*present(inputs))
  return dq, (ds[0] if ds else None)


def _shared_dbias_call(inputs, block_q, block_k, flags, target):
  """dbias of a bias shared over batch and/or heads, ``[bias batch, bias heads, Lq, Lk]``: each
  program sums the dS tiles of `per_b x nh` (batch, head) pairs for one bias row block; the
  `groups` partials are summed here. Exactly one of `g` (batch groups, when the bias is shared over
  the batch) and `bi` (per-batch bias) is nonzero, so `g + bi` is the batch block either way."""
  qt, kt, vt, _, _, _, bias, q_col, _ = inputs
  b, h, lq_p, d = qt.shape
  lk_p, dv = kt.shape[2], vt.shape[3]
  bb, bh = bias.shape[:2]
  nh = h if bh == 1 else 1
  per_b = largest_divisor(b, _MAX_PAIRS_PER_PROGRAM) if bb == 1 else 1
  groups = b // per_b if bb == 1 else 1
  group_q = lambda dd: pl.BlockSpec((per_b, nh, block_q, dd),
                                    lambda g, bi, hi, i: (g + bi, hi, i, 0))
  group_k = lambda dd: pl.BlockSpec((per_b, nh, lk_p, dd), lambda g, bi, hi, i: (g + bi, hi, 0, 0))
  group_rows = pl.BlockSpec((per_b, nh, block_q, 1), lambda g, bi, hi, i: (g + bi, hi, i, 0))
  in_specs = [group_q(d), group_k(d), group_k(dv), group_q(dv), group_rows, group_rows,
              pl.BlockSpec((None, None, block_q, lk_p), lambda g, bi, hi, i: (bi, hi, i, 0))]
  if q_col is not None:
    in_specs += [pl.BlockSpec((per_b, block_q, 1), lambda g, bi, hi, i: (g + bi, i, 0)),
                 pl.BlockSpec((per_b, 1, lk_p), lambda g, bi, hi, i: (g + bi, 0, 0))]
  partials_shape = jax.ShapeDtypeStruct((groups, bb, bh, lq_p, lk_p), _F32)
  kernel = functools.partial(_dbias_kernel, num_k_blocks=lk_p // block_k, nb=per_b, nh=nh,
                             block_q=block_q, block_k=block_k, **flags)
  partials = pl.pallas_call(
      with_absent_inputs(kernel, inputs),
      grid=(groups, bb, bh, lq_p // block_q),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, None, block_q, lk_p),
                             lambda g, bi, hi, i: (g, bi, hi, i, 0)),
      out_shape=partials_shape,
      **backend_params(target, 4),
      name="attention_bwd_dbias",
      cost_estimate=cost_estimate(_tile_flops(inputs), *present(inputs), partials_shape),
  )(*present(inputs))
  return jnp.sum(partials, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _pallas_attention(q, k, v, bias, q_seg, kv_seg, causal, scale, block_sizes, target):
  return _pallas_forward(q, k, v, bias, q_seg, kv_seg, causal, scale, block_sizes, target)[0]


def _pallas_attention_fwd(q, k, v, bias, q_seg, kv_seg, causal, scale, block_sizes, target):
  out, lse = _pallas_forward(q, k, v, bias, q_seg, kv_seg, causal, scale, block_sizes, target)
  return out, (q, k, v, bias, q_seg, kv_seg, out, lse)


def _pallas_attention_bwd(causal, scale, block_sizes, target, res, do):
  q, k, v, bias, q_seg, kv_seg, out, lse = res
  dq, dk, dv, dbias = _pallas_backward(q, k, v, bias, q_seg, kv_seg, out, lse, do, causal, scale,
                                       block_sizes, target)
  return dq, dk, dv, dbias, None, None


_pallas_attention.defvjp(_pallas_attention_fwd, _pallas_attention_bwd)


def attention_pallas(q, k, v, *, bias=None, segment_ids=None, causal=False, scale=None,
                     block_sizes=None, block_q=None, block_k=None, target=None):
  """Pallas flash-attention forward (online softmax over key blocks) with a ``custom_vjp``.

  Same semantics as ``attention_reference``. Lengths that are not a multiple of the block (49,
  197) are padded and the padding is masked inside the kernel. ``target``: ``"interpret"``,
  ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic); None is the platform's (the interpreter on CPU).
  ``block_sizes``: the largest tiles of each pass, a ``BlockSizes`` (None: ``BlockSizes.default``,
  64 on GPU and in the interpreter, 128 on TPU); or ``block_q``/``block_k``, the query/key tiles
  of every pass.

  Residuals are (q, k, v, bias, segment ids, out, lse); the backward is the Pallas dK/dV and
  dQ/dbias kernels (see the module docstring). On GPU the compiled kernels are not yet validated on
  a device.
  """
  arrays, static = _pallas_args(q, k, v, bias, segment_ids, causal, scale, block_sizes, block_q,
                                block_k, target)
  return sharding.shard_map(lambda *a: _pallas_attention(*a, *static), _KERNEL_AXES,
                            _QKV_AXES)(*arrays)


def attention_pallas_with_lse(q, k, v, *, bias=None, segment_ids=None, causal=False, scale=None,
                              block_sizes=None, block_q=None, block_k=None, target=None):
  """Forward only: returns ``(out, lse)`` with ``lse`` ``[B, H, Lq]`` f32 (natural log)."""
  arrays, static = _pallas_args(q, k, v, bias, segment_ids, causal, scale, block_sizes, block_q,
                                block_k, target)
  return sharding.shard_map(lambda *a: _pallas_forward(*a, *static), _KERNEL_AXES,
                            (_QKV_AXES, ("batch", "heads", None)))(*arrays)


# The kernels' arrays by logical axis: q, k, v, bias, q and kv segment ids. Under a mesh they run
# per shard of the batch and the heads (sharding.shard_map), the only axes they are independent
# along; Mosaic (TPU) kernels cannot be partitioned by XLA, and Triton's are not.
_QKV_AXES = ("batch", None, "heads", None)
_KERNEL_AXES = (_QKV_AXES,) * 3 + (("batch", "heads", None, None), ("batch", None), ("batch", None))


def _pallas_args(q, k, v, bias, segment_ids, causal, scale, block_sizes, block_q, block_k, target):
  """Validated positional arguments of the Pallas forward/custom_vjp: (arrays, static ones)."""
  bias, q_seg, kv_seg = _validate(q, k, v, bias, segment_ids)
  target = default_target() if target is None else target
  _check_pallas_supported(target, q.shape[-1], v.shape[-1])
  block_sizes = _block_sizes(target, block_sizes, block_q, block_k)
  return ((q, k, v, bias, q_seg, kv_seg),
          (bool(causal), default_scale(scale, q.shape[-1]), block_sizes, target))


# --------------------------------------------------------------------------------------------------
# jax's TPU flash attention
# --------------------------------------------------------------------------------------------------

_TPU_FLASH_BLOCK = 128  # its default blocks, which the lengths must be multiples of


def attention_tpu_flash(q, k, v, *, bias=None, segment_ids=None, causal=False, scale=None):
  """``attention`` through jax's TPU flash attention, per shard of the batch and the heads.

  Its layout is ``[B, H, L, D]`` (q, k, v are transposed in and out) and its bias is
  ``[B, H, Lq, Lk]``: a bias shared over the batch or heads is broadcast per shard, and its gradient
  summed back by the broadcast's transpose. f32 inputs run at the TPU's default matmul precision,
  as XLA's own f32 dots do there; the Pallas kernel above runs them at full precision.
  """
  bias, q_seg, kv_seg = _validate(q, k, v, bias, segment_ids)
  reason = _tpu_flash_shape_reason(q, k, v)
  if reason:
    raise ValueError(f"attention_tpu_flash: {reason}")
  flash = functools.partial(_tpu_flash, causal=bool(causal),
                            scale=default_scale(scale, q.shape[-1]))
  return sharding.shard_map(flash, _KERNEL_AXES, _QKV_AXES)(q, k, v, bias, q_seg, kv_seg)


def _tpu_flash(q, k, v, bias, q_seg, kv_seg, *, causal, scale):
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  (b, lq, h, _), lk = q.shape, k.shape[1]
  if bias is not None:  # it scales q k^T + bias; this op adds the bias after the scale
    bias = jnp.broadcast_to(bias.astype(_F32) / scale, (b, h, lq, lk))
  segments = None if q_seg is None else tpu_flash.SegmentIds(q=q_seg, kv=kv_seg)
  out = heads_first(tpu_flash.flash_attention(heads_first(q), heads_first(k), heads_first(v), bias,
                                              segments, causal=causal, sm_scale=scale))
  if q_seg is None:  # with top-left causal masking alone, every query sees key 0
    return out
  # A query none of whose keys is unmasked gets the mean of v there; this op's rows give 0.
  seen = q_seg[:, :, None] == kv_seg[:, None, :]
  if causal:
    seen = seen & (jnp.arange(lq)[:, None] >= jnp.arange(lk)[None, :])
  return jnp.where(jnp.any(seen, axis=-1)[:, :, None, None], out, 0).astype(out.dtype)


def _tpu_flash_shape_reason(q, k, v) -> str | None:
  if v.shape[-1] != q.shape[-1]:
    return (f"jax's TPU flash attention needs equal q and v head dims, got {q.shape[-1]}, "
            f"{v.shape[-1]}")
  if q.shape[1] % _TPU_FLASH_BLOCK or k.shape[1] % _TPU_FLASH_BLOCK:
    return (f"jax's TPU flash attention needs lengths that are multiples of {_TPU_FLASH_BLOCK}, "
            f"got q_len {q.shape[1]}, kv_len {k.shape[1]}")
  return None


def _tpu_flash_reason(q, k, v) -> str | None:
  if dispatch.platform() != "tpu":
    return f"jax's TPU flash attention needs a TPU, the platform is {dispatch.platform()}"
  return _tpu_flash_shape_reason(q, k, v)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def _cudnn_reason(q, k, v, bias, segment_ids) -> str | None:
  """Why ``jax.nn.dot_product_attention(implementation="cudnn")`` cannot serve the call."""
  if dispatch.platform() != "gpu":
    return f"cuDNN needs an NVIDIA GPU, the platform is {dispatch.platform()}"
  capability = dispatch.compute_capability() or (9, 0)  # a CPU tracing for a GPU: Hopper
  if capability < (8, 0):
    return (f"cuDNN's fused attention needs compute capability 8.0 (Ampere) or later, got "
            f"{capability}")
  if q.dtype not in _CUDNN_DTYPES:
    return f"cuDNN needs float16/bfloat16 inputs, got {q.dtype}"
  d, dv = q.shape[-1], v.shape[-1]
  max_d = 256 if capability >= (9, 0) else 128
  if d != dv or d % 8 or d > max_d:
    return (f"cuDNN needs equal q/v head dims, a multiple of 8 and <= {max_d} on compute "
            f"capability {capability}, got {d} and {dv}")
  if segment_ids is not None:
    return "cuDNN takes no segment ids here"
  if q.shape[1] % 2 or k.shape[1] % 2:
    # jax's cuDNN gradient takes its own stand-in for bias=None as a bias, and a bias gradient
    # needs even lengths; whether a gradient will be taken is not known here.
    return (f"cuDNN's gradient needs even lengths, got q_len {q.shape[1]}, kv_len {k.shape[1]}")
  return None


def _pallas_reason(q, v) -> str | None:
  try:
    _check_pallas_supported(default_target(), q.shape[-1], v.shape[-1])
  except ValueError as e:
    return str(e)
  return None


def attention(q, k, v, *, bias=None, segment_ids=None, causal=False, scale=None,
              implementation=None):
  """Softmax attention, layout ``[B, L, H, D]``; see ``attention_reference`` for the semantics.

  ``implementation``:

  * ``None``: the best that serves the call on this platform (``ops.dispatch``): on GPU cuDNN
    (through ``jax.nn.dot_product_attention``) when it supports the case (bf16/f16, head dim a
    multiple of 8 up to 256, no segment ids, even lengths), else the Pallas kernel,
    else the reference; on TPU jax's flash attention when the lengths are multiples of 128, else
    the Pallas kernel; on CPU the reference (never interpret mode).
  * ``"xla"``: the jnp reference. ``"pallas"``: the Pallas kernel (interpret mode on CPU).
    ``"cudnn"``: cuDNN. ``"tpu_flash"``: jax's TPU flash attention. A named implementation that
    cannot serve the call raises ValueError.
  """
  reasons = {
      "xla": lambda: None,
      "pallas": lambda: _pallas_reason(q, v),
      "cudnn": lambda: _cudnn_reason(q, k, v, bias, segment_ids),
      "tpu_flash": lambda: _tpu_flash_reason(q, k, v),
  }
  chosen = dispatch.choose("attention", implementation, reasons)
  if chosen == "cudnn":
    bias, _, _ = _validate(q, k, v, bias, None)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=causal,
                                        implementation="cudnn")
  if chosen == "tpu_flash":
    return attention_tpu_flash(q, k, v, bias=bias, segment_ids=segment_ids, causal=causal,
                               scale=scale)
  if chosen == "xla":
    return attention_reference(q, k, v, bias=bias, segment_ids=segment_ids, causal=causal,
                               scale=scale)
  return attention_pallas(q, k, v, bias=bias, segment_ids=segment_ids, causal=causal,
                          scale=scale)
