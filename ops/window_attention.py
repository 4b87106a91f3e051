"""Attention over many small windows with a learned relative-position bias table.

MaxViT block and grid attention run softmax attention inside each ``wh x ww`` window (or grid
group), with the windows stacked into the batch: ``q, k, v`` are
``[B * num_windows, wh * ww, H, D]``. The bias is gathered from a table of
``(2 wh - 1) (2 ww - 1)`` entries per head, indexed by the *key minus query* offset inside the
window (MaxViT's TF ``2d_multi_head`` convention)::

    bias[h, q, k] = table[h, k_row - q_row + wh - 1, k_col - q_col + ww - 1]

Swin/timm ``RelPosBias`` index query minus key: flip the table on both spatial axes to use it here.
The same ``[H, T, T]`` bias is shared by every window, so this is ``ops.attention`` with a bias
broadcast over the batch axis; the gradient reaches the table through the gather's transpose (a
scatter-add), and the kernels reduce ``dbias`` over the windows without materializing it per window.

``"pallas"`` is the window kernel below. It reads the windows where they are, with no transposed
or padded copies of q, k, v or the output, and each program runs several windows with the bias
loaded once per head. On GPU (and in the interpreter) a program takes one head of up to 32
windows of ``[B * num_windows, T, H, D]``, each a tile of the next power of two of T rows loaded
and stored under a row mask. On TPU a program takes a block of ``[B * num_windows, T, H * D]`` (a
free reshape): as many windows as fit 512 KiB of VMEM per array, by a lane-dense group of heads,
T rows exactly. A window fits one tile, so the softmax is computed whole (no online rescaling) and
the backward recomputes it (nothing but q, k, v and the bias is kept for it); ``dbias`` is summed
over each program's windows on chip, then over the programs.
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
from ops._pallas import (MASK_VALUE, TARGETS, backend_params, cost_estimate, default_scale,
                         default_target, is_triton_tile, largest_divisor, next_power_of_two,
                         present, round_up, tile_dot, with_absent_inputs)
from ops.attention import attention

_F32 = jnp.float32
# Windows per program: the most that divide the window count, up to this many (more windows per
# program: fewer dbias partials to sum, fewer programs).
_MAX_WINDOWS_PER_PROGRAM = 32
# A window is one tile: its rows and keys padded to a power of two up to this.
_MAX_TILE = 128
# TPU: windows per program up to this much VMEM per array block in Mosaic's tiles (a backward
# program double-buffers seven such blocks: q, k, v, do in and dq, dk, dv out).
_TPU_BLOCK_BYTES = 512 * 1024


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
    implementation: ``None`` (the platform's best: the window kernel on GPU and TPU, the
      reference on CPU), ``"pallas"`` (the window kernel; the interpreter on CPU), or any of
      ``ops.attention``'s, which then runs with the bias.

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
  if implementation == "pallas":
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
# Pallas window kernels
# --------------------------------------------------------------------------------------------------


def _pallas_reason(q, k, v) -> str | None:
  """Why the window kernel cannot serve the call on this platform (None: it can)."""
  if k.shape[1] != q.shape[1]:
    return f"windows attend within themselves: expected k of q's {q.shape[1]} tokens"
  if q.shape[1] > _MAX_TILE:
    return f"a window is one tile of at most {_MAX_TILE} tokens, got {q.shape[1]}"
  if default_target() == "gpu":
    for name, dim in (("head_dim", q.shape[-1]), ("v head_dim", v.shape[-1])):
      if not is_triton_tile(dim):
        return f"Triton tiles need a power-of-two {name} >= 16, got {dim}"
  return None


@dataclasses.dataclass(frozen=True)
class _Windows:
  """Which windows and heads a program runs and how its kernel reads them (hashable: a nondiff
  argument of the custom_vjp). The arrays are ``[N, T, H, D]``; the kernels see them per target:

  * GPU and the interpreter: whole, one head per program (grid axis 1) and ``windows``
    consecutive windows (grid axis 0), each loaded as a ``tile`` of the next power of two of T
    rows under a row mask.
  * TPU (Mosaic tiles the two minor dims): viewed ``[N, T, H * D]`` (a free reshape), in blocks
    of ``windows`` windows by ``heads`` heads (a multiple of 128 lanes, or all of them), T rows
    exactly (Mosaic pads to its tiles inside). ``tpu_interpret`` runs them in Pallas's TPU
    interpreter (tests on a CPU).
  """
  target: str
  tokens: int   # T
  windows: int  # per program
  heads: int    # per program
  tpu_interpret: bool = False

  @classmethod
  def plan(cls, q, v, target, tpu_interpret=False) -> "_Windows":
    count, tokens, heads, _ = q.shape
    if target != "tpu":
      return cls(target, tokens, largest_divisor(count, _MAX_WINDOWS_PER_PROGRAM), 1)
    widths = (q.shape[-1], v.shape[-1])
    lane_dense = [n for n in range(1, heads + 1)
                  if heads % n == 0 and all(n * width % 128 == 0 for width in widths)]
    block_heads = lane_dense[0] if lane_dense else heads
    itemsize = q.dtype.itemsize
    per_window = (round_up(tokens, 32 // itemsize) * round_up(block_heads * max(widths), 128)
                  * itemsize)
    return cls(target, tokens, largest_divisor(count, _TPU_BLOCK_BYTES // per_window),
               block_heads, tpu_interpret)

  @property
  def tile(self) -> int:
    return self.tokens if self.target == "tpu" else max(16, next_power_of_two(self.tokens))

  # -- inside a kernel -----------------------------------------------------------------------------

  def program_heads(self):
    """The heads this program runs: its grid index on GPU, the block's (static) on TPU."""
    return range(self.heads) if self.target == "tpu" else (pl.program_id(1),)

  def first_window(self):
    """This program's first window in the refs it sees (read outside loops: the interpreter
    takes no program_id inside one)."""
    return 0 if self.target == "tpu" else pl.program_id(0) * self.windows

  def load(self, ref, w, head):
    """``[tile, D]``: window ``w`` of the refs, one head; rows past T are 0."""
    if self.target == "tpu":
      return ref[w, :, self._columns(ref, head)]
    from jax.experimental.pallas import triton as plgpu
    return plgpu.load(self._window(ref, w, head), mask=self._row_mask(ref.shape[-1]), other=0)

  def store(self, ref, w, head, value):
    value = value.astype(ref.dtype)
    if self.target == "tpu":
      ref[w, :, self._columns(ref, head)] = value
    else:
      from jax.experimental.pallas import triton as plgpu
      plgpu.store(self._window(ref, w, head), value, mask=self._row_mask(value.shape[-1]))

  def bias(self, bias_ref, head):
    """The head's ``[tile, tile]`` bias in f32, padding 0 (None without a bias)."""
    if bias_ref is None:
      return None
    if self.target == "tpu":
      return bias_ref[head].astype(_F32)
    from jax.experimental.pallas import triton as plgpu
    view = bias_ref.at[head, pl.ds(0, self.tile), pl.ds(0, self.tile)]
    mask = None if self.tile == self.tokens else self.valid_rows() & self.valid_keys()
    return plgpu.load(view, mask=mask, other=0).astype(_F32)

  def store_dbias(self, dbias_ref, head, value):
    """This program's windows' part of dbias; the programs' parts are summed outside."""
    if self.target == "tpu":
      dbias_ref[0, head] = value
    else:
      dbias_ref[pl.program_id(0), head] = value

  def valid_rows(self):
    """``[tile, 1]``: the rows that are the window's (None: all are)."""
    if self.tile == self.tokens:
      return None
    return lax.broadcasted_iota(jnp.int32, (self.tile, 1), 0) < self.tokens

  def valid_keys(self):
    """``[1, tile]``: the keys that are the window's (None: all are)."""
    if self.tile == self.tokens:
      return None
    return lax.broadcasted_iota(jnp.int32, (1, self.tile), 1) < self.tokens

  def _columns(self, ref, head):
    width = ref.shape[-1] // self.heads
    return pl.ds(head * width, width)

  def _window(self, ref, w, head):
    return ref.at[w, pl.ds(0, self.tile), head, :]

  def _row_mask(self, width):
    rows = self.valid_rows()
    return None if rows is None else jnp.broadcast_to(rows, (self.tile, width))

  # -- around the kernels --------------------------------------------------------------------------

  def call(self, kernel, name, windows, bias, out_like, with_dbias, flops):
    """``pallas_call`` of a window kernel over (window groups, head groups). ``windows``: the
    ``[N, T, H, D]`` inputs; ``bias``: ``[H, T, T]`` or None; outputs shaped like ``out_like``
    and, ``with_dbias``, the programs' parts of dbias ``[groups, H, tile, tile]`` (f32)."""
    count, tokens, heads, _ = windows[0].shape
    groups = count // self.windows
    outputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in out_like]
    if with_dbias:
      outputs.append(jax.ShapeDtypeStruct((groups, heads, self.tile, self.tile), _F32))
    inputs = present(windows + [bias])
    kernel = with_absent_inputs(kernel, windows + [bias])  # bias_ref is None without a bias
    common = dict(grid=(groups, heads // self.heads), name=name,
                  cost_estimate=cost_estimate(flops, *inputs, *outputs),
                  **backend_params(self.target, 2, tpu_interpret=self.tpu_interpret))
    if self.target != "tpu":
      return pl.pallas_call(kernel, out_shape=outputs, **common)(*inputs)

    def window_block(x):
      return pl.BlockSpec((self.windows, tokens, self.heads * x.shape[-1]), lambda g, j: (g, 0, j))
    bias_blocks = [pl.BlockSpec((self.heads, tokens, tokens), lambda g, j: (j, 0, 0))]
    dbias_blocks = [pl.BlockSpec((1, self.heads, tokens, tokens), lambda g, j: (g, j, 0, 0))]
    flat = [jax.ShapeDtypeStruct((count, tokens, heads * x.shape[-1]), x.dtype) for x in out_like]
    results = pl.pallas_call(
        kernel, out_shape=flat + outputs[len(flat):],
        in_specs=[window_block(x) for x in windows] + (bias_blocks if bias is not None else []),
        out_specs=[window_block(x) for x in out_like] + (dbias_blocks if with_dbias else []),
        **common,
    )(*[x.reshape(count, tokens, -1) for x in windows], *inputs[len(windows):])
    return [r.reshape(o.shape) for r, o in zip(results, outputs)]


def _probabilities(q, k, bias, scale, key_valid):
  """The whole softmax of one window, f32, padded keys at 0."""
  s = tile_dot(q, k, (1, 1)) * scale
  if bias is not None:
    s = s + bias
  if key_valid is not None:
    s = jnp.where(key_valid, s, MASK_VALUE)
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return p / jnp.sum(p, axis=-1, keepdims=True)


def _window_fwd_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, *, scale, at: _Windows):
  first = at.first_window()
  for head in at.program_heads():
    bias = at.bias(bias_ref, head)

    def window(i, _, head=head, bias=bias):
      w = first + i
      q, k, v = (at.load(ref, w, head) for ref in (q_ref, k_ref, v_ref))
      p = _probabilities(q, k, bias, scale, at.valid_keys())
      at.store(o_ref, w, head, tile_dot(p.astype(v.dtype), v, (1, 0)))
      return 0

    lax.fori_loop(0, at.windows, window, 0)


