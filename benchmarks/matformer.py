r"""MatFormer on a CPU: MatLM tiny on tiny Shakespeare (one joint training vs the four sizes trained
independently on the same batches), the elastic Mix'n'Match curve, consistency with the XL model,
speculative decoding with sub-model drafts, and MatViT on Fashion-MNIST.

  python benchmarks/matformer.py --train matlm_sum      # one training (train.py; resumes)
  python benchmarks/matformer.py --part lm               # measures (trains what is missing first)
  python benchmarks/matformer.py --part vit

The trainings are the shared train.py on configs/matformer.py, one workdir each under --root:
  matlm_sum, matlm_sample   matlm_tiny_shakespeare, objective=sum | sample (S, M, L, XL jointly);
  indep_{73,146,292,584}    objective=none, mlp_dim=W: the S, M, L and XL sizes trained on their
                            own, with the same batches (same seed) and the same recipe;
  matvit_sum                matvit_fashion_mnist (S, M, L, XL jointly).
`--lm_steps N` sets every LM run's step count alike (the fair comparison needs the same tokens),
`--vit_steps N` the MatViT run's (the schedule follows; 0: the config's); a run whose
final_metrics.json exists is reused, so pass the same values to the measuring call.

Then, on the checkpoints train.py tested (the best by validation loss for the LMs):
  - validation and test loss of S, M, L, XL: joint (sum, sample) vs independent;
  - the balanced Mix'n'Match sweep of the summed-loss model (eval.py --config.evaluator=elastic, tasks/elastic.py);
  - consistency (the paper's measure): the share of validation positions where a sub-model's
    next-byte argmax equals its own XL's, nested sub-models vs the joint XL and independent
    models vs the independent XL;
  - speculative decoding (greedy, batch 1): each XL verifying S and M drafts of its own kind
    (extracted from the joint model / trained independently), acceptance rate and speed-up over
    plain greedy decoding of the same XL; every output is checked equal to plain greedy.
Results: benchmarks/results/matformer_{tiny_shakespeare,fashion_mnist}.{json,md} and the elastic
tables and plots matformer_*_elastic.{md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# jax and the zoo are imported inside the functions that use them: `--train` only starts train.py
SIZES = {"S": 73, "M": 146, "L": 292, "XL": 584}   # matlm_tiny's granularities (d_ff 584)
LM_RUNS = {"matlm_sum": "matlm_tiny_shakespeare,objective=sum",
           "matlm_sample": "matlm_tiny_shakespeare,objective=sample",
           **{f"indep_{w}": f"matlm_tiny_shakespeare,objective=none,mlp_dim={w}"
              for w in SIZES.values()}}
VIT_RUNS = {"matvit_sum": "matvit_fashion_mnist"}
RUNS = {**LM_RUNS, **VIT_RUNS}   # workdir name -> configs/matformer.py argument
DATASET = {**{name: "tiny_shakespeare" for name in LM_RUNS},
           **{name: "fashion_mnist" for name in VIT_RUNS}}


def run_config(name: str, data_root: str, total_steps: int = 0):
  """The config of run ``name`` as train.py builds it from the command line of `train_run`."""
  from configs import matformer as matformer_config
  config = matformer_config.get_config(RUNS[name])
  config.data.manual_dir = os.path.join(data_root, DATASET[name])
  if total_steps:
    config.total_steps = total_steps
  config.lock()
  return config


def train_run(root: str, name: str, data_root: str, total_steps: int = 0) -> None:
  """Trains (or resumes) run ``name`` with train.py unless its final_metrics.json exists."""
  workdir = os.path.join(root, name)
  if os.path.exists(os.path.join(workdir, "final_metrics.json")):
    return
  command = [sys.executable, os.path.join(REPO, "train.py"),
             f"--config=configs/matformer.py:{RUNS[name]}",
             f"--workdir={workdir}",
             f"--config.data.manual_dir={os.path.join(data_root, DATASET[name])}"]
  if total_steps:
    command.append(f"--config.total_steps={total_steps}")
  subprocess.run(command, cwd=REPO, check=True)


def final_metrics(root: str, name: str) -> dict:
  with open(os.path.join(root, name, "final_metrics.json")) as f:
    return json.load(f)


def training_cost(root: str, name: str) -> dict:
  """What train.py recorded: steps, wall time of its last process (a resumed run's earlier
  processes are not in it) and the median logged training throughput."""
  final = final_metrics(root, name)
  with open(os.path.join(root, name, "metrics.jsonl")) as f:
    rates = [r["perf/steps_per_sec"] for r in map(json.loads, f) if "perf/steps_per_sec" in r]
  return {"steps": final["steps"], "best_step": final["best_step"],
          "wall_time_sec": final["wall_time_sec"],
          "steps_per_sec": statistics.median(rates) if rates else None}


def load_tested(config, root: str, name: str, which: str = "best"):
  """The run's model with the weights of checkpoint ``which`` (eval.py's loading)."""
  import data
  import eval as eval_lib
  import tasks
  import train
  split = data.load(config.data, config.final_eval_splits[0])
  model, _ = eval_lib.load_model(config, os.path.join(root, name), which, split,
                                 tasks.from_config(config), train.make_mesh(config.mesh))
  return model


def elastic_sweep(config, workdir: str, which: str, split: str, stem: str) -> dict:
  """eval.py's elastic evaluator on a run's checkpoint; its table and plot as <stem>.md/.png."""
  import eval as eval_lib
  import tasks
  config = config.copy_and_resolve_references()
  config.evaluator = "elastic"
  result = eval_lib.evaluate_checkpoint(config, workdir, which, split)
  tasks.elastic.write(result, stem)
  return result


def consistency(pairs: dict, batches) -> dict[str, float]:
  """Share of positions (teacher forcing) where a model's next-token argmax equals its
  reference's; ``pairs``: name -> ((model, granularity), (reference, granularity))."""
  import numpy as np
  from flax import nnx
  argmax = nnx.jit(lambda m, t, g: m(t, granularity=g).argmax(-1), static_argnums=2)

  def predictions(model, granularity):
    return np.concatenate([np.asarray(argmax(model, t, granularity)) for t in batches])

  return {name: float((predictions(*model) == predictions(*reference)).mean())
          for name, (model, reference) in pairs.items()}


