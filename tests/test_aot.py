"""aot.py and the TPU path of the kernels, compiled for a v5e slice on this CPU (libtpu describes
the chips without having them).

The Pallas attention kernels compile to Mosaic under a 4-chip mesh through the shard_map that
wraps them, and cannot without it; abstract batches are the pipeline's; `python aot.py` compiles
and reports a small config and refuses one that cannot fit. Skipped only without libtpu
(pip install -e ".[tpu]"), which CI installs.
"""
import functools
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import aot
from conftest import load_benchmark
import data
import ops
import tasks
import train
from configs import common
from configs import itransformer as itransformer_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="needs libtpu, the TPU compiler: pip install -e '.[tpu]'")

REPO = pathlib.Path(__file__).resolve().parents[1]
ATTENTION = sys.modules["ops.attention"]   # `ops.attention` is the function
B, L, H, D = 8, 256, 4, 128                # 8 sequences of 256 tokens, 4 heads of 128


@pytest.fixture(scope="module")
def v5e_chips():
  return aot.tpu_devices("v5e:2x2")


def _compile_attention_grad(devices, mesh_axes: dict, attention_fn, shape=(B, L, H, D),
                            dtype=jnp.bfloat16, bias=False):
  """jit(grad) of attention over q, k, v [B, L, H, D] split by batch (and heads on tensor), with
  an f32 bias [B, H, L, L] if `bias`."""
  mesh = train.make_mesh(ml_collections.ConfigDict(mesh_axes), devices=devices)
  split = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor"))
  q = jax.ShapeDtypeStruct(shape, dtype, sharding=split)
  args = [q, q, q]
  if bias:
    batch, length, heads, _ = shape
    args.append(jax.ShapeDtypeStruct((batch, heads, length, length), jnp.float32,
                                     sharding=jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), "tensor"))))
  loss = lambda *a: attention_fn(*a).astype(jnp.float32).sum()
  with jax.set_mesh(mesh):
    return jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).trace(*args).lower().compile()