def _window_bwd_kernel(q_ref, k_ref, v_ref, do_ref, bias_ref, dq_ref, dk_ref, dv_ref,
                       dbias_ref=None, *, scale, at: _Windows):
  rows, first = at.valid_rows(), at.first_window()
  for head in at.program_heads():
    bias = at.bias(bias_ref, head)

    def window(i, dbias, head=head, bias=bias):
      w = first + i
      q, k, v, do = (at.load(ref, w, head) for ref in (q_ref, k_ref, v_ref, do_ref))
      p = _probabilities(q, k, bias, scale, at.valid_keys())
      out = tile_dot(p.astype(v.dtype), v, (1, 0))
      delta = jnp.sum(out * do.astype(_F32), axis=-1, keepdims=True)
      ds = p * (tile_dot(do, v, (1, 1)) - delta)                           # d(logits)
      if rows is not None:
        ds = jnp.where(rows, ds, 0.0)                                 # padded rows add nothing
      at.store(dv_ref, w, head, tile_dot(p.astype(do.dtype), do, (0, 0)))
      at.store(dq_ref, w, head, tile_dot(ds.astype(k.dtype), k, (1, 0)) * scale)
      at.store(dk_ref, w, head, tile_dot(ds.astype(q.dtype), q, (0, 0)) * scale)
      return dbias if dbias_ref is None else dbias + ds

    dbias = lax.fori_loop(0, at.windows, window, jnp.zeros((at.tile, at.tile), _F32))
    if dbias_ref is not None:
      at.store_dbias(dbias_ref, head, dbias)


