r"""What every Pallas kernel compiles to on an H100 and a TPU, measured on a CPU (no device needed).

  python benchmarks/compile_report.py --gpu          # Triton for sm_90 with pip triton + ptxas
  python benchmarks/compile_report.py --tpu          # Mosaic for a v5e:2x2 slice with libtpu
  python benchmarks/compile_report.py --gpu --tpu --json report.json --cases window
  python benchmarks/compile_report.py --lightning_cost   # lightning kernels vs the XLA loop, TPU
  python benchmarks/compile_report.py --window_passes    # window attention's HBM passes, GPU, TPU

GPU: each case's forward and backward is exported for `cuda` (the kernels lower to Triton IR, which
is captured), the IR is compiled with pip `triton` for `GPUTarget("cuda", 90, 32)` with the
warps and stages the zoo asks for, and `ptxas -v` reads registers and spills. A row per kernel:
registers per thread, spill stores and loads (bytes), shared memory, and the tensor-core
(`wgmma`, `mma.sync`) and f32 FMA instructions of its PTX. XLA compiles these kernels with its own
bundled Triton, so the figures are close to, not identical with, what a GPU runs.

TPU: each case's forward and backward, the batch split over the chips (one sequence a chip where
it does not split), is compiled for v5e:2x2 through the dispatch ops.attention and the models use
(the shard_map per chip), and also through the zoo's Pallas kernel by name. A row per case: whether it compiles (the first line
of the error if not: `CompileTimeScopedVmemOom` when a block does not fit the scoped VMEM), the
Mosaic kernels, the temporaries per chip, and each Pallas kernel's VMEM from its blocks
(double-buffered, in Mosaic's (8, 128) tiles, scratch included).

Shapes are the models': MaxViT-T's window stages and BiFormer-T's routing stages at 224 and batch
128, dense attention at 4K (head dims 64 and 128, causal, a bias), and TransNormerLLM-385M's
lightning attention from 2K to 32K tokens, in float32 and bfloat16. Needs `pip install
triton==3.9.0` (GPU) and `pip install -e ".[tpu]"` (TPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.extend
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ops  # noqa: E402
from ops.testing import triton_modules  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  family: str           # for --cases
  arrays: Callable      # dtype -> abstract arguments
  fn: Callable          # (*arrays, implementation) -> output
  grad_args: int        # the leading arguments the loss is differentiated by


def _s(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def _attention_case(name, family, shape, bias=None, causal=False):
  def arrays(dtype):
    qkv = [_s(shape, dtype)] * 3
    return qkv + ([_s(bias, jnp.float32)] if bias else [])

  def fn(q, k, v, *bias_, implementation=None):
    return ops.attention(q, k, v, bias=bias_[0] if bias_ else None, causal=causal,
                         implementation=implementation)
  return Case(name, family, arrays, fn, 4 if bias else 3)


def _window_case(stage, windows, heads):
  def arrays(dtype):
    return [_s((windows, 49, heads, 32), dtype)] * 3 + [_s((heads, 13, 13), jnp.float32)]

  def fn(q, k, v, table, implementation=None):
    return ops.window_attention(q, k, v, table, window=(7, 7), implementation=implementation)
  return Case(f"maxvit_t s{stage}: {windows} windows x 49, H{heads} hd32", "window", arrays, fn, 4)


def _routing_case(stage, size, dim, heads, topk):
  def arrays(dtype):
    return [_s((128, size, size, dim), dtype)] * 3

  def fn(q, k, v, implementation=None):
    return ops.routing_attention(q, k, v, num_heads=heads, n_win=7, topk=topk,
                                 implementation=implementation)
  return Case(f"biformer_t s{stage}: {size}x{size}, C{dim} H{heads} top{topk}", "routing",
              arrays, fn, 3)


def _lightning_case(length, batch, heads=8, head_dim=128):
  """TNL-385M's heads by default (width 1024 in 8 heads); hd 64 for the smaller head dim."""
  def arrays(dtype):
    return [_s((batch, length, heads, head_dim), dtype)] * 3

  def fn(q, k, v, implementation=None):
    decay = jnp.linspace(0.01, 0.5, heads)
    return ops.lightning_attention(q, k, v, decay=decay, implementation=implementation)
  model = "tnl_385m" if head_dim == 128 else "tnl"
  return Case(f"{model} lightning: B{batch} L{length // 1024}K H{heads} hd{head_dim}",
              "lightning", arrays, fn, 3)


