"""Benchmarks of the attention ops and the depthwise convs beside them: forward, backward, both.

    python benchmarks/ops.py --suite window_cpu     # CPU: the zoo's window attention vs naive code
    python benchmarks/ops.py --suite attention      # GPU/TPU: Pallas vs XLA vs cuDNN, dense, biased
    python benchmarks/ops.py --suite window         # GPU/TPU: 49-token windows, Pallas/XLA/cuDNN
    python benchmarks/ops.py --suite routing_cpu    # CPU: BiFormer routing (gather) vs dense
    python benchmarks/ops.py --suite routing        # GPU/TPU: routing Pallas vs gather, dense
    python benchmarks/ops.py --suite depthwise_cpu  # CPU: ops.depthwise_conv2d vs grouped conv
    python benchmarks/ops.py --suite lightning      # GPU/TPU: lightning kernels vs XLA loop, cuDNN
    python benchmarks/ops.py --suite window --quick # fewer cases and repetitions (gpu_check.sh)

Every row is measured in this run on this machine; ratios are against the other implementations of
the same row. Timing follows specs/kernels.md §4.5: jit, one call to compile (left out), >= 3
warm-up calls, then >= 10 repetitions; median with p10/p90. On a GPU each repetition is the device
time of the call's kernels, by CUPTI (`jax.experimental.mosaic.gpu.profiler.measure`); elsewhere,
or where CUPTI is unavailable, wall clock with `block_until_ready` over >= 25 ms (host overhead
included). Each row says which (`timer`).
FLOPs are logical (4 B H Lq Lk D forward, 2.5x that backward; half when causal); bytes are the
minimum HBM traffic (q, k, v, o forward; + do, dq, dk, dv backward; + the bias once).
`--json PATH` writes the rows with the device, versions and block sizes.

`--steady_heap` (CPU, glibc) reruns the process with glibc's malloc fixed to one arena that never
returns memory to the OS. With the default tunables, whether a call re-faults its MiB of buffers
depends on the heap's history (the mmap threshold adapts, per-thread arenas trim), so the first
implementation timed in a case can pay thousands of page faults per call that the next one does
not: window_cpu's stage-1 forward measured 0.46x "naive" with an identical compiled program.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ops  # noqa: E402
from ops import attention as attention_fn  # noqa: E402
from ops import depthwise_conv2d  # noqa: E402
from ops import routing_attention, window_attention  # noqa: E402
from ops._pallas import default_target  # noqa: E402
from ops.attention import BlockSizes  # noqa: E402

# Dense bf16 peak (TFLOP/s, no sparsity) and HBM bandwidth (TB/s) by device kind (spec sheets).
PEAKS = {
    "NVIDIA H100 80GB HBM3": (989.4, 3.35),      # SXM5
    "NVIDIA H100 PCIe": (756.0, 2.0),
    "NVIDIA H100 NVL": (835.0, 3.9),
    "NVIDIA H200": (989.4, 4.8),
    "NVIDIA A100-SXM4-80GB": (312.0, 2.039),
    "NVIDIA A100-SXM4-40GB": (312.0, 1.555),
    "NVIDIA A100 80GB PCIe": (312.0, 1.935),
    "TPU v4": (275.0, 1.2),
    "TPU v5 lite": (197.0, 0.819),
    "TPU v5p": (459.0, 2.765),
    "TPU v6 lite": (918.0, 1.64),
}


def timer() -> str:
  """"cupti" (device time of the kernels) on a GPU where CUPTI loads, else "wall"."""
  if jax.default_backend() != "gpu":
    return "wall"
  try:
    from jax.experimental.mosaic.gpu import profiler  # noqa: F401
  except ImportError:
    return "wall"
  return "cupti"


def _time_cupti(fn, *args, reps):
  from jax.experimental.mosaic.gpu import profiler
  jax.block_until_ready(fn(*args))
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  _, ms = profiler.measure(fn, iterations=reps)(*args)
  seconds = [t / 1e3 for t in ms]
  q10, q90 = np.percentile(seconds, [10, 90])
  return statistics.median(seconds), float(q10), float(q90)


def time_fn(fn, *args, min_reps=10, min_rep_seconds=0.025):
  """Median, p10, p90 seconds per call of a jitted fn (compile and warm-up left out): device time
  by CUPTI where ``timer()`` says so, else wall clock."""
  if timer() == "cupti":
    return _time_cupti(fn, *args, reps=min_reps)
  jax.block_until_ready(fn(*args))
  start, warm = time.perf_counter(), 0
  while warm < 3 or time.perf_counter() - start < 0.025:
    jax.block_until_ready(fn(*args))
    warm += 1
  per_call = (time.perf_counter() - start) / warm
  inner = max(1, int(np.ceil(min_rep_seconds / max(per_call, 1e-9))))
  samples = []
  for _ in range(min_reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / inner)
  q10, q90 = np.percentile(samples, [10, 90])
  return statistics.median(samples), float(q10), float(q90)


def temp_bytes(fn, *args) -> int | None:
  """Scratch memory XLA allocates for one call (None where the backend does not report it)."""
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def naive_window_attention(q, k, v, table, window):
  """The obvious code a user would write: einsum, gathered bias, softmax, einsum (native dtype)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
  logits = logits + ops.relative_position_bias(table, window)[None]
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _inputs(shape, dtype, seed=0, lk=None):
  b, lq, h, d = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], shape, dtype)
  k = jax.random.normal(keys[1], (b, lk or lq, h, d), dtype)
  v = jax.random.normal(keys[2], (b, lk or lq, h, d), dtype)
  return q, k, v, keys[3]