def time_call(fn, repeats: int = 5) -> float:
  """Median seconds of `fn()` after one call that compiles."""
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def speculative(target, drafts: dict, prompts, new_tokens: int,
                num_drafts=(2, 4)) -> dict:
  """Greedy decoding of ``target`` alone and with each draft: tokens/s (median over prompts of
  the median of 5 timed calls), acceptance rate (mean over prompts) and speed-up."""
  import numpy as np
  import models
  from models.generation import speculative_generate
  greedy = [models.generate(target, p, new_tokens) for p in prompts]
  plain = statistics.median(time_call(lambda p=p: models.generate(target, p, new_tokens))
                            for p in prompts)
  rows = {}
  for name, draft in drafts.items():
    for k in num_drafts:
      rates, times = [], []
      for prompt, expected in zip(prompts, greedy):
        out, stats = speculative_generate(target, draft, prompt, new_tokens, num_draft=k)
        if not np.array_equal(out, expected):
          raise AssertionError(f"speculative decoding with {name} changed the greedy output")
        rates.append(stats["acceptance_rate"])
        times.append(time_call(lambda p=prompt: speculative_generate(
            target, draft, p, new_tokens, num_draft=k)[0]))
      rows[f"{name}, k={k}"] = {"draft_params": models.count_params(draft),
                                "acceptance_rate": statistics.mean(rates),
                                "tokens_per_sec": new_tokens / statistics.median(times),
                                "speedup": plain / statistics.median(times)}
  return {"target_params": models.count_params(target),
          "greedy_tokens_per_sec": new_tokens / plain, "drafts": rows}


