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
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from ops.attention import attention


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
    implementation: as in ``ops.attention``.

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
    bias = relative_position_bias(rel_pos_table, window)[None]      # [1, H, T, T]: shared
  return attention(q, k, v, bias=bias, scale=scale, implementation=implementation)


def _check_window(window) -> tuple[int, int]:
  if (not isinstance(window, (tuple, list)) or len(window) != 2
      or not all(isinstance(w, (int, np.integer)) and w > 0 for w in window)):
    raise ValueError(f"window_attention: expected window as (height, width) of positive ints, "
                     f"got {window!r}")
  return int(window[0]), int(window[1])