def _passes(f, args):
  """Jitted forward, backward alone and forward+backward of f(*args) with a random cotangent.

  The backward takes the VJP (its residuals) as an argument: closed over, the residuals would be
  compile-time constants that XLA partly folds away, timing less work than a real backward.
  """
  out = f(*args)
  do = jax.random.normal(jax.random.key(9), out.shape, out.dtype)
  fwd = jax.jit(f)
  _, vjp = jax.vjp(f, *args)
  bwd = jax.jit(lambda vjp, ct: vjp(ct))
  both = jax.jit(lambda *a: jax.vjp(f, *a)[1](do))
  return {"fwd": (fwd, args), "bwd": (bwd, (vjp, do)), "fwd+bwd": (both, args)}


def _row(case, impl, pass_name, seconds, flops, bytes_, peaks, extra=None):
  med, p10, p90 = seconds
  row = dict(case=case, implementation=impl, passes=pass_name, median_ms=med * 1e3,
             p10_ms=p10 * 1e3, p90_ms=p90 * 1e3, tflops=flops / med / 1e12,
             gbps=bytes_ / med / 1e9, timer=timer())
  if peaks:
    row["pct_peak_flops"] = 100 * row["tflops"] / peaks[0]
    row["pct_peak_hbm"] = 100 * row["gbps"] / (peaks[1] * 1e3)
  row.update(extra or {})
  return row


def _attention_cost(b, lq, lk, h, d, causal, itemsize, bias_bytes):
  fwd = 4.0 * b * h * lq * lk * d * (0.5 if causal else 1.0)
  io = itemsize * b * h * d * (2 * lq + 2 * lk)                     # q, o, k, v
  return {"fwd": (fwd, io + bias_bytes), "bwd": (2.5 * fwd, 2 * io + 2 * bias_bytes),
          "fwd+bwd": (3.5 * fwd, 3 * io + 2 * bias_bytes)}


def suite_window_cpu(args):
  """The zoo's XLA window attention vs the naive einsum + softmax, MaxViT-T stage 1-3 shapes."""
  rows = []
  # (case, windows = batch x windows per image, heads, head dim): MaxViT-T at 224, batch 8.
  for case, n, h, d in (("stage1 56x56 C64", 8 * 64, 2, 32), ("stage2 28x28 C128", 8 * 16, 4, 32),
                        ("stage3 14x14 C256", 8 * 4, 8, 32)):
    q, k, v, key = _inputs((n, 49, h, d), jnp.float32)
    table = jax.random.normal(key, (h, 13, 13))
    impls = {
        "zoo (xla)": lambda q, k, v, t: window_attention(q, k, v, t, window=(7, 7),
                                                         implementation="xla"),
        "naive einsum": lambda q, k, v, t: naive_window_attention(q, k, v, t, (7, 7)),
    }
    cost = _attention_cost(n, 49, 49, h, d, False, 4, 4 * h * 13 * 13)
    for impl, f in impls.items():
      rows += _measure(case, impl, f, (q, k, v, table), cost, with_memory=True)
  return rows