# The Mosaic kernels of a forward and backward: the zoo's Pallas kernel, and jax's flash attention
# (which the TPU dispatch prefers at lengths that are multiples of its 128-blocks).
KERNELS = {
    "pallas": {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"},
    "tpu_flash": {"jit(flash_attention)",
                  "flash_mha_bwd_dkv_block_q_major=128_block_q=128_block_k_major=128_block_k=128",
                  "flash_mha_bwd_dq_block_q_major=128_block_k_major=128_block_k=128"},
}


@pytest.mark.parametrize("implementation", [None, "pallas"], ids=["dispatched", "pallas"])
@pytest.mark.parametrize("mesh_axes, shard", [
    (dict(data=4, fsdp=1, tensor=1), (B // 4, H)),       # batch split 4 ways
    (dict(data=2, fsdp=1, tensor=2), (B // 2, H // 2)),  # batch 2 ways, heads 2 ways
], ids=["data4", "data2_tensor2"])
def test_attention_compiles_to_mosaic_kernels_per_shard(v5e_chips, mesh_axes, shard, implementation):
  # ops.attention's dispatch follows the mesh: TPU, so Mosaic kernels.
  compiled = _compile_attention_grad(
      v5e_chips, mesh_axes, functools.partial(ops.attention, implementation=implementation))
  hlo = compiled.as_text()
  assert aot.mosaic_kernels(hlo) == dict.fromkeys(KERNELS[implementation or "tpu_flash"], 1)
  kernel_lines = [line for line in hlo.splitlines()
                  if 'custom_call_target="tpu_custom_call"' in line]
  per_shard = f"bf16[{shard[0]},{shard[1]},{L},{D}]"   # the kernels' [B, H, L, D] blocks
  assert all(per_shard in line for line in kernel_lines), kernel_lines[0][:300]
  # Each chip holds its quarter of q, k and v, nothing more.
  q_bytes = B * L * H * D * 2
  assert compiled.memory_analysis().argument_size_in_bytes == 3 * q_bytes // 4


@pytest.mark.parametrize("dtype, bias, heads", [(jnp.bfloat16, False, 8), (jnp.float32, True, 1)],
                         ids=["bf16", "f32_bias"])
def test_long_attention_fits_in_vmem(v5e_chips, dtype, bias, heads):
  # 32K tokens per sequence, one per chip. The zoo's Pallas kernel holds a whole (batch, head)
  # sequence per block and runs out of scoped VMEM from 16K (bf16) and 8K (f32 with a bias) on;
  # jax's flash attention streams 128-blocks.
  length, mesh_axes = 32768, dict(data=4, fsdp=1, tensor=1)
  fn = lambda q, k, v, bias=None, implementation=None: ops.attention(
      q, k, v, bias=bias, implementation=implementation)
  compiled = _compile_attention_grad(v5e_chips, mesh_axes, fn, shape=(4, length, heads, D),
                                     dtype=dtype, bias=bias)
  assert set(aot.mosaic_kernels(compiled.as_text())) == KERNELS["tpu_flash"]
  with pytest.raises(Exception, match="CompileTimeScopedVmemOom"):
    _compile_attention_grad(v5e_chips, mesh_axes, functools.partial(fn, implementation="pallas"),
                            shape=(4, length // 2, heads, D), dtype=dtype, bias=bias)


def test_lightning_attention_compiles_per_shard_at_32k(v5e_chips):
  # TransNormerLLM-385M's heads at 32K tokens, one sequence per chip: the dispatch takes the
  # lightning kernels on TPU, whose blocks are a chunk of 128 tokens whatever L.
  decay = jnp.linspace(0.01, 0.5, 8)
  fn = lambda q, k, v: ops.lightning_attention(q, k, v, decay=decay)
  compiled = _compile_attention_grad(v5e_chips, dict(data=4, fsdp=1, tensor=1), fn,
                                     shape=(4, 32768, 8, D))
  assert set(aot.mosaic_kernels(compiled.as_text())) == {"lightning_states", "lightning_chunks"}


def test_lightning_kernels_move_fewer_bytes_than_the_xla_loop():
  # Why the TPU dispatch takes the kernels (benchmarks/RESULTS.md has the 2K figures): by XLA's
  # cost analysis of the compiled programs, with the loop unrolled so that every step counts.
  rows = {(r["implementation"], r["pass_"]): r
          for r in load_benchmark("compile_report").lightning_cost_rows("v5e:2x2", length=512)}
  for pass_ in ("fwd", "fwd+bwd"):
    xla, kernels = rows["xla", pass_], rows["pallas", pass_]
    assert kernels["mb_accessed"] < 0.6 * xla["mb_accessed"], (xla, kernels)
    assert kernels["gflop"] < 1.5 * xla["gflop"], (xla, kernels)


def test_window_kernel_on_tpu_runs_many_windows_a_program_and_moves_less():
  # MaxViT-T's stage-1 block attention (16 images) compiled for v5e:2x2: the window kernel runs 32
  # windows of both heads a program (ops.attention's kernel: one window and head a program), and
  # the traffic attention adds to the block (over the block without attention) is under a
  # quarter of what ops.attention's kernel and its transposed, padded copies add.
  rows = {r["path"]: r for r in load_benchmark("compile_report").tpu_window_rows("v5e:2x2", 16)}
  window, dense, none = (rows[name] for name in (
      "window kernel", "ops.attention kernel", "no attention (q + k + v)"))
  assert window["fwd_grid_steps"] * 64 == dense["fwd_grid_steps"] == 512, rows
  for pass_ in ("fwd_passes", "fwd+bwd_passes"):
    assert window[pass_] - none[pass_] < 0.25 * (dense[pass_] - none[pass_]), rows


def test_mosaic_kernel_without_the_shard_map_cannot_be_partitioned(v5e_chips):
  def unwrapped(q, k, v):   # the custom_vjp kernel that attention_pallas shard_maps
    return ATTENTION._pallas_attention(q, k, v, None, None, None, False, D**-0.5,
                                       ATTENTION.BlockSizes.uniform(128, 128), "tpu")

  with pytest.raises(NotImplementedError, match="cannot be automatically partitioned"):
    _compile_attention_grad(v5e_chips, dict(data=4, fsdp=1, tensor=1), unwrapped)


def _digits_vision_recipe():
  """The vision families' Fashion-MNIST recipe (resize to 32, label smoothing) on digits."""
  config = common.fashion_mnist_config()
  config.data.name = "digits"
  return config


@pytest.mark.parametrize("make_config", [lambda: itransformer_config.get_config("digits"),
                                         _digits_vision_recipe], ids=["stored", "resized_smoothed"])
def test_abstract_batches_are_the_pipelines(make_config):
  config = make_config()
  task = tasks.from_config(config)
  split = data.load(config.data, "train")
  meta = data.abstract_meta(config.data)
  assert meta == {"num_classes": split.meta["num_classes"],
                  "image_shape": tuple(split.meta["image_shape"])}
  batches = {
      True: data.train_batches(split, 16, seed=0, input_config=config.input)[0],
      False: next(iter(data.eval_batches(split, 16, input_config=config.input))),
  }
  for train_batch, batch in batches.items():
    abstract = tasks.abstract_batch(task, config, meta, 16, train=train_batch)
    assert ({k: (v.shape, v.dtype) for k, v in abstract.items()}
            == {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()})


def _run_aot(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "aot.py", *args], cwd=REPO, env=env, text=True,
                        capture_output=True, timeout=600)


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _report_bytes(stdout: str) -> dict[str, list[float]]:
  """The report's byte rows: name -> per-step values ('-' rows left out)."""
  rows = {}
  for line in stdout.splitlines():
    match = re.fullmatch(r"  (model|optimizer|batch|temporaries|total)\s+(.*)", line)
    if match:
      rows[match[1]] = [float(v) * _UNITS[u] for v, u in re.findall(r"([\d.]+) (GiB|MiB|KiB|B)\b",
                                                                     match[2])]
  return rows


@pytest.mark.slow
def test_aot_reports_a_small_config_that_fits():
  result = _run_aot("--config", "configs/itransformer.py:digits", "--topology", "v5e-4",
                    "--config.mesh.data=4")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert out.startswith("v5e:2x2: 4 x TPU v5 lite, 16 GiB HBM per device; mesh data=4 fsdp=1 "
                        "tensor=1"), out
  params = int(re.search(r"([\d,]+) params", out)[1].replace(",", ""))
  rows = _report_bytes(out)
  model, optimizer, batch = rows["model"][0], rows["optimizer"][0], rows["batch"]
  # Replicated f32 params on each chip (+ 8-byte RNG keys); AdamW's mu and nu as much again x2.
  assert model == pytest.approx(4 * params, rel=2e-3)
  assert optimizer == pytest.approx(2 * model, rel=2e-3)
  # A quarter of each batch per chip: 8 x 8 f32 pixels and an int32 label (+ the eval mask).
  assert batch == pytest.approx([64 // 4 * (64 * 4 + 4), 512 // 4 * (64 * 4 + 4 + 4)], rel=1e-3)
  train_total, eval_total = rows["total"]
  assert model + optimizer + batch[0] <= train_total < 16 * 2**30
  assert model + batch[1] <= eval_total < 16 * 2**30
  tflops = re.search(r"TFLOP \(XLA ops\)\s+(\S+)\s+(\S+)", out)
  assert float(tflops[1]) > 0 and float(tflops[2]) > 0
  # Training uses attention dropout (XLA); evaluation the Mosaic kernel, once per layer.
  assert re.search(r"Mosaic kernels\s+0\s+2\n", out), out
  assert "eval kernels: attention_fwd x2" in out


@pytest.mark.slow
def test_aot_refuses_what_does_not_fit_in_one_line():
  # FFNs of 4M hidden units: 4.1B params, 15 GiB of f32 weights alone on every 16 GiB chip.
  result = _run_aot("--config", "configs/matformer.py:lm_tiny_shakespeare,mlp_dim=4000000",
                    "--topology", "v5e:2x2", "--config.mesh.data=4", "--noeval")
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and re.search("hbm", errors[0], re.IGNORECASE), result.stderr[-3000:]


def test_cloud_slice_names_map_to_topologies():
  assert [aot.topology_name(n) for n in ("v5e-1", "v5litepod-8", "v6e-16", "v5e-256")] == [
      "v5e:1x1", "v5e:2x4", "v6e:4x4", "v5e:16x16"]
  # v4 and v5p names count TensorCores, two per chip.
  assert [aot.topology_name(n) for n in ("v4-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128")] == [
      "v4:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4"]
  assert aot.topology_name("v5e:2x4") == "v5e:2x4"
  for bad in ("v5e-2", "v5e-12", "tpu-8", "v5e-x"):
    with pytest.raises(aot.AotError, match="--topology"):
      aot.topology_name(bad)
