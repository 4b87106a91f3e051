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
  input block) with an online softmax, so the gathered ``topk``-fold K/V never exists in memory. In
  the interpreter each loop step concatenates ``group`` routed region tiles into one key tile of
  about ``block_k`` rows (e.g. the 16 routed 2x2 regions of BiFormer stage 3 into one 64-row tile);
  the Triton kernel takes one region per step. A ``custom_vjp`` whose backward is two Pallas
  kernels: dQ per query region (the same loop over routed regions), and dK/dV per *key* region over
  an inverse routing table (the query regions that routed to it, in ascending order). Each dK/dV
  tile is written by exactly one program, summing in a fixed order: deterministic without atomics,
  and without the ``topk``-fold partial sums that per-(query region, slot) outputs would need. P is
  recomputed from the log-sum-exp. Matmuls as in ``ops.attention``: bf16 operands as they are (f32
  accumulation), f32 at full precision. The kernels lower with Triton on GPU (checked by exporting
  from a CPU in the tests) and run in the interpreter on CPU. On TPU the top-k table would go
  through ``PrefetchScalarGridSpec`` so that index maps fetch only the routed regions; that variant
  is not written yet.
* ``routing_attention(..., implementation=None | "xla" | "pallas")`` dispatches through
  ``ops.dispatch``: the kernel on GPU where it lowers, else the reference; the reference on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops import dispatch, sharding
from ops._pallas import (MASK_VALUE, TARGETS, backend_params, default_scale, default_target,
                         is_triton_tile, next_power_of_two, tile_dot)

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST

IMPLEMENTATIONS = (None, "xla", "pallas")  # what `implementation=` takes


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


