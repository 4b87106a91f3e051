"""Numerical test rules shared by the kernel tests (specs/kernels.md §4.4).

Low-precision kernels are judged against the f32 reference relative to how far a plain
low-precision implementation of the same math strays from it (the FlashAttention test rule), so
the tolerance follows the data instead of a hand-picked constant::

    max|kernel - ref_f32| <= factor * max|ref_lowp - ref_f32| + atol0

with ``factor`` 2 for outputs and 3 for gradients, and ``atol0`` twice the round-off of ``ref_f32``
at the output dtype (``max|cast(ref_f32, dtype) - ref_f32|``), so exact-looking cases are not flaky.
"""
from __future__ import annotations

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
