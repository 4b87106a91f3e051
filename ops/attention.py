"""Softmax attention with an additive bias, causal masking and segment ids.

Layout ``[B, L, H, D]`` as in ``jax.nn.dot_product_attention``. Semantics::

    out = softmax(scale * q @ k^T + bias, masked) @ v

The bias is added *after* the scale (MaxViT / Swin relative-position bias semantics), and is
broadcastable to ``[B, H, Lq, Lk]``. A query row whose keys are all masked returns 0.

Implementations:

* ``attention_reference``: jnp, f32 math with ``precision=HIGHEST``. The spec and the CPU path.
* ``attention_pallas``: a ``pl.pallas_call`` forward kernel (online softmax over key blocks) wrapped
  in a ``jax.custom_vjp``. Its backward is currently the autodiff of the reference recomputed from
  the residuals (q, k, v, bias, segment ids); a Pallas backward kernel (dq, dk, dv, dbias reduced over
  the broadcast axes) is the next step.
* ``attention(..., implementation=None | "xla" | "pallas")`` dispatches. ``None`` picks the reference
  on CPU and never runs interpret mode silently; ``"pallas"`` on CPU runs the kernel with
  ``interpret=True``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST
# Finite mask value, as in jax's Pallas attention kernels: fully masked rows never produce NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLEMENTATIONS = (None, "xla", "pallas")


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


def _default_scale(scale, d):
  return 1.0 / math.sqrt(d) if scale is None else float(scale)


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
  mask = jnp.ones((1, 1, lq, lk), bool)
  if causal:
    mask = mask & jnp.tril(jnp.ones((lq, lk), bool))[None, None]
  if q_seg is not None:
    mask = mask & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
  s = jnp.where(mask, s, _MASK_VALUE)
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
  return _reference(q, k, v, bias, q_seg, kv_seg, causal, _default_scale(scale, q.shape[-1]))


# --------------------------------------------------------------------------------------------------
# Pallas forward kernel
# --------------------------------------------------------------------------------------------------


def _round_up(x, m):
  return (x + m - 1) // m * m


def _block_size(length, block):
  """Power-of-two block (Triton loads need power-of-two tiles), at least 16, at most ``block``."""
  return min(block, max(16, 1 << (length - 1).bit_length()))


def _check_pallas_supported(backend, interpret, head_dim, v_head_dim):
  """Raises ValueError for cases the compiled (non-interpret) kernel cannot lower."""
  if interpret:
    return
  if backend == "gpu":
    for name, d in (("head_dim", head_dim), ("v head_dim", v_head_dim)):
      if d < 16 or d & (d - 1):
        raise ValueError(
            f"attention: implementation='pallas' on GPU expected a power-of-two {name} >= 16 "
            f"(Triton tiles), got {d}; use implementation='xla'")


def _fwd_kernel(*refs, scale, causal, kv_len, block_q, block_k, num_k_blocks, has_bias, has_seg):
  q_ref, k_ref, v_ref, *rest = refs
  bias_ref = rest.pop(0) if has_bias else None
  qseg_ref, kseg_ref = (rest.pop(0), rest.pop(0)) if has_seg else (None, None)
  o_ref, lse_ref = rest

  qi = pl.program_id(2)
  q = q_ref[...].astype(_F32) * scale                               # [bq, D]
  q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  qseg = qseg_ref[...][:, None] if has_seg else None

  def body(j, carry):
    m, l, acc = carry
    start = pl.multiple_of(j * block_k, block_k)
    kb = k_ref[pl.ds(start, block_k), :].astype(_F32)               # [bk, D]
    vb = v_ref[pl.ds(start, block_k), :].astype(_F32)               # [bk, Dv]
    s = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                        preferred_element_type=_F32)                # [bq, bk]
    if has_bias:
      s = s + bias_ref[:, pl.ds(start, block_k)].astype(_F32)
    k_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    mask = k_pos < kv_len
    if causal:
      mask = mask & (q_pos >= k_pos)
    if has_seg:
      mask = mask & (qseg == kseg_ref[pl.ds(start, block_k)][None, :])
    s = jnp.where(mask, s, _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    acc = alpha * acc + lax.dot_general(p, vb, (((1,), (0,)), ((), ())), precision=_HIGHEST,
                                        preferred_element_type=_F32)
    return m_new, l, acc

  m0 = jnp.full((block_q, 1), _MASK_VALUE, _F32)
  l0 = jnp.zeros((block_q, 1), _F32)
  acc0 = jnp.zeros((block_q, o_ref.shape[-1]), _F32)
  if causal:  # skip key blocks entirely above the diagonal
    upper = jnp.minimum(num_k_blocks, ((qi + 1) * block_q + block_k - 1) // block_k)
  else:
    upper = num_k_blocks
  m, l, acc = lax.fori_loop(0, upper, body, (m0, l0, acc0))
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, _MASK_VALUE, m + jnp.log(jnp.where(empty, 1.0, l)))[:, 0]


def _pallas_forward(q, k, v, bias, q_seg, kv_seg, causal, scale, block_q, block_k, interpret):
  """Runs the forward kernel on validated inputs. Returns (out [B,Lq,H,Dv], lse [B,H,Lq] f32)."""
  b, lq, h, d = q.shape
  lk, dv = k.shape[1], v.shape[3]
  bq, bk = _block_size(lq, block_q), _block_size(lk, block_k)
  lq_p, lk_p = _round_up(lq, bq), _round_up(lk, bk)
  # Kernel layout [B, H, L, D]; pad lengths to whole blocks (padding is masked in the kernel).
  qt = jnp.pad(jnp.swapaxes(q, 1, 2), ((0, 0), (0, 0), (0, lq_p - lq), (0, 0)))
  kt = jnp.pad(jnp.swapaxes(k, 1, 2), ((0, 0), (0, 0), (0, lk_p - lk), (0, 0)))
  vt = jnp.pad(jnp.swapaxes(v, 1, 2), ((0, 0), (0, 0), (0, lk_p - lk), (0, 0)))

  args = [qt, kt, vt]
  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda bi, hi, qi: (bi, hi, qi, 0)),
      pl.BlockSpec((None, None, lk_p, d), lambda bi, hi, qi: (bi, hi, 0, 0)),
      pl.BlockSpec((None, None, lk_p, dv), lambda bi, hi, qi: (bi, hi, 0, 0)),
  ]
  if bias is not None:
    bb, bh = bias.shape[0], bias.shape[1]
    # Broadcast only over the length axes; batch/head broadcast stays virtual via the index map.
    bias_p = jnp.broadcast_to(bias, (bb, bh, lq, lk))
    bias_p = jnp.pad(bias_p, ((0, 0), (0, 0), (0, lq_p - lq), (0, lk_p - lk)))
    args.append(bias_p)
    in_specs.append(pl.BlockSpec(
        (None, None, bq, lk_p),
        lambda bi, hi, qi: (bi if bb > 1 else 0, hi if bh > 1 else 0, qi, 0)))
  if q_seg is not None:
    args += [jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, lq_p - lq))),
             jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, lk_p - lk)))]
    in_specs += [pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
                 pl.BlockSpec((None, lk_p), lambda bi, hi, qi: (bi, 0))]

  kernel = functools.partial(
      _fwd_kernel, scale=scale, causal=causal, kv_len=lk, block_q=bq, block_k=bk,
      num_k_blocks=lk_p // bk, has_bias=bias is not None, has_seg=q_seg is not None)
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, h, lq_p // bq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, dv), lambda bi, hi, qi: (bi, hi, qi, 0)),
                 pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi))],
      out_shape=[jax.ShapeDtypeStruct((b, h, lq_p, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq_p), _F32)],
      interpret=interpret,
      name="attention_fwd",
  )(*args)
  return jnp.swapaxes(out[:, :, :lq], 1, 2), lse[:, :, :lq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _pallas_attention(q, k, v, bias, q_seg, kv_seg, causal, scale, block_q, block_k, interpret):
  return _pallas_forward(q, k, v, bias, q_seg, kv_seg, causal, scale, block_q, block_k,
                         interpret)[0]


def _pallas_attention_fwd(q, k, v, bias, q_seg, kv_seg, causal, scale, block_q, block_k,
                          interpret):
  out, lse = _pallas_forward(q, k, v, bias, q_seg, kv_seg, causal, scale, block_q, block_k,
                             interpret)
  return out, (q, k, v, bias, q_seg, kv_seg, out, lse)


def _pallas_attention_bwd(causal, scale, block_q, block_k, interpret, res, do):
  # Backward = autodiff of the reference recomputed from the residuals. The Pallas backward
  # kernel (dq, dk, dv, dbias reduced over broadcast axes, using o and lse) is the next step.
  q, k, v, bias, q_seg, kv_seg, _, _ = res
  _, vjp = jax.vjp(
      lambda q_, k_, v_, b_: _reference(q_, k_, v_, b_, q_seg, kv_seg, causal, scale),
      q, k, v, bias)
  dq, dk, dv, dbias = vjp(do)
  return dq, dk, dv, dbias, None, None


_pallas_attention.defvjp(_pallas_attention_fwd, _pallas_attention_bwd)


def attention_pallas(q, k, v, *, bias=None, segment_ids=None, causal=False, scale=None,
                     block_q=64, block_k=64, interpret=None):
  """Pallas flash-attention forward (online softmax over key blocks) with a ``custom_vjp``.

  Same semantics as ``attention_reference``. Lengths that are not a multiple of the block (49,
  197) are padded and the padding is masked inside the kernel. ``interpret=None`` means
  ``interpret=True`` on CPU.

  The backward pass is, for now, the autodiff of the jnp reference recomputed from the residuals
  (q, k, v, bias, segment ids); the residuals also keep the output and log-sum-exp for the Pallas
  backward kernel (dq, dk, dv, dbias), which is the next step.
  """
  bias, q_seg, kv_seg = _validate(q, k, v, bias, segment_ids)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  _check_pallas_supported(jax.default_backend(), interpret, q.shape[-1], v.shape[-1])
  return _pallas_attention(q, k, v, bias, q_seg, kv_seg, bool(causal),
                           _default_scale(scale, q.shape[-1]), int(block_q), int(block_k),
                           bool(interpret))


def attention_pallas_with_lse(q, k, v, *, bias=None, segment_ids=None, causal=False, scale=None,
                              block_q=64, block_k=64, interpret=None):
  """Forward only: returns ``(out, lse)`` with ``lse`` ``[B, H, Lq]`` f32 (natural log)."""
  bias, q_seg, kv_seg = _validate(q, k, v, bias, segment_ids)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  _check_pallas_supported(jax.default_backend(), interpret, q.shape[-1], v.shape[-1])
  return _pallas_forward(q, k, v, bias, q_seg, kv_seg, bool(causal),
                         _default_scale(scale, q.shape[-1]), int(block_q), int(block_k),
                         bool(interpret))


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def attention(q, k, v, *, bias=None, segment_ids=None, causal=False, scale=None,
              implementation=None):
  """Softmax attention, layout ``[B, L, H, D]``; see ``attention_reference`` for the semantics.

  ``implementation``: ``None`` picks the reference ("xla") on CPU and the Pallas kernel elsewhere
  (never interpret mode); ``"xla"`` is the jnp reference; ``"pallas"`` is the Pallas kernel, run
  with ``interpret=True`` on CPU.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention: expected implementation in {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation is None:
    implementation = "xla" if jax.default_backend() == "cpu" else "pallas"
  if implementation == "xla":
    return attention_reference(q, k, v, bias=bias, segment_ids=segment_ids, causal=causal,
                               scale=scale)
  return attention_pallas(q, k, v, bias=bias, segment_ids=segment_ids, causal=causal,
                          scale=scale)
