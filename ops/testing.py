"""Numerical test rules shared by the kernel tests (specs/kernels.md §4.4).

Low-precision kernels are judged against the f32 reference relative to how far a plain
low-precision implementation of the same math strays from it (the FlashAttention test rule), so
the tolerance follows the data instead of a hand-picked constant::

    max|kernel - ref_f32| <= factor * max|ref_lowp - ref_f32| + atol0

with ``factor`` 2 for outputs and 3 for gradients, and ``atol0`` twice the round-off of ``ref_f32``
at the output dtype (``max|cast(ref_f32, dtype) - ref_f32|``), so exact-looking cases are not flaky.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

OUTPUT_FACTOR = 2.0
GRADIENT_FACTOR = 3.0


def error_ratio_bound(ref_f32, ref_lowp, dtype, factor: float) -> float:
  """The tolerance ``factor * max|ref_lowp - ref_f32| + 2 max|cast(ref_f32, dtype) - ref_f32|``."""
  rounded = np.asarray(jnp.asarray(ref_f32, jnp.float32).astype(dtype), np.float64)
  ref_f32 = np.asarray(ref_f32, np.float64)
  lowp_err = np.abs(np.asarray(ref_lowp, np.float64) - ref_f32).max(initial=0.0)
  rounding = np.abs(rounded - ref_f32).max(initial=0.0)
  return factor * lowp_err + 2.0 * rounding


def assert_error_ratio(kernel, ref_f32, ref_lowp, *, factor: float = OUTPUT_FACTOR,
                       dtype=None, name: str = "output"):
  """Asserts the error-ratio rule; ``dtype`` defaults to the kernel output's dtype."""
  dtype = kernel.dtype if dtype is None else dtype
  if kernel.shape != ref_f32.shape:
    raise AssertionError(f"{name}: shape {kernel.shape} != reference {ref_f32.shape}")
  err = np.abs(np.asarray(kernel, np.float64) - np.asarray(ref_f32, np.float64)).max(initial=0.0)
  bound = error_ratio_bound(ref_f32, ref_lowp, dtype, factor)
  if not err <= bound:
    raise AssertionError(
        f"{name}: max|kernel - ref_f32| = {err:.3g} exceeds {factor:g} x max|ref_lowp - ref_f32| "
        f"+ atol0 = {bound:.3g}")


def triton_modules(fn, *args) -> list[tuple[str, str]]:
  """(kernel name, Triton IR) of every Pallas kernel ``jax.jit(fn)(*args)`` lowers to on GPU, in
  trace order: the program is exported for ``cuda`` on this host (no GPU needed) with the ops'
  dispatch told the platform is a GPU, and jax's Triton lowering is intercepted."""
  import contextlib
  import re

  import jax
  from jax import export
  from jax._src.pallas.triton import pallas_call_registration

  from ops import dispatch

  lowering = pallas_call_registration.lowering
  original, platform = lowering.lower_jaxpr_to_triton_module, dispatch.platform
  captured = []

  def capture(*a, **kw):
    result = original(*a, **kw)
    text = result.module.operation.get_asm(enable_debug_info=False)
    name = re.search(r"tt\.func public @(\w+)", text)
    captured.append((name[1] if name else "?", text))
    return result

  with contextlib.ExitStack() as restore:
    restore.callback(setattr, lowering, "lower_jaxpr_to_triton_module", original)
    restore.callback(setattr, dispatch, "platform", platform)
    lowering.lower_jaxpr_to_triton_module = capture
    dispatch.platform = lambda: "gpu"
    export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  return captured


# --- the plain low-precision implementations the error-ratio rule compares against ----------------


def attention_lowp(q, k, v, bias=None, *, causal=False, scale=None):
  """Softmax attention as plain bf16 code: matmul operands in the inputs' dtype with f32
  accumulation, an f32 softmax, P cast down before P @ V (FlashAttention's ref_lowp)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  if causal:
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)


def routing_lowp(q, k, v, routes, *, num_heads, n_win, scale):
  """Routing attention as the plain gather code in the inputs' dtype, f32 accumulation and
  softmax."""
  from ops.routing import from_regions, to_regions

  qr, kr, vr = (to_regions(x, n_win, num_heads) for x in (q, k, v))
  gather = jax.vmap(lambda x, r: x[:, r])
  kg, vg = gather(kr, routes), gather(vr, routes)
  kg = kg.reshape(*kg.shape[:3], -1, kg.shape[-1])
  vg = vg.reshape(*vg.shape[:3], -1, vg.shape[-1])
  s = jnp.einsum("bmpqd,bmpkd->bmpqk", qr, kg, preferred_element_type=jnp.float32) * scale
  p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
  out = jnp.einsum("bmpqk,bmpkd->bmpqd", p, vg, preferred_element_type=jnp.float32)
  return from_regions(out.astype(q.dtype), n_win, *q.shape[1:3])


def lightning_lowp(q, k, v, decay):
  """Decayed causal linear attention as plain bf16 code: the quadratic form with bf16 scores and
  mask, f32 accumulation, a bf16 output."""
  length = q.shape[1]
  lam = jnp.exp(-jnp.asarray(decay, jnp.float32))
  dist = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
  mask = jnp.where(dist >= 0, lam[:, None, None] ** jnp.maximum(dist, 0), 0.0).astype(q.dtype)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores.astype(q.dtype) * mask[None]
  out = jnp.einsum("bhqk,bkhe->bqhe", scores, v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)