def _implementations():
  impls = ["xla", "pallas"]
  if jax.default_backend() == "gpu":
    impls.append("cudnn")
  return impls


def suite_attention(args):
  """Dense attention at 16k tokens per batch (FA grid), bf16: no bias, causal, shared bias; on a
  GPU also jax's reference Triton kernel (`jax.experimental.pallas.ops.gpu.attention.mha`)."""
  rows, dtype = [], jnp.bfloat16
  for lq, d in ((4096, 128),) if args.quick else ((1024, 128), (4096, 128), (4096, 64)):
    h = 2048 // d
    b = max(1, 16384 // lq)
    for variant in ("plain", "causal", "bias [1,H,L,L]"):
      q, k, v, key = _inputs((b, lq, h, d), dtype)
      bias = (jax.random.normal(key, (1, h, lq, lq), dtype) if variant.startswith("bias")
              else None)
      causal = variant == "causal"
      cost = _attention_cost(b, lq, lq, h, d, causal, 2, 0 if bias is None else bias.nbytes)
      case = f"L{lq} hd{d} B{b} H{h} {variant}"
      for impl in _implementations():
        f = (lambda q, k, v, impl=impl: attention_fn(q, k, v, bias=bias, causal=causal,
                                                     implementation=impl))
        rows += _measure(case, impl, f, (q, k, v), cost)
      if bias is None and jax.default_backend() == "gpu":  # jax's own Triton kernel: no bias
        from jax.experimental.pallas.ops.gpu import attention as jax_gpu_attention
        f = lambda q, k, v: jax_gpu_attention.mha(q, k, v, None, sm_scale=d ** -0.5,
                                                  causal=causal)
        rows += _measure(case, "jax pallas mha", f, (q, k, v), cost)
  return rows


def suite_window(args):
  """MaxViT windows: 49 tokens, head dim 32, a [H, 13, 13] table, bf16, many windows."""
  rows, dtype = [], jnp.bfloat16
  for n, h in ((32 * 64, 2),) if args.quick else ((32 * 64, 2), (32 * 16, 4)):  # MaxViT-T
    # stage 1 / 2 at 224, batch 32
    q, k, v, key = _inputs((n, 49, h, 32), dtype)
    table = jax.random.normal(key, (h, 13, 13), dtype)
    cost = _attention_cost(n, 49, 49, h, 32, False, 2, 2 * h * 13 * 13)
    for impl in _implementations():
      f = (lambda q, k, v, t, impl=impl: window_attention(q, k, v, t, window=(7, 7),
                                                          implementation=impl))
      rows += _measure(f"windows {n}x49 H{h} hd32", impl, f, (q, k, v, table), cost)
  return rows


# BiFormer-T at 224 (n_win 7, head dim 32): (stage, map side, channels, heads, top-k regions).
_BIFORMER_T_STAGES = ((1, 56, 64, 2, 1), (2, 28, 128, 4, 4), (3, 14, 256, 8, 16))


def _routing_rows(batch, dtype, routing_impls, dense_impls, with_memory):
  """Routing attention at the BiFormer-T stage shapes, and dense attention over the same tokens
  (what routing replaces), both with BiFormer's scale qk_dim ** -0.5."""
  rows = []
  for stage, side, channels, heads, topk in _BIFORMER_T_STAGES:
    q, k, v, _ = _inputs((batch, side, side, channels), dtype)
    tokens, region_tokens, d = side * side, (side // 7) ** 2, channels // heads
    case = f"stage{stage} {side}x{side} C{channels} H{heads} top{topk} B{batch}"
    scale = channels ** -0.5
    for impl in routing_impls:
      f = (lambda q, k, v, impl=impl: routing_attention(
          q, k, v, num_heads=heads, n_win=7, topk=topk, scale=scale, implementation=impl))
      cost = _attention_cost(batch, tokens, topk * region_tokens, heads, d, False,
                             jnp.dtype(dtype).itemsize, 0)
      rows += _measure(case, f"routing {impl}", f, (q, k, v), cost, with_memory)
    for impl in dense_impls:
      def f(q, k, v, impl=impl):
        split = [x.reshape(batch, tokens, heads, d) for x in (q, k, v)]
        return attention_fn(*split, scale=scale, implementation=impl)
      cost = _attention_cost(batch, tokens, tokens, heads, d, False, jnp.dtype(dtype).itemsize, 0)
      rows += _measure(case, f"dense {impl}", f, (q, k, v), cost, with_memory)
  return rows


def suite_routing_cpu(args):
  """BiFormer-T stages, f32, batch 2: the gather reference (the CPU path) vs dense attention.
  The Pallas kernel only runs in the interpreter on CPU, which says nothing about its speed."""
  return _routing_rows(2, jnp.float32, ["xla"], ["xla"], with_memory=True)


def suite_routing(args):
  """BiFormer-T stages, bf16, batch 64: the Pallas kernel vs the gather reference vs dense."""
  dense = [] if args.quick else _implementations()
  return _routing_rows(64, jnp.bfloat16, ["xla", "pallas"], dense, with_memory=not args.quick)


def suite_lightning(args):
  """TransNormerLLM-385M's heads (8 of 128), bf16, 2K-32K tokens (16K tokens a batch): lightning
  attention's kernels vs its XLA loop, beside causal softmax attention (cuDNN on a GPU, jax's
  flash attention on a TPU) over the same tokens. FLOPs: the chunked form's, 2 L (C (D + E) + 2 D
  E) per head forward with 64-token chunks (2.5x that forward+backward); bytes: q, k, v, o."""
  rows, h, d, chunk = [], 8, 128, 64
  decay = jnp.linspace(0.01, 0.5, h)
  lengths = (2048, 32768) if args.quick else (2048, 4096, 8192, 16384, 32768)
  for length in lengths:
    b = max(1, 16384 // length)
    q, k, v, _ = _inputs((b, length, h, d), jnp.bfloat16)
    case = f"L{length} B{b} H{h} hd{d}"
    fwd = 2.0 * b * h * length * (chunk * 2 * d + 2 * d * d)
    io = 2 * b * length * h * d * 4
    cost = {"fwd": (fwd, io), "bwd": (2.5 * fwd, 2 * io), "fwd+bwd": (3.5 * fwd, 3 * io)}
    # on CPU "pallas" is the interpreter, which says nothing of the kernels' speed
    for impl in ("xla",) if jax.default_backend() == "cpu" else ("xla", "pallas"):
      f = lambda q, k, v, impl=impl: ops.lightning_attention(q, k, v, decay=decay,
                                                             implementation=impl)
      rows += _measure(case, f"lightning {impl}", f, (q, k, v), cost)
    softmax = lambda q, k, v: attention_fn(q, k, v, causal=True)
    rows += _measure(case, "softmax causal", softmax, (q, k, v),
                     _attention_cost(b, length, length, h, d, True, 2, 0))
  return rows


def suite_depthwise_cpu(args):
  """The depthwise convs beside the attention (BiFormer's 3x3 CPE and 5x5 LCE, HorNet's 7x7) at
  BiFormer-T / HorNet-T stage shapes, batch 8: `ops.depthwise_conv2d` (its CPU path: shifted
  products, custom VJP) vs XLA's grouped conv. FLOPs 2 k^2 per output, 3x that with the backward."""
  rows = []
  for side, channels, kernel in ((56, 64, 3), (56, 64, 5), (14, 256, 5), (56, 64, 7)):
    x = jax.random.normal(jax.random.key(0), (8, side, side, channels))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, channels))
    impls = {
        "zoo depthwise_conv2d": depthwise_conv2d,
        "xla grouped conv": lambda x, w: jax.lax.conv_general_dilated(
            x, w[:, :, None], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1]),
    }
    flops = 2.0 * x.size * kernel * kernel
    cost = {"fwd": (flops, 2 * x.nbytes), "bwd": (2 * flops, 3 * x.nbytes),
            "fwd+bwd": (3 * flops, 4 * x.nbytes)}
    for impl, f in impls.items():
      rows += _measure(f"{side}x{side} C{channels} k{kernel} B8", impl, f, (x, w), cost,
                       with_memory=True)
  return rows


