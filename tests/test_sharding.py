"""Every model shards: each parameter names its axes, and on 8 CPU devices FSDP and tensor
parallelism split parameters and optimizer state while training gives the 1-device losses.

The multi-device checks run in one subprocess with 8 simulated CPU devices (the device count is
fixed when jax starts): `python tests/test_sharding.py` prints one JSON line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
  # The steps run for milliseconds, their compiles for most of a minute: LLVM's optimisations
  # off, and XLA:CPU's older elemental emitters, which compile a partitioned step twice as fast.
  os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                             "--xla_backend_optimization_level=0 "
                             "--xla_cpu_use_fusion_emitters=false")
  sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import ops
from configs import biformer, hornet, itransformer, matformer, maxvit, transnormer

# One model of every family (the vision ones at their CPU recipe's width, one block a stage), with
# the data facts the task needs.
FAMILIES = {
    "hornet": (lambda: _one_block(hornet.get_config("fashion_mnist")), {"num_classes": 10}),
    "maxvit": (lambda: maxvit.get_config("fashion_mnist"), {"num_classes": 10}),
    "biformer": (lambda: _one_block(biformer.get_config("fashion_mnist")), {"num_classes": 10}),
    "itransformer": (lambda: itransformer.get_config("etth1_96"), {}),
    "transnormer": (lambda: _small_lm(transnormer.get_config("wikitext103_t1")),
                    {"vocab_size": 64}),
    "transnormer_llm": (lambda: transnormer.get_config("tiny_shakespeare"), {"vocab_size": 256}),
    "matlm": (lambda: matformer.get_config("matlm_tiny_shakespeare"), {"vocab_size": 256}),
    "matvit": (lambda: matformer.get_config("matvit_fashion_mnist"), {"num_classes": 10}),
}
MESHES = {"fsdp8": (1, 8, 1), "d2f2t2": (2, 2, 2)}
BATCH, SEQ_LEN, STEPS = 8, 32, 3


def _one_block(config):
  config.model.depths = (1,) * len(config.model.depths)
  return config


def _small_lm(config):
  config.model.update(dim=48, depth=4, num_heads=4, dtype="float32")  # the recipe's is bf16
  return config


def _batch(config, meta: dict, step: int) -> dict:
  """A deterministic random training batch of the config's task (no dataset needed)."""
  rng = np.random.default_rng(step)
  if config.task == "classification":
    side = config.input.image_size
    image = rng.normal(size=(BATCH, side, side, config.model.get("in_chans", 3)))
    return {"image": image.astype(np.float32),
            "label": rng.integers(0, meta["num_classes"], BATCH).astype(np.int32)}
  if config.task == "language_modeling":
    return {"tokens": rng.integers(0, meta["vocab_size"], (BATCH, SEQ_LEN + 1)).astype(np.int32),
            "weights": np.ones((BATCH, SEQ_LEN), np.float32)}
  model = nnx.eval_shape(lambda: models.create_model(config.model.name))
  series = (BATCH, model.seq_len, 7)
  return {"x": rng.normal(size=series).astype(np.float32),
          "x_mark": rng.normal(size=(BATCH, model.seq_len, 4)).astype(np.float32),
          "y": rng.normal(size=(BATCH, model.pred_len, 7)).astype(np.float32)}


def _train(config, meta: dict, mesh) -> dict:
  """Losses of a few steps of train.py's step on `mesh`, and the bytes of model + optimizer
  state in all and on the first device."""
  import tasks
  import train
  task = tasks.from_config(config)
  with jax.set_mesh(mesh), ops.sharding.use_rules(config.mesh.rules):
    tx = train.make_optimizer(config, train.make_schedule(config, 100, 1000))
    model, optimizer = train.create_model_and_optimizer(config, meta, task, mesh, tx)
    graphdef, state = nnx.split((model, optimizer))
    step_fn = train.make_train_step(task, graphdef, train.rng_streams(model), config.seed)
    leaves = jax.tree.leaves(state)
    total = sum(x.nbytes for x in leaves)
    first = mesh.devices.flat[0]
    on_first = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == first)
    losses, compiles_before = [], []
    for step in range(STEPS):
      compiles_before.append(len(_COMPILES))
      batch = train.put_batch(_batch(config, meta, step), mesh)
      state, metrics = step_fn(state, batch, step)
      losses.append(float(metrics["loss"]))
  return {"losses": losses, "bytes": total, "bytes_on_first_device": on_first,
          "compiles_after_first_step": len(_COMPILES) - compiles_before[1]}


_COMPILES = []  # one entry per XLA compile, from jax.monitoring (registered by _all)


def _family(family: str) -> dict:
  import train
  make_config, meta = FAMILIES[family]
  config = make_config()
  config.optimizer.accum_steps = 1
  result = {"one": _train(config, meta, train.make_mesh(config.mesh, jax.devices()[:1]))}
  for name, (data, fsdp, tensor) in MESHES.items():
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    result[name] = _train(config, meta, train.make_mesh(config.mesh))
  return result


