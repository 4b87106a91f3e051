"""Mixed precision in every family: `dtype` (compute) and `param_dtype` (storage).

With `dtype=bfloat16` the weights stay float32 (master weights), the matmuls and convolutions
run in bf16, and softmax, norm statistics and the loss stay float32; `param_dtype=bfloat16`
stores bf16 weights; a bf16 train step runs. One small model per family, the sizes the family
tests and the CPU recipes use.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models
import ops
import tasks
import train
from configs import common
from configs import biformer as biformer_config
from configs import hornet as hornet_config
from configs import itransformer as itransformer_config
from models import biformer, layers, maxvit, transnormer_llm
from models.matformer import MatLM, MatViT
from models.transnormer import TransNormerLM

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
MATMULS = ("dot_general", "conv_general_dilated")
# Primitives of softmax (exp, reduce_max), its log and norm statistics (rsqrt, sqrt, reduce_sum):
# in a bf16 forward they must still see float32 (complex64: the GF layer's spectrum).
STATISTICS = ("exp", "log", "reduce_max", "reduce_sum", "rsqrt", "sqrt")
WIDE_ENOUGH = (F32, jnp.dtype(jnp.complex64))


def _recipe_model(config_module, arg: str, **overrides):
  """A builder of the model a CPU recipe trains (its config's model overrides)."""
  config = config_module.get_config(arg)
  recipe = common.model_overrides(config)
  return functools.partial(models.create_model, config.model.name, **{**recipe, **overrides})


def _images(side: int, channels: int = 1):
  return {"image": jax.random.normal(jax.random.key(1), (2, side, side, channels)),
          "label": jnp.array([1, 3])}


def _tokens(length: int, vocab: int):
  tokens = jax.random.randint(jax.random.key(1), (2, length + 1), 0, vocab)
  return {"tokens": tokens, "weights": jnp.ones((2, length)), "num_bytes": jnp.full((2,), length)}


# family: (model builder taking dtype keywords, task, batch). The LMs are wide enough (or their
# sequences short enough) that the weight matmuls dominate as in the published sizes: the
# attention inside ops' XLA paths (the CPU's) runs in f32 whatever the input dtype.
CASES = {
    "hornet": (_recipe_model(hornet_config, "fashion_mnist,variant=tiny_gf", num_classes=10,
                             base_dim=16, depths=(1, 1, 1, 1)),
               "classification", lambda: _images(32)),
    "maxvit": (functools.partial(maxvit.MaxViT, embed_dims=(32, 64), depths=(1, 1),
                                 stem_widths=(16, 16), num_classes=5, window_size=2),
               "classification", lambda: _images(16, 3)),
    "biformer": (_recipe_model(biformer_config, "fashion_mnist", num_classes=10,
                               depths=(1, 1, 1, 1)),
                 "classification", lambda: _images(32)),
    "itransformer": (_recipe_model(itransformer_config, "digits"),
                     "classification", lambda: _images(8)),
    # SMALL_LM of the family test, wider: DiagAttention pads to 64-token blocks in f32.
    "transnormer": (functools.partial(TransNormerLM, vocab_size=50, dim=256, depth=2, num_heads=4),
                    "language_modeling", lambda: _tokens(64, 50)),
    "transnormer_llm": (functools.partial(models.create_model, "transnormer_llm_tiny"),
                        "language_modeling", lambda: _tokens(16, 256)),
    "matlm": (functools.partial(models.create_model, "matlm_tiny"),
              "language_modeling", lambda: _tokens(16, 256)),
    "matvit": (functools.partial(MatViT, img_size=8, patch_size=4, in_chans=3, num_classes=5,
                                 dim=16, depth=2, num_heads=2, mlp_dim=32),
               "classification", lambda: _images(8, 3)),
}


def _abstract(family: str, **dtypes):
  build = CASES[family][0]
  return nnx.eval_shape(lambda: build(**dtypes, rngs=nnx.Rngs(0)))


@functools.cache
def _bf16_model(family: str):
  """The abstract bf16 model (read only: shared by the tests)."""
  return _abstract(family, dtype=jnp.bfloat16)


def _inputs(family: str):
  batch = CASES[family][2]()
  return batch["image"] if "image" in batch else batch["tokens"][:, :-1]


def _compile(fn, *args):
  """`jax.jit(fn)` for `args`, without XLA:CPU's LLVM optimisation (half the compile time of
  these small models; the tests measure numbers, not speed)."""
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
  return jax.jit(fn).lower(*args).compile(options)


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def _sub_jaxprs(eqn):
  """The jaxprs an equation calls: pjit, custom_vjp/jvp, scan, while, cond branches."""
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _equations(jaxpr, repeats: int = 1):
  """(equation, times it runs) over the jaxpr and every jaxpr nested in it (a scan's body runs
  `length` times; a while loop's trip count is unknown: once)."""
  for eqn in jaxpr.eqns:
    yield eqn, repeats
    inner = repeats * eqn.params["length"] if eqn.primitive.name == "scan" else repeats
    for sub in _sub_jaxprs(eqn):
      yield from _equations(sub, inner)


def matmul_flops(eqn) -> int:
  """2 x multiply-adds of a dot_general or conv_general_dilated, from its operand shapes."""
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  if eqn.primitive.name == "dot_general":
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = math.prod(d for i, d in enumerate(rhs.shape) if i not in (*rhs_contract, *rhs_batch))
    return 2 * math.prod(lhs.shape) * rhs_free
  spec = eqn.params["dimension_numbers"].rhs_spec    # (out, in / groups, *spatial) of the kernel
  per_output = rhs.shape[spec[1]] * math.prod(rhs.shape[i] for i in spec[2:])
  return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output


def test_matmul_flops_counts_from_shapes():
  def f(a, b, image, kernel):
    dots = jnp.einsum("bij,bjk->bik", a, b)                                # 2*2*3*4*5 = 240
    conv = jax.lax.conv_general_dilated(image, kernel, (1, 1), "VALID")    # 2*(1*2*4*4)*(4*2*2)
    return dots, conv, jax.lax.scan(lambda c, _: (c @ c, None), a[0, :, :3], length=3)  # 3x2*3*3*3

  jaxpr = jax.make_jaxpr(f)(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)), jnp.ones((1, 4, 5, 5)),
                            jnp.ones((2, 4, 2, 2)))
  counted = [(eqn.primitive.name, n * matmul_flops(eqn)) for eqn, n in _equations(jaxpr.jaxpr)
             if eqn.primitive.name in MATMULS]
  assert sorted(counted) == [("conv_general_dilated", 2 * 32 * 16), ("dot_general", 162),
                             ("dot_general", 240)]