CASES = [
    _window_case(1, 8192, 2), _window_case(2, 2048, 4), _window_case(3, 512, 8),
    _window_case(4, 128, 16),
    _routing_case(1, 56, 64, 2, 1), _routing_case(2, 28, 128, 4, 4),
    _attention_case("biformer_t s4: 49 tokens, H16 hd32", "dense", (128, 49, 16, 32)),
    _attention_case("dense 4K hd64 H32", "dense", (4, 4096, 32, 64)),
    _attention_case("dense 4K hd128 H16 causal", "dense", (4, 4096, 16, 128), causal=True),
    _attention_case("dense 4K hd128 H16 bias", "dense", (4, 4096, 16, 128),
                    bias=(1, 16, 4096, 4096)),
    *(_lightning_case(length, batch) for length, batch in ((2048, 2), (8192, 2), (32768, 1))),
    *(_lightning_case(length, batch, 16, 64) for length, batch in ((4096, 2), (32768, 1))),
]


def _loss(case: Case, implementation):
  def loss(*args):
    out = case.fn(*args, implementation=implementation)
    return jnp.sum(out.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=tuple(range(case.grad_args))))


def _first_line(error: Exception) -> str:
  lines = [line for line in str(error).splitlines() if line.strip()]
  return re.sub(r"\s+", " ", f"{type(error).__name__}: {lines[0] if lines else ''}")[:160]


# ----------------------------------------------------------------------------------------- GPU

def _captured_triton_modules(case: Case, dtype) -> list[tuple[str, str]]:
  """(kernel name, Triton IR) of every kernel of the case's forward and backward on GPU."""
  return triton_modules(_loss(case, "pallas"), *case.arrays(dtype))


def _sm90_row(name: str, ttir: str, workdir: Path) -> dict:
  import triton
  from triton.backends.compiler import GPUTarget

  path = workdir / f"{name}.ttir"
  path.write_text(ttir)
  # The warps and stages ops._pallas.backend_params gives every Triton kernel.
  kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, num_stages=2))
  ptx = kernel.asm["ptx"]
  ptx_path = workdir / f"{name}.ptx"
  ptx_path.write_text(ptx)
  # The newer of the wheel's two ptxas (CUDA 13) reads the PTX version Triton writes.
  bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
  ptxas = next(p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists())
  info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx_path), "-o", os.devnull],
                        capture_output=True, text=True).stderr
  number = lambda pattern: int(m[1]) if (m := re.search(pattern, info)) else None
  return dict(kernel=name, registers=number(r"Used (\d+) registers"),
              spill_stores=number(r"(\d+) bytes spill stores"),
              spill_loads=number(r"(\d+) bytes spill loads"),
              shared_kib=round(kernel.metadata.shared / 1024, 1),
              wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
              mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
              fma_f32=len(re.findall(r"\bfma\.rn\.f32", ptx)))


def _numbered(modules):
  """Kernels of one name (the lightning sweeps: forward, dQ, dK, dV) numbered in trace order."""
  counts = {}
  for name, ttir in modules:
    counts[name] = counts.get(name, 0) + 1
    yield (name if counts[name] == 1 else f"{name}#{counts[name]}"), ttir


def gpu_rows(cases, dtypes) -> list[dict]:
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for case in cases:
      for dtype in dtypes:
        base = dict(case=case.name, dtype=jnp.dtype(dtype).name)
        try:
          modules = _captured_triton_modules(case, dtype)
        except Exception as e:  # noqa: BLE001  a case the kernels refuse: its reason is the row
          rows.append(base | dict(kernel="-", error=_first_line(e)))
          continue
        for name, ttir in _numbered(modules):
          try:
            rows.append(base | _sm90_row(name, ttir, Path(tmp)))
          except Exception as e:  # noqa: BLE001
            rows.append(base | dict(kernel=name, error=_first_line(e)))
        print(f"gpu: {case.name} {base['dtype']}: {len(modules)} kernels", file=sys.stderr)
  return rows


# ----------------------------------------------------------------------------------------- TPU

