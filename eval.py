r"""Evaluates a checkpoint of a run on a split, prints a table and writes it as JSON.

  python eval.py --config configs/itransformer.py:etth1_96 --workdir runs/etth1_96
  python eval.py --config configs/itransformer.py:etth1_96 --workdir runs/etth1_96 \
      --checkpoint=best --split=validation
  python eval.py --config configs/itransformer.py:etth1_96 --workdir /tmp/x --checkpoint=converted/etth1

--checkpoint is `latest`, `best` (by the config's early-stopping metric), a step number, or a path
that models.load_pretrained reads (a zoo params dir, another workdir, an official .pth/.safetensors).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from flax import nnx
from ml_collections import config_flags
import orbax.checkpoint as ocp

import data
import models
import tasks
import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<arg>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (checkpoints/ is read from it).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest | best | <step> | <path>")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON path; default <workdir>/eval_<split>_<checkpoint>.json")


def resolve_step(mngr, which: str) -> int:
  """The step a --checkpoint value names within a run's checkpoint manager."""
  steps = mngr.all_steps()
  if not steps:
    raise ValueError(f"no checkpoint in {mngr.directory}; train first or pass --checkpoint=<path>")
  if which == "latest":
    return mngr.latest_step()
  if which == "best":
    meta = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    best = meta["early_stopping"]["best_step"]
    if best is None:
      raise ValueError("--checkpoint=best needs a run with config.early_stopping.metric set")
    return best
  if which.isdigit() and int(which) in steps:
    return int(which)
  raise ValueError(f"--checkpoint={which!r}: expected latest, best, one of the steps {steps} or an existing path")


def evaluate_checkpoint(config, workdir: str, which: str, split_name: str) -> dict:
  task = tasks.get_task(config.task)
  mesh = train.make_mesh(config.mesh)
  split = data.load(config.data, split_name)
  (model,) = train.create_model_and_optimizer(config, split.meta, task, mesh)
  if os.path.exists(which) and not which.isdigit():
    models.load_pretrained(model, which)
    source = which
  else:
    with train.make_checkpoint_manager(workdir, config, read_only=True) as mngr:
      step = resolve_step(mngr, which)
      train.restore_model_items(mngr, step, model)
    source = f"step {step}"
  eval_step = train.make_eval_step(task, nnx.graphdef(model))
  metrics = train.evaluate(task, eval_step, nnx.state(model), split, config.input, mesh)
  print(train.format_table({f"{split_name}/{k}": v for k, v in metrics.items()},
                           title=f"{config.model.name} on {config.data.name}/{split_name} ({source})"))
  return {"checkpoint": source, "split": split_name, **metrics}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    result = evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _SPLIT.value)
  except (data.DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  tag = os.path.basename(os.path.normpath(_CHECKPOINT.value))
  output = _OUTPUT.value or os.path.join(_WORKDIR.value, f"eval_{_SPLIT.value}_{tag}.json")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {output}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