@functools.cache
def _bf16_eval_jaxpr(family: str):
  """The bf16 model's evaluation step (forward, then the task's f32 loss) as a jaxpr."""
  _, task_name, batch = CASES[family]
  graphdef, state = nnx.split(_bf16_model(family))
  batch = {**batch(), "mask": jnp.ones((2,))}
  task = tasks.get_task(task_name)
  return jax.make_jaxpr(lambda s, b: task.eval_sums(nnx.merge(graphdef, s), b))(state, batch).jaxpr


@pytest.mark.parametrize("family", CASES)
def test_bf16_compute_keeps_f32_weights_and_runs_the_matmuls_in_bf16(family):
  assert {p.dtype for p in _params(_bf16_model(family))} == {F32}
  flops = {True: 0, False: 0}
  for eqn, repeats in _equations(_bf16_eval_jaxpr(family)):
    if eqn.primitive.name in MATMULS:
      in_bf16 = all(v.aval.dtype == BF16 for v in eqn.invars[:2])
      flops[in_bf16] += repeats * matmul_flops(eqn)
  # Measured: HorNet 1.000, MaxViT 0.991, BiFormer 0.978, iTransformer 0.970, TransNormer 0.942,
  # TransNormerLLM 0.938, MatLM 0.982, MatViT 0.937; the rest is attention inside ops (f32).
  assert flops[True] / (flops[True] + flops[False]) >= 0.9