def to_regions(x, n_win, num_heads):
  """``[B, H, W, C]`` -> ``[B, heads, n_win**2, tokens per region, C / heads]``."""
  b, h, w, c = x.shape
  x = x.reshape(b, n_win, h // n_win, n_win, w // n_win, num_heads, c // num_heads)
  x = x.transpose(0, 5, 1, 3, 2, 4, 6)                     # b, head, row, col, r_h, r_w, d
  return x.reshape(b, num_heads, n_win * n_win, (h // n_win) * (w // n_win), c // num_heads)


def from_regions(x, n_win, height, width):
  """Inverse of ``to_regions``: ``[B, heads, regions, tokens, d]`` -> ``[B, H, W, heads * d]``."""
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
  scale = default_scale(scale, c)

  def region_means(x):
    x = lax.stop_gradient(x).astype(_F32)
    x = x.reshape(b, n_win, height // n_win, n_win, width // n_win, c)
    return x.mean(axis=(2, 4)).reshape(b, n_win * n_win, c)

  logits = jnp.einsum("bpc,brc->bpr", region_means(q) * scale, region_means(k), precision=_HIGHEST)
  return lax.top_k(logits, topk)[1].astype(jnp.int32)


def _reference(q, k, v, routes, num_heads, n_win, scale):
  """Gather-then-attend on validated inputs, as the official code (f32, HIGHEST)."""
  height, width = q.shape[1:3]
  qr, kr, vr = (to_regions(x.astype(_F32), n_win, num_heads) for x in (q, k, v))
  # [heads, regions, tokens, d] and [regions, topk] -> [heads, regions, topk, tokens, d]
  gather = jax.vmap(lambda x, r: x[:, r])
  kg, vg = gather(kr, routes), gather(vr, routes)
  b, m, p, t, w2 = kg.shape[:5]
  kg = kg.reshape(b, m, p, t * w2, kg.shape[-1])
  vg = vg.reshape(b, m, p, t * w2, vg.shape[-1])
  s = jnp.einsum("bmpqd,bmpkd->bmpqk", qr, kg, precision=_HIGHEST) * scale
  out = jnp.einsum("bmpqk,bmpkd->bmpqd", jax.nn.softmax(s, axis=-1), vg, precision=_HIGHEST)
  return from_regions(out, n_win, height, width).astype(q.dtype)


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
  scale = default_scale(scale, q.shape[-1])
  routes = region_routes(q, k, n_win=n_win, topk=topk, scale=scale)
  return _reference(q, k, v, routes, num_heads, n_win, scale)


# --------------------------------------------------------------------------------------------------
# Pallas kernels. Layout: [B, heads, regions, padded tokens, d], one region per tile; the tokens of
# a region are padded to a power of two and masked. Each kernel loops over region ids read from an
# index table and gathers `group` region tiles into one tile per step (one per step on GPU: Triton
# concatenates nothing but pairs of [..., 1] arrays).
# --------------------------------------------------------------------------------------------------


def _group(target, block_k, padded, count):
  """Region tiles per loop step: about ``block_k`` rows, no more than the regions there are."""
  if target == "gpu":
    return 1
  return min(max(1, block_k // padded), next_power_of_two(count))


def _gather_tiles(ref, ids):
  """``ref[i]`` for the traced region ids, concatenated along the token axis (in-kernel gather)."""
  return ref[ids[0]] if len(ids) == 1 else jnp.concatenate([ref[i] for i in ids], axis=0)


def _check_pallas_supported(target, padded, head_dim, v_head_dim):
  """Raises ValueError for cases the kernel of ``target`` cannot lower."""
  if target not in TARGETS:
    raise ValueError(f"routing_attention: expected a Pallas target in {TARGETS}, got {target!r}")
  if target == "tpu":
    raise ValueError(
        "routing_attention: implementation='pallas' on TPU needs the top-k table in SMEM "
        "(PrefetchScalarGridSpec), which is not written yet; use implementation='xla'")
  if target == "gpu":
    for name, d in (("qk head_dim", head_dim), ("v head_dim", v_head_dim)):
      if not is_triton_tile(d):
        raise ValueError(
            f"routing_attention: implementation='pallas' on GPU expected a power-of-two {name} "
            f">= 16 (Triton tiles), got {d}; use implementation='xla'")
    if padded < 16:
      raise ValueError(
          f"routing_attention: implementation='pallas' on GPU expected regions of >= 16 tokens "
          f"(Triton tile rows), got {padded}; use implementation='xla'")


def _split_index(index, padded):
  """(slot, token) of a row of gathered tiles: ``index // padded, index % padded`` (power of 2)."""
  shift = padded.bit_length() - 1
  return lax.shift_right_logical(index, jnp.int32(shift)), index & (padded - 1)


def _fwd_kernel(routes_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, tokens, topk, group):
  padded = q_ref.shape[0]
  q = q_ref[...]                                                    # [padded, d]
  col_slot, col_token = _split_index(
      lax.broadcasted_iota(jnp.int32, (1, group * padded), 1), padded)

  def body(step, carry):
    m, l, acc = carry
    kb = _gather_tiles(k_ref, [routes_ref[step * group + g] for g in range(group)])
    vb = _gather_tiles(v_ref, [routes_ref[step * group + g] for g in range(group)])
    mask = (step * group + col_slot < topk) & (col_token < tokens)
    s = jnp.where(mask, tile_dot(q, kb, (1, 1)) * scale, MASK_VALUE)   # [padded, group * padded]
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    acc = alpha * acc + tile_dot(p.astype(vb.dtype), vb, (1, 0))
    return m_new, l, acc

  init = (jnp.full((padded, 1), MASK_VALUE, _F32), jnp.zeros((padded, 1), _F32),
          jnp.zeros((padded, o_ref.shape[-1]), _F32))
  m, l, acc = lax.fori_loop(0, -(-topk // group), body, init)
  # l > 0: slot 0 is a routed region with at least one real token.
  o_ref[...] = (acc / l).astype(o_ref.dtype)
  lse_ref[...] = (m + jnp.log(l))[:, 0]


def _dq_kernel(routes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
               tokens, topk, group):
  padded = q_ref.shape[0]
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  col_slot, col_token = _split_index(
      lax.broadcasted_iota(jnp.int32, (1, group * padded), 1), padded)

  def body(step, dq):
    kb = _gather_tiles(k_ref, [routes_ref[step * group + g] for g in range(group)])
    vb = _gather_tiles(v_ref, [routes_ref[step * group + g] for g in range(group)])
    mask = (step * group + col_slot < topk) & (col_token < tokens)
    p = jnp.where(mask, jnp.exp(tile_dot(q, kb, (1, 1)) * scale - lse), 0.0)
    ds = p * (tile_dot(do, vb, (1, 1)) - delta)
    return dq + tile_dot(ds.astype(kb.dtype), kb, (1, 0))

  dq = lax.fori_loop(0, -(-topk // group), body, jnp.zeros(dq_ref.shape, _F32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(inverse_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 scale, tokens, group):
  """One key region: loops over the query regions that routed to it (ascending, then -1)."""
  padded = k_ref.shape[0]
  kb, vb = k_ref[...], v_ref[...]                                    # [padded, d]
  count = jnp.sum((inverse_ref[...] >= 0).astype(jnp.int32))
  row_slot, row_token = _split_index(
      lax.broadcasted_iota(jnp.int32, (group * padded, 1), 0), padded)
  col_valid = lax.broadcasted_iota(jnp.int32, (1, padded), 1) < tokens

  def body(step, carry):
    dk, dv = carry
    ids = [jnp.maximum(inverse_ref[step * group + g], 0) for g in range(group)]
    qb, dob = _gather_tiles(q_ref, ids), _gather_tiles(do_ref, ids)   # [group * padded, d]
    lse, delta = _gather_tiles(lse_ref, ids)[:, None], _gather_tiles(delta_ref, ids)[:, None]
    mask = (step * group + row_slot < count) & (row_token < tokens) & col_valid
    p = jnp.where(mask, jnp.exp(tile_dot(qb, kb, (1, 1)) * scale - lse), 0.0)
    ds = p * (tile_dot(dob, vb, (1, 1)) - delta)
    dk = dk + tile_dot(ds.astype(qb.dtype), qb, (0, 0))
    dv = dv + tile_dot(p.astype(dob.dtype), dob, (0, 0))
    return dk, dv

  dk, dv = lax.fori_loop(0, (count + group - 1) // group, body,
                         (jnp.zeros(dk_ref.shape, _F32), jnp.zeros(dv_ref.shape, _F32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
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


def _padded_table(table, fill=0):
  """An index table ``[B, regions, n]`` padded to ``n`` a power of two (Triton loads)."""
  n = table.shape[-1]
  return jnp.pad(table, ((0, 0), (0, 0), (0, next_power_of_two(n) - n)), constant_values=fill)


def _specs(regions, padded, d):
  """BlockSpecs over ``[B, heads, regions, padded, d]`` (grid (batch, head, region)): one region
  tile, every region of the (batch, head), and the same two for ``[B, heads, regions, padded]``."""
  return (pl.BlockSpec((None, None, None, padded, d), lambda b, h, p: (b, h, p, 0, 0)),
          pl.BlockSpec((None, None, regions, padded, d), lambda b, h, p: (b, h, 0, 0, 0)))


def _row_specs(regions, padded):
  return (pl.BlockSpec((None, None, None, padded), lambda b, h, p: (b, h, p, 0)),
          pl.BlockSpec((None, None, regions, padded), lambda b, h, p: (b, h, 0, 0)))


def _table_spec(width):
  return pl.BlockSpec((None, None, width), lambda b, h, p: (b, p, 0))


def _pallas_forward(qr, kr, vr, routes, scale, tokens, block_k, target):
  """Forward on the padded region layout. Returns (out like vr, lse [B, heads, regions, padded])."""
  b, m, regions, padded, d = qr.shape
  topk = routes.shape[-1]
  routes = _padded_table(routes)                                   # extra slots are masked
  one_q, every_k = _specs(regions, padded, d)
  one_v, every_v = _specs(regions, padded, vr.shape[-1])
  one_row, _ = _row_specs(regions, padded)
  group = _group(target, block_k, padded, topk)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, tokens=tokens, topk=topk, group=group),
      grid=(b, m, regions),
      in_specs=[_table_spec(routes.shape[-1]), one_q, every_k, every_v],
      out_specs=[one_v, one_row],
      out_shape=[jax.ShapeDtypeStruct(vr.shape, qr.dtype),
                 jax.ShapeDtypeStruct(qr.shape[:4], _F32)],
      name="routing_attention_fwd",
      **backend_params(target, 3),
  )(routes, qr, kr, vr)


def _pallas_backward(qr, kr, vr, routes, out, lse, do, scale, tokens, block_k, target):
  b, m, regions, padded, d = qr.shape
  topk = routes.shape[-1]
  delta = jnp.sum(out.astype(_F32) * do.astype(_F32), axis=-1)     # [B, heads, regions, padded]
  one_q, every_q = _specs(regions, padded, d)
  one_v, every_v = _specs(regions, padded, vr.shape[-1])
  one_row, every_row = _row_specs(regions, padded)

  # dQ: one program per query region, looping over its routed key regions.
  routes = _padded_table(routes)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, tokens=tokens, topk=topk,
                        group=_group(target, block_k, padded, topk)),
      grid=(b, m, regions),
      in_specs=[_table_spec(routes.shape[-1]), one_q, every_q, every_v, one_v, one_row, one_row],
      out_specs=one_q,
      out_shape=jax.ShapeDtypeStruct(qr.shape, qr.dtype),
      name="routing_attention_bwd_dq",
      **backend_params(target, 3),
  )(routes, qr, kr, vr, do, lse, delta)

  # dK, dV: one program per key region, looping over the query regions routed to it.
  inverse = _inverse_routes(routes[..., :topk], next_power_of_two(regions))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, scale=scale, tokens=tokens,
                        group=_group(target, block_k, padded, regions)),
      grid=(b, m, regions),
      in_specs=[_table_spec(inverse.shape[-1]), every_q, one_q, one_v, every_v, every_row,
                every_row],
      out_specs=[one_q, one_v],
      out_shape=[jax.ShapeDtypeStruct(kr.shape, kr.dtype),
                 jax.ShapeDtypeStruct(vr.shape, vr.dtype)],
      name="routing_attention_bwd_dkdv",
      **backend_params(target, 3),
  )(inverse, qr, kr, vr, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _routed_attention(qr, kr, vr, routes, scale, tokens, block_k, target):
  return _pallas_forward(qr, kr, vr, routes, scale, tokens, block_k, target)[0]


def _routed_attention_fwd(qr, kr, vr, routes, scale, tokens, block_k, target):
  out, lse = _pallas_forward(qr, kr, vr, routes, scale, tokens, block_k, target)
  return out, (qr, kr, vr, routes, out, lse)


def _routed_attention_bwd(scale, tokens, block_k, target, res, do):
  qr, kr, vr, routes, out, lse = res
  dq, dk, dv = _pallas_backward(qr, kr, vr, routes, out, lse, do, scale, tokens, block_k, target)
  return dq, dk, dv, None                                           # no gradient for the indices


_routed_attention.defvjp(_routed_attention_fwd, _routed_attention_bwd)


def routing_attention_pallas(q, k, v, *, num_heads, n_win, topk, scale=None, block_k=64,
                             target=None):
  """The Pallas kernels (forward and ``custom_vjp`` backward); semantics of the reference.

  ``target``: ``"interpret"``, ``"gpu"`` (Triton) or ``"tpu"`` (not written yet: raises); None is
  the platform's (the interpreter on CPU). ``block_k`` (a power of two) is about the number of
  keys per loop step: routed regions are gathered ``block_k // tokens`` at a time (one at a time on
  GPU). On GPU the compiled kernels are checked to lower, not yet validated on a device.
  """
  _validate(q, k, v, num_heads=num_heads, n_win=n_win, topk=topk)
  if not _is_int(block_k) or block_k < 1 or block_k & (block_k - 1):
    raise ValueError(f"routing_attention: expected block_k a power of two, got {block_k!r}")
  b, height, width, c = q.shape
  scale = default_scale(scale, c)
  tokens = (height // n_win) * (width // n_win)
  padded = next_power_of_two(tokens)
  target = default_target() if target is None else target
  _check_pallas_supported(target, padded, c // num_heads, v.shape[-1] // num_heads)

  def per_shard(q, k, v):  # every example is routed and attended on its own
    routes = region_routes(q, k, n_win=n_win, topk=topk, scale=scale)

    def regions(x):
      x = to_regions(x, n_win, num_heads)
      return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, padded - tokens), (0, 0)))

    out = _routed_attention(regions(q), regions(k), regions(v), routes, scale, tokens, block_k,
                            target)
    return from_regions(out[:, :, :, :tokens], n_win, height, width)

  # Under a mesh the kernels run per shard of the batch (Mosaic and Triton kernels cannot be
  # partitioned by XLA); the heads share the channel axis and the routing, so they stay whole.
  maps = ("batch", None, None, None)
  return sharding.shard_map(per_shard, (maps,) * 3, maps)(q, k, v)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def _pallas_reason(q, v, *, num_heads, n_win) -> str | None:
  tokens = (q.shape[1] // n_win) * (q.shape[2] // n_win)
  try:
    _check_pallas_supported(default_target(), next_power_of_two(tokens), q.shape[-1] // num_heads,
                            v.shape[-1] // num_heads)
  except ValueError as e:
    return str(e)
  return None


def routing_attention(q, k, v, *, num_heads, n_win, topk, scale=None, implementation=None):
  """Bi-level routing attention on ``[B, H, W, C]`` maps; see ``routing_attention_reference``.

  ``implementation``: ``None`` is the best that serves the call on this platform
  (``ops.dispatch``): the Pallas kernel on GPU when it can lower the case (power-of-two head dims
  >= 16, regions of >= 16 tokens; BiFormer stages 1-2 at 224), else the reference; the reference on
  CPU (never interpret mode) and on TPU (no TPU kernel yet). ``"xla"`` is the jnp reference;
  ``"pallas"`` the kernel (interpret mode on CPU). A named implementation that cannot serve the
  call raises ValueError.
  """
  _validate(q, k, v, num_heads=num_heads, n_win=n_win, topk=topk)
  reasons = {"xla": lambda: None,
             "pallas": lambda: _pallas_reason(q, v, num_heads=num_heads, n_win=n_win)}
  chosen = dispatch.choose("routing_attention", implementation, reasons)
  kwargs = dict(num_heads=num_heads, n_win=n_win, topk=topk, scale=scale)
  if chosen == "pallas":
    return routing_attention_pallas(q, k, v, **kwargs)
  return routing_attention_reference(q, k, v, **kwargs)
