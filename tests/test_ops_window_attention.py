"""ops.window_attention: the MaxViT bias convention, its window invariants, the window kernel
vs the reference (interpret mode), and what it lowers to on a GPU."""
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ops
from conftest import load_benchmark
from ops import testing

window_attention_module = importlib.import_module("ops.window_attention")


def _windows(n, window, h, d, seed=0):
  tokens = window[0] * window[1]
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(kk, (n, tokens, h, d)) for kk in keys[:3])
  table = jax.random.normal(keys[3], (h, 2 * window[0] - 1, 2 * window[1] - 1))
  return q, k, v, table


def _close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [(2, 3), (7, 7)])
def test_bias_is_indexed_key_minus_query(window):
  """bias[h, q, k] = table[h, k_row - q_row + wh - 1, k_col - q_col + ww - 1], spelled out."""
  wh, ww = window
  table = np.asarray(_windows(1, window, 2, 4)[3])
  want = np.zeros((2, wh * ww, wh * ww), np.float32)
  for (qr, qc), (kr, kc) in itertools.product(itertools.product(range(wh), range(ww)), repeat=2):
    want[:, qr * ww + qc, kr * ww + kc] = table[:, kr - qr + wh - 1, kc - qc + ww - 1]
  np.testing.assert_array_equal(np.asarray(ops.relative_position_bias(table, window)), want)


def test_one_window_equals_attention_with_the_gathered_bias():
  q, k, v, table = _windows(1, (7, 7), 4, 32, seed=1)
  bias = ops.relative_position_bias(table, (7, 7))
  want = ops.attention(q, k, v, bias=bias)
  _close(ops.window_attention(q, k, v, table, window=(7, 7)), want, 1e-6)
  _close(ops.window_attention(q, k, v, table, window=(7, 7), implementation="pallas"), want, 1e-5)


@pytest.mark.parametrize("window,n", [((7, 7), 12), ((8, 8), 6), ((3, 5), 5)])
def test_kernel_matches_reference_with_table_gradient(window, n):
  """Outputs and the gradients wrt q, k, v and the *table* (through the gather's transpose) of the
  kernel path equal autodiff of the reference; many windows share one table."""
  q, k, v, table = _windows(n, window, 2, 32, seed=n)
  do = jax.random.normal(jax.random.key(99), q.shape)
  def grads(impl):
    loss = lambda *a: jnp.sum(ops.window_attention(*a, window=window, implementation=impl) * do)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, table)
  (val_k, g_k), (val_r, g_r) = grads("pallas"), grads("xla")
  _close(val_k, val_r, 1e-4)
  for a, b in zip(g_k, g_r):
    _close(a, b, 1e-4)


def test_without_table_is_plain_attention():
  q, k, v, _ = _windows(3, (8, 8), 2, 16, seed=3)
  _close(ops.window_attention(q, k, v, None, window=(8, 8)), ops.attention(q, k, v), 1e-6)


@pytest.mark.parametrize("n", [40, 37], ids=["2_programs_of_20", "37_programs_of_1"])
def test_kernel_runs_several_windows_a_program(n):
  """The window count split into programs of several windows (the largest divisor up to 32), the
  table's gradient summed over the programs' partials; without a table too."""
  q, k, v, table = _windows(n, (7, 7), 2, 16, seed=n)
  do = jax.random.normal(jax.random.key(98), q.shape)
  for t in (table, None):
    def grads(impl, t=t):
      args = (q, k, v) if t is None else (q, k, v, t)
      loss = lambda *a: jnp.sum(ops.window_attention(
          *a[:3], None if t is None else a[3], window=(7, 7), implementation=impl) * do)
      return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)
    (val_k, g_k), (val_r, g_r) = grads("pallas"), grads("xla")
    _close(val_k, val_r, 1e-4)
    for a, b in zip(g_k, g_r):
      _close(a, b, 1e-4)