@pytest.mark.parametrize("family", CASES)
def test_bf16_softmax_norm_statistics_and_loss_stay_f32(family):
  low = {(eqn.primitive.name, str(eqn.invars[0].aval.dtype))
         for eqn, _ in _equations(_bf16_eval_jaxpr(family))
         if eqn.primitive.name in STATISTICS and eqn.invars[0].aval.dtype not in WIDE_ENOUGH}
  assert not low
  norms = [m for _, m in nnx.iter_graph(_bf16_model(family))
           if isinstance(m, (nnx.LayerNorm, nnx.BatchNorm))]
  assert all(norm.dtype == BF16 for norm in norms)  # outputs bf16; statistics f32 (below)


def _random_weights(model):
  """`model` (abstract) with weights drawn in numpy, no init program to compile: kernels and
  tables ~ N(0, 1 / fan_in), norm scales and layer scales ~ 1 + N(0, 0.1^2), other vectors
  ~ N(0, 0.1^2) (so that no layer starts at zero: MatViT's head, HorNet's layer scales),
  BatchNorm statistics near (0, 1), URPE's reflection a unit vector."""
  rng = np.random.default_rng(0)
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    shape, name = var.get_value().shape, path[-1]
    if isinstance(var, nnx.RngKey):
      value = jax.random.key(0)
    elif isinstance(var, nnx.RngCount):
      value = np.zeros(shape, np.uint32)
    elif len(shape) >= 2:
      value = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
    elif isinstance(var, layers.Buffer):
      value = rng.normal(size=shape)
      value /= np.linalg.norm(value)
    else:
      near_one = name in ("scale", "gamma", "var")
      value = near_one + 0.1 * (np.abs if name == "var" else np.asarray)(rng.normal(size=shape))
    var.set_value(jnp.asarray(value, var.get_value().dtype))
  return model


# Measured max |bf16 - f32| / max |f32| on the same weights (bf16's 2^-9 rounding, grown
# through the layers): HorNet 0.011, MaxViT 0.012, BiFormer 0.011, iTransformer 0.005,
# TransNormer 0.003, TransNormerLLM 0.032, MatLM 0.012, MatViT 0.014.
@pytest.mark.parametrize("family", CASES)
def test_bf16_outputs_are_close_to_f32_on_the_same_weights(family):
  graphdef, state = nnx.split(_random_weights(_abstract(family)))
  outputs = []
  for graph in (graphdef, nnx.graphdef(_bf16_model(family))):
    forward = _compile(lambda s, x, graph=graph: nnx.merge(graph, s)(x), state, _inputs(family))
    outputs.append(np.asarray(forward(state, _inputs(family)), np.float64))
  reference, low = outputs
  error = np.abs(low - reference).max() / np.abs(reference).max()
  assert 0 < error < 5e-2


@pytest.mark.parametrize("family", CASES)
def test_bf16_param_dtype_stores_bf16_weights(family):
  model = _abstract(family, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert {p.dtype for p in _params(model)} == {BF16}
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, _inputs(family))
  assert out.shape[0] == 2 and jnp.issubdtype(out.dtype, jnp.floating)


def test_create_model_reads_dtype_names_as_configs_give_them():
  model = nnx.eval_shape(lambda: models.create_model("matlm_tiny", dtype="bfloat16",
                                                     param_dtype="float32"))
  assert isinstance(model.dtype, np.dtype) and model.dtype == BF16
  assert model.blocks[0].attn.qkv.dtype == BF16
  assert {p.dtype for p in _params(model)} == {F32}
  with pytest.raises(TypeError, match="bf16"):
    models.create_model("matlm_tiny", dtype="bf16")