def lm_part(root: str, data_root: str, total_steps: int, out_dir: str) -> dict:
  import jax.numpy as jnp
  import numpy as np
  import data
  from models import matformer

  for name in LM_RUNS:
    train_run(root, name, data_root, total_steps)
  result = {"training": {name: training_cost(root, name) for name in LM_RUNS}, "loss": {}}
  for split in ("validation", "test"):
    for objective in ("sum", "sample"):
      joint = final_metrics(root, f"matlm_{objective}")
      result["loss"][f"joint_{objective}/{split}"] = {
          size: joint[f"{split}/{size}/loss"] for size in SIZES}
    result["loss"][f"independent/{split}"] = {
        size: final_metrics(root, f"indep_{w}")[f"{split}/loss"] for size, w in SIZES.items()}

  config = run_config("matlm_sum", data_root, total_steps)
  result["elastic"] = elastic_sweep(config, os.path.join(root, "matlm_sum"), "best", "validation",
                                    os.path.join(out_dir, "matformer_tiny_shakespeare_elastic"))

  joint = load_tested(config, root, "matlm_sum")
  independent = {size: load_tested(run_config(f"indep_{w}", data_root, total_steps), root,
                                   f"indep_{w}") for size, w in SIZES.items()}
  split = data.load(config.data, "validation")
  tokens = split.gather(np.arange(len(split)))["tokens"][:, :-1]
  batches = [jnp.asarray(tokens[i:i + 64]) for i in range(0, len(tokens), 64)]
  result["consistency_with_xl"] = consistency(
      {**{f"joint {s} vs joint XL": ((joint, w), (joint, None))
          for s, w in SIZES.items() if s != "XL"},
       **{f"independent {s} vs independent XL": ((independent[s], None), (independent["XL"], None))
          for s in SIZES if s != "XL"}}, batches)

  # 32 + 96 positions: the context length the models were trained on
  prompt_len, new_tokens = 32, 96
  prompts = [batches[0][i:i + 1, :prompt_len] for i in range(0, 64, 16)]
  result["speculative"] = {
      "new_tokens": new_tokens, "prompts": len(prompts), "prompt_len": prompt_len,
      "joint": speculative(joint, {f"joint {s} (extracted)": matformer.extract(joint, SIZES[s])
                                   for s in ("S", "M")}, prompts, new_tokens),
      "independent": speculative(independent["XL"], {f"independent {s}": independent[s]
                                                     for s in ("S", "M")}, prompts, new_tokens)}
  return result


def lm_markdown(result: dict) -> str:
  params = {r["name"]: r["params"] for r in result["elastic"]["rows"]}
  steps = result["training"]["matlm_sum"]["steps"]
  lines = [f"Validation / test loss (nats per byte), {steps} steps of 16 x 128 bytes each run.", "",
           "| training | " + " | ".join(f"{s} ({params[s] / 1e3:.0f}K) {split}"
                                        for split in ("val", "test") for s in SIZES) + " |",
           "|---|" + "---|" * 2 * len(SIZES)]
  for key, label in (("joint_sum", "MatLM, one joint training (summed loss)"),
                     ("joint_sample", "MatLM, one joint training (sampled granularity)"),
                     ("independent", "4 models trained independently")):
    cells = [f"{result['loss'][f'{key}/{split}'][s]:.4f}" for split in ("validation", "test")
             for s in SIZES]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines += ["", "| run | steps | best step | wall (s) | steps/s |", "|---|---|---|---|---|"]
  lines += [f"| {name} | {t['steps']} | {t['best_step']} | {t['wall_time_sec']:.0f} | "
            f"{t['steps_per_sec']:.2f} |" for name, t in result["training"].items()]
  lines += ["", "| sub-model vs its XL | next-byte argmax agreement (validation) |", "|---|---|"]
  lines += [f"| {k} | {v:.3f} |" for k, v in result["consistency_with_xl"].items()]
  spec = result["speculative"]
  lines += ["", f"Speculative decoding: greedy, batch 1, {spec['new_tokens']} new bytes after "
                f"{spec['prompts']} validation prompts of {spec['prompt_len']} bytes; k = draft "
                "proposals per round.", "",
            "| target | draft, k | draft params | acceptance | tokens/s | speed-up |",
            "|---|---|---|---|---|---|"]
  for kind in ("joint", "independent"):
    target = spec[kind]
    lines.append(f"| {kind} XL ({target['target_params']:,}) | none (greedy) | - | - | "
                 f"{target['greedy_tokens_per_sec']:.0f} | 1.00x |")
    lines += [f"| {kind} XL | {k} | {v['draft_params']:,} | {v['acceptance_rate']:.3f} | "
              f"{v['tokens_per_sec']:.0f} | {v['speedup']:.2f}x |"
              for k, v in target["drafts"].items()]
  return "\n".join(lines) + "\n"


