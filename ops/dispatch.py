"""Choosing an implementation of an op for the platform and the case at hand.

Every op offers ``implementation=None | "xla" | "pallas" | "cudnn" | ...``. Each implementation
states, for a concrete call, why it cannot serve it (or ``None`` when it can). ``None`` walks the
platform's order in ``ORDER`` and takes the first that can; naming one that cannot raises a
ValueError carrying its reason. The CPU order holds only ``"xla"``: interpret mode (what
``"pallas"`` means on CPU) is for tests and is never picked silently.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax

Reason = str | None  # why an implementation cannot serve a call; None when it can

# Each op's implementations per platform, best first; the last always serves. The libraries that
# already do the job come first, the zoo's kernels for what they do not do.
ORDER = {
    # GPU: cuDNN's fused attention (sm80+; bf16/f16, head dim <= 256 from Hopper on, <= 128
    # before; even lengths; no segment ids), then the zoo's Triton kernel (a bias and its gradient,
    # segment ids, f32, odd lengths). jax's Mosaic GPU attention (sm90) serves a subset of what
    # cuDNN serves (bf16/f16, no bias, no causal backward), so it is not in the order.
    # TPU: jax's flash attention (lengths multiples of 128; K/V streamed, VMEM independent of L),
    # then the zoo's Mosaic kernel (windows of 49, ragged lengths: a whole sequence per block).
    "attention": {"cpu": ("xla",), "gpu": ("cudnn", "pallas", "xla"),
                  "tpu": ("tpu_flash", "pallas", "xla")},
    # Windows (MaxViT's 49 tokens with a shared bias; cuDNN takes no odd lengths in training):
    # the zoo's window kernel (several windows a program, read in place) on GPU and TPU.
    "window_attention": {"cpu": ("xla",), "gpu": ("pallas", "xla"), "tpu": ("pallas", "xla")},
    # No library routes regions: the zoo's kernel where it lowers (regions of >= 16 tokens).
    "routing_attention": {"cpu": ("xla",), "gpu": ("pallas", "xla"), "tpu": ("pallas", "xla")},
    # Lightning Attention-2's chunk-parallel kernels (tensor cores / the MXU) on devices; no
    # library has decayed linear attention.
    "lightning_attention": {"cpu": ("xla",), "gpu": ("pallas", "xla"), "tpu": ("pallas", "xla")},
    # TransNormer v1's bidirectional and block-diagonal forms: einsums, no kernel.
    "norm_attention": {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
    "diag_attention": {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
    # XLA:CPU runs grouped convs through a generic loop: the shifted products there (xla_cpu).
    "depthwise_conv": {"cpu": ("shifted", "xla"), "gpu": ("xla",), "tpu": ("xla",)},
}


def platform() -> str:
  """``"cpu"``, ``"gpu"`` or ``"tpu"``: the devices of the mesh set by ``jax.set_mesh``, else the
  default backend (where un-placed arrays live). Following the mesh lets a CPU trace and compile
  a program for TPU devices it does not have (``aot.py``)."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  backend = device.platform if device is not None else jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm") else backend


def compute_capability() -> tuple[int, int] | None:
  """The GPU's CUDA compute capability ((9, 0) on Hopper), or None where no GPU is attached (a
  CPU tracing for one)."""
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  return tuple(int(x) for x in capability.split(".")) if capability else None


def choose(op: str, implementation: str | None, reasons: Mapping[str, Callable[[], Reason]],
           order: Mapping[str, tuple[str, ...]] | None = None) -> str:
  """Returns the implementation to run.

  Args:
    op: the op's name, for messages and its ``ORDER`` entry.
    implementation: what the caller asked for (None: the platform's best).
    reasons: implementation -> a thunk returning why it cannot serve this call (None: it can).
      Thunks keep the checks lazy: a cuDNN check never runs on CPU.
    order: platform -> implementations, best first, ending with one that always serves; None is
      ``ORDER[op]``.
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
  for name in (ORDER[op] if order is None else order)[platform()]:
    reason = reasons[name]()
    if reason is None:
      return name
    tried.append(f"{name}: {reason}")
  raise ValueError(f"{op}: no implementation serves this call ({'; '.join(tried)})")