def _kernels() -> dict:
  """Largest difference from the jnp reference (relative to the largest value), of the loss and
  the gradients, of each Pallas kernel (interpret mode) run per shard of batch and heads on a
  2 x 2 x 2 mesh; False where the kernel did not run under shard_map (XLA cannot partition a
  Mosaic kernel: the TPU compile fails, tests/test_aot.py)."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  keys = jax.random.split(jax.random.key(0), 4)
  qkv = [jax.random.normal(k, (8, 16, 4, 16)) for k in keys[:3]]
  bias = jax.random.normal(keys[3], (1, 4, 16, 16))
  segments = jnp.repeat(jnp.arange(2), 8)[None].repeat(8, 0)
  maps = [jax.random.normal(k, (4, 8, 8, 32)) for k in keys[:3]]
  decay = jnp.array([0.1, 0.2, 0.3, 0.4])
  table = jax.random.normal(keys[3], (4, 7, 7))
  cases = {
      "attention+bias": (lambda impl, q, k, v: ops.attention(
          q, k, v, bias=bias, implementation=impl), qkv),
      "attention causal": (lambda impl, q, k, v: ops.attention(
          q, k, v, causal=True, implementation=impl), qkv),
      "attention segments": (lambda impl, q, k, v: ops.attention(
          q, k, v, segment_ids=segments, implementation=impl), qkv),
      "routing": (lambda impl, q, k, v: ops.routing_attention(
          q, k, v, num_heads=2, n_win=2, topk=2, implementation=impl), maps),
      "lightning": (lambda impl, q, k, v: ops.lightning_attention(
          q, k, v, decay=decay, implementation=impl), qkv),
      "windows": (lambda impl, q, k, v: ops.window_attention(
          q, k, v, table, window=(4, 4), implementation=impl), qkv),
  }
  errors = {}
  for name, (op, args) in cases.items():
    def value_and_grads(impl):
      def loss(*a):
        return jnp.sum(op(impl, *a) * jnp.cos(jnp.arange(args[0].size).reshape(args[0].shape)))
      return jax.value_and_grad(loss, argnums=(0, 1, 2))
    want = value_and_grads("xla")(*args)
    with jax.set_mesh(mesh):
      got = jax.jit(value_and_grads("pallas"))(*args)
      per_shard = "shard_map" in str(jax.make_jaxpr(value_and_grads("pallas"))(*args))
    errors[name] = per_shard and max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                       for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))
  return errors


def _all() -> dict:
  """Every family's result and the kernels', or the error that stopped each."""
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: event == "/jax/core/compile/backend_compile_duration"
      and _COMPILES.append(event))
  results = {}
  for name, run in [("kernels", _kernels), *((f, lambda f=f: _family(f)) for f in FAMILIES)]:
    jax.clear_caches()   # one family's compiled programs at a time in memory
    try:
      results[name] = run()
    except Exception as e:  # noqa: BLE001 -- reported by the test of that family
      results[name] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
  return results


@pytest.fixture(scope="module")
def eight_devices() -> dict:
  """The results of one subprocess with 8 CPU devices (one jax start for every case)."""
  out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, cwd=ROOT,
                       timeout=1200, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _result(results: dict, name: str):
  assert "error" not in results[name], results[name]
  return results[name]


@pytest.mark.slow
def test_kernels_under_a_mesh_match_the_reference(eight_devices):
  errors = _result(eight_devices, "kernels")
  assert set(errors) == {"attention+bias", "attention causal", "attention segments", "routing",
                         "lightning", "windows"}
  for name, error in errors.items():
    assert error is not False and error < 1e-5, (name, error)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sharded_training_matches_one_device(eight_devices, family):
  result = _result(eight_devices, family)
  one = result["one"]
  assert one["bytes_on_first_device"] == one["bytes"]
  # FSDP over 8 devices: the big arrays are split 8 ways; small ones (norms, biases, a
  # 1-channel stem) may stay whole.
  assert result["fsdp8"]["bytes_on_first_device"] <= result["fsdp8"]["bytes"] / 6
  # 2 x 2 x 2: fsdp and tensor split each big array up to 4 ways.
  assert result["d2f2t2"]["bytes_on_first_device"] <= result["d2f2t2"]["bytes"] / 2.5
  for name in ("one", *MESHES):
    # The step hands its state back laid out as it came (ops.sharding.constrain_state): the
    # second step does not compile again.
    assert result[name]["compiles_after_first_step"] == 0, name
  for name in MESHES:
    assert result[name]["bytes"] == one["bytes"]
    np.testing.assert_allclose(result[name]["losses"], one["losses"], rtol=1e-5)
  assert one["losses"][-1] != one["losses"][0]  # the steps trained


# One registered variant per model class: the names come from the code, not the sizes.
NAMED = ["hornet_tiny_7x7", "hornet_tiny_gf", "maxvit_tiny_tf_224", "biformer_tiny",
         "itransformer_etth1_96", "itransformer_cls_digits", "transnormer_t1", "transnormer_t1_mlm",
         "transnormer_llm_385m", "matlm_tiny", "matvit_tiny_patch16_224", "transformer_lm_tiny"]


@pytest.mark.parametrize("name", NAMED)
def test_every_parameter_names_its_axes(name):
  model = nnx.eval_shape(lambda: models.create_model(name))
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = ops.sharding.logical_axes(variable)
    assert names is not None and len(names) == variable.ndim, (path, variable.shape, names)
    assert all(n is None or n in ops.sharding.RULES for n in names), (path, names)


def test_optimizer_state_follows_the_params():
  """Adam's moments carry their parameter's logical axes, so they are split as it is."""
  import train
  config = itransformer.get_config("digits")
  tx = train.make_optimizer(config, train.make_schedule(config, 10, 100))
  model, optimizer = nnx.eval_shape(lambda: (lambda m: (m, nnx.Optimizer(m, tx, wrt=nnx.Param)))(
      models.create_model(config.model.name, num_classes=10)))
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  moments = [(path, v) for path, v in nnx.to_flat_state(nnx.state(optimizer.opt_state))
             if "mu" in path or "nu" in path]
  assert len(moments) == 2 * len(params)
  for path, moment in moments:
    param = params[path[path.index("mu" if "mu" in path else "nu") + 1:]]
    assert ops.sharding.logical_axes(moment) == ops.sharding.logical_axes(param), path


if __name__ == "__main__":
  print(json.dumps(_all()))