def vit_part(root: str, data_root: str, total_steps: int, out_dir: str) -> dict:
  train_run(root, "matvit_sum", data_root, total_steps)
  # Fashion-MNIST has no validation split: the last checkpoint is the one train.py tested
  config = run_config("matvit_sum", data_root, total_steps)
  elastic = elastic_sweep(config, os.path.join(root, "matvit_sum"), "latest", "test",
                          os.path.join(out_dir, "matformer_fashion_mnist_elastic"))
  return {"training": {**training_cost(root, "matvit_sum"), "batch_size": config.input.batch_size},
          "final": final_metrics(root, "matvit_sum"), "elastic": elastic}


def vit_markdown(result: dict) -> str:
  final, training = result["final"], result["training"]
  params = {r["name"]: r["params"] for r in result["elastic"]["rows"]}
  sizes = [name for name in SIZES if name in params]
  return "\n".join([
      f"Test accuracy of each granularity after one joint training (summed loss), "
      f"{training['steps']} steps of batch {training['batch_size']} ({final['epochs']:.2f} epochs); "
      f"{training['wall_time_sec'] / 60:.1f} min, {training['steps_per_sec']:.2f} steps/s.", "",
      "| | " + " | ".join(f"{s} ({params[s] / 1e3:.0f}K)" for s in sizes) + " |",
      "|---|" + "---|" * len(sizes),
      "| test accuracy | " + " | ".join(f"{100 * final[f'test/{s}/accuracy']:.2f} %"
                                       for s in sizes) + " |",
      "| test loss | " + " | ".join(f"{final[f'test/{s}/loss']:.4f}" for s in sizes) + " |"]) + "\n"


def environment() -> dict:
  import flax
  import jax
  return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "command": shlex.join(["python", *sys.argv]),
          "device": f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores "
                    f"({platform.processor() or platform.machine()})",
          "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version()}


def write_results(result: dict, stem: str, markdown: str) -> None:
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(markdown)
  print(markdown)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", default=os.path.join(REPO, "runs", "matformer"))
  parser.add_argument("--data_root", default=os.path.join(REPO, "..", "shared", "data"))
  parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
  parser.add_argument("--train", choices=RUNS,
                      help="only train (or resume) this run, measure nothing")
  parser.add_argument("--part", choices=("lm", "vit", "all"), default="all")
  parser.add_argument("--lm_steps", type=int, default=0, help="every LM run's steps (0: config)")
  parser.add_argument("--vit_steps", type=int, default=0, help="MatViT's steps (0: config)")
  args = parser.parse_args()
  if args.train:
    steps = args.vit_steps if args.train in VIT_RUNS else args.lm_steps
    train_run(args.root, args.train, args.data_root, steps)
    return 0
  os.makedirs(args.results, exist_ok=True)
  if args.part in ("lm", "all"):
    result = {"environment": environment(),
              **lm_part(args.root, args.data_root, args.lm_steps, args.results)}
    write_results(result, os.path.join(args.results, "matformer_tiny_shakespeare"),
                  lm_markdown(result))
  if args.part in ("vit", "all"):
    result = {"environment": environment(),
              **vit_part(args.root, args.data_root, args.vit_steps, args.results)}
    write_results(result, os.path.join(args.results, "matformer_fashion_mnist"),
                  vit_markdown(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
