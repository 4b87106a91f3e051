"""BiFormer's bi-level routing attention (BRA) on ``[B, H, W, C]`` maps (Zhu et al., CVPR 2023).

Semantics of the official ``ops/bra_legacy.py`` with ``kv_downsample_mode='identity'`` (every
released model):

1. **Regions.** The map is cut into ``n_win x n_win`` regions of ``(H / n_win) x (W / n_win)``
   tokens, numbered row-major (``p = row * n_win + col``), tokens row-major inside a region.
2. **Routing.** A region's query and key are the means of ``q`` and ``k`` over its tokens, over the
   full qk width (one routing shared by all heads). The region affinity ``(scale q_r) k_r^T`` picks,
   for every query region, its ``topk`` key regions (``lax.top_k``: highest first). A region is not
   forced to route to itself. No gradient goes through the routing (the official code detaches
   ``q_r`` and ``k_r``; the indices are integers).
3. **Token attention.** Per head, each query region's tokens attend to the tokens of its ``topk``
   routed regions: ``softmax(scale q k^T) v`` over ``topk * w^2`` keys. Heads split the channels
   head-major (``(m c)``): q and k into ``qk_dim / num_heads``, v into ``dim / num_heads``.

``q`` and ``k`` have ``qk_dim`` channels, ``v`` has ``dim`` (equal in the released models). The
scale is ``qk_dim ** -0.5``, the *full* qk width and not the head width, in both the routing and the
token attention: the official code does this (a per-head scale sharpens attention by
``sqrt(num_heads)``). The LCE/LePE convolution and the projections belong to the model, not here.

Implementations:

* ``routing_attention_reference``: jnp, f32 math with ``precision=HIGHEST``; gathers the routed
  regions' K/V into ``[B, heads, regions, topk * w^2, d]`` as the official code does. The spec.
* ``routing_attention_pallas``: a ``pl.pallas_call`` forward kernel, one program per (batch, head,
  query region), that reads the routed K/V regions by index inside the kernel (the top-k table is an
  input block; each loop step concatenates ``group`` routed region tiles into one key tile of about
  ``block_k`` rows, e.g. the 16 routed 2x2 regions of BiFormer stage 3 into one 64-row tile) with an
  online softmax, so the gathered ``topk``-fold K/V never exists in memory. A ``custom_vjp`` whose
  backward is two Pallas kernels: dQ per query region (the same loop over routed regions), and
  dK/dV per *key* region over an inverse routing table (the query regions that routed to it, in
  ascending order). Each dK/dV tile is written by exactly one program, summing in a fixed order:
  deterministic without atomics, and without the ``topk``-fold partial sums that per-(query region,
  slot) outputs would need. P is recomputed from the log-sum-exp.
* ``routing_attention(..., implementation=None | "xla" | "pallas")`` dispatches. ``None`` is the
  reference (on CPU interpret mode is never picked silently; on devices until the compiled kernel is
  validated there); ``"pallas"`` runs the kernel, with ``interpret=True`` on CPU.

On TPU the top-k table would go through ``PrefetchScalarGridSpec`` so that index maps fetch only
the routed regions; that variant is not written yet.
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
# Finite mask value, as in jax's Pallas attention kernels: a fully masked tile never produces NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLEMENTATIONS = (None, "xla", "pallas")


# --------------------------------------------------------------------------------------------------
# Validation and layout
# --------------------------------------------------------------------------------------------------


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _validate(q, k, v, *, num_heads, n_win, topk):
  """Checks shapes and settings (``v``/``num_heads`` may be None where they are not used)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x is not None and x.ndim != 4:
      raise ValueError(
          f"routing_attention: expected {name} of rank 4 [batch, height, width, channels], "
          f"got shape {tuple(x.shape)}")
  if k.shape != q.shape:
    raise ValueError(
        f"routing_attention: expected k of the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
  if v is not None and v.shape[:3] != q.shape[:3]:
    raise ValueError(
        f"routing_attention: expected v with the batch, height and width of q "
        f"{tuple(q.shape[:3])}, got {tuple(v.shape)}")
  if not _is_int(n_win) or n_win < 1:
    raise ValueError(f"routing_attention: expected n_win a positive int, got {n_win!r}")
  height, width = q.shape[1:3]
  if height % n_win or width % n_win:
    raise ValueError(
        f"routing_attention: expected height and width divisible by n_win={n_win}, got "
        f"{height}x{width}; pad the map first (BiFormer's auto_pad pads the block input)")
  if not _is_int(topk) or not 1 <= topk <= n_win * n_win:
    raise ValueError(
        f"routing_attention: expected topk an int in [1, n_win**2 = {n_win * n_win}], got {topk!r}")
  if num_heads is not None:
    if not _is_int(num_heads) or num_heads < 1:
      raise ValueError(f"routing_attention: expected num_heads a positive int, got {num_heads!r}")
    for name, c in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
      if c % num_heads:
        raise ValueError(
            f"routing_attention: expected {name} channels divisible by num_heads={num_heads}, "
            f"got {c}")


def _default_scale(scale, qk_dim):
  return 1.0 / math.sqrt(qk_dim) if scale is None else float(scale)


def _to_regions(x, n_win, num_heads):
  """``[B, H, W, C]`` -> ``[B, heads, n_win**2, tokens per region, C / heads]``."""
  b, h, w, c = x.shape
  x = x.reshape(b, n_win, h // n_win, n_win, w // n_win, num_heads, c // num_heads)
  x = x.transpose(0, 5, 1, 3, 2, 4, 6)                     # b, head, row, col, r_h, r_w, d
  return x.reshape(b, num_heads, n_win * n_win, (h // n_win) * (w // n_win), c // num_heads)


def _from_regions(x, n_win, height, width):
  """Inverse of ``_to_regions``: ``[B, heads, regions, tokens, d]`` -> ``[B, H, W, heads * d]``."""
  b, m, _, _, d = x.shape
  x = x.reshape(b, m, n_win, n_win, height // n_win, width // n_win, d)
  x = x.transpose(0, 2, 4, 3, 5, 1, 6)                     # b, row, r_h, col, r_w, head, d
  return x.reshape(b, height, width, m * d)


# --------------------------------------------------------------------------------------------------
# Routing and reference
# --------------------------------------------------------------------------------------------------


def region_routes(q, k, *, n_win, topk, scale=None):
  """The routing step alone: ``int32 [B, n_win**2, topk]``, the key regions of each query region.

  Region means of ``q`` and ``k`` over the full qk width, affinity ``(scale q_r) k_r^T``, top-k
  (highest first). ``scale`` defaults to ``qk_dim ** -0.5``. No gradient flows through it.
  """
  _validate(q, k, None, num_heads=None, n_win=n_win, topk=topk)
  b, height, width, c = q.shape
  scale = _default_scale(scale, c)

  def region_means(x):
    x = lax.stop_gradient(x).astype(_F32)
    x = x.reshape(b, n_win, height // n_win, n_win, width // n_win, c)
    return x.mean(axis=(2, 4)).reshape(b, n_win * n_win, c)

  logits = jnp.einsum("bpc,brc->bpr", region_means(q) * scale, region_means(k), precision=_HIGHEST)
  return lax.top_k(logits, topk)[1].astype(jnp.int32)


def _reference(q, k, v, routes, num_heads, n_win, scale):
  """Gather-then-attend on validated inputs, as the official code (f32, HIGHEST)."""
  height, width = q.shape[1:3]
  qr, kr, vr = (_to_regions(x.astype(_F32), n_win, num_heads) for x in (q, k, v))
  # [heads, regions, tokens, d] and [regions, topk] -> [heads, regions, topk, tokens, d]
  gather = jax.vmap(lambda x, r: x[:, r])
  kg, vg = gather(kr, routes), gather(vr, routes)
  b, m, p, t, w2 = kg.shape[:5]
  kg = kg.reshape(b, m, p, t * w2, kg.shape[-1])
  vg = vg.reshape(b, m, p, t * w2, vg.shape[-1])
  s = jnp.einsum("bmpqd,bmpkd->bmpqk", qr, kg, precision=_HIGHEST) * scale
  out = jnp.einsum("bmpqk,bmpkd->bmpqd", jax.nn.softmax(s, axis=-1), vg, precision=_HIGHEST)
  return _from_regions(out, n_win, height, width).astype(q.dtype)


def routing_attention_reference(q, k, v, *, num_heads, n_win, topk, scale=None):
  """Bi-level routing attention in jnp (see the module docstring for the semantics).

  Args:
    q, k: ``[B, H, W, qk_dim]``.
    v: ``[B, H, W, dim]``.
    num_heads: heads; divides ``qk_dim`` and ``dim``.
    n_win: regions per side; divides ``H`` and ``W``.
    topk: routed key regions per query region, in ``[1, n_win**2]``.
    scale: logits scale of the routing and the token attention, default ``qk_dim ** -0.5``.

  Returns:
    ``[B, H, W, dim]`` in ``q.dtype``.
  """
  _validate(q, k, v, num_heads=num_heads, n_win=n_win, topk=topk)
  scale = _default_scale(scale, q.shape[-1])
  routes = region_routes(q, k, n_win=n_win, topk=topk, scale=scale)
  return _reference(q, k, v, routes, num_heads, n_win, scale)


# --------------------------------------------------------------------------------------------------
# Pallas kernels. Layout: [B, heads, regions, padded tokens, d], one region per tile; the tokens of
# a region are padded to a power of two and masked. Each kernel loops over region ids read from an
# index table, and gathers `group` region tiles into one tile per step.
# --------------------------------------------------------------------------------------------------


def _next_pow2(n):
  return 1 << (n - 1).bit_length()


def _round_up(x, m):
  return (x + m - 1) // m * m


def _group(block_k, padded, count):
  """Region tiles per loop step: about ``block_k`` rows, no more than the regions there are."""
  return min(max(1, block_k // padded), _next_pow2(count))


def _gather_tiles(ref, ids):
  """Concatenates ``ref[i]`` for the traced region ids along the token axis (in-kernel gather)."""
  return jnp.concatenate([ref[i] for i in ids], axis=0)


def _dot(a, b, contract):
  return lax.dot_general(a, b, (contract, ((), ())), precision=_HIGHEST,
                         preferred_element_type=_F32)


def _check_pallas_supported(backend, interpret, padded, head_dim, v_head_dim):
  """Raises ValueError for cases the compiled (non-interpret) kernel cannot lower."""
  if interpret or backend != "gpu":
    return
  for name, d in (("qk head_dim", head_dim), ("v head_dim", v_head_dim)):
    if d < 16 or d & (d - 1):
      raise ValueError(
          f"routing_attention: implementation='pallas' on GPU expected a power-of-two {name} >= 16 "
          f"(GPU matmul tiles), got {d}; use implementation='xla'")
  if padded < 16:
    raise ValueError(
        f"routing_attention: implementation='pallas' on GPU expected regions of >= 16 tokens "
        f"(query tile rows), got {padded}; use implementation='xla'")


def _fwd_kernel(routes_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, tokens, topk, group):
  padded = q_ref.shape[0]
  q = q_ref[...].astype(_F32) * scale                               # [padded, d]
  col = lax.broadcasted_iota(jnp.int32, (1, group * padded), 1)
  col_slot, col_token = col // padded, col % padded

  def body(step, carry):
    m, l, acc = carry
    ids = [routes_ref[step * group + g] for g in range(group)]
    kb = _gather_tiles(k_ref, ids).astype(_F32)                     # [group * padded, d]
    vb = _gather_tiles(v_ref, ids).astype(_F32)
    mask = (step * group + col_slot < topk) & (col_token < tokens)
    s = jnp.where(mask, _dot(q, kb, ((1,), (1,))), _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    acc = alpha * acc + _dot(p, vb, ((1,), (0,)))
    return m_new, l, acc

  init = (jnp.full((padded, 1), _MASK_VALUE, _F32), jnp.zeros((padded, 1), _F32),
          jnp.zeros((padded, o_ref.shape[-1]), _F32))
  m, l, acc = lax.fori_loop(0, routes_ref.shape[0] // group, body, init)
  # l > 0: slot 0 is a routed region with at least one real token.
  o_ref[...] = (acc / l).astype(o_ref.dtype)
  lse_ref[...] = (m + jnp.log(l))[:, 0]


def _dq_kernel(routes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
               tokens, topk, group):
  padded = q_ref.shape[0]
  q = q_ref[...].astype(_F32) * scale
  do = do_ref[...].astype(_F32)
  lse = lse_ref[...][:, None]
  delta = delta_ref[...][:, None]
  col = lax.broadcasted_iota(jnp.int32, (1, group * padded), 1)
  col_slot, col_token = col // padded, col % padded

  def body(step, dq):
    ids = [routes_ref[step * group + g] for g in range(group)]
    kb = _gather_tiles(k_ref, ids).astype(_F32)
    vb = _gather_tiles(v_ref, ids).astype(_F32)
    mask = (step * group + col_slot < topk) & (col_token < tokens)
    p = jnp.where(mask, jnp.exp(_dot(q, kb, ((1,), (1,))) - lse), 0.0)
    ds = p * (_dot(do, vb, ((1,), (1,))) - delta)
    return dq + _dot(ds, kb, ((1,), (0,)))

  dq = lax.fori_loop(0, routes_ref.shape[0] // group, body, jnp.zeros(dq_ref.shape, _F32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(inverse_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 scale, tokens, group):
  """One key region: loops over the query regions that routed to it (ascending, then -1)."""
  padded = k_ref.shape[0]
  kb = k_ref[...].astype(_F32)                                       # [padded, d]
  vb = v_ref[...].astype(_F32)
  count = jnp.sum((inverse_ref[...] >= 0).astype(jnp.int32))
  row = lax.broadcasted_iota(jnp.int32, (group * padded, 1), 0)
  row_slot, row_token = row // padded, row % padded
  col_valid = lax.broadcasted_iota(jnp.int32, (1, padded), 1) < tokens

  def body(step, carry):
    dk, dv = carry
    ids = [jnp.maximum(inverse_ref[step * group + g], 0) for g in range(group)]
    qb = _gather_tiles(q_ref, ids).astype(_F32) * scale              # [group * padded, d]
    dob = _gather_tiles(do_ref, ids).astype(_F32)
    lse = _gather_tiles(lse_ref, ids)[:, None]
    delta = _gather_tiles(delta_ref, ids)[:, None]
    mask = (step * group + row_slot < count) & (row_token < tokens) & col_valid
    p = jnp.where(mask, jnp.exp(_dot(qb, kb, ((1,), (1,))) - lse), 0.0)
    ds = p * (_dot(dob, vb, ((1,), (1,))) - delta)
    return dk + _dot(ds, qb, ((0,), (0,))), dv + _dot(p, dob, ((0,), (0,)))

  dk, dv = lax.fori_loop(0, (count + group - 1) // group, body,
                         (jnp.zeros(dk_ref.shape, _F32), jnp.zeros(dv_ref.shape, _F32)))
  dk_ref[...] = dk.astype(dk_ref.dtype)                              # q was already scaled
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _inverse_routes(routes, slots):
  """``[B, key regions, slots]``: the query regions routed to each key region, ascending, then -1.

  Top-k indices are distinct, so a query region appears at most once per key region.
  """
  regions = routes.shape[1]
  ids = jnp.arange(regions, dtype=jnp.int32)
  hit = jnp.any(routes[:, None, :, :] == ids[None, :, None, None], axis=-1)   # [B, key, query]
  order = jnp.argsort(jnp.logical_not(hit), axis=-1, stable=True).astype(jnp.int32)
  inverse = jnp.where(ids < jnp.sum(hit, axis=-1, keepdims=True), order, -1)
  return jnp.pad(inverse, ((0, 0), (0, 0), (0, slots - regions)), constant_values=-1)


def _region_specs(regions, padded, d):
  """BlockSpecs over the ``[B, heads, regions, padded, d]`` layout, grid (batch, head, region)."""
  one = pl.BlockSpec((None, None, None, padded, d), lambda b, h, p: (b, h, p, 0, 0))
  every = pl.BlockSpec((None, None, regions, padded, d), lambda b, h, p: (b, h, 0, 0, 0))
  return one, every


def _pallas_forward(qr, kr, vr, routes, scale, tokens, block_k, interpret):
  """Forward on the padded region layout. Returns (out like vr, lse [B, heads, regions, padded])."""
  b, m, regions, padded, d = qr.shape
  dv, topk = vr.shape[-1], routes.shape[-1]
  group = _group(block_k, padded, topk)
  slots = _round_up(topk, group)
  routes = jnp.pad(routes, ((0, 0), (0, 0), (0, slots - topk)))    # extra slots are masked
  one_q, every_k = _region_specs(regions, padded, d)
  one_v, every_v = _region_specs(regions, padded, dv)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, tokens=tokens, topk=topk, group=group),
      grid=(b, m, regions),
      in_specs=[pl.BlockSpec((None, None, slots), lambda bi, hi, pi: (bi, pi, 0)),
                one_q, every_k, every_v],
      out_specs=[one_v,
                 pl.BlockSpec((None, None, None, padded), lambda bi, hi, pi: (bi, hi, pi, 0))],
      out_shape=[jax.ShapeDtypeStruct(vr.shape[:4] + (dv,), qr.dtype),
                 jax.ShapeDtypeStruct(qr.shape[:4], _F32)],
      interpret=interpret,
      name="routing_attention_fwd",
  )(routes, qr, kr, vr)


def _pallas_backward(qr, kr, vr, routes, out, lse, do, scale, tokens, block_k, interpret):
  b, m, regions, padded, d = qr.shape
  dv_dim, topk = vr.shape[-1], routes.shape[-1]
  delta = jnp.sum(out.astype(_F32) * do.astype(_F32), axis=-1)     # [B, heads, regions, padded]
  one_q, every_q = _region_specs(regions, padded, d)
  one_v, every_v = _region_specs(regions, padded, dv_dim)
  one_row = pl.BlockSpec((None, None, None, padded), lambda bi, hi, pi: (bi, hi, pi, 0))
  every_row = pl.BlockSpec((None, None, regions, padded), lambda bi, hi, pi: (bi, hi, 0, 0))

  # dQ: one program per query region, looping over its routed key regions.
  group = _group(block_k, padded, topk)
  slots = _round_up(topk, group)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, tokens=tokens, topk=topk, group=group),
      grid=(b, m, regions),
      in_specs=[pl.BlockSpec((None, None, slots), lambda bi, hi, pi: (bi, pi, 0)),
                one_q, every_q, every_v, one_v, one_row, one_row],
      out_specs=one_q,
      out_shape=jax.ShapeDtypeStruct(qr.shape, qr.dtype),
      interpret=interpret,
      name="routing_attention_bwd_dq",
  )(jnp.pad(routes, ((0, 0), (0, 0), (0, slots - topk))), qr, kr, vr, do, lse, delta)

  # dK, dV: one program per key region, looping over the query regions routed to it.
  group = _group(block_k, padded, regions)
  slots = _round_up(regions, group)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, scale=scale, tokens=tokens, group=group),
      grid=(b, m, regions),
      in_specs=[pl.BlockSpec((None, None, slots), lambda bi, hi, pi: (bi, pi, 0)),
                every_q, one_q, one_v, every_v, every_row, every_row],
      out_specs=[one_q, one_v],
      out_shape=[jax.ShapeDtypeStruct(kr.shape, kr.dtype),
                 jax.ShapeDtypeStruct(vr.shape, vr.dtype)],
      interpret=interpret,
      name="routing_attention_bwd_dkdv",
  )(_inverse_routes(routes, slots), qr, kr, vr, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _routed_attention(qr, kr, vr, routes, scale, tokens, block_k, interpret):
  return _pallas_forward(qr, kr, vr, routes, scale, tokens, block_k, interpret)[0]


def _routed_attention_fwd(qr, kr, vr, routes, scale, tokens, block_k, interpret):
  out, lse = _pallas_forward(qr, kr, vr, routes, scale, tokens, block_k, interpret)
  return out, (qr, kr, vr, routes, out, lse)


def _routed_attention_bwd(scale, tokens, block_k, interpret, res, do):
  qr, kr, vr, routes, out, lse = res
  dq, dk, dv = _pallas_backward(qr, kr, vr, routes, out, lse, do, scale, tokens, block_k, interpret)
  return dq, dk, dv, None                                           # no gradient for the indices


_routed_attention.defvjp(_routed_attention_fwd, _routed_attention_bwd)


def routing_attention_pallas(q, k, v, *, num_heads, n_win, topk, scale=None, block_k=64,
                             interpret=None):
  """The Pallas kernels (forward and ``custom_vjp`` backward); semantics of the reference.

  ``block_k`` (a power of two) is about the number of keys per loop step: routed regions are
  gathered ``block_k // tokens`` at a time. ``interpret=None`` means ``interpret=True`` on CPU.
  On GPU the compiled kernels are not yet validated on a device.
  """
  _validate(q, k, v, num_heads=num_heads, n_win=n_win, topk=topk)
  if not _is_int(block_k) or block_k < 1 or block_k & (block_k - 1):
    raise ValueError(f"routing_attention: expected block_k a power of two, got {block_k!r}")
  b, height, width, c = q.shape
  scale = _default_scale(scale, c)
  tokens = (height // n_win) * (width // n_win)
  padded = _next_pow2(tokens)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  _check_pallas_supported(jax.default_backend(), interpret, padded, c // num_heads,
                          v.shape[-1] // num_heads)
  routes = region_routes(q, k, n_win=n_win, topk=topk, scale=scale)

  def regions(x):
    x = _to_regions(x, n_win, num_heads)
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, padded - tokens), (0, 0)))

  out = _routed_attention(regions(q), regions(k), regions(v), routes, scale, tokens, int(block_k),
                          bool(interpret))
  return _from_regions(out[:, :, :, :tokens], n_win, height, width)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def routing_attention(q, k, v, *, num_heads, n_win, topk, scale=None, implementation=None):
  """Bi-level routing attention on ``[B, H, W, C]`` maps; see ``routing_attention_reference``.

  ``implementation``: ``None`` picks the reference ("xla"): on CPU always (never interpret mode),
  and on GPU/TPU too until the compiled Pallas kernel has been validated and timed on a device;
  ``"xla"`` is the jnp reference; ``"pallas"`` is the Pallas kernel, run with ``interpret=True`` on
  CPU, and raising ValueError for cases the compiled kernel cannot lower.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"routing_attention: expected implementation in {IMPLEMENTATIONS}, got {implementation!r}")
  kwargs = dict(num_heads=num_heads, n_win=n_win, topk=topk, scale=scale)
  if implementation == "pallas":
    return routing_attention_pallas(q, k, v, **kwargs)
  return routing_attention_reference(q, k, v, **kwargs)
