"""Joint training of a nested (MatFormer) model's granularities, as a wrapper of any task.

A nested model (`models.matformer.NestedFFNs`: MatLM, MatViT) runs as a smaller sub-model when
called with ``granularity=g``; ``model.granularities`` are the trained ones (S, M, L, XL). The
wrapper hands the task a view of the model that is called at one granularity, so the task's own
loss and metrics serve every sub-model:

- ``objective='sum'`` (MatViT's scenic trainer, MatFormer-OLMo): the loss of a step is
  ``sum_i w_i * loss_i`` over every granularity, on the same batch, with the same dropout masks
  (the RNG state is rewound before each granularity, as scenic passes one dropout key to all).
  Weights default to 1 (a sum, not a mean: the effective learning rate is g times a single
  model's). Logged: the summed loss and each granularity's ``<name>/<metric>``.
- ``objective='sample'`` (devvrit/matformer, the NeurIPS text): one granularity per step, drawn
  with probabilities ``weights`` (default uniform); the branches are compiled once into a
  `lax.switch`. The draw comes from the model's RNG state, which the loop reseeds from (seed,
  step), so a resumed run draws the same granularities. Logged: the loss and ``granularity``
  (the index drawn).

Evaluation reports every granularity's metrics as ``<name>/<metric>`` (names S, M, L, XL; g0,
g1, ... for other counts) and, unprefixed, their mean over the granularities (e.g. ``loss``,
for early stopping).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

OBJECTIVES = ("sum", "sample")
_SAMPLE_SALT = 0x4D415446  # separates the granularity draw from the dropout masks of the same key


def granularity_names(count: int) -> tuple[str, ...]:
  return ("S", "M", "L", "XL") if count == 4 else tuple(f"g{i}" for i in range(count))


class AtGranularity:
  """``model`` as a callable that always runs at ``granularity`` (other attributes pass
  through), for tasks that call ``model(inputs, train=...)``."""

  def __init__(self, model: nnx.Module, granularity):
    self.model, self.granularity = model, granularity

  def __call__(self, *args, **kwargs):
    return self.model(*args, granularity=self.granularity, **kwargs)

  def __getattr__(self, name):
    return getattr(self.model, name)


class Nested:
  """Wraps ``task`` (see the module docstring); ``weights``: one per granularity or () for the
  default (1 each for 'sum', uniform for 'sample')."""

  def __init__(self, task, objective: str = "sum", weights: tuple[float, ...] = ()):
    if objective not in OBJECTIVES:
      raise ValueError(f"nested objective must be one of {OBJECTIVES}, got {objective!r}")
    if any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
      raise ValueError(f"nested weights must be >= 0 and not all 0, got {weights}")
    self.task, self.objective, self.weights = task, objective, tuple(weights)
    derived = getattr(task, "derived_metrics", None)
    if derived is not None:  # only tasks that have it offer it (tasks.finalize checks)
      self.derived_metrics = self._derived_metrics

  def model_overrides(self, meta: dict) -> dict:
    return self.task.model_overrides(meta)

  def example_spec(self, config, meta: dict, train: bool) -> dict:
    return self.task.example_spec(config, meta, train)

  def _granularities(self, model) -> tuple:
    granularities = getattr(model, "granularities", None)
    if granularities is None:
      raise ValueError(f"nested training needs a nested model (with granularities, e.g. MatLM "
                       f"or MatViT), got {type(model).__name__}")
    if self.weights and len(self.weights) != len(granularities):
      raise ValueError(f"nested weights need one value per granularity ({len(granularities)}), "
                       f"got {self.weights}")
    return tuple(granularities)

  def loss(self, model, batch):
    granularities = self._granularities(model)
    if self.objective == "sample":
      return self._sampled_loss(model, batch, granularities)
    weights = self.weights or (1.0,) * len(granularities)
    rng_state = nnx.clone(nnx.state(model, nnx.RngState))
    total, logs = 0.0, {}
    for name, granularity, weight in zip(granularity_names(len(granularities)), granularities,
                                         weights):
      nnx.update(model, rng_state)   # the same dropout masks for every granularity
      loss, aux = self.task.loss(AtGranularity(model, granularity), batch)
      total = total + weight * loss
      logs |= {f"{name}/loss": loss} | {f"{name}/{k}": v for k, v in aux.items()}
    return total, logs

  def _sampled_loss(self, model, batch, granularities):
    streams = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)]
    if not streams:
      raise ValueError("sampled-granularity training draws from the model's RNG streams; "
                       f"{type(model).__name__} has none")
    key = jax.random.fold_in(streams[0].key[...], _SAMPLE_SALT)
    count = len(granularities)
    probs = jnp.asarray(self.weights or (1.0,) * count, jnp.float32)
    index = jax.random.choice(key, count, p=probs / probs.sum())
    branches = [lambda m, b, g=g: self.task.loss(AtGranularity(m, g), b) for g in granularities]
    loss, aux = nnx.switch(index, branches, model, batch)
    return loss, {**aux, "granularity": index.astype(jnp.float32)}

  def eval_sums(self, model, batch):
    granularities = self._granularities(model)
    out, mean = {}, {}
    for name, granularity in zip(granularity_names(len(granularities)), granularities):
      for metric, (total, count) in self.task.eval_sums(AtGranularity(model, granularity),
                                                        batch).items():
        out[f"{name}/{metric}"] = (total, count)
        previous = mean.get(metric, (0.0, 0.0))
        mean[metric] = (previous[0] + total, previous[1] + count)
    return out | mean

  def _derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    """The task's derived metrics for the mean and for each granularity's metrics."""
    groups: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
      prefix, _, metric = key.rpartition("/")
      groups.setdefault(prefix, {})[metric] = value
    return {(f"{prefix}/{k}" if prefix else k): v for prefix, group in groups.items()
            for k, v in self.task.derived_metrics(group).items()}
