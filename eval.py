r"""Evaluates a checkpoint of a run on a split, prints a table and writes it as JSON.

  python eval.py --config configs/itransformer.py:etth1_96 --workdir runs/etth1_96
  python eval.py --config configs/itransformer.py:etth1_96 --workdir runs/etth1_96 \
      --checkpoint=best --split=validation
  python eval.py --config configs/itransformer.py:etth1_96 --workdir runs/etth1 --checkpoint=converted/etth1

--checkpoint is `latest`, `best` (by the config's early-stopping metric), a step number, a path
that models.load_pretrained reads (a zoo params dir, another workdir, an official .pth/.safetensors)
or registered weights `<model>.<tag>`, which are then evaluated with their own preprocessing
(models.resolve_data_config) instead of the config's:

  python eval.py --config configs/maxvit.py:imagenet --workdir runs/maxvit_t \
      --checkpoint=maxvit_tiny_tf_224.in1k --split=validation

--save_pretrained DIR also writes the evaluated weights as a weights directory (model.safetensors,
and config.json with the metrics), which `models.create_model("local-dir:DIR")` reads and which can
be pushed to the Hugging Face hub as it is.
On several processes it takes train.py's --multihost / --coordinator_address, --num_processes,
--process_id: they evaluate the split together and process 0 prints and writes the result.

`--config.evaluator=NAME` runs an evaluator of tasks.EVALUATORS instead of one evaluation of the
model, and writes <workdir>/<NAME>_<split>_<checkpoint>.json with what the evaluator adds (e.g.
'elastic', tasks/elastic.py: every Mix'n'Match sub-model of a MatFormer, a table and a plot):

  python eval.py --config configs/matformer.py:matlm_tiny_shakespeare --workdir runs/matlm \
      --split=validation --config.evaluator=elastic
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags
import orbax.checkpoint as ocp

import data
import models
import ops
import tasks
import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<arg>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (checkpoints/ is read from it).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest | best | <step> | <path>")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_OUTPUT = flags.DEFINE_string("output", "", "JSON path; default <workdir>/eval_<split>_<checkpoint>.json")
_KEEP_FREED_MEMORY = flags.DEFINE_bool("keep_freed_memory", True, "Keep freed host memory mapped "
                                        "(ops.xla_cpu.keep_freed_memory_mapped).")
_SAVE_PRETRAINED = flags.DEFINE_string(
    "save_pretrained", "", "Also write the evaluated weights here (models.save_pretrained).")
train.define_multihost_flags()


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


def load_model(config, workdir: str, which: str, split, task, mesh):
  """The run's model with the weights --checkpoint names; returns (model, where they came from)."""
  (model,) = train.create_model_and_optimizer(config, split.meta, task, mesh)
  if models.pretrained.is_registered_weights(which) or (os.path.exists(which) and not which.isdigit()):
    models.load_pretrained(model, which)
    return model, which
  train.check_resumed_config(config, workdir)  # a model or task the checkpoints do not hold
  with train.make_checkpoint_manager(workdir, config, read_only=True) as mngr:
    step = resolve_step(mngr, which)
    train.restore_model_items(mngr, step, model)
  return model, f"step {step}"


def with_weights_preprocessing(config, which: str):
  """The config, its evaluation preprocessing replaced by that of registered weights: their
  numbers hold for the preprocessing they were evaluated with."""
  if not models.pretrained.is_registered_weights(which):
    return config
  weights = models.resolve_data_config(which)
  config = config.copy_and_resolve_references()
  config.input.image_size = weights["input_size"][1]
  config.input.mean, config.input.std = tuple(weights["mean"]), tuple(weights["std"])
  for key in ("interpolation", "crop_pct", "crop_mode"):
    config.input[key] = weights[key]
  return config


def load_split(config, split_name: str, mesh):
  """The split to evaluate, once the mesh and the evaluation batch are known to fit the processes."""
  train.check_mesh_over_processes(mesh)
  train.check_eval_batch_size(config.input, mesh)
  return train.load_splits(config.data, (split_name,))[split_name]


def evaluate_checkpoint(config, workdir: str, which: str, split_name: str,
                        save_pretrained: str = "") -> dict:
  """Evaluates the weights `which` names on a split, or runs config.evaluator on them;
  `save_pretrained`: also write them there."""
  config = with_weights_preprocessing(config, which)
  evaluator = tasks.get_evaluator(config.evaluator)
  say = print if train.is_main_process() else lambda line: None
  with train.on_mesh(config) as mesh:
    # An evaluator evaluates the models it makes with the plain task (a sub-model is not nested).
    task = tasks.get_task(config.task) if evaluator else tasks.from_config(config)
    split = load_split(config, split_name, mesh)
    model, source = load_model(config, workdir, which, split, task, mesh)

    def evaluate_model(model):
      eval_step = train.make_eval_step(task, nnx.graphdef(model))
      return train.evaluate(task, eval_step, nnx.state(model), split, config.input, mesh)

    if evaluator:
      return {"checkpoint": source, "split": split_name,
              **evaluator.evaluate(model, evaluate_model, config, report=say)}
    metrics = evaluate_model(model)
    say(train.format_table({f"{split_name}/{k}": v for k, v in metrics.items()},
                           title=f"{config.model.name} on {config.data.name}/{split_name} "
                                 f"({source})"))
    if save_pretrained and train.is_main_process():
      metric = ", ".join(f"{config.data.name}/{split_name} {k} {v:.4f}" for k, v in metrics.items())
      say(f"wrote {models.save_pretrained(model, save_pretrained, metric=metric)}")
    return {"checkpoint": source, "split": split_name, **metrics}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # orbax and tfds log every file they touch at INFO, and a read-only checkpoint manager warns
  # that it is read-only: the table and the file written are what an evaluation says.
  logging.set_verbosity(logging.ERROR)
  if _KEEP_FREED_MEMORY.value:
    ops.xla_cpu.keep_freed_memory_mapped()  # XLA:CPU's per-call buffers stay mapped
  try:
    train.initialize_multihost()
    if train.is_main_process():
      check_writable(output_path())  # before evaluating, not after
    result = evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _SPLIT.value,
                                 save_pretrained=_SAVE_PRETRAINED.value)
  except (train.CheckpointError, data.DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if train.is_main_process():  # the others computed the same result
    write_result(result)


def output_path() -> str:
  """--output, or <evaluator or 'eval'>_<split>_<checkpoint>.json in the workdir."""
  tag = os.path.basename(os.path.normpath(_CHECKPOINT.value))
  kind = _CONFIG.value.evaluator or "eval"
  return _OUTPUT.value or os.path.join(_WORKDIR.value, f"{kind}_{_SPLIT.value}_{tag}.json")


def check_writable(path: str) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    raise ValueError(f"cannot write {path}: {e.strerror}; name another file with --output") from None


def write_result(result: dict) -> None:
  """The result as JSON where --output says, beside it what the evaluator writes."""
  output = output_path()
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
  written = [output]
  evaluator = tasks.get_evaluator(_CONFIG.value.evaluator)
  if evaluator:
    written += evaluator.write(result, os.path.splitext(output)[0])
  print(f"wrote {', '.join(written)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=train.parse_flags)
