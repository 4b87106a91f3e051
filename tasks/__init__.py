"""Tasks: what the shared loop needs to know about a kind of problem.

A task turns (model, batch) into a training loss and into evaluation sums. Sums (not means) with
their counts let the loop add up padded evaluation batches over devices and hosts exactly.
"""
from __future__ import annotations

from typing import Protocol

import jax
import numpy as np
from flax import nnx

from tasks import elastic
from tasks.classification import Classification
from tasks.forecasting import Forecasting
from tasks.language_modeling import LanguageModeling
from tasks.nested import Nested

Sums = dict[str, tuple[jax.Array, jax.Array]]  # metric name -> (weighted sum, weight)


class Task(Protocol):
  def model_overrides(self, meta: dict) -> dict:
    """create_model kwargs that follow from the data (e.g. the number of classes)."""

  def example_spec(self, config, meta: dict, train: bool) -> dict:
    """{key: (shape, dtype)} of one example of a training (or evaluation) batch, from the config
    and the data's meta (a split's, or data.abstract_meta's): what `abstract_batch` builds on."""

  def loss(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, dict]:
    """Mean training loss of a batch (model in training mode) and extra scalars to log."""

  def eval_sums(self, model: nnx.Module, batch: dict) -> Sums:
    """Per-metric (sum, count) over the real examples of a padded batch (batch['mask'])."""

  # Optional: `derived_metrics(metrics) -> dict`, metrics that are not a sum over a count but a
  # function of those that are (perplexity = exp(loss)); `finalize` adds them.


_TASKS = {"forecasting": Forecasting, "classification": Classification,
          "language_modeling": LanguageModeling}


def get_task(name: str) -> Task:
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r}; expected one of {sorted(_TASKS)}")
  return _TASKS[name]()


# Evaluators that eval.py runs instead of one evaluation of the model (config.evaluator): each
# has `evaluate(model, evaluate_model, config, report) -> result` and `write(result, stem)`.
EVALUATORS = {"elastic": elastic}


def get_evaluator(name: str):
  """The evaluator module `name` names; None for '' (the model evaluated as it is)."""
  if name and name not in EVALUATORS:
    raise ValueError(f"unknown config.evaluator {name!r}; expected '' or one of {sorted(EVALUATORS)}")
  return EVALUATORS.get(name)


def from_config(config) -> Task:
  """The task a run's config names (``config.task``); a config with ``nested.objective`` set
  ('sum' or 'sample') trains every granularity of a nested model jointly (tasks.nested)."""
  task = get_task(config.task)
  nested = config.get("nested")
  if nested is not None and nested.objective:
    task = Nested(task, objective=nested.objective, weights=tuple(nested.weights))
  return task


def abstract_batch(task: Task, config, meta: dict, batch_size: int, *, train: bool = True,
                   sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
  """A batch of `batch_size` examples as data.train_batches (train) or data.eval_batches (with
  its 'mask') would give it, as ShapeDtypeStructs placed by `sharding`: a step can be traced and
  compiled without the data (aot.py)."""
  spec = task.example_spec(config, meta, train)
  if not train:
    spec = {**spec, "mask": ((), np.float32)}
  return {key: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=sharding)
          for key, (shape, dtype) in spec.items()}


def finalize(sums: dict[str, tuple[float, float]], task: Task | None = None) -> dict[str, float]:
  """Turns accumulated (sum, count) pairs into metric values (+ the task's derived metrics)."""
  metrics = {name: float(total) / max(float(count), 1.0) for name, (total, count) in sums.items()}
  derived = getattr(task, "derived_metrics", None)
  return metrics | derived(metrics) if derived is not None else metrics