def _window_flops(q, v, backward):
  """Matmuls of every window: scores and output (forward); again, and dp, dv, dq, dk (backward)."""
  count, tokens, heads, d = q.shape
  return 2 * count * heads * tokens * tokens * (d + v.shape[-1]) * (3 if backward else 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _window_attention(q, k, v, bias, scale, at):
  return _window_forward(q, k, v, bias, scale, at)


def _window_forward(q, k, v, bias, scale, at):
  out_like = jax.ShapeDtypeStruct((*q.shape[:3], v.shape[-1]), q.dtype)
  (out,) = at.call(functools.partial(_window_fwd_kernel, scale=scale, at=at), "window_fwd",
                   [q, k, v], bias, [out_like], False, _window_flops(q, v, False))
  return out


def _window_attention_fwd(q, k, v, bias, scale, at):
  return _window_forward(q, k, v, bias, scale, at), (q, k, v, bias)


def _window_attention_bwd(scale, at, residuals, do):
  q, k, v, bias = residuals
  dq, dk, dv, *parts = at.call(functools.partial(_window_bwd_kernel, scale=scale, at=at),
                               "window_bwd", [q, k, v, do], bias, [q, k, v], bias is not None,
                               _window_flops(q, v, True))
  dbias = None
  if bias is not None:
    tokens = q.shape[1]
    dbias = jnp.sum(parts[0], axis=0)[:, :tokens, :tokens].astype(bias.dtype)
  return dq, dk, dv, dbias


_window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)