# --- norm statistics: bf16 inputs whose mean (271) bf16 cannot hold (its spacing there is 2) ----

_CHANNELS = 16
_RUNNING_MEAN, _RUNNING_VAR = 271.0, 85.0   # of 256, 258, ..., 286: the BatchNorm's batch below


def _offset_input():
  """[16, 16] bf16: row i is 256 + 2 * ((i + j) % 16) over columns j (all exact in bf16)."""
  grid = np.add.outer(np.arange(_CHANNELS), np.arange(_CHANNELS)) % _CHANNELS
  return jnp.asarray(256.0 + 2.0 * grid, jnp.bfloat16)


def _reference(x, kind: str, eps: float):
  x = np.asarray(x, np.float64)
  if kind == "batch_norm":       # running statistics, per channel (the last axis)
    return (x - _RUNNING_MEAN) / np.sqrt(_RUNNING_VAR + eps)
  if kind == "layer_norm":
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  if kind == "srms_norm":
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) / np.sqrt(x.shape[-1]) + eps)


def _evaluating(norm: nnx.BatchNorm):
  norm.mean[...] = jnp.full((_CHANNELS,), _RUNNING_MEAN, jnp.float32)
  norm.var[...] = jnp.full((_CHANNELS,), _RUNNING_VAR, jnp.float32)
  return lambda x: norm(x, use_running_average=True)


NORMS = {  # name: (reference kind, eps, the family's norm in bf16 as a function)
    "layer_norm": ("layer_norm", 1e-5, lambda: layers.layer_norm(
        _CHANNELS, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))),
    "maxvit_batch_norm": ("batch_norm", 1e-3, lambda: _evaluating(maxvit.batch_norm(
        _CHANNELS, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))),
    "biformer_batch_norm": ("batch_norm", 1e-5, lambda: _evaluating(biformer._batch_norm(
        _CHANNELS, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))),
    "transnormer_llm_srms_norm": ("srms_norm", 1e-6, lambda: transnormer_llm.srms_norm),
    "transnormer_simple_rms_norm": ("simple_rms_norm", 1e-8, lambda: ops.simple_rms_norm),
}


@pytest.mark.parametrize("name", NORMS)
def test_bf16_norms_compute_their_statistics_in_f32(name):
  """bf16 statistics would centre on 270 or 272: errors of 0.1 in the output; f32 ones leave
  the output's own bf16 rounding (<= 2^-8 relative)."""
  kind, eps, make = NORMS[name]
  x = _offset_input()
  y = make()(x)
  assert y.dtype == jnp.bfloat16
  want = _reference(x, kind, eps)
  assert np.abs(np.asarray(y, np.float64) - want).max() <= 2 ** -8 * np.abs(want).max()


# --- a bf16 train step ------------------------------------------------------------------------

def test_bf16_train_step_runs_and_keeps_f32_weights():
  model = MatLM(vocab_size=64, dim=32, depth=2, num_heads=4, mlp_dim=64, dropout=0.1,
                dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  before = jax.tree.map(np.array, nnx.state(model, nnx.Param))   # the step donates `state`
  batch = _tokens(16, 64)
  step = train.make_train_step(tasks.get_task("language_modeling"), graphdef,
                               train.rng_streams(model), seed=0)
  step = _compile(step, state, batch, 0)
  losses = []
  for i in range(2):
    state, metrics = step(state, batch, i)
    losses.append(float(metrics["loss"]))
  model, _ = nnx.merge(graphdef, state)
  # ~log(64) = 4.16 at the start (N(0, 0.02) weights); two Adam steps of lr 1e-3 move it little
  assert all(3.5 < loss < 4.5 for loss in losses)
  assert {p.dtype for p in _params(model)} == {F32}
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       nnx.state(model, nnx.Param), before)
  assert 5e-4 < max(jax.tree.leaves(moved)) < 3e-3   # each step moves a weight by <= ~lr