def _measure(case, impl, f, fargs, cost, with_memory=False):
  peaks = PEAKS.get(jax.devices()[0].device_kind)
  rows = []
  try:
    passes = _passes(f, fargs)
  except ValueError as e:  # this implementation cannot serve the case: say why, keep going
    return [dict(case=case, implementation=impl, skipped=str(e))]
  for pass_name, (fn, a) in passes.items():
    extra = None
    if with_memory:
      memory = temp_bytes(fn, *a)
      extra = {"temp_mib": None if memory is None else memory / 2 ** 20}
    rows.append(_row(case, impl, pass_name, time_fn(fn, *a), *cost[pass_name], peaks, extra))
  return rows


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def run_facts() -> dict:
  """When, on what and how this run was made, for benchmarks/RESULTS.md's headers: the UTC date,
  the device in words and the command line (paths inside the repository relative to it)."""
  device = jax.devices()[0]
  name = (f"{_cpu_name()}, {len(os.sched_getaffinity(0))} cores, CPU only"
          if device.platform == "cpu" else f"{jax.device_count()} x {device.device_kind}")
  repo = Path(__file__).resolve().parents[1]
  argv = [os.path.relpath(a, repo) if os.path.isabs(a) and a.startswith(f"{repo}{os.sep}") else a
          for a in sys.argv]
  return dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=name,
              command=shlex.join(["python", *argv]))