def window_attention_pallas(q, k, v, bias=None, *, scale=None, target=None, tpu_interpret=False):
  """The window kernel: softmax attention inside each window of ``[N, T, H, D]`` (T <= 128), with
  an optional bias ``[H, T, T]`` shared by every window; its ``custom_vjp`` backward gives dq, dk,
  dv and the bias's gradient. ``target``: ``"interpret"``, ``"gpu"`` (Triton) or ``"tpu"``
  (Mosaic; with ``tpu_interpret``, in Pallas's TPU interpreter); None is the platform's. Under a
  mesh it runs per shard of the windows and the heads."""
  target = default_target() if target is None else target
  if target not in TARGETS:
    raise ValueError(f"window_attention_pallas: expected target 'interpret', 'gpu' or 'tpu', got "
                     f"{target!r}")
  scale = default_scale(scale, q.shape[-1])

  def local(q, k, v, *bias):
    at = _Windows.plan(q, v, target, tpu_interpret)
    return _window_attention(q, k, v, bias[0] if bias else None, scale, at)
  qkv = ("batch", None, "heads", None)
  arrays, specs = (q, k, v), (qkv,) * 3
  if bias is not None:
    arrays, specs = arrays + (bias,), specs + (("heads", None, None),)
  return sharding.shard_map(local, specs, qkv)(*arrays)
