"""Attention over many small windows with a learned relative-position bias table.

MaxViT block and grid attention run softmax attention inside each ``wh x ww`` window (or grid
group), with the windows stacked into the batch: ``q, k, v`` are ``[B * num_windows, wh * ww, H, D]``.
The bias is gathered from a table of ``(2 wh - 1) (2 ww - 1)`` entries per head, indexed by the
*key minus query* offset inside the window (MaxViT's TF ``2d_multi_head`` convention)::

    bias[h, q, k] = table[h, k_row - q_row + wh - 1, k_col - q_col + ww - 1]

Swin/timm ``RelPosBias`` index query minus key: flip the table on both spatial axes to use it here.
The same ``[H, T, T]`` bias is shared by every window, so this is ``ops.attention`` with a bias
broadcast over the batch axis; the gradient reaches the table through the gather's transpose (a
scatter-add), and the kernels reduce ``dbias`` over the windows without materializing it per window.

On GPU (and in the interpreter) ``"pallas"`` is the window kernel below: it reads the windows where
they are, ``[B * num_windows, T, H, D]``, a tile of the next power of two of T rows per window
loaded and stored under a row mask (no transposed or padded copies of q, k, v or the output), and
each program runs several windows of one head with the bias tile loaded once. A window fits one
tile, so the softmax is computed whole (no online rescaling) and the backward recomputes it
(nothing but q, k, v and the bias is kept for it); ``dbias`` is summed over each program's windows
in registers, then over the programs. On TPU ``"pallas"`` is ``ops.attention``'s Mosaic kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ops import dispatch, sharding
from ops.attention import (_MASK_VALUE, _backend_params, _cost_estimate, _default_scale,
                           _default_target, _mm, attention)

_F32 = jnp.float32
# Windows per program: the most that divide the window count, up to this many (more windows per
# program: fewer dbias partials to sum, fewer programs).
_MAX_WINDOWS_PER_PROGRAM = 32
# A window is one tile: its rows and keys padded to a power of two up to this.
_MAX_TILE = 128


@functools.lru_cache(maxsize=None)
def relative_position_index(window: tuple[int, int]) -> np.ndarray:
  """Static ``[T, T]`` index into the flattened ``(2wh-1) x (2ww-1)`` table (key minus query)."""
  wh, ww = window
  rows, cols = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  d_row = rows[None, :] - rows[:, None] + wh - 1                     # [query, key]
  d_col = cols[None, :] - cols[:, None] + ww - 1
  index = d_row * (2 * ww - 1) + d_col
  index.setflags(write=False)
  return index


def relative_position_bias(rel_pos_table, window: tuple[int, int]):
  """Gathers the ``[H, T, T]`` bias (``T = wh * ww``) from a ``[H, 2wh-1, 2ww-1]`` table."""
  window = _check_window(window)
  wh, ww = window
  expected = (2 * wh - 1, 2 * ww - 1)
  if rel_pos_table.ndim != 3 or tuple(rel_pos_table.shape[1:]) != expected:
    raise ValueError(
        f"window_attention: expected rel_pos_table of shape [heads, {expected[0]}, {expected[1]}] "
        f"for window {window}, got {tuple(rel_pos_table.shape)}")
  flat = rel_pos_table.reshape(rel_pos_table.shape[0], -1)
  return jnp.take(flat, relative_position_index(window), axis=1)


def window_attention(q, k, v, rel_pos_table=None, *, window=(7, 7), scale=None,
                     implementation=None):
  """Attention inside each window: ``softmax(scale q k^T + bias[h]) v`` per window and head.

  Args:
    q, k, v: ``[B * num_windows, wh * ww, H, D]`` (windows stacked into the batch).
    rel_pos_table: ``[H, 2wh-1, 2ww-1]`` learned table (MaxViT layout, key minus query), or None
      for windows without a relative-position bias (BiFormer's 64-token windows).
    window: ``(wh, ww)``; ``wh * ww`` must equal the token axis.
    scale: logits scale, default ``1 / sqrt(D)``; the bias is not scaled.
    implementation: ``None`` (the platform's best: the window kernel on GPU, ``ops.attention``'s
      Mosaic kernel on TPU, the reference on CPU), ``"pallas"`` (those kernels; the interpreter on
      CPU), or any of ``ops.attention``'s, which then runs with the bias.

  Returns:
    ``[B * num_windows, wh * ww, H, Dv]`` in ``q.dtype``.
  """
  window = _check_window(window)
  tokens = window[0] * window[1]
  if q.ndim != 4 or q.shape[1] != tokens:
    raise ValueError(
        f"window_attention: expected q of shape [batch * windows, {tokens}, heads, head_dim] for "
        f"window {window}, got {tuple(q.shape)}")
  bias = None
  if rel_pos_table is not None:
    if rel_pos_table.shape[0] != q.shape[2]:
      raise ValueError(
          f"window_attention: expected rel_pos_table with {q.shape[2]} heads (q has {q.shape[2]}), "
          f"got {tuple(rel_pos_table.shape)}")
    bias = relative_position_bias(rel_pos_table, window)             # [H, T, T]: shared
  if implementation in (None, "xla", "pallas"):
    reasons = {"xla": lambda: None, "pallas": lambda: _pallas_reason(q, k, v)}
    implementation = dispatch.choose("window_attention", implementation, reasons)
  if implementation == "pallas" and _default_target() != "tpu":
    return window_attention_pallas(q, k, v, bias, scale=scale)
  return attention(q, k, v, bias=None if bias is None else bias[None], scale=scale,
                   implementation=implementation)


def _check_window(window) -> tuple[int, int]:
  if (not isinstance(window, (tuple, list)) or len(window) != 2
      or not all(isinstance(w, (int, np.integer)) and w > 0 for w in window)):
    raise ValueError(f"window_attention: expected window as (height, width) of positive ints, "
                     f"got {window!r}")
  return int(window[0]), int(window[1])


# --------------------------------------------------------------------------------------------------
# Pallas window kernels (GPU, interpreter)
# --------------------------------------------------------------------------------------------------


def _pallas_reason(q, k, v) -> str | None:
  """Why the window kernel cannot serve the call on this platform (None: it can)."""
  if k.shape[1] != q.shape[1]:
    return f"windows attend within themselves: expected k of q's {q.shape[1]} tokens"
  if q.shape[1] > _MAX_TILE:
    return f"a window is one tile of at most {_MAX_TILE} tokens, got {q.shape[1]}"
  if _default_target() == "gpu":
    for name, dim in (("head_dim", q.shape[-1]), ("v head_dim", v.shape[-1])):
      if dim < 16 or dim & (dim - 1):
        return f"Triton tiles need a power-of-two {name} >= 16, got {dim}"
  return None


def _windows_per_program(count: int) -> int:
  return max(n for n in range(1, min(count, _MAX_WINDOWS_PER_PROGRAM) + 1) if count % n == 0)


def _window_rows(ref, window, head, rows, mask):
  """The [rows, D] tile of one window and head of a [N, T, H, D] ref: rows T and on are masked
  (in memory they are the next window's, or lie past the end)."""
  from jax.experimental.pallas import triton as plgpu
  view = ref.at[window, pl.ds(0, rows), head, :]
  return plgpu.load(view, mask=jnp.broadcast_to(mask, (rows, ref.shape[-1])), other=0)


def _store_rows(ref, window, head, value, mask):
  from jax.experimental.pallas import triton as plgpu
  plgpu.store(ref.at[window, pl.ds(0, value.shape[0]), head, :], value.astype(ref.dtype),
              mask=jnp.broadcast_to(mask, value.shape))


def _bias_tile(bias_ref, head, tile, tokens):
  from jax.experimental.pallas import triton as plgpu
  row = lax.broadcasted_iota(jnp.int32, (tile, tile), 0)
  col = lax.broadcasted_iota(jnp.int32, (tile, tile), 1)
  view = bias_ref.at[head, pl.ds(0, tile), pl.ds(0, tile)]
  return plgpu.load(view, mask=(row < tokens) & (col < tokens), other=0).astype(_F32)


def _probabilities(q, k, bias, scale, key_valid):
  """The whole softmax of one window, f32, padded keys at 0."""
  s = _mm(q, k, (1, 1)) * scale
  if bias is not None:
    s = s + bias
  s = jnp.where(key_valid, s, _MASK_VALUE)
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return p / jnp.sum(p, axis=-1, keepdims=True)


def _window_masks_and_bias(bias_ref, head, tile, tokens):
  """What every window of a program shares: the valid query rows [tile, 1], the valid keys
  [1, tile] and the head's bias tile (None without a bias)."""
  rows = lax.broadcasted_iota(jnp.int32, (tile, 1), 0) < tokens
  key_valid = lax.broadcasted_iota(jnp.int32, (1, tile), 1) < tokens
  bias = None if bias_ref is None else _bias_tile(bias_ref, head, tile, tokens)
  return rows, key_valid, bias


def _window_fwd_kernel(*refs, scale, tokens, tile, windows, has_bias):
  q_ref, k_ref, v_ref, *rest = refs
  bias_ref = rest.pop(0) if has_bias else None
  (o_ref,) = rest
  group, head = pl.program_id(0), pl.program_id(1)
  rows, key_valid, bias = _window_masks_and_bias(bias_ref, head, tile, tokens)

  def window(w, _):
    n = group * windows + w
    q, k, v = (_window_rows(ref, n, head, tile, rows) for ref in (q_ref, k_ref, v_ref))
    p = _probabilities(q, k, bias, scale, key_valid)
    _store_rows(o_ref, n, head, _mm(p.astype(v.dtype), v, (1, 0)), rows)
    return 0

  lax.fori_loop(0, windows, window, 0)


def _window_bwd_kernel(*refs, scale, tokens, tile, windows, has_bias):
  q_ref, k_ref, v_ref, do_ref, *rest = refs
  bias_ref = rest.pop(0) if has_bias else None
  dq_ref, dk_ref, dv_ref, *dbias_ref = rest
  group, head = pl.program_id(0), pl.program_id(1)
  rows, key_valid, bias = _window_masks_and_bias(bias_ref, head, tile, tokens)

  def window(w, dbias):
    n = group * windows + w
    q, k, v, do = (_window_rows(ref, n, head, tile, rows)
                   for ref in (q_ref, k_ref, v_ref, do_ref))
    p = _probabilities(q, k, bias, scale, key_valid)
    out = _mm(p.astype(v.dtype), v, (1, 0))
    delta = jnp.sum(out * do.astype(_F32), axis=-1, keepdims=True)
    ds = jnp.where(rows, p * (_mm(do, v, (1, 1)) - delta), 0.0)     # d(logits), padded rows 0
    _store_rows(dv_ref, n, head, _mm(p.astype(do.dtype), do, (0, 0)), rows)
    _store_rows(dq_ref, n, head, _mm(ds.astype(k.dtype), k, (1, 0)) * scale, rows)
    _store_rows(dk_ref, n, head, _mm(ds.astype(q.dtype), q, (0, 0)) * scale, rows)
    return dbias + ds

  dbias = lax.fori_loop(0, windows, window, jnp.zeros((tile, tile), _F32))
  if has_bias:
    dbias_ref[0][group, head] = dbias


def _window_call(kernel, arrays, out_shape, has_bias, scale, target):
  """pallas_call over (window groups, heads); arrays [N, T, H, D] as they are, and the bias."""
  count, tokens, heads, _ = arrays[0].shape
  windows = _windows_per_program(count)
  tile = max(16, 1 << (tokens - 1).bit_length())
  outputs = out_shape(count // windows, tile)
  # matmuls of one window: scores and output (forward); again, and dp, dv, dq, dk (backward)
  flops = 2 * count * heads * tokens * tokens * (arrays[0].shape[-1] + arrays[2].shape[-1])
  flops *= 3 if kernel is _window_bwd_kernel else 1
  return pl.pallas_call(
      functools.partial(kernel, scale=scale, tokens=tokens, tile=tile, windows=windows,
                        has_bias=has_bias),
      grid=(count // windows, heads),
      out_shape=outputs,
      cost_estimate=_cost_estimate(flops, *arrays, *jax.tree.leaves(outputs)),
      name=kernel.__name__.strip("_").removesuffix("_kernel"),
      **_backend_params(target, 2),
  )(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _window_attention(q, k, v, bias, scale, target):
  return _window_forward(q, k, v, bias, scale, target)


def _window_forward(q, k, v, bias, scale, target):
  arrays = [q, k, v] + ([] if bias is None else [bias])
  return _window_call(_window_fwd_kernel, arrays,
                      lambda groups, tile: jax.ShapeDtypeStruct((*q.shape[:3], v.shape[-1]),
                                                                q.dtype),
                      bias is not None, scale, target)


def _window_attention_fwd(q, k, v, bias, scale, target):
  return _window_forward(q, k, v, bias, scale, target), (q, k, v, bias)


def _window_attention_bwd(scale, target, residuals, do):
  q, k, v, bias = residuals
  tokens, heads = q.shape[1:3]
  arrays = [q, k, v, do] + ([] if bias is None else [bias])

  def out_shape(groups, tile):
    grads = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    return grads + ([] if bias is None else
                    [jax.ShapeDtypeStruct((groups, heads, tile, tile), _F32)])
  dq, dk, dv, *partials = _window_call(_window_bwd_kernel, arrays, out_shape, bias is not None,
                                       scale, target)
  dbias = None
  if bias is not None:
    dbias = jnp.sum(partials[0], axis=0)[:, :tokens, :tokens].astype(bias.dtype)
  return dq, dk, dv, dbias


_window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)


def window_attention_pallas(q, k, v, bias=None, *, scale=None, target=None):
  """The window kernel: softmax attention inside each window of ``[N, T, H, D]`` (T <= 128), with
  an optional bias ``[H, T, T]`` shared by every window; its ``custom_vjp`` backward gives dq, dk,
  dv and the bias's gradient. ``target``: ``"interpret"`` or ``"gpu"`` (Triton); None is the
  platform's. Under a mesh it runs per shard of the windows and the heads."""
  target = _default_target() if target is None else target
  if target not in ("interpret", "gpu"):
    raise ValueError(f"window_attention_pallas: expected target 'interpret' or 'gpu', got "
                     f"{target!r}; on TPU ops.attention's kernel serves windows")
  scale = _default_scale(scale, q.shape[-1])
  qkv = ("batch", None, "heads", None)
  if bias is None:
    return sharding.shard_map(lambda q, k, v: _window_attention(q, k, v, None, scale, target),
                              (qkv,) * 3, qkv)(q, k, v)
  return sharding.shard_map(lambda *a: _window_attention(*a, scale, target),
                            (qkv,) * 3 + (("heads", None, None),), qkv)(q, k, v, bias)