def environment() -> dict:
  device = jax.devices()[0]
  env = dict(**run_facts(), device_kind=device.device_kind, platform=device.platform,
             device_count=jax.device_count(), jax=jax.__version__,
             jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
             python=platform.python_version(), machine=platform.processor() or platform.machine(),
             pallas_target=default_target(),
             pallas_max_block=BlockSizes.default(default_target()).block_q)
  try:
    import jaxlib
    env["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  if device.platform == "gpu":
    from jax._src.lib import cuda_versions
    if cuda_versions is not None:
      env["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
      env["cudnn"] = cuda_versions.cudnn_get_version()
  return env


def print_table(rows):
  keys = ["case", "implementation", "passes", "median_ms", "p10_ms", "p90_ms", "tflops", "gbps"]
  keys += [k for k in ("pct_peak_flops", "pct_peak_hbm", "temp_mib", "speedup", "timer")
           if any(k in r for r in rows)]
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  for r in rows:
    if "skipped" in r:
      print(f"| {r['case']} | {r['implementation']} | skipped: {r['skipped']} |")
      continue
    cells = [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
    print("| " + " | ".join(cells) + " |")


def add_ratios(rows, baseline):
  """speedup: the baseline implementation's median over this row's (same case and pass)."""
  base = {(r["case"], r["passes"]): r["median_ms"] for r in rows
          if r.get("implementation") == baseline and "median_ms" in r}
  for r in rows:
    if "median_ms" in r and (r["case"], r["passes"]) in base:
      r["speedup"] = base[(r["case"], r["passes"])] / r["median_ms"]


SUITES = {"window_cpu": (suite_window_cpu, "naive einsum"), "attention": (suite_attention, "xla"),
          "window": (suite_window, "xla"), "routing_cpu": (suite_routing_cpu, "routing xla"),
          "routing": (suite_routing, "routing xla"),
          "depthwise_cpu": (suite_depthwise_cpu, "xla grouped conv"),
          "lightning": (suite_lightning, "lightning xla")}


# One malloc arena, no trimming, no mmap for buffers: every call reuses already-touched pages.
_STEADY_HEAP = ("glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=4294967296:"
                "glibc.malloc.mmap_threshold=1073741824")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--suite", choices=sorted(SUITES), required=True)
  parser.add_argument("--json", type=Path, help="write the rows and the environment here")
  parser.add_argument("--quick", action="store_true",
                      help="the largest case of each suite only (benchmarks/gpu_check.sh)")
  parser.add_argument("--steady_heap", action="store_true",
                      help="rerun with glibc malloc tunables that keep buffers' pages mapped")
  args = parser.parse_args(argv)
  if args.steady_heap and os.environ.get("GLIBC_TUNABLES") != _STEADY_HEAP:
    # glibc reads its tunables only at process start, hence the re-exec.
    cli = sys.argv[1:] if argv is None else list(argv)
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *cli],
              {**os.environ, "GLIBC_TUNABLES": _STEADY_HEAP})
  suite, baseline = SUITES[args.suite]
  env = environment()
  env["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
  print(json.dumps(env))
  print(f"speedup = median of {baseline!r} / median of the row (same case and pass)")
  rows = suite(args)
  add_ratios(rows, baseline)
  print_table(rows)
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(environment=env, suite=args.suite, baseline=baseline,
                                         rows=rows), indent=1))


if __name__ == "__main__":
  main()
