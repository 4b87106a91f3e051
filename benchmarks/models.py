"""Model throughput: forward and training-step examples/s, one table line per model.

    python benchmarks/models.py                             # every model in MODELS
    python benchmarks/models.py --models hornet_tiny_7x7 --json benchmarks/results/models.json

The device is JAX's default one. On CPU: float32 compute and each model's CPU batch; on a GPU or
TPU: bfloat16 compute (float32 params and optimizer state) and the accelerator batch.
Forward: `model(x, train=False)`, jitted. Training step: train.py's own jitted step (the task's
loss, backward, AdamW update with clipping, the state donated), so drop path and the like run as
in training. Timing: benchmarks/ops.py's `time_fn` (compile left out, warm-up, median of >= 10
repetitions with p10/p90). Every number is measured in the run that prints it.

Another model gets one line in MODELS: its registered name, the task train.py trains it with, a
batch maker, its batch sizes and (other than image classifiers) its inference call.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import models  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
from configs import common  # noqa: E402


def _load_ops_benchmark():
  """benchmarks/ops.py as a module (its name would clash with the `ops` package)."""
  spec = importlib.util.spec_from_file_location("ops_benchmark", REPO / "benchmarks" / "ops.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_OPS_BENCHMARK = _load_ops_benchmark()
time_fn, environment = _OPS_BENCHMARK.time_fn, _OPS_BENCHMARK.environment


def images(size: int, channels: int = 3, num_classes: int = 1000) -> Callable[[int], dict]:
  """A classification batch maker: random NHWC images and labels."""
  def make(batch: int) -> dict:
    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((batch, size, size, channels), np.float32),
            "label": rng.integers(0, num_classes, batch).astype(np.int32)}
  return make


def classify(model: nnx.Module, batch: dict) -> jax.Array:
  return model(batch["image"], train=False)


@dataclasses.dataclass(frozen=True)
class Entry:
  model: str                          # a models.list_models() name
  task: str                           # the tasks.get_task() name train.py trains it with
  make_batch: Callable[[int], dict]   # batch size -> the batch the task reads
  batch_cpu: int
  batch_accelerator: int
  forward: Callable[[nnx.Module, dict], jax.Array] = classify  # the inference call


MODELS = (
    Entry("hornet_tiny_7x7", "classification", images(224), batch_cpu=8, batch_accelerator=128),
    Entry("hornet_tiny_gf", "classification", images(224), batch_cpu=8, batch_accelerator=128),
)


def _optimizer() -> optax.GradientTransformation:
  config = common.base_config()
  config.optimizer.name = "adamw"
  config.optimizer.weight_decay = 0.05
  config.optimizer.clip_norm = 1.0
  return train.make_optimizer(config, optax.constant_schedule(1e-4))


def measure(entry: Entry) -> dict:
  accelerator = jax.default_backend() != "cpu"
  dtype = jnp.bfloat16 if accelerator else jnp.float32
  batch_size = entry.batch_accelerator if accelerator else entry.batch_cpu
  batch = {k: jnp.asarray(v) for k, v in entry.make_batch(batch_size).items()}
  task = tasks.get_task(entry.task)
  model = models.create_model(entry.model, dtype=dtype, rngs=nnx.Rngs(0))

  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda params, batch: entry.forward(nnx.merge(graphdef, params), batch))
  forward_s = time_fn(forward, params, batch)

  state_graphdef, state = nnx.split((model, nnx.Optimizer(model, _optimizer(), wrt=nnx.Param)))
  step_fn = train.make_train_step(task, state_graphdef, train.rng_streams(model), seed=0)
  step = 0

  def train_step():  # advances the donated state, as the training loop does
    nonlocal state, step
    state, metrics = step_fn(state, batch, step)
    step += 1
    return metrics["loss"]

  train_s = time_fn(train_step)
  return dict(model=entry.model, params=models.count_params(model),
              dtype=jnp.dtype(dtype).name, batch=batch_size,
              forward_per_s=batch_size / forward_s[0], forward_ms=forward_s[0] * 1e3,
              forward_p10_p90_ms=[t * 1e3 for t in forward_s[1:]],
              train_per_s=batch_size / train_s[0], train_step_ms=train_s[0] * 1e3,
              train_p10_p90_ms=[t * 1e3 for t in train_s[1:]])


def print_table(rows: list[dict]) -> None:
  print("| model | params | dtype | batch | forward ex/s | forward ms | train ex/s | train step ms |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['params']:,} | {r['dtype']} | {r['batch']} | "
          f"{r['forward_per_s']:.1f} | {r['forward_ms']:.1f} | {r['train_per_s']:.1f} | "
          f"{r['train_step_ms']:.1f} |")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="*", help="names from MODELS (default: all)")
  parser.add_argument("--json", type=Path, help="write the rows and the environment here")
  args = parser.parse_args(argv)
  known = {entry.model: entry for entry in MODELS}
  unknown = sorted(set(args.models or ()) - set(known))
  if unknown:
    parser.error(f"unknown models {unknown}; MODELS has {sorted(known)}")
  env = environment()
  print(json.dumps(env))
  rows = [measure(known[name]) for name in (args.models or known)]
  print_table(rows)
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(environment=env, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
  main()
