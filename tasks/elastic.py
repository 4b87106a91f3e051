"""The elastic evaluator (`--config.evaluator=elastic`): a nested (MatFormer) model's every
balanced Mix'n'Match sub-model, the trained granularities S, M, L and XL among them, extracted
(`models.matformer.extract`) and evaluated as a model of its own, with the metric-vs-parameters
table and plot that MatFormer's elastic inference is judged by.

  python eval.py --config configs/matformer.py:matlm_tiny_shakespeare --workdir runs/matlm \
      --split=validation --config.evaluator=elastic
"""
from __future__ import annotations

from typing import Callable

from flax import nnx

import models
from models import matformer
from tasks.nested import granularity_names


def evaluate(model: nnx.Module, evaluate_model: Callable[[nnx.Module], dict], config,
             report: Callable[[str], None] = print) -> dict:
  """{model, metric, rows: [{name, widths, params, metrics...}]}, smallest sub-model first;
  `evaluate_model(sub)` gives a sub-model's metrics with the plain task, `report` a line each."""
  if not isinstance(model, matformer.NestedFFNs):
    raise ValueError(f"config.evaluator='elastic' needs a nested (MatFormer) model, got "
                     f"{config.model.name}")
  names = dict(zip((model.layer_widths(g) for g in model.granularities),
                   granularity_names(len(model.granularities))))
  rows = []
  for widths in matformer.balanced_configs(model):
    sub = matformer.extract(model, widths)
    metrics = evaluate_model(sub)
    rows.append({"name": names.get(widths, "mix'n'match"), "widths": list(widths),
                 "params": models.count_params(sub), **metrics})
    report(f"{rows[-1]['name']:>11} {widths}: {rows[-1]['params']:,} params, " +
           ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
  # The curve's metric: the run's early-stopping one, else accuracy where the task has it.
  metric = config.early_stopping.metric.rpartition("/")[2]
  if metric not in rows[0]:
    metric = "accuracy" if "accuracy" in rows[0] else "loss"
  return {"model": config.model.name, "metric": metric, "rows": rows}


def write(result: dict, stem: str) -> list[str]:
  """The table as <stem>.md and, with matplotlib, the plot as <stem>.png: the paths written."""
  with open(stem + ".md", "w") as f:
    f.write(markdown(result))
  return [stem + ".md", *([stem + ".png"] if plot(result, stem + ".png") else [])]


def markdown(result: dict) -> str:
  """One row per sub-model, smallest first."""
  metrics = [k for k in result["rows"][0] if k not in ("name", "widths", "params")]
  lines = [f"{result['model']} on {result['split']} ({result['checkpoint']})", "",
           "| sub-model | FFN widths per layer | params | " + " | ".join(metrics) + " |",
           "|---|---|---|" + "---|" * len(metrics)]
  for row in result["rows"]:
    widths = ", ".join(map(str, row["widths"]))
    values = " | ".join(f"{row[k]:.4f}" for k in metrics)
    name = f"**{row['name']}**" if row["name"] != "mix'n'match" else row["name"]
    lines.append(f"| {name} | {widths} | {row['params']:,} | {values} |")
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> bool:
  """The metric-vs-parameters curve as a PNG; False (nothing written) without matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
  except ImportError:
    return False
  metric, rows = result["metric"], result["rows"]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["params"] for r in rows], [r[metric] for r in rows], ".-", color="tab:blue",
          label="Mix'n'Match (balanced)")
  named = [r for r in rows if r["name"] != "mix'n'match"]
  ax.plot([r["params"] for r in named], [r[metric] for r in named], "o", color="tab:red",
          label="granularities")
  for r in named:
    ax.annotate(r["name"], (r["params"], r[metric]), textcoords="offset points", xytext=(4, 4))
  ax.set_xlabel("parameters")
  ax.set_ylabel(f"{result['split']} {metric}")
  ax.set_title(result["model"])
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