def test_kernel_bf16_error_ratio_rule():
  q, k, v, table = (x.astype(jnp.bfloat16) for x in _windows(16, (7, 7), 2, 32, seed=21))
  bias = ops.relative_position_bias(table, (7, 7))
  do = jax.random.normal(jax.random.key(22), q.shape).astype(jnp.bfloat16)

  def run(fn, args):
    out, vjp = jax.vjp(fn, *args)
    return (out, *vjp(do.astype(out.dtype)))
  f32 = [x.astype(jnp.float32) for x in (q, k, v, bias)]
  want = run(lambda q, k, v, b: ops.attention_reference(q, k, v, bias=b[None]), f32)
  low = run(lambda q, k, v, b: testing.attention_lowp(q, k, v, b[None]), (q, k, v, bias))
  got = run(lambda *a: ops.window_attention_pallas(*a), (q, k, v, bias))
  for name, a, w, lp in zip(("out", "dq", "dk", "dv", "dbias"), got, want, low):
    factor = testing.OUTPUT_FACTOR if name == "out" else testing.GRADIENT_FACTOR
    testing.assert_error_ratio(a, w, lp, factor=factor, dtype=jnp.bfloat16, name=name)


def test_tpu_layout_in_the_tpu_interpreter():
  """The TPU variant ([N, T, H * D] blocks of several windows and a lane-dense group of heads,
  T rows exact) in Pallas's TPU interpreter: 40 windows in 4 programs of 10, 8 heads of 32 in 2
  groups of 4; outputs and every gradient, the bias's too, against the reference."""
  q, k, v, table = _windows(40, (7, 7), 8, 32, seed=40)
  bias = ops.relative_position_bias(table, (7, 7))
  plan = window_attention_module._Windows.plan(q, v, "tpu")
  assert (plan.windows, plan.heads) == (10, 4)
  do = jax.random.normal(jax.random.key(41), q.shape)
  for args in ((q, k, v, bias), (q, k, v)):
    kernel = lambda *a: ops.window_attention_pallas(*a, target="tpu", tpu_interpret=True)
    reference = lambda q, k, v, *b: ops.attention_reference(q, k, v, bias=b[0][None] if b else None)
    out, vjp = jax.vjp(kernel, *args)
    want, want_vjp = jax.vjp(reference, *args)
    _close(out, want, 1e-5)
    for got, expected in zip(vjp(do), want_vjp(do)):
      _close(got, expected, 1e-4)


def test_gpu_path_reads_the_windows_in_place():
  """On a GPU, window attention's forward moves q, k, v and the output once each (4 passes over
  q, the minimum) where ops.attention's kernel, behind transposed copies padded to 64 rows, moved
  over 14; the backward, 7 passes at least, is under 13 (over 60 before). Measured on the program
  lowered for CUDA (benchmarks/compile_report.py --window_passes)."""
  rows = {row["path"]: row for row in load_benchmark("compile_report").window_passes_rows()}
  assert rows["window kernel"]["fwd_passes"] < 4.1, rows
  assert rows["window kernel"]["bwd_passes"] < 13, rows
  assert rows["ops.attention kernel"]["fwd_passes"] > 14, rows


def test_errors_say_expected_and_given():
  q, k, v, table = _windows(2, (7, 7), 2, 8)
  with pytest.raises(ValueError, match=r"expected q of shape \[batch \* windows, 64, .*got \(2, 49"):
    ops.window_attention(q, k, v, table, window=(8, 8))
  with pytest.raises(ValueError, match=r"expected rel_pos_table of shape \[heads, 13, 13\].*\(2, 11, 11\)"):
    ops.window_attention(q, k, v, table[:, 1:-1, 1:-1], window=(7, 7))
  with pytest.raises(ValueError, match=r"expected rel_pos_table with 2 heads.*\(3, 13, 13\)"):
    ops.window_attention(q, k, v, jnp.zeros((3, 13, 13)), window=(7, 7))
  with pytest.raises(ValueError, match=r"expected window as \(height, width\)"):
    ops.window_attention(q, k, v, table, window=49)
