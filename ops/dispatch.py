"""Choosing an implementation of an op for the platform and the case at hand.

Every op offers ``implementation=None | "xla" | "pallas" | "cudnn" | ...``. Each implementation
states, for a concrete call, why it cannot serve it (or ``None`` when it can). ``None`` walks the
platform's preference order and takes the first that can; naming one that cannot raises a
ValueError carrying its reason. The CPU order holds only ``"xla"``: interpret mode (what
``"pallas"`` means on CPU) is for tests and is never picked silently.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax

Reason = str | None  # why an implementation cannot serve a call; None when it can


def platform() -> str:
  """``"cpu"``, ``"gpu"`` or ``"tpu"``: the devices of the mesh set by ``jax.set_mesh``, else the
  default backend (where un-placed arrays live). Following the mesh lets a CPU trace and compile
  a program for TPU devices it does not have (``aot.py``)."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  backend = device.platform if device is not None else jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm") else backend


def choose(op: str, implementation: str | None, reasons: Mapping[str, Callable[[], Reason]],
           preference: Mapping[str, tuple[str, ...]]) -> str:
  """Returns the implementation to run.

  Args:
    op: the op's name, for messages.
    implementation: what the caller asked for (None: the platform's best).
    reasons: implementation -> a thunk returning why it cannot serve this call (None: it can).
      Thunks keep the checks lazy: a cuDNN check never runs on CPU.
    preference: platform -> implementations in order of preference; must end with one that always
      serves (``"xla"``).
  """
  if implementation is not None:
    if implementation not in reasons:
      raise ValueError(
          f"{op}: expected implementation in {(None, *reasons)}, got {implementation!r}")
    reason = reasons[implementation]()
    if reason is not None:
      raise ValueError(f"{op}: implementation={implementation!r} cannot serve this call: {reason}")
    return implementation
  tried = []
  for name in preference[platform()]:
    reason = reasons[name]()
    if reason is None:
      return name
    tried.append(f"{name}: {reason}")
  raise ValueError(f"{op}: no implementation serves this call ({'; '.join(tried)})")