def _vmem_tile_bytes(shape, dtype) -> int:
  """Bytes of a block in VMEM: Mosaic lays the two minor dims out in (8 x 32-bit sublanes, 128
  lanes) tiles, so a [128, 1] f32 column takes as much as [128, 128]."""
  dtype = jnp.dtype(dtype)
  rows, cols = ((1,) + tuple(shape))[-2:]
  sublanes = 8 * max(1, 4 // dtype.itemsize)
  lead = math.prod(shape[:-2]) if len(shape) > 2 else 1
  return lead * -(-rows // sublanes) * sublanes * -(-cols // 128) * 128 * dtype.itemsize


def kernel_vmem(closed_jaxpr) -> dict[str, int]:
  """Each Mosaic kernel's VMEM in bytes, from its blocks: inputs and outputs double-buffered (the
  pipeline's), scratch once, SMEM and HBM operands left out; the largest per kernel name."""
  vmem = {}

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        grid = eqn.params["grid_mapping"]
        total = 0
        for block in grid.block_mappings:
          ref = block.transformed_block_aval
          if str(getattr(ref, "memory_space", "")).lower() in ("smem", "any", "hbm"):
            continue
          total += 2 * _vmem_tile_bytes(ref.inner_aval.shape, ref.inner_aval.dtype)
        for scratch in grid.scratch_avals:
          aval = getattr(scratch, "inner_aval", scratch)
          total += _vmem_tile_bytes(aval.shape, aval.dtype)
        name = eqn.params["name"] or eqn.params["jaxpr"].debug_info.func_name  # unnamed: jax's
        name = str(getattr(name, "name", name))
        vmem[name] = max(vmem.get(name, 0), total)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(closed_jaxpr.jaxpr)
  return vmem


def _data_mesh(devices):
  """The devices as a mesh of one data axis (train.py's axis names)."""
  import ml_collections
  import train
  return train.make_mesh(ml_collections.ConfigDict(dict(data=len(devices), fsdp=1, tensor=1)),
                         devices=devices)


def _tpu_row(case: Case, dtype, implementation, devices) -> dict:
  import aot

  mesh = _data_mesh(devices)
  split = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
  arrays = []
  for array in case.arrays(dtype):  # the batch split over the chips; a shared bias stays whole
    if array.ndim < 4 or array.shape[0] == 1:
      arrays.append(array)
      continue
    batch = array.shape[0] if array.shape[0] % len(devices) == 0 else len(devices)
    arrays.append(jax.ShapeDtypeStruct((batch, *array.shape[1:]), array.dtype, sharding=split))
  row = dict(case=case.name, dtype=jnp.dtype(dtype).name, implementation=implementation or "auto")
  try:
    with jax.set_mesh(mesh):
      compiled = _loss(case, implementation).trace(*arrays).lower().compile()
  except Exception as e:  # noqa: BLE001
    return row | dict(compiles=False, error=_first_line(e))
  kernels = aot.mosaic_kernels(compiled.as_text())
  with jax.set_mesh(mesh):
    vmem = kernel_vmem(jax.make_jaxpr(_loss(case, implementation))(*arrays))
  return row | dict(compiles=True, kernels=", ".join(sorted(kernels)) or "-",
                    temp_mib=round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
                    vmem_kib=", ".join(f"{name} {size / 1024:.0f}"
                                       for name, size in sorted(vmem.items())) or "-")


def tpu_rows(cases, dtypes, topology: str) -> list[dict]:
  import aot
  devices = aot.tpu_devices(topology)
  rows = []
  for case in cases:
    for dtype in dtypes:
      for implementation in (None, "pallas"):
        rows.append(_tpu_row(case, dtype, implementation, devices))
        print(f"tpu: {case.name} {rows[-1]['dtype']} {rows[-1]['implementation']}: "
              f"{'ok' if rows[-1]['compiles'] else rows[-1]['error']}", file=sys.stderr)
  return rows


def _pallas_call_bytes(jaxpr) -> int:
  """Bytes of every pallas_call's operands and results in a jaxpr (nested ones included)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      total += sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize
                   for v in (*eqn.invars, *eqn.outvars))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += _pallas_call_bytes(sub)
  return total


def hbm_passes(fn, *args) -> float:
  """HBM traffic of ``jit(fn)`` on a GPU, in passes over ``args[0]``: the kernels' operands and
  results (each read or written once, the minimum) plus XLA's cost analysis of everything else in
  the program lowered for CUDA (unoptimized: a copy XLA would fuse away still counts, so the
  figure is an upper bound)."""
  from ops import dispatch
  platform, dispatch.platform = dispatch.platform, lambda: "gpu"
  try:
    closed = jax.make_jaxpr(fn)(*args)
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    dispatch.platform = platform
  moved = lowered.cost_analysis()["bytes accessed"] + _pallas_call_bytes(closed.jaxpr)
  return moved / (math.prod(args[0].shape) * args[0].dtype.itemsize)


def window_passes_rows() -> list[dict]:
  """MaxViT-T's stage-1 windows (batch 32, bf16): HBM passes over q of window attention through
  the window kernel and through ops.attention's kernel (transposed and padded to 64 rows)."""
  q = jax.ShapeDtypeStruct((2048, 49, 2, 32), jnp.bfloat16)
  table = jax.ShapeDtypeStruct((2, 13, 13), jnp.float32)
  paths = {
      "window kernel": lambda q, k, v, t: ops.window_attention(q, k, v, t, implementation="pallas"),
      "ops.attention kernel": lambda q, k, v, t: ops.attention(
          q, k, v, bias=ops.relative_position_bias(t, (7, 7))[None], implementation="pallas"),
  }
  rows = []
  for name, fn in paths.items():
    grads = lambda *a, fn=fn: jax.vjp(fn, *a)[1](jnp.ones(q.shape, q.dtype))
    rows.append(dict(path=name, fwd_passes=round(hbm_passes(fn, q, q, q, table), 2),
                     bwd_passes=round(hbm_passes(grads, q, q, q, table), 2)))
  return rows


def tpu_window_rows(topology: str, images: int = 128) -> list[dict]:
  """MaxViT-T's stage-1 block attention on TPU (56x56x64 maps cut into 7x7 windows, 2 heads of
  32, bf16), per chip by XLA's cost analysis of the compiled program: HBM passes over q and the
  grid steps of the kernels, through the window kernel, through ops.attention's (transposed and
  padded to 64 rows) and with no attention (q + k + v). The program is the model's around it: the
  window partition, the qkv projection, attention, the reverse partition and the residual, so that
  XLA lays the arrays out as it would in the model."""
  import aot

  devices = aot.tpu_devices(topology)
  mesh = _data_mesh(devices)
  x = jax.ShapeDtypeStruct((images, 56, 56, 64), jnp.bfloat16,
                           sharding=jax.sharding.NamedSharding(mesh, jax.P("data")))
  w = jax.ShapeDtypeStruct((64, 3 * 64), jnp.bfloat16)
  table = jax.ShapeDtypeStruct((2, 13, 13), jnp.float32)
  paths = {
      "window kernel": lambda q, k, v, t: ops.window_attention(q, k, v, t, implementation="pallas"),
      "ops.attention kernel": lambda q, k, v, t: ops.attention(
          q, k, v, bias=ops.relative_position_bias(t, (7, 7))[None], implementation="pallas"),
      "no attention (q + k + v)": lambda q, k, v, t: q + k + v,
  }

  def windows(x):  # [B, 56, 56, C] -> [B * 64, 49, C]
    b, c = x.shape[0], x.shape[-1]
    return x.reshape(b, 8, 7, 8, 7, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * 64, 49, c)

  def unwindows(y, like):
    b, c = like.shape[0], like.shape[-1]
    return y.reshape(b, 8, 8, 7, 7, c).transpose(0, 1, 3, 2, 4, 5).reshape(like.shape)

  q_bytes = images // len(devices) * 56 * 56 * 64 * 2  # one chip's q
  rows = []
  for name, path in paths.items():
    def block(x, w, t, path=path):
      tokens = windows(x)
      q, k, v = jnp.moveaxis((tokens @ w).reshape(*tokens.shape[:2], 3, 2, 32), 2, 0)
      return x + unwindows(path(q, k, v, t).reshape(tokens.shape), x)
    grads = lambda x, w, t, block=block: jax.grad(
        lambda *a: jnp.sum(block(*a).astype(jnp.float32)), (0, 1))(x, w, t)
    row = dict(path=name)
    for pass_, fn in (("fwd", block), ("fwd+bwd", grads)):
      with jax.set_mesh(mesh):
        compiled = jax.jit(fn).trace(x, w, table).lower().compile()
        steps = _pallas_grid_steps(jax.make_jaxpr(fn)(x, w, table).jaxpr)
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      row[f"{pass_}_passes"] = round(cost["bytes accessed"] / q_bytes, 1)
      row[f"{pass_}_grid_steps"] = steps
    rows.append(row)
  return rows


def _pallas_grid_steps(jaxpr) -> int:
  """Grid steps of every pallas_call in a jaxpr (nested ones included; under a shard_map, per
  shard)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      total += math.prod(eqn.params["grid_mapping"].grid)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += _pallas_grid_steps(sub)
  return total


def lightning_cost_rows(topology: str, length: int = 2048) -> list[dict]:
  """Lightning attention on TPU, kernels against the XLA chunk loop, by XLA's cost analysis per
  chip (TNL-385M's heads, one sequence per chip, bf16). The loop is compiled unrolled so that its
  cost analysis counts every step (a while loop's body counts once); the kernels count their cost
  estimates."""
  import functools

  import aot
  from ops import linear_attention

  devices = aot.tpu_devices(topology)
  mesh = _data_mesh(devices)
  qkv = jax.ShapeDtypeStruct((len(devices), length, 8, 128), jnp.bfloat16,
                             sharding=jax.sharding.NamedSharding(mesh, jax.P("data")))
  decay = jnp.linspace(0.01, 0.5, 8)
  fori_loop = linear_attention.lax.fori_loop
  rows = []
  for implementation in ("xla", "pallas"):
    loss = lambda *a: jnp.sum(ops.lightning_attention(
        *a, decay=decay, implementation=implementation).astype(jnp.float32))
    for name, fn in (("fwd", loss), ("fwd+bwd", jax.value_and_grad(loss, (0, 1, 2)))):
      if implementation == "xla":
        linear_attention.lax.fori_loop = functools.partial(fori_loop, unroll=True)
      try:
        with jax.set_mesh(mesh):
          compiled = jax.jit(fn).trace(qkv, qkv, qkv).lower().compile()
      finally:
        linear_attention.lax.fori_loop = fori_loop
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      rows.append(dict(implementation=implementation, pass_=name, length=length,
                       gflop=round(cost.get("flops", 0) / 1e9, 3),
                       mb_accessed=round(cost.get("bytes accessed", 0) / 1e6, 1)))
  return rows


# ------------------------------------------------------------------------------------------- main

def markdown(rows: list[dict]) -> str:
  columns = list(dict.fromkeys(key for row in rows for key in row))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gpu", action="store_true", help="Triton for sm_90 (pip triton)")
  parser.add_argument("--tpu", action="store_true", help="Mosaic for a TPU slice (libtpu)")
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--cases", nargs="*", default=[], choices=sorted({c.family for c in CASES}),
                      help="case families (default: all)")
  parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
  parser.add_argument("--window_passes", action="store_true",
                      help="window attention on a GPU and a TPU: HBM passes of the kernels and around them")
  parser.add_argument("--lightning_cost", action="store_true",
                      help="lightning on TPU: the kernels' cost analysis against the XLA loop's")
  parser.add_argument("--json", type=Path, help="write the rows here")
  args = parser.parse_args(argv)
  if not (args.gpu or args.tpu or args.lightning_cost or args.window_passes):
    parser.error("expected --gpu, --tpu, --lightning_cost, --window_passes or several")
  cases = [c for c in CASES if not args.cases or c.family in args.cases]
  dtypes = [jnp.dtype(d) for d in args.dtypes]
  report = {}
  if args.gpu:
    report["gpu_sm90"] = gpu_rows(cases, dtypes)
    print("## Triton, sm_90\n\n" + markdown(report["gpu_sm90"]) + "\n")
  if args.tpu:
    report["tpu"] = tpu_rows(cases, dtypes, args.topology)
    print(f"## Mosaic, {args.topology}\n\n" + markdown(report["tpu"]) + "\n")
  if args.window_passes:
    report["window_passes"] = window_passes_rows()
    print("## Window attention on a GPU: HBM passes over q\n\n"
          + markdown(report["window_passes"]) + "\n")
    report["tpu_window_passes"] = tpu_window_rows(args.topology)
    print(f"## Window attention on {args.topology}: HBM passes over q and grid steps per chip\n\n"
          + markdown(report["tpu_window_passes"]) + "\n")
  if args.lightning_cost:
    report["lightning_cost"] = lightning_cost_rows(args.topology)
    print(f"## Lightning on {args.topology}: cost analysis per chip\n\n"
          + markdown(report["lightning_cost"]) + "\n")
  if args.json:
    environment = dict(jax=jax.__version__, devices="none: compiled on a CPU")
    args.json.write_text(json.dumps(dict(environment=environment, **report), indent=1))


if __name__ == "__main__":
  main()
